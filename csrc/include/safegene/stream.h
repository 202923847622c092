// Streaming linear combinations over files: the engine under extract and apply.
//
// A plan is a list of jobs; each job writes one output tensor, out = sum_k c_k * in_k, where
// every input is a byte range of some input file and the output is a byte range of some
// output file whose header the Python layer has already written. Jobs are cut into chunks
// of at most `chunk_elems` elements, so one tensor larger than the budget is fine, and run
// through a bounded ring of `slots` buffers: one thread preads, one computes (splitting the
// chunk over the kernel threads), one pwrites. Peak buffer memory is
// slots * chunk_elems * (sum of input sizes + output size) and is fixed by the budget,
// never by model size.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "safegene/dtype.h"
#include "safegene/kernels.h"

namespace safegene {

struct StreamInput {
  int32_t file;     // index into StreamPlan::in_paths
  uint64_t offset;  // absolute byte offset in that file
  DType dtype;
  float coeff;
};

struct StreamJob {
  int32_t out_file;  // index into StreamPlan::out_paths
  uint64_t out_offset;
  DType out_dtype;
  int64_t numel;
  std::vector<StreamInput> inputs;
  // Optional LoRA update merged into input 0 (in its own dtype) before the combination:
  // out = c_0 * round(in_0 + scale * B @ A) + sum_{k>0} c_k * in_k. rank 0 = none. The
  // factors belong to the caller and must outlive the run.
  LowRank lowrank;
};

struct StreamPlan {
  std::vector<std::string> in_paths;
  std::vector<uint64_t> in_sizes;   // expected file sizes (0 = do not check): detects files changed under us
  std::vector<int64_t> in_mtimes_ns;  // expected mtimes (0 = do not check)
  std::vector<std::string> out_paths;
  std::vector<StreamJob> jobs;
  uint64_t budget_bytes = 128ull << 20;
  int slots = 4;
  StatsLevel stats_level = StatsLevel::Full;
  // Chunks stay small enough that a slot's buffers live in cache between the read, the
  // arithmetic and the write; the budget only caps them.
  uint64_t max_chunk_elems = 1ull << 18;
};

struct StreamResult {
  std::vector<LinStats> stats;  // one per job
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t chunk_elems = 0;
  uint64_t buffer_bytes = 0;  // what the ring actually allocated
};

// progress(bytes_done_of_outputs) is called from the calling thread between waits; it may
// throw to cancel (the bindings use that for KeyboardInterrupt).
StreamResult run_stream(const StreamPlan& plan, const std::function<void(uint64_t)>& progress);

// Baseline for benchmarks: read every input byte range and write every output byte range
// with the same pread/pwrite pattern and no arithmetic (the roofline).
StreamResult run_copy_roofline(const StreamPlan& plan);

}  // namespace safegene
