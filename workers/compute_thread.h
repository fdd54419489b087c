// One thread for a rank's heavy work (weight loading, the model's forward pass), so that the
// process's loop thread stays free to answer its parent (status, shutdown, liveness) while a
// step computes. Results come back as promises on the loop thread.
//
// Threading: construct, call run() and destroy on the loop thread. The destructor waits for the
// running job (if any) to return: make it return first (e.g. WorkerEngine::cancel()).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include <kj/async.h>
#include <kj/debug.h>
#include <kj/function.h>

namespace vsup::workers {

class ComputeThread {
 public:
  ComputeThread();
  ~ComputeThread();
  ComputeThread(const ComputeThread&) = delete;
  ComputeThread& operator=(const ComputeThread&) = delete;

  // Runs `job` on the compute thread, jobs in order. A std::exception it throws rejects the
  // promise with its message.
  template <typename T, typename Func>
  kj::Promise<T> run(Func&& job) {
    if constexpr (std::is_void_v<T>) {
      return runVoid(kj::fwd<Func>(job));
    } else {
      // The value travels through a heap slot; only completion crosses threads (GCC 12 warns
      // about a cross-thread ExceptionOr<T> holding a non-trivial T).
      auto slot = kj::heap<kj::Maybe<T>>();
      kj::Maybe<T>* out = slot.get();
      return runVoid([job = kj::fwd<Func>(job), out]() mutable { *out = job(); })
          .then([slot = kj::mv(slot)]() mutable -> T { return kj::mv(KJ_ASSERT_NONNULL(*slot)); });
    }
  }

 private:
  template <typename Func>
  kj::Promise<void> runVoid(Func&& job) {
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    post([this, job = kj::fwd<Func>(job), fulfiller = kj::mv(paf.fulfiller)]() mutable {
      try {
        job();
        handoff();
        fulfiller->fulfill();
      } catch (const std::exception& e) {
        handoff();
        fulfiller->reject(KJ_EXCEPTION(FAILED, e.what()));
      }
    });
    // The fulfiller's synchronisation is in libkj, invisible to ThreadSanitizer: the mutex
    // makes "the job's writes happen before the loop thread reads them" visible too.
    return paf.promise.then([this]() { handoff(); }, [this](kj::Exception&& e) {
      handoff();
      kj::throwFatalException(kj::mv(e));
    });
  }
  void post(kj::Function<void()> job);
  void handoff() { std::lock_guard<std::mutex> lock(mutex_); }
  void loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<kj::Function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace vsup::workers
