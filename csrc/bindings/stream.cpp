#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "safegene/errors.h"
#include "safegene/stream.h"

namespace py = pybind11;

namespace safegene {
namespace {

void check_code(DType t, const char* what) {
  if (!dtype_valid(static_cast<int32_t>(t)))
    throw Error(std::string(what) + ": unknown dtype code " + std::to_string(static_cast<int32_t>(t)) +
                "; use safegene._core.DType");
}

StreamPlan make_plan(const std::vector<std::string>& in_paths, const std::vector<uint64_t>& in_sizes,
                     const std::vector<int64_t>& in_mtimes, const std::vector<std::string>& out_paths,
                     const std::vector<StreamJob>& jobs, uint64_t budget, int slots,
                     StatsLevel stats_level = StatsLevel::Full) {
  StreamPlan p;
  bool known = false;
  switch (stats_level) {
    case StatsLevel::None:
    case StatsLevel::Guard:
    case StatsLevel::Full: known = true;
  }
  if (!known) throw Error("stream plan: unknown stats level; use safegene._core.StatsLevel");
  p.stats_level = stats_level;
  p.in_paths = in_paths;
  p.in_sizes = in_sizes;
  p.in_mtimes_ns = in_mtimes;
  p.out_paths = out_paths;
  p.budget_bytes = budget;
  p.slots = slots;
  p.jobs = jobs;
  return p;
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using LowRankT = std::tuple<int64_t, F32Array, F32Array, float>;  // job, A (r x cols), B (rows x r), scale

// Attaches LoRA terms to their jobs. The arrays are kept in `keep` so their memory outlives
// the run (the GIL is released while it reads them).
void attach_lowrank(StreamPlan& p, const std::vector<LowRankT>& terms, std::vector<F32Array>& keep) {
  for (const auto& t : terms) {
    const int64_t j = std::get<0>(t);
    if (j < 0 || static_cast<size_t>(j) >= p.jobs.size())
      throw Error("stream plan: a low-rank term names job " + std::to_string(j) + ", which does not exist");
    const F32Array& a = std::get<1>(t);
    const F32Array& b = std::get<2>(t);
    if (a.ndim() != 2 || b.ndim() != 2 || a.shape(0) != b.shape(1) || a.shape(0) < 1)
      throw Error("stream plan: the low-rank factors of job " + std::to_string(j) +
                  " must be A (rank x cols) and B (rows x rank) with rank >= 1");
    StreamJob& job = p.jobs[j];
    if (job.lowrank.rank != 0) throw Error("stream plan: job " + std::to_string(j) + " has two low-rank terms");
    keep.push_back(a);
    keep.push_back(b);
    job.lowrank.a = a.data();
    job.lowrank.b = b.data();
    job.lowrank.rank = a.shape(0);
    job.lowrank.rows = b.shape(0);
    job.lowrank.cols = a.shape(1);
    job.lowrank.scale = std::get<3>(t);
  }
}

py::dict to_dict(const StreamResult& r) {
  py::dict d;
  d["stats"] = py::cast(r.stats);
  d["bytes_read"] = r.bytes_read;
  d["bytes_written"] = r.bytes_written;
  d["chunk_elems"] = r.chunk_elems;
  d["buffer_bytes"] = r.buffer_bytes;
  return d;
}

std::string term_repr(const StreamInput& t) {
  return "Term(file=" + std::to_string(t.file) + ", offset=" + std::to_string(t.offset) + ", dtype=DType." +
         dtype_name(t.dtype) + ", coeff=" + py::repr(py::float_(t.coeff)).cast<std::string>() + ")";
}

}  // namespace

void register_stream(py::module_& m) {
  py::class_<StreamInput>(m, "Term", "One input of a stream job: coeff * (the tensor at byte offset of input file).")
      .def(py::init([](int32_t file, uint64_t offset, DType dtype, float coeff) {
             check_code(dtype, "Term");
             return StreamInput{file, offset, dtype, coeff};
           }),
           py::arg("file"), py::arg("offset"), py::arg("dtype"), py::arg("coeff") = 1.0f)
      .def_readonly("file", &StreamInput::file, "index into in_paths")
      .def_readonly("offset", &StreamInput::offset, "absolute byte offset in that file")
      .def_readonly("dtype", &StreamInput::dtype)
      .def_readonly("coeff", &StreamInput::coeff)
      .def("__repr__", &term_repr);

  py::class_<StreamJob>(m, "Job", "One output tensor of a stream: out = sum of its terms, at out_offset of out_file.")
      .def(py::init([](int32_t out_file, uint64_t out_offset, DType out_dtype, int64_t numel,
                       const std::vector<StreamInput>& terms) {
             check_code(out_dtype, "Job");
             StreamJob j;
             j.out_file = out_file;
             j.out_offset = out_offset;
             j.out_dtype = out_dtype;
             j.numel = numel;
             j.inputs = terms;
             return j;
           }),
           py::arg("out_file"), py::arg("out_offset"), py::arg("out_dtype"), py::arg("numel"), py::arg("terms"))
      .def_readonly("out_file", &StreamJob::out_file, "index into out_paths")
      .def_readonly("out_offset", &StreamJob::out_offset, "absolute byte offset in that file")
      .def_readonly("out_dtype", &StreamJob::out_dtype)
      .def_readonly("numel", &StreamJob::numel, "elements (bytes for RAW)")
      .def_property_readonly(
          "terms", [](const StreamJob& j) { return j.inputs; }, "the inputs (a copy)")
      .def("__repr__", [](const StreamJob& j) {
        std::string terms;
        for (const auto& t : j.inputs) terms += (terms.empty() ? "" : ", ") + term_repr(t);
        return "Job(out_file=" + std::to_string(j.out_file) + ", out_offset=" + std::to_string(j.out_offset) +
               ", out_dtype=DType." + dtype_name(j.out_dtype) + ", numel=" + std::to_string(j.numel) + ", terms=[" +
               terms + "])";
      });

  m.def(
      "run_stream",
      [](const std::vector<std::string>& in_paths, const std::vector<uint64_t>& in_sizes,
         const std::vector<int64_t>& in_mtimes, const std::vector<std::string>& out_paths,
         const std::vector<StreamJob>& jobs, uint64_t budget, int slots, py::object progress, StatsLevel stats_level,
         const std::vector<LowRankT>& lowrank) {
        StreamPlan plan = make_plan(in_paths, in_sizes, in_mtimes, out_paths, jobs, budget, slots, stats_level);
        std::vector<F32Array> keep;
        attach_lowrank(plan, lowrank, keep);
        std::function<void(uint64_t)> cb = [progress](uint64_t done) {
          py::gil_scoped_acquire gil;
          if (PyErr_CheckSignals() != 0) throw py::error_already_set();
          if (!progress.is_none()) progress(done);
        };
        StreamResult r;
        {
          py::gil_scoped_release nogil;
          r = run_stream(plan, cb);
        }
        return to_dict(r);
      },
      py::arg("in_paths"), py::arg("in_sizes"), py::arg("in_mtimes_ns"), py::arg("out_paths"), py::arg("jobs"),
      py::arg("budget_bytes"), py::arg("slots") = 4, py::arg("progress") = py::none(),
      py::arg("stats_level") = StatsLevel::Full, py::arg("lowrank") = std::vector<LowRankT>{},
      "Run a streaming plan: every Job writes out = sum of coeff * input over its Terms at its output offset.\n"
      "lowrank: [(job, A, B, scale)] merges a LoRA update W + scale * B @ A into term 0 of that job\n"
      "(in term 0's dtype) before the combination.\n"
      "Returns {'stats': [Stats, one per job], 'bytes_read': ..., 'bytes_written': ..., 'chunk_elems': ...,\n"
      "'buffer_bytes': ...}.");
  m.def(
      "run_copy_roofline",
      [](const std::vector<std::string>& in_paths, const std::vector<std::string>& out_paths,
         const std::vector<StreamJob>& jobs, uint64_t budget, int slots) {
        StreamPlan plan = make_plan(in_paths, {}, {}, out_paths, jobs, budget, slots);
        StreamResult r;
        {
          py::gil_scoped_release nogil;
          r = run_copy_roofline(plan);
        }
        return to_dict(r);
      },
      py::arg("in_paths"), py::arg("out_paths"), py::arg("jobs"), py::arg("budget_bytes"), py::arg("slots") = 4,
      "Benchmark baseline: the same reads and writes as run_stream, no arithmetic.");
}

}  // namespace safegene
