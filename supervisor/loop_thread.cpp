#include "supervisor/loop_thread.h"

#include <future>

#include "ipc/uv_kj.h"

namespace vsup::supervisor {

LoopThread::LoopThread() {
  std::promise<void> ready;
  auto started = ready.get_future();
  thread_ = std::thread([this, &ready]() {
    uv_loop_init(&loop_);
    {
      ipc::KjOnUv kj(&loop_);
      executor_ = &kj::getCurrentThreadExecutor();
      // A referenced handle keeps uv_run blocking in epoll_wait while there is nothing else;
      // the destructor wakes it to end the loop.
      stop_ = UvHandle<uv_async_t>::make([&](uv_async_t* h) {
        uv_async_init(&loop_, h, [](uv_async_t* async) { uv_stop(async->loop); });
      });
      ready.set_value();
      uv_run(&loop_, UV_RUN_DEFAULT);
      stop_.reset();
    }
    // Every handle closed above gets its close callback here; then the loop is empty.
    uv_run(&loop_, UV_RUN_DEFAULT);
    uv_loop_close(&loop_);
  });
  started.wait();
}

LoopThread::~LoopThread() {
  // The stop handle is only ever touched by the loop thread, except for this send.
  uv_async_send(stop_.get());
  thread_.join();
}

}  // namespace vsup::supervisor
