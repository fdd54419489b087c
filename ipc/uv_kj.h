// KJ (Cap'n Proto's event loop) running on a libuv loop, on one thread.
//
// Contract (docs/architecture.md, "Threads"):
//   * One KjOnUv per thread, created and destroyed on the thread that runs the uv loop. Every
//     capnp/KJ object of that thread lives and dies on it.
//   * Inside uv_run() KJ work is pumped by a uv_idle_t armed only while KJ has queued events, so
//     an idle process sleeps in epoll_wait.
//   * Promise::wait(kj.waitScope()) is allowed only *outside* uv_run (tests, short CLI tools): it
//     drives the uv loop itself, and libuv forbids re-entering uv_run from a callback.
//   * Nothing here touches process-global state (no signals, no SIGPIPE disposition): it is safe
//     inside a host process.
#pragma once

#include <uv.h>

#include <atomic>
#include <kj/async-io.h>
#include <kj/async.h>

#include "base/fd.h"
#include "ipc/uv_handle.h"

namespace vsup::ipc {

class UvEventPort final : public kj::EventPort {
 public:
  explicit UvEventPort(uv_loop_t* loop);
  ~UvEventPort();

  bool wait() override;
  bool poll() override;
  void setRunnable(bool runnable) override;
  void wake() const override;

  void attach(kj::EventLoop* kjLoop, kj::WaitScope* scope) {
    kjLoop_ = kjLoop;
    scope_ = scope;
  }
  uv_loop_t* loop() const { return loop_; }

 private:
  void schedulePump();
  void pump();

  uv_loop_t* loop_;
  kj::EventLoop* kjLoop_ = nullptr;
  kj::WaitScope* scope_ = nullptr;
  bool inPump_ = false;     // inside the uv_idle pump, i.e. inside uv_run
  bool kjDriving_ = false;  // inside wait()/poll(): KJ drives uv_run and runs its own queue
  UvHandle<uv_idle_t> pump_;
  UvHandle<uv_async_t> wakeup_;
  mutable std::atomic<bool> woken_{false};
};

// The per-thread bundle: port, KJ event loop and the wait scope that makes it current.
class KjOnUv {
 public:
  explicit KjOnUv(uv_loop_t* loop);
  ~KjOnUv();
  KjOnUv(const KjOnUv&) = delete;
  KjOnUv& operator=(const KjOnUv&) = delete;

  kj::WaitScope& waitScope() { return scope_; }
  uv_loop_t* loop() const { return port_.loop(); }

 private:
  UvEventPort port_;
  kj::EventLoop kjLoop_;
  kj::WaitScope scope_;
};

// A stream over a connected socket fd, driven by one uv_poll_t. Writes use MSG_NOSIGNAL, so a
// peer that went away yields a DISCONNECTED exception, never SIGPIPE. Reads of 0 bytes are EOF.
// Runs on the loop thread only.
class UvSocketStream final : public kj::AsyncIoStream {
 public:
  UvSocketStream(uv_loop_t* loop, OwnFd fd);
  ~UvSocketStream() noexcept(false);

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;

  int fd() const { return fd_.get(); }

 private:
  kj::Promise<size_t> readSome(kj::byte* buffer, size_t minBytes, size_t maxBytes, size_t done);
  kj::Promise<void> writeSome(kj::Array<kj::ArrayPtr<const kj::byte>> pieces, size_t first);
  kj::Promise<void> whenReady(int event);
  void rearm();
  static void onPoll(uv_poll_t* handle, int status, int events);

  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
  kj::Own<kj::PromiseFulfiller<void>> readable_;
  kj::Own<kj::PromiseFulfiller<void>> writable_;
  int armed_ = 0;
};

// Sleeps until `ms` from now on the uv loop. Dropping the promise cancels the timer.
kj::Promise<void> uvSleep(uv_loop_t* loop, uint64_t ms);

}  // namespace vsup::ipc
