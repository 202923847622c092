#include <pybind11/functional.h>
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
         const std::vector<JobT>& jobs, uint64_t budget, int slots, py::object progress, int stats_level) {
        StreamPlan plan = make_plan(in_paths, in_sizes, in_mtimes, out_paths, jobs, budget, slots, stats_level);
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
      "Run a streaming plan: every job writes out = sum_k c_k * in_k at its output offset.\n"
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
