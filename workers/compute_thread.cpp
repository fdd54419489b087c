#include "workers/compute_thread.h"

#include <signal.h>

#include <kj/common.h>

namespace vsup::workers {

ComputeThread::ComputeThread() {
  // The thread must never take the process's signals (the loop thread's signalfd owns them):
  // block everything while it is created, so it inherits a full mask.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  thread_ = std::thread([this]() { loop(); });
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

ComputeThread::~ComputeThread() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    jobs_.clear();  // not started: their promises break (the loop side is going away)
  }
  wake_.notify_one();
  thread_.join();
}

void ComputeThread::post(kj::Function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  wake_.notify_one();
}

void ComputeThread::loop() {
  for (;;) {
    kj::Maybe<kj::Function<void()>> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this]() { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      job = kj::mv(jobs_.front());
      jobs_.pop_front();
    }
    KJ_IF_MAYBE(j, job) { (*j)(); }
  }
}

}  // namespace vsup::workers
