// The bounded-buffer streaming pipeline (see safegene/stream.h).
//
// Three threads and a ring of slots: the reader preads every input range of a chunk into a
// free slot, the computer turns the slot's inputs into the output chunk (splitting it over
// the kernel threads), the writer pwrites the output and frees the slot. The calling thread
// only waits and reports progress. Any failure in any stage aborts all three and is
// re-thrown on the calling thread with the file named.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "safegene/errors.h"
#include "safegene/stream.h"

namespace safegene {
namespace {

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

int64_t mtime_ns(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec;
}

void pread_full(int fd, const std::string& path, char* buf, uint64_t len, uint64_t off) {
  while (len > 0) {
    const ssize_t r = ::pread(fd, buf, std::min<uint64_t>(len, 1ull << 30), static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(path + ": read failed at byte " + std::to_string(off) + ": " + std::strerror(errno));
    }
    if (r == 0)
      throw Error(path + ": unexpected end of file at byte " + std::to_string(off) +
                  " (the file was truncated or replaced while being read; check the input and run again)");
    buf += r;
    len -= static_cast<uint64_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

// Writeback pacing (Linux). A stream that writes gigabytes into the page cache leaves the kernel
// to flush them later; when other writes have already filled the dirty-page budget, every pwrite
// stalls in the kernel's dirty throttling instead. "kick" asks the kernel to start writing each
// chunk as soon as it is written (sync_file_range WRITE: asynchronous); "pace" also waits for the
// chunks written more than a window ago, so this stream never holds more than the window dirty.
// SAFEGENE_WRITEBACK=off|kick|pace[:MiB] chooses; see bench/RESULTS.md for the measurement.
class WritebackPacer {
 public:
  enum class Mode { Off, Kick, Pace };
  WritebackPacer() {
    const char* env = std::getenv("SAFEGENE_WRITEBACK");
    const std::string v = env ? env : "";
    if (v.rfind("kick", 0) == 0) mode_ = Mode::Kick;
    else if (v.rfind("pace", 0) == 0) {
      mode_ = Mode::Pace;
      const auto colon = v.find(':');
      if (colon != std::string::npos) window_ = std::max<uint64_t>(1, std::strtoull(v.c_str() + colon + 1, nullptr, 10)) << 20;
    }
  }
  void written(int fd, uint64_t off, uint64_t len) {
#ifdef __linux__
    if (mode_ == Mode::Off || len == 0) return;
    ::sync_file_range(fd, static_cast<off64_t>(off), static_cast<off64_t>(len), SYNC_FILE_RANGE_WRITE);
    if (mode_ != Mode::Pace) return;
    pending_.push_back({fd, off, len});
    pending_bytes_ += len;
    while (pending_bytes_ > window_ && !pending_.empty()) {
      const Range r = pending_.front();
      pending_.pop_front();
      pending_bytes_ -= r.len;
      ::sync_file_range(r.fd, static_cast<off64_t>(r.off), static_cast<off64_t>(r.len),
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    }
#else
    (void)fd; (void)off; (void)len;
#endif
  }

 private:
  struct Range {
    int fd;
    uint64_t off, len;
  };
  Mode mode_ = Mode::Off;
  uint64_t window_ = uint64_t{256} << 20;
  std::deque<Range> pending_;
  uint64_t pending_bytes_ = 0;
};

void pwrite_full(int fd, const std::string& path, const char* buf, uint64_t len, uint64_t off) {
  while (len > 0) {
    const ssize_t r = ::pwrite(fd, buf, std::min<uint64_t>(len, 1ull << 30), static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(path + ": write failed at byte " + std::to_string(off) + ": " + std::strerror(errno) +
                  " (free disk space or raise the file-size limit, then run again)");
    }
    buf += r;
    len -= static_cast<uint64_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

// A blocking queue whose pop returns false once the pipeline is aborted or closed and empty.
template <class T>
class Queue {
 public:
  explicit Queue(std::atomic<bool>& abort) : abort_(abort) {}
  void push(T v) {
    {
      std::lock_guard<std::mutex> g(m_);
      q_.push_back(std::move(v));
    }
    cv_.notify_one();
  }
  void close() {
    {
      std::lock_guard<std::mutex> g(m_);
      closed_ = true;
    }
    cv_.notify_all();
  }
  void wake() { cv_.notify_all(); }
  bool pop(T& out) {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [&] { return abort_.load() || closed_ || !q_.empty(); });
    if (abort_.load() || q_.empty()) return false;
    out = std::move(q_.front());
    q_.pop_front();
    return true;
  }

 private:
  std::atomic<bool>& abort_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<T> q_;
  bool closed_ = false;
};

struct Task {
  int32_t job;
  int64_t start;
  int64_t n;
};

struct Msg {
  int64_t task;
  int slot;
};

void validate(const StreamPlan& p) {
  if (p.in_sizes.size() && p.in_sizes.size() != p.in_paths.size())
    throw Error("stream plan: in_sizes does not match in_paths");
  if (p.in_mtimes_ns.size() && p.in_mtimes_ns.size() != p.in_paths.size())
    throw Error("stream plan: in_mtimes_ns does not match in_paths");
  if (p.slots < 2 || p.slots > 64) throw Error("stream plan: slots must be in [2, 64]");
  for (size_t j = 0; j < p.jobs.size(); ++j) {
    const StreamJob& job = p.jobs[j];
    if (job.out_file < 0 || static_cast<size_t>(job.out_file) >= p.out_paths.size())
      throw Error("stream plan: job " + std::to_string(j) + " names an output file that does not exist");
    if (job.numel < 0) throw Error("stream plan: job " + std::to_string(j) + " has a negative element count");
    if (job.inputs.empty()) throw Error("stream plan: job " + std::to_string(j) + " has no inputs");
    const bool copy = job.inputs.size() == 1 && job.inputs[0].dtype == job.out_dtype && job.inputs[0].coeff == 1.0f;
    if (!copy && !dtype_is_float(job.out_dtype))
      throw Error("stream plan: job " + std::to_string(j) + " computes into a non-float dtype; only copies are allowed");
    if (job.lowrank.rank != 0) {
      const LowRank& lr = job.lowrank;
      if (lr.rank < 0 || lr.rows <= 0 || lr.cols <= 0 || lr.a == nullptr || lr.b == nullptr)
        throw Error("stream plan: job " + std::to_string(j) + " has an invalid low-rank term");
      if (!dtype_is_float(job.inputs[0].dtype))
        throw Error("stream plan: job " + std::to_string(j) + " adds a low-rank term to a non-float input");
      if (lr.rows > job.numel / lr.cols || lr.rows * lr.cols != job.numel)
        throw Error("stream plan: job " + std::to_string(j) + " has a low-rank term of " + std::to_string(lr.rows) + " x " +
                    std::to_string(lr.cols) + " for " + std::to_string(job.numel) + " elements");
    }
    for (const auto& in : job.inputs) {
      if (!copy && !dtype_is_float(in.dtype))
        throw Error("stream plan: job " + std::to_string(j) + " computes on a non-float input; only copies are allowed");
      if (in.file < 0 || static_cast<size_t>(in.file) >= p.in_paths.size())
        throw Error("stream plan: job " + std::to_string(j) + " names an input file that does not exist");
    }
  }
}

// Every byte range must lie inside the file as it is on disk now (fstat), whatever the plan
// claims, and offset arithmetic must not overflow: a hostile plan can only get an error.
void check_ranges(const StreamPlan& p, const std::vector<uint64_t>& in_actual, const std::vector<uint64_t>& out_actual) {
  constexpr uint64_t kMaxNumel = 1ull << 56;
  for (size_t j = 0; j < p.jobs.size(); ++j) {
    const StreamJob& job = p.jobs[j];
    if (static_cast<uint64_t>(job.numel) > kMaxNumel)
      throw Error("stream plan: job " + std::to_string(j) + " has an implausible element count " + std::to_string(job.numel));
    const uint64_t out_bytes = static_cast<uint64_t>(job.numel) * dtype_size(job.out_dtype);
    if (job.out_offset > out_actual[job.out_file] || out_bytes > out_actual[job.out_file] - job.out_offset)
      throw Error(p.out_paths[job.out_file] + ": output range of job " + std::to_string(j) + " lies past the end of the file");
    for (const auto& in : job.inputs) {
      const uint64_t bytes = static_cast<uint64_t>(job.numel) * dtype_size(in.dtype);
      if (in.offset > in_actual[in.file] || bytes > in_actual[in.file] - in.offset)
        throw Error(p.in_paths[in.file] + ": tensor range of job " + std::to_string(j) +
                    " lies past the end of the file (truncated?); check the input and run again");
    }
  }
}

uint64_t file_size(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) throw Error(path + ": cannot stat: " + std::strerror(errno));
  return static_cast<uint64_t>(st.st_size);
}

void open_inputs(const StreamPlan& p, std::vector<Fd>& fds) {
  for (size_t i = 0; i < p.in_paths.size(); ++i) {
    fds[i].fd = ::open(p.in_paths[i].c_str(), O_RDONLY | O_CLOEXEC);
    if (fds[i].fd < 0) throw Error(p.in_paths[i] + ": cannot open for reading: " + std::strerror(errno));
  }
}

void check_unchanged(const StreamPlan& p, const std::vector<Fd>& fds, const char* when) {
  for (size_t i = 0; i < fds.size(); ++i) {
    struct stat st;
    if (::fstat(fds[i].fd, &st) != 0) throw Error(p.in_paths[i] + ": cannot stat: " + std::strerror(errno));
    const bool size_bad = !p.in_sizes.empty() && p.in_sizes[i] && static_cast<uint64_t>(st.st_size) != p.in_sizes[i];
    const bool mtime_bad = !p.in_mtimes_ns.empty() && p.in_mtimes_ns[i] && mtime_ns(st) != p.in_mtimes_ns[i];
    if (size_bad || mtime_bad)
      throw Error(p.in_paths[i] + ": the file changed " + when + " (size or modification time differs from when " +
                  "its header was read); nothing was written, run again on a stable input");
  }
}

StreamResult run(const StreamPlan& plan, const std::function<void(uint64_t)>& progress, bool compute) {
  validate(plan);
  std::vector<Fd> in_fds(plan.in_paths.size()), out_fds(plan.out_paths.size());
  open_inputs(plan, in_fds);
  check_unchanged(plan, in_fds, "before reading");
  for (size_t i = 0; i < plan.out_paths.size(); ++i) {
    out_fds[i].fd = ::open(plan.out_paths[i].c_str(), O_WRONLY | O_CLOEXEC);
    if (out_fds[i].fd < 0) throw Error(plan.out_paths[i] + ": cannot open for writing: " + std::strerror(errno));
  }
  {
    std::vector<uint64_t> in_actual, out_actual;
    for (size_t i = 0; i < in_fds.size(); ++i) in_actual.push_back(file_size(in_fds[i].fd, plan.in_paths[i]));
    for (size_t i = 0; i < out_fds.size(); ++i) out_actual.push_back(file_size(out_fds[i].fd, plan.out_paths[i]));
    check_ranges(plan, in_actual, out_actual);
  }

  uint64_t per_elem = 4;
  for (const auto& job : plan.jobs) {
    uint64_t b = dtype_size(job.out_dtype);
    for (const auto& in : job.inputs) b += dtype_size(in.dtype);
    per_elem = std::max(per_elem, b);
  }
  const uint64_t slots = static_cast<uint64_t>(plan.slots);
  uint64_t chunk = std::min<uint64_t>(plan.budget_bytes / (slots * per_elem), plan.max_chunk_elems);
  chunk = std::max<uint64_t>(chunk / 4096 * 4096, 4096);

  StreamResult res;
  res.stats.resize(plan.jobs.size());
  res.chunk_elems = chunk;
  std::vector<Task> tasks;
  for (size_t j = 0; j < plan.jobs.size(); ++j)
    for (int64_t s = 0; s < plan.jobs[j].numel; s += static_cast<int64_t>(chunk))
      tasks.push_back({static_cast<int32_t>(j), s, std::min<int64_t>(chunk, plan.jobs[j].numel - s)});

  const uint64_t slot_bytes = chunk * per_elem;
  std::vector<std::unique_ptr<char[]>> ring(std::min<uint64_t>(slots, std::max<size_t>(tasks.size(), 1)));
  for (auto& r : ring) r.reset(new char[slot_bytes]);
  res.buffer_bytes = slot_bytes * ring.size();

  std::atomic<bool> abort{false};
  std::mutex err_m;
  std::exception_ptr err;
  auto fail = [&](std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> g(err_m);
      if (!err) err = e;
    }
    abort.store(true);
  };
  Queue<int> free_q(abort);
  Queue<Msg> read_q(abort), done_q(abort);
  for (int s = 0; s < static_cast<int>(ring.size()); ++s) free_q.push(s);
  std::atomic<uint64_t> bytes_read{0}, bytes_written{0};
  std::atomic<int64_t> tasks_written{0};

  // Where each input and the output of a task live inside its slot.
  auto layout = [&](const StreamJob& job, std::vector<char*>& ins, char*& out, int slot) {
    char* p = ring[slot].get();
    ins.resize(job.inputs.size());
    for (size_t k = 0; k < job.inputs.size(); ++k) {
      ins[k] = p;
      p += chunk * dtype_size(job.inputs[k].dtype);
    }
    out = p;
  };

  std::thread reader([&] {
    try {
      std::vector<char*> ins;
      char* out;
      for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()) && !abort.load(); ++t) {
        int slot;
        if (!free_q.pop(slot)) break;
        const Task& tk = tasks[t];
        const StreamJob& job = plan.jobs[tk.job];
        layout(job, ins, out, slot);
        for (size_t k = 0; k < job.inputs.size(); ++k) {
          const auto& in = job.inputs[k];
          const uint64_t es = dtype_size(in.dtype);
          pread_full(in_fds[in.file].fd, plan.in_paths[in.file], ins[k], tk.n * es, in.offset + tk.start * es);
          bytes_read += tk.n * es;
        }
        read_q.push({t, slot});
      }
    } catch (...) {
      fail(std::current_exception());
    }
    read_q.close();
  });

  // Several compute threads take whole chunks (no thread start-up per chunk). Each chunk's
  // statistics are kept apart and merged in chunk order at the end, so results do not
  // depend on the thread count or on scheduling.
  std::vector<LinStats> task_stats(compute ? tasks.size() : 0);
  const int n_compute = std::max(1, std::min<int>(num_threads(), static_cast<int>(ring.size()) - 1));
  std::atomic<int> computing{n_compute};
  auto compute_loop = [&] {
    try {
      std::vector<char*> ins;
      char* out;
      Msg m;
      std::vector<const void*> ptrs;
      std::vector<DType> in_types;
      std::vector<float> coeffs;
      while (read_q.pop(m)) {
        const Task& tk = tasks[m.task];
        const StreamJob& job = plan.jobs[tk.job];
        layout(job, ins, out, m.slot);
        const bool copy = job.inputs.size() == 1 && job.inputs[0].dtype == job.out_dtype && job.inputs[0].coeff == 1.0f;
        // A LoRA update is merged into input 0 in place, in input 0's dtype (the slot is ours).
        if (compute && job.lowrank.rank > 0)
          add_lowrank_range(ins[0], job.inputs[0].dtype, tk.start, tk.n, job.lowrank);
        if (compute && copy) {
          // Identity jobs (lambda = 0 tensors, integer buffers) keep their exact bytes.
          std::memcpy(out, ins[0], static_cast<size_t>(tk.n) * dtype_size(job.out_dtype));
        } else if (compute) {
          in_types.clear();
          coeffs.clear();
          ptrs.clear();
          for (size_t k = 0; k < job.inputs.size(); ++k) {
            in_types.push_back(job.inputs[k].dtype);
            coeffs.push_back(job.inputs[k].coeff);
            ptrs.push_back(ins[k]);
          }
          lincomb_range(out, job.out_dtype, ptrs, in_types, coeffs, tk.n, &task_stats[m.task], plan.stats_level);
        }
        done_q.push(m);
      }
    } catch (...) {
      fail(std::current_exception());
    }
    if (--computing == 0) done_q.close();
  };
  std::vector<std::thread> computers;
  for (int i = 0; i < n_compute; ++i) computers.emplace_back(compute_loop);

  std::thread writer([&] {
    try {
      WritebackPacer pacer;
      std::vector<char*> ins;
      char* out;
      Msg m;
      while (done_q.pop(m)) {
        const Task& tk = tasks[m.task];
        const StreamJob& job = plan.jobs[tk.job];
        layout(job, ins, out, m.slot);
        const uint64_t es = dtype_size(job.out_dtype);
        pwrite_full(out_fds[job.out_file].fd, plan.out_paths[job.out_file], out, tk.n * es,
                    job.out_offset + tk.start * es);
        pacer.written(out_fds[job.out_file].fd, job.out_offset + tk.start * es, tk.n * es);
        bytes_written += tk.n * es;
        tasks_written += 1;
        free_q.push(m.slot);
      }
    } catch (...) {
      fail(std::current_exception());
    }
    free_q.close();
  });

  // The caller's thread reports progress; a throwing callback (Ctrl-C) aborts the pipeline.
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  while (!abort.load() && tasks_written.load() < n_tasks) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (progress) {
      try {
        progress(bytes_written.load());
      } catch (...) {
        fail(std::current_exception());
      }
    }
  }
  free_q.wake();
  read_q.wake();
  done_q.wake();
  reader.join();
  for (auto& th : computers) th.join();
  writer.join();
  if (err) std::rethrow_exception(err);
  for (size_t t = 0; t < task_stats.size(); ++t) res.stats[tasks[t].job].merge(task_stats[t]);
  check_unchanged(plan, in_fds, "while being read");
  if (progress) progress(bytes_written.load());
  res.bytes_read = bytes_read.load();
  res.bytes_written = bytes_written.load();
  return res;
}

}  // namespace

StreamResult run_stream(const StreamPlan& plan, const std::function<void(uint64_t)>& progress) {
  return run(plan, progress, true);
}

StreamResult run_copy_roofline(const StreamPlan& plan) { return run(plan, nullptr, false); }

}  // namespace safegene
