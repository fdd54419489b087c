// LoopThread: a private thread running one libuv loop with KJ on it, for hosts that have no
// loop of their own. Other threads run work on it with run(), which blocks until the work (and
// the promise it returns, if any) is done and rethrows its failure as vsup::Error.
//
// Every KJ/capnp object used through a LoopThread must be created and destroyed on it (inside
// run()). The destructor stops the loop, lets every handle close and joins the thread: after it
// returns, the thread is gone.
#pragma once

#include <uv.h>

#include <atomic>
#include <memory>
#include <string>
#include <mutex>
#include <thread>

#include <kj/async.h>
#include <kj/debug.h>

#include "base/check.h"
#include "ipc/user_message.h"
#include "ipc/uv_handle.h"

namespace vsup::supervisor {

class LoopThread {
 public:
  LoopThread();
  ~LoopThread();
  LoopThread(const LoopThread&) = delete;
  LoopThread& operator=(const LoopThread&) = delete;

  uv_loop_t* loop() { return &loop_; }
  bool onLoopThread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Runs `func` on the loop thread and waits for its result (a promise is waited for too).
  // Must not be called from the loop thread itself.
  template <typename Func>
  auto run(Func&& func) {
    VSUP_REQUIRE(!onLoopThread(),
                 "a blocking vsup call was made from vsup's own thread (e.g. inside a callback)");
    try {
      handoff();  // happens-before: everything this thread did, then func on the loop thread
      using Value = typename PromiseValue<kj::PromiseForResult<Func, void>>::Type;
      auto wrapped = [this, f = kj::fwd<Func>(func)]() mutable {
        handoff();
        return kj::Promise<void>(kj::READY_NOW)
            .then(kj::mv(f))
            .then(Handoff{this}, [this](kj::Exception&& e) -> Value {
              handoff();  // the exception (its strings) crosses to the caller too
              kj::throwFatalException(kj::mv(e));
            });
      };
      using Result = decltype(executor_->executeSync(kj::mv(wrapped)));
      if constexpr (std::is_void_v<Result>) {
        executor_->executeSync(kj::mv(wrapped));
        handoff();
      } else {
        Result result = executor_->executeSync(kj::mv(wrapped));
        handoff();
        return result;
      }
    } catch (const kj::Exception& e) {
      handoff();
      throw vsup::Error(ipc::userMessage(e));
    }
  }

 private:
  // The caller and the loop thread hand work over through KJ's cross-thread events, whose
  // synchronisation lives in libkj (futexes ThreadSanitizer cannot see, as Debian's libkj is not
  // instrumented). Locking one std::mutex on both sides of each hand-over makes the same
  // ordering visible to it; it costs two uncontended lock/unlock pairs per run().
  void handoff() { std::lock_guard<std::mutex> lock(handoffMutex_); }
  template <typename P>
  struct PromiseValue;
  template <typename T>
  struct PromiseValue<kj::Promise<T>> {
    using Type = T;
  };
  struct Handoff {
    LoopThread* thread;
    void operator()() const { thread->handoff(); }
    template <typename T>
    T operator()(T&& value) const {
      thread->handoff();
      return kj::fwd<T>(value);
    }
  };

  void main();
  std::mutex handoffMutex_;

  uv_loop_t loop_;
  const kj::Executor* executor_ = nullptr;
  UvHandle<uv_async_t> stop_;  // created and closed on the loop thread
  std::thread thread_;
};

}  // namespace vsup::supervisor
