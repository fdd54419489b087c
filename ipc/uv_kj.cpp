#include "ipc/uv_kj.h"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstring>
#include <kj/common.h>
#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"

namespace vsup::ipc {

UvEventPort::UvEventPort(uv_loop_t* loop) : loop_(loop) {
  pump_ = UvHandle<uv_idle_t>::make([&](uv_idle_t* h) { uv_idle_init(loop, h); });
  pump_->data = this;
  beforePoll_ = UvHandle<uv_prepare_t>::make([&](uv_prepare_t* h) { uv_prepare_init(loop, h); });
  beforePoll_->data = this;
  wakeup_ = UvHandle<uv_async_t>::make([&](uv_async_t* h) {
    uv_async_init(loop, h, [](uv_async_t* async) {
      // Another thread queued work for KJ (kj::Executor): pump, so that it gets polled.
      auto* self = static_cast<UvEventPort*>(async->data);
      if (self != nullptr) self->schedulePump();
    });
  });
  wakeup_->data = this;
  // The wake-up handle alone must not keep the host's loop alive.
  uv_unref(reinterpret_cast<uv_handle_t*>(wakeup_.get()));
}

UvEventPort::~UvEventPort() = default;

bool UvEventPort::wait() {
  if (inPump_) return woken_.exchange(false);
  // KJ itself is driving uv_run here: it runs its own queue when this returns, so the pump
  // must stay out of the way (KJ forbids poll() from inside its wait()).
  kjDriving_ = true;
  KJ_DEFER(kjDriving_ = false);
  // Blocking wait (outside uv_run): the wake-up handle must count, or uv_run would return at
  // once whenever nothing else is active and KJ would call wait() again in a busy loop.
  // KJ waits only when its queue is empty, so the pump has nothing to do meanwhile; left
  // active, an idle handle makes every UV_RUN_ONCE poll with a zero timeout, and the wait
  // would spin (a blocking kj::Promise::wait() on a supervisor stop burned a core).
  const bool pumpArmed = uv_is_active(reinterpret_cast<uv_handle_t*>(pump_.get())) != 0;
  if (pumpArmed) uv_idle_stop(pump_.get());
  //
  // A callback that libuv runs before it polls (a timer already due, a pending write) may
  // queue KJ work. Inside its wait() KJ does not tell the port so: it last said "runnable"
  // and never took it back, so its setRunnable(true) is a no-op. The prepare handle runs
  // after those callbacks and before libuv picks the poll timeout: if KJ has work by then,
  // the armed pump makes the poll return at once (the pump itself does nothing while KJ
  // drives, and stays armed, which is what KJ believes anyway).
  uv_prepare_start(beforePoll_.get(), [](uv_prepare_t* h) {
    auto* self = static_cast<UvEventPort*>(h->data);
    if (self != nullptr && self->kjLoop_ != nullptr && self->kjLoop_->isRunnable()) {
      self->schedulePump();
    }
  });
  uv_ref(reinterpret_cast<uv_handle_t*>(wakeup_.get()));
  uv_run(loop_, UV_RUN_ONCE);
  uv_unref(reinterpret_cast<uv_handle_t*>(wakeup_.get()));
  uv_prepare_stop(beforePoll_.get());
  if (pumpArmed) schedulePump();
  return woken_.exchange(false);
}

bool UvEventPort::poll() {
  // Inside the pump we are already inside uv_run, which libuv forbids re-entering: the uv
  // events are delivered by the running loop itself.
  if (inPump_) return woken_.exchange(false);
  kjDriving_ = true;
  KJ_DEFER(kjDriving_ = false);
  uv_run(loop_, UV_RUN_NOWAIT);
  return woken_.exchange(false);
}

void UvEventPort::setRunnable(bool runnable) {
  if (runnable) {
    schedulePump();
  } else if (!woken_.load()) {
    uv_idle_stop(pump_.get());
  }
}

void UvEventPort::schedulePump() {
  uv_idle_start(pump_.get(), [](uv_idle_t* h) {
    auto* self = static_cast<UvEventPort*>(h->data);
    if (self != nullptr) self->pump();
  });
}

void UvEventPort::pump() {
  if (kjLoop_ == nullptr || scope_ == nullptr || kjDriving_) return;
  // An exception must never unwind into libuv: KJ routes callback failures into promises,
  // so anything reaching here is a bug worth a loud line, not a crash of the host.
  inPump_ = true;
  try {
    // poll() runs the queue and takes cross-thread work (it asks poll() of this port, which
    // reports wake-ups); run() then tells the port when the queue is empty.
    scope_->poll();
    kjLoop_->run();
  } catch (const std::exception& e) {
    vsup::log().error("[ipc] uncaught exception in event loop: {}", e.what());
  }
  inPump_ = false;
  if (!kjLoop_->isRunnable() && !woken_.load()) uv_idle_stop(pump_.get());
}

void UvEventPort::wake() const {
  woken_.store(true);
  uv_async_send(wakeup_.get());
}

KjOnUv::KjOnUv(uv_loop_t* loop) : port_(loop), kjLoop_(port_), scope_(kjLoop_) {
  port_.attach(&kjLoop_, &scope_);
}

KjOnUv::~KjOnUv() { port_.attach(nullptr, nullptr); }

// ---------------------------------------------------------------------------------------------

UvSocketStream::UvSocketStream(uv_loop_t* loop, OwnFd fd) : fd_(std::move(fd)) {
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) {
    int rc = uv_poll_init_socket(loop, h, fd_.get());
    VSUP_REQUIRE(rc == 0, std::string("uv_poll_init_socket: ") + uv_strerror(rc));
  });
  poll_->data = this;
}

