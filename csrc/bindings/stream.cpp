#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "common.h"
#include "safegene/errors.h"
#include "safegene/stream.h"

namespace py = pybind11;

namespace safegene {
namespace {

using InputT = std::tuple<int32_t, uint64_t, int32_t, float>;                 // file, offset, dtype, coeff
using JobT = std::tuple<int32_t, uint64_t, int32_t, int64_t, std::vector<InputT>>;  // out file, offset, dtype, numel, inputs

StreamPlan make_plan(const std::vector<std::string>& in_paths, const std::vector<uint64_t>& in_sizes,
                     const std::vector<int64_t>& in_mtimes, const std::vector<std::string>& out_paths,
                     const std::vector<JobT>& jobs, uint64_t budget, int slots, int stats_level = 2) {
  StreamPlan p;
  if (stats_level < 0 || stats_level > 2) throw Error("stream plan: stats_level must be 0, 1 or 2");
  p.stats_level = static_cast<StatsLevel>(stats_level);
  p.in_paths = in_paths;
  p.in_sizes = in_sizes;
  p.in_mtimes_ns = in_mtimes;
  p.out_paths = out_paths;
  p.budget_bytes = budget;
  p.slots = slots;
  p.jobs.reserve(jobs.size());
  for (const auto& j : jobs) {
    StreamJob job;
    job.out_file = std::get<0>(j);
    job.out_offset = std::get<1>(j);
    if (!dtype_valid(std::get<2>(j))) throw Error("stream plan: unknown output dtype code");
    job.out_dtype = static_cast<DType>(std::get<2>(j));
    job.numel = std::get<3>(j);
    for (const auto& in : std::get<4>(j)) {
      if (!dtype_valid(std::get<2>(in))) throw Error("stream plan: unknown input dtype code");
      job.inputs.push_back({std::get<0>(in), std::get<1>(in), static_cast<DType>(std::get<2>(in)), std::get<3>(in)});
    }
    p.jobs.push_back(std::move(job));
  }
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
  py::list stats;
  for (const auto& s : r.stats)
    stats.append(py::make_tuple(s.out_sq, s.in0_sq, s.in1_sq, s.in01_dot, s.round_sq, s.nonfinite_out, s.nonfinite_in));
  py::dict d;
  d["stats"] = stats;
  d["bytes_read"] = r.bytes_read;
  d["bytes_written"] = r.bytes_written;
  d["chunk_elems"] = r.chunk_elems;
  d["buffer_bytes"] = r.buffer_bytes;
  return d;
}

}  // namespace

void register_stream(py::module_& m) {
  m.def(
      "run_stream",
      [](const std::vector<std::string>& in_paths, const std::vector<uint64_t>& in_sizes,
         const std::vector<int64_t>& in_mtimes, const std::vector<std::string>& out_paths,
         const std::vector<JobT>& jobs, uint64_t budget, int slots, py::object progress, int stats_level,
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
      py::arg("budget_bytes"), py::arg("slots") = 4, py::arg("progress") = py::none(), py::arg("stats_level") = 2,
      py::arg("lowrank") = std::vector<LowRankT>{},
      "Run a streaming plan: every job writes out = sum_k c_k * in_k at its output offset.\n"
      "lowrank: [(job, A, B, scale)] merges a LoRA update W + scale * B @ A into input 0 of that job\n"
      "(in input 0's dtype) before the combination.\n"
      "Returns {'stats': [(out_sq, in0_sq, in1_sq, in01_dot, round_sq, nonfinite_out, nonfinite_in)], ...}.");
  m.def(
      "run_copy_roofline",
      [](const std::vector<std::string>& in_paths, const std::vector<std::string>& out_paths,
         const std::vector<JobT>& jobs, uint64_t budget, int slots) {
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
