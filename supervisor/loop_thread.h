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
#include <thread>

#include <kj/async.h>
#include <kj/debug.h>

#include "ipc/check.h"
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
      return executor_->executeSync(kj::fwd<Func>(func));
    } catch (const kj::Exception& e) {
      throw vsup::Error(std::string(e.getDescription().cStr()));
    }
  }

 private:
  void main();

  uv_loop_t loop_;
  const kj::Executor* executor_ = nullptr;
  UvHandle<uv_async_t> stop_;  // created and closed on the loop thread
  std::thread thread_;
};

}  // namespace vsup::supervisor