UvSocketStream::~UvSocketStream() noexcept(false) {
  // Close the poll handle (deregistering the fd from epoll) before the fd itself is closed.
  poll_.reset();
}

void UvSocketStream::onPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<UvSocketStream*>(handle->data);
  if (self == nullptr) return;
  // On a poll error wake both directions: the next syscall reports the real error.
  if (status < 0) events = UV_READABLE | UV_WRITABLE;
  if (events & UV_READABLE) {
    // One recv() into the buffer, whether or not a read is waiting (a read issued later, or
    // re-issued after a cancelled one, is then served from the buffer without a syscall).
    self->fill();
    if (self->readable_ && self->readable_->isWaiting() &&
        (self->buffered() >= self->readMin_ || self->eof_ || self->readErrno_ != 0)) {
      auto f = kj::mv(self->readable_);
      f->fulfill();
    }
  }
  if ((events & UV_WRITABLE) && self->writable_) {
    auto f = kj::mv(self->writable_);
    f->fulfill();
  }
  self->rearm();
}

void UvSocketStream::rearm() {
  int want = 0;
  // READABLE stays armed from the first read on; it is dropped only when there is nothing
  // more to learn (EOF, an error) or nowhere to put bytes (the buffer is full and no read
  // waits: a level-triggered poll would otherwise fire on every loop turn).
  if (reading_ && !eof_ && readErrno_ == 0 &&
      ((readable_ && readable_->isWaiting()) || buffered() < rbuf_.size())) {
    want |= UV_READABLE;
  }
  if (writable_ && writable_->isWaiting()) want |= UV_WRITABLE;
  if (want == armed_) return;
  armed_ = want;
  ++pollChanges_;
  if (want == 0) {
    uv_poll_stop(poll_.get());
  } else {
    uv_poll_start(poll_.get(), want, &UvSocketStream::onPoll);
  }
}

kj::Promise<void> UvSocketStream::whenReady(int event) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  (event == UV_READABLE ? readable_ : writable_) = kj::mv(paf.fulfiller);
  rearm();
  return kj::mv(paf.promise);
}

void UvSocketStream::fill() {
  // Called from the poll callback too: nothing here throws (errors are kept in readErrno_).
  if (eof_ || readErrno_ != 0 || rbuf_.size() == 0) return;
  if (rend_ == rbuf_.size() && rbegin_ > 0) {
    memmove(rbuf_.begin(), rbuf_.begin() + rbegin_, rend_ - rbegin_);
    rend_ -= rbegin_;
    rbegin_ = 0;
  }
  size_t space = rbuf_.size() - rend_;
  if (space == 0) return;
  for (;;) {
    ++recvCalls_;
    ssize_t n = ::recv(fd_.get(), rbuf_.begin() + rend_, space, MSG_DONTWAIT);
    if (n > 0) {
      rend_ += size_t(n);
      // A short read took everything the socket held: don't ask again before the poll says
      // there is more (that call would only meet EAGAIN).
      mayHaveMore_ = size_t(n) == space;
      return;
    }
    if (n == 0) {
      eof_ = true;
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      ++recvEagains_;
      mayHaveMore_ = false;
      return;
    }
    if (errno == ECONNRESET) {  // the peer is gone: same as EOF for a reader
      eof_ = true;
      return;
    }
    readErrno_ = errno;
    return;
  }
}

void UvSocketStream::reserve(size_t bytes) {
  if (rbuf_.size() == 0) {
    rbuf_ = kj::heapArray<kj::byte>(std::max(bytes, kReadBufferBytes));
    return;
  }
  if (rbuf_.size() - rbegin_ >= bytes) return;
  size_t have = buffered();
  if (rbuf_.size() >= bytes) {
    memmove(rbuf_.begin(), rbuf_.begin() + rbegin_, have);
  } else {
    // One read needs more than the buffer holds (a large message body): grow for it; take()
    // shrinks the buffer back once it is empty.
    auto bigger = kj::heapArray<kj::byte>(std::max(bytes, 2 * rbuf_.size()));
    memcpy(bigger.begin(), rbuf_.begin() + rbegin_, have);
    rbuf_ = kj::mv(bigger);
  }
  rbegin_ = 0;
  rend_ = have;
}

