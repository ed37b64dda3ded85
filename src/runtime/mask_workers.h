// A few threads that run one batch of independent jobs at a time for the engine thread: the grammar masks of a
// step's constrained rows, computed while the step's forward runs (docs/engine.md "Sampler").
//
// One caller (the engine thread) at a time: start() hands out jobs 0..n-1, wait() returns once every one has run.
// The waiting thread runs the jobs nobody has taken yet itself, so a batch never takes longer than running it on the
// caller alone would (and with no threads at all, wait() runs the whole batch). Each job index is run exactly once,
// by one thread; the job function must not throw (the engine's catches everything into the job's own result). What a
// job writes is visible to the caller after wait() (both sides go through the mutex).
// The threads start with the first batch, sleep on a condition variable between batches, and are joined by the
// destructor.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ds::runtime {

class MaskWorkers {
 public:
  explicit MaskWorkers(int threads) : nthreads_(threads < 0 ? 0 : threads) {}
  ~MaskWorkers();
  MaskWorkers(const MaskWorkers&) = delete;
  MaskWorkers& operator=(const MaskWorkers&) = delete;

  // Starts jobs fn(0) .. fn(n - 1) on the threads. The previous batch must have been waited for.
  void start(size_t n, std::function<void(size_t)> fn);
  // Runs the jobs not started yet on the calling thread, then waits for the others. No-op without a batch.
  void wait();
  int threads() const { return nthreads_; }

 private:
  void loop();

  const int nthreads_;
  std::vector<std::thread> threads_;  // started by the first start()
  std::mutex mu_;
  std::condition_variable work_, done_;
  std::function<void(size_t)> fn_;  // the batch's job; set by start(), cleared by wait()
  size_t n_ = 0, next_ = 0, finished_ = 0;
  bool stop_ = false;
};

}  // namespace ds::runtime
