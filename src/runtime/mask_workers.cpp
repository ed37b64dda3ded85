#include "runtime/mask_workers.h"

#include "core/status.h"

namespace ds::runtime {

MaskWorkers::~MaskWorkers() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  work_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void MaskWorkers::start(size_t n, std::function<void(size_t)> fn) {
  {
    std::lock_guard<std::mutex> l(mu_);
    DS_CHECK(finished_ == n_, "MaskWorkers::start: the previous batch was not waited for");
    fn_ = std::move(fn);
    n_ = n;
    next_ = 0;
    finished_ = 0;
  }
  if (threads_.empty())
    for (int i = 0; i < nthreads_; ++i) threads_.emplace_back([this] { loop(); });
  work_.notify_all();
}

void MaskWorkers::wait() {
  std::unique_lock<std::mutex> l(mu_);
  while (next_ < n_) {  // help: the jobs nobody has taken yet
    const size_t i = next_++;
    l.unlock();
    fn_(i);
    l.lock();
    ++finished_;
  }
  done_.wait(l, [&] { return finished_ == n_; });
  fn_ = nullptr;
  n_ = next_ = finished_ = 0;
}

void MaskWorkers::loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    work_.wait(l, [&] { return stop_ || next_ < n_; });
    if (stop_) return;
    const size_t i = next_++;
    l.unlock();
    fn_(i);  // fn_ is not reassigned before every claimed job has finished (wait())
    l.lock();
    if (++finished_ == n_) done_.notify_all();
  }
}

}  // namespace ds::runtime