size_t UvSocketStream::take(kj::byte* buffer, size_t maxBytes) {
  size_t n = std::min(buffered(), maxBytes);
  if (n > 0) memcpy(buffer, rbuf_.begin() + rbegin_, n);
  rbegin_ += n;
  if (rbegin_ == rend_) {
    rbegin_ = rend_ = 0;
    if (rbuf_.size() > kReadBufferBytes) rbuf_ = kj::heapArray<kj::byte>(kReadBufferBytes);
  }
  return n;
}

kj::Promise<size_t> UvSocketStream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  return readSome(static_cast<kj::byte*>(buffer), minBytes, maxBytes);
}

kj::Promise<size_t> UvSocketStream::readSome(kj::byte* buffer, size_t minBytes, size_t maxBytes) {
  // The caller's buffer is written only when the read completes: until then the bytes stay in
  // ours, so a read cancelled while it waits loses nothing.
  reading_ = true;
  for (;;) {
    if (buffered() >= minBytes || eof_) {
      size_t n = take(buffer, maxBytes);
      rearm();  // arms READABLE after the first read, or again once a full buffer has room
      return n;
    }
    if (readErrno_ != 0) KJ_FAIL_SYSCALL("recv", readErrno_);
    reserve(minBytes);
    if (!mayHaveMore_) break;
    fill();
  }
  readMin_ = minBytes;
  return whenReady(UV_READABLE).then([this, buffer, minBytes, maxBytes]() {
    return readSome(buffer, minBytes, maxBytes);
  });
}

kj::Promise<void> UvSocketStream::write(const void* buffer, size_t size) {
  auto pieces = kj::heapArray<kj::ArrayPtr<const kj::byte>>(1);
  pieces[0] = kj::arrayPtr(static_cast<const kj::byte*>(buffer), size);
  return writeSome(kj::mv(pieces), 0);
}

kj::Promise<void> UvSocketStream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return writeSome(kj::heapArray(pieces), 0);
}

kj::Promise<void> UvSocketStream::writeSome(kj::Array<kj::ArrayPtr<const kj::byte>> pieces,
                                            size_t first) {
  // The caller keeps the bytes alive until the promise resolves (kj::AsyncOutputStream
  // contract); we keep only the piece list, advanced in place as bytes go out.
  constexpr size_t kMaxIov = 64;  // well under IOV_MAX; more pieces go in the next sendmsg
  while (first < pieces.size()) {
    iovec iov[kMaxIov];
    size_t count = 0;
    for (size_t i = first; i < pieces.size() && count < kMaxIov; ++i) {
      iov[count++] = {const_cast<kj::byte*>(pieces[i].begin()), pieces[i].size()};
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = count;
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return whenReady(UV_WRITABLE).then([this, pieces = kj::mv(pieces), first]() mutable {
          return writeSome(kj::mv(pieces), first);
        });
      }
      if (errno == EPIPE || errno == ECONNRESET) {
        return KJ_EXCEPTION(DISCONNECTED, "peer disconnected", errno);
      }
      KJ_FAIL_SYSCALL("sendmsg", errno);
    }
    size_t sent = size_t(n);
    while (first < pieces.size() && sent >= pieces[first].size()) {
      sent -= pieces[first].size();
      ++first;
    }
    if (sent > 0) pieces[first] = pieces[first].slice(sent, pieces[first].size());
  }
  return kj::READY_NOW;
}

kj::Promise<void> UvSocketStream::whenWriteDisconnected() { return kj::NEVER_DONE; }

void UvSocketStream::shutdownWrite() { ::shutdown(fd_.get(), SHUT_WR); }

void UvSocketStream::abortRead() { ::shutdown(fd_.get(), SHUT_RD); }

// ---------------------------------------------------------------------------------------------

namespace {

// Owns the timer and the fulfiller; destroyed when the promise is dropped or the timer fires.
struct Sleeper {
  UvHandle<uv_timer_t> timer;
  kj::Own<kj::PromiseFulfiller<void>> fulfiller;
};

}  // namespace

kj::Promise<void> uvSleep(uv_loop_t* loop, uint64_t ms) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto sleeper = kj::heap<Sleeper>();
  sleeper->fulfiller = kj::mv(paf.fulfiller);
  sleeper->timer = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop, t); });
  sleeper->timer->data = sleeper.get();
  // From now, not from the loop's cached time (which may be a whole busy turn old: the sleep
  // would then end early).
  uv_update_time(loop);
  uv_timer_start(
      sleeper->timer.get(),
      [](uv_timer_t* t) {
        auto* s = static_cast<Sleeper*>(t->data);
        if (s != nullptr) s->fulfiller->fulfill();
      },
      ms, 0);
  return paf.promise.attach(kj::mv(sleeper));
}

}  // namespace vsup::ipc
