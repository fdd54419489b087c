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
  // Started only inside wait(): see there.
  UvHandle<uv_prepare_t> beforePoll_;
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
// peer that went away yields a DISCONNECTED exception, never SIGPIPE. Reads of 0 bytes are EOF
// (so is ECONNRESET: the peer is gone).
//
// Reads are buffered: one recv() per readable event into a buffer (kReadBufferBytes, grown only
// while one read needs more than that in one piece, shrunk back once empty), and every tryRead
// is served from the buffer first, so a burst of Cap'n Proto messages (8-byte header, then the
// body, each its own tryRead) costs one syscall, not two or three. A recv that came back short
// means the socket is drained, so the next read waits for the poll instead of trying again to
// meet an EAGAIN. Bytes reach the caller's buffer only when its read completes: a read that is
// cancelled (its promise dropped) loses nothing, the next read gets the bytes.
// Once reading has begun the poll stays armed for READABLE for the stream's lifetime (a readiness
// wait costs no epoll_ctl), except while the buffer is full with nobody reading (then it is
// re-armed by the next read) and after EOF or a read error (kept and reported to every later
// read once the buffered bytes are consumed). WRITABLE is armed only while a write is blocked.
// The stream carries bytes only: no fds (recv() without control data; the kernel drops any fd
// a peer tries to pass).
// Runs on the loop thread only. No exception leaves a libuv callback.
class UvSocketStream final : public kj::AsyncIoStream {
 public:
  static constexpr size_t kReadBufferBytes = 64 * 1024;

  UvSocketStream(uv_loop_t* loop, OwnFd fd);
  ~UvSocketStream() noexcept(false);

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;

  int fd() const { return fd_.get(); }

  // Counters, for tests and benchmarks: recv() calls made, and those that found nothing
  // (EAGAIN).
  uint64_t recvCalls() const { return recvCalls_; }
  uint64_t recvEagains() const { return recvEagains_; }
  // Bytes received but not yet handed to a reader.
  size_t buffered() const { return rend_ - rbegin_; }
  // The events the poll is armed for now (UV_READABLE | UV_WRITABLE), and how many times the
  // arming changed (each change is an epoll_ctl).
  int armedEvents() const { return armed_; }
  uint64_t pollChanges() const { return pollChanges_; }

 private:
  kj::Promise<size_t> readSome(kj::byte* buffer, size_t minBytes, size_t maxBytes);
  size_t take(kj::byte* buffer, size_t maxBytes);
  void reserve(size_t bytes);
  void fill();
  kj::Promise<void> writeSome(kj::Array<kj::ArrayPtr<const kj::byte>> pieces, size_t first);
  kj::Promise<void> whenReady(int event);
  void rearm();
  static void onPoll(uv_poll_t* handle, int status, int events);

  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
  kj::Own<kj::PromiseFulfiller<void>> readable_;
  kj::Own<kj::PromiseFulfiller<void>> writable_;
  int armed_ = 0;

  // The read buffer: bytes [rbegin_, rend_) of rbuf_ are received and not yet read.
  kj::Array<kj::byte> rbuf_;
  size_t rbegin_ = 0;
  size_t rend_ = 0;
  size_t readMin_ = 0;         // the waiting read's need (buffered bytes that let it complete)
  bool reading_ = false;       // a read was ever issued: READABLE stays armed from then on
  bool mayHaveMore_ = true;    // the last recv filled the buffer: the socket may hold more
  bool eof_ = false;           // recv returned 0 (or ECONNRESET)
  int readErrno_ = 0;          // recv failed with this (reported once the buffer is consumed)
  uint64_t recvCalls_ = 0;
  uint64_t recvEagains_ = 0;
  uint64_t pollChanges_ = 0;
};

// Sleeps until `ms` from now on the uv loop. Dropping the promise cancels the timer.
kj::Promise<void> uvSleep(uv_loop_t* loop, uint64_t ms);

}  // namespace vsup::ipc
