// Tests for ipc/uv_kj.h: KJ pumped by a libuv loop, the socket stream, and uvSleep.
// Every test owns its uv loop (closed at the end: a handle left open fails uv_loop_close) and is
// bounded by a uv timer or a poll() timeout, never by an unbounded wait.
#include "ipc/uv_kj.h"

#include <dirent.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <doctest/doctest.h>
#include <functional>
#include <memory>
#include <kj/debug.h>
#include <kj/vector.h>
#include <string>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "ipc/test_util.h"

namespace {

using vsup::testing::elapsedMs;
using vsup::testing::openFdCount;
using vsup::testing::TestLoop;

using vsup::OwnFd;
using vsup::UvHandle;
using vsup::ipc::KjOnUv;
using vsup::ipc::UvEventPort;
using vsup::ipc::UvSocketStream;
using vsup::ipc::uvSleep;

// CPU time (user + system) of the calling thread, in milliseconds.
double threadCpuMs() {
  rusage ru{};
  ::getrusage(RUSAGE_THREAD, &ru);
  return (double(ru.ru_utime.tv_sec) + double(ru.ru_stime.tv_sec)) * 1e3 +
         (double(ru.ru_utime.tv_usec) + double(ru.ru_stime.tv_usec)) / 1e3;
}

// A one-shot uv timer that calls `fn` on the loop thread.
struct Timer {
  UvHandle<uv_timer_t> handle;
  std::function<void()> fn;
  Timer(uv_loop_t* loop, uint64_t ms, std::function<void()> f) : fn(std::move(f)) {
    handle = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop, t); });
    handle->data = this;
    uv_timer_start(
        handle.get(),
        [](uv_timer_t* t) {
          if (t->data != nullptr) static_cast<Timer*>(t->data)->fn();
        },
        ms, 0);
  }
};

struct SocketPair {
  OwnFd a, b;
  SocketPair() {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    a.reset(sv[0]);
    b.reset(sv[1]);
  }
};

// How a promise settled, waited for at most `ms` on the loop.
struct Outcome {
  enum Kind { Resolved, Failed, TimedOut };
  Kind kind;
  kj::Exception::Type type = kj::Exception::Type::FAILED;
  std::string description;
  explicit Outcome(Kind k) : kind(k) {}
  Outcome(Kind k, kj::Exception::Type t, std::string d) : kind(k), type(t), description(std::move(d)) {}
};

Outcome settle(kj::Promise<void> promise, uv_loop_t* loop, kj::WaitScope& ws, uint64_t ms) {
  return promise
      .then([]() { return Outcome{Outcome::Resolved}; },
            [](kj::Exception&& e) {
              return Outcome{Outcome::Failed, e.getType(), e.getDescription().cStr()};
            })
      .exclusiveJoin(uvSleep(loop, ms).then([]() { return Outcome{Outcome::TimedOut}; }))
      .wait(ws);
}

uint8_t patternByte(size_t i) { return uint8_t((i * 31 + i / 251) % 251); }

std::vector<kj::byte> patternBytes(size_t n) {
  std::vector<kj::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = patternByte(i);
  return v;
}

// Reads exactly `n` bytes from `stream` in chunks of at most `chunk`, each read its own event.
kj::Promise<void> readAll(UvSocketStream& stream, kj::byte* out, size_t n, size_t chunk) {
  if (n == 0) return kj::READY_NOW;
  return stream.tryRead(out, 1, std::min(n, chunk)).then([&stream, out, n, chunk](size_t got) {
    KJ_REQUIRE(got > 0, "unexpected EOF", n);
    return readAll(stream, out + got, n - got, chunk);
  });
}

// Writes all `n` bytes to a blocking fd.
void writeFully(int fd, const void* data, size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    REQUIRE(w > 0);
    p += w;
    n -= size_t(w);
  }
}

// Runs the loop (in turns of at most 1 ms) until `done()` or `ms` have passed; says whether
// `done()` became true.
bool runUntil(uv_loop_t* loop, kj::WaitScope& ws, const std::function<bool()>& done, double ms) {
  auto start = vsup::monoNow();
  while (!done()) {
    if (elapsedMs(start) > ms) return false;
    uvSleep(loop, 1).wait(ws);
  }
  return true;
}

// Bytes queued in a socket's receive buffer (not yet taken by recv).
int queuedBytes(int fd) {
  int n = -1;
  REQUIRE(::ioctl(fd, FIONREAD, &n) == 0);
  return n;
}

// A stream of messages shaped like Cap'n Proto's on the wire: an 8-byte header (segment count
// minus one, then the segment's size in words), then the body. Message i has (i % 7 + 1) words,
// filled with bytes derived from i.
std::vector<kj::byte> capnpShapedMessages(size_t count) {
  std::vector<kj::byte> wire;
  for (size_t i = 0; i < count; ++i) {
    uint32_t header[2] = {0, uint32_t(i % 7 + 1)};
    auto* h = reinterpret_cast<const kj::byte*>(header);
    wire.insert(wire.end(), h, h + sizeof header);
    for (size_t j = 0; j < header[1] * 8; ++j) wire.push_back(kj::byte((i * 13 + j) & 0xff));
  }
  return wire;
}

// Reads `count` messages of capnpShapedMessages() the way capnp does (header, then body, each a
// tryRead with minBytes == maxBytes) and checks every byte.
void readCapnpShapedMessages(UvSocketStream& stream, kj::WaitScope& ws, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    uint32_t header[2] = {99, 99};
    REQUIRE(stream.tryRead(header, 8, 8).wait(ws) == 8);
    REQUIRE(header[0] == 0);
    REQUIRE(header[1] == uint32_t(i % 7 + 1));
    std::vector<kj::byte> body(header[1] * 8);
    REQUIRE(stream.tryRead(body.data(), body.size(), body.size()).wait(ws) == body.size());
    for (size_t j = 0; j < body.size(); ++j) REQUIRE(body[j] == kj::byte((i * 13 + j) & 0xff));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// KjOnUv: the pump.

TEST_CASE("a promise fulfilled from a uv timer callback resolves while uv_run drives the loop") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto paf = kj::newPromiseAndFulfiller<int>();
  int seen = 0;
  auto done = paf.promise.then([&](int v) { seen = v; }).eagerlyEvaluate(nullptr);
  Timer timer(loop.get(), 5, [&] { paf.fulfiller->fulfill(42); });
  // Bounded: the only active handle is the one-shot timer, so uv_run returns once the KJ
  // continuation has run and the pump went idle again.
  uv_run(loop.get(), UV_RUN_DEFAULT);
  CHECK(seen == 42);
}

TEST_CASE("a chain of KJ continuations queued before uv_run is run to the end inside uv_run") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  int steps = 0;
  auto chain = kj::evalLater([&] { ++steps; })
                   .then([&] { return kj::evalLater([&] { ++steps; }); })
                   .then([&] { ++steps; })
                   .eagerlyEvaluate(nullptr);
  CHECK(uv_run(loop.get(), UV_RUN_DEFAULT) == 0);
  CHECK(steps == 3);
}

TEST_CASE("promise.wait drives the uv loop when called outside uv_run") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto paf = kj::newPromiseAndFulfiller<int>();
  Timer timer(loop.get(), 20, [&] { paf.fulfiller->fulfill(7); });
  auto start = vsup::monoNow();
  CHECK(paf.promise.wait(kj.waitScope()) == 7);
  CHECK(elapsedMs(start) >= 19.0);
}

TEST_CASE("an idle KjOnUv does not keep uv_run alive") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  // A promise nobody will fulfil is not a reason to keep the host's loop running.
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto pending = paf.promise.eagerlyEvaluate(nullptr);
  auto start = vsup::monoNow();
  CHECK(uv_run(loop.get(), UV_RUN_DEFAULT) == 0);
  CHECK(elapsedMs(start) < 100.0);
}

TEST_CASE("uv_run sleeps instead of spinning while KJ is idle and a timer is pending") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  // Some KJ work first, so the pump has been armed and disarmed at least once.
  auto warm = kj::evalLater([] {}).eagerlyEvaluate(nullptr);
  uv_run(loop.get(), UV_RUN_NOWAIT);
  bool fired = false;
  Timer timer(loop.get(), 200, [&] { fired = true; });
  auto start = vsup::monoNow();
  double cpu0 = threadCpuMs();
  uv_run(loop.get(), UV_RUN_DEFAULT);
  double cpu = threadCpuMs() - cpu0;
  double wall = elapsedMs(start);
  CHECK(fired);
  CHECK(wall >= 190.0);
  CHECK_MESSAGE(cpu < 50.0, "uv_run burnt ", cpu, " ms of CPU in ", wall, " ms");
}

// ---------------------------------------------------------------------------------------------
// Waking from another thread.

TEST_CASE("UvEventPort::wait returns true after wake() from another thread") {
  TestLoop loop;
  bool woke = false;
  {
    UvEventPort port(loop.get());
    std::thread waker([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      port.wake();
    });
    auto deadline = vsup::deadlineAfterMs(2000);
    while (!woke && vsup::monoNow() < deadline) woke = port.wait();
    waker.join();
  }
  CHECK(woke);
}

TEST_CASE("a blocking wait for a cross-thread event is ended by the other thread") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  auto paf = kj::newPromiseAndFulfiller<int>();
  std::thread other([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    executor.executeSync([&] { paf.fulfiller->fulfill(5); });
  });
  int value = paf.promise.wait(kj.waitScope());
  other.join();
  CHECK(value == 5);
}

TEST_CASE("a blocking wait for a cross-thread event sleeps instead of spinning") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  auto paf = kj::newPromiseAndFulfiller<void>();
  std::thread other([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    executor.executeSync([&] { paf.fulfiller->fulfill(); });
  });
  auto start = vsup::monoNow();
  double cpu0 = threadCpuMs();
  paf.promise.wait(kj.waitScope());
  double cpu = threadCpuMs() - cpu0;
  double wall = elapsedMs(start);
  other.join();
  CHECK(wall >= 190.0);
  CHECK_MESSAGE(cpu < 50.0, "wait() burnt ", cpu, " ms of CPU in ", wall, " ms");
}

TEST_CASE("a blocking wait after a cross-thread wake-up sleeps instead of spinning") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  // A cross-thread call lands first: its wake-up arms the pump, which only uv_run's own idle
  // phase would disarm. Then a blocking wait for a timer 200 ms away: the armed pump must not
  // turn each of its uv_run turns into a zero-timeout poll.
  std::atomic<bool> ran{false};
  std::thread other([&] { executor.executeSync([&] { ran = true; }); });
  while (!ran) kj.waitScope().poll();
  other.join();
  auto paf = kj::newPromiseAndFulfiller<void>();
  Timer timer(loop.get(), 200, [&] { paf.fulfiller->fulfill(); });
  auto start = vsup::monoNow();
  double cpu0 = threadCpuMs();
  paf.promise.wait(kj.waitScope());
  double cpu = threadCpuMs() - cpu0;
  double wall = elapsedMs(start);
  CHECK(wall >= 190.0);
  CHECK_MESSAGE(cpu < 50.0, "wait() burnt ", cpu, " ms of CPU in ", wall, " ms");
}

TEST_CASE("a cross-thread call reaches KJ while the host's uv_run is running") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  std::atomic<bool> ran{false};
  bool timedOut = false;
  // Keeps the host loop alive at most 1 s; stopped early once the call has run.
  Timer guard(loop.get(), 1000, [&] { timedOut = true; });
  std::thread other([&] {
    executor.executeSync([&] {
      ran = true;
      uv_timer_stop(guard.handle.get());
    });
  });
  uv_run(loop.get(), UV_RUN_DEFAULT);
  CHECK_MESSAGE(ran.load(), "executeSync from another thread did not run during uv_run");
  CHECK_FALSE(timedOut);
  // If it did not run inside uv_run, let it run now so the other thread can finish.
  for (int i = 0; i < 100 && !ran; ++i) {
    kj.waitScope().poll();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  other.join();
}

// ---------------------------------------------------------------------------------------------
// UvSocketStream.

TEST_CASE("UvSocketStream carries bytes both ways over a socketpair") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  UvSocketStream b(loop.get(), std::move(sp.b));
  auto& ws = kj.waitScope();

  a.write("hello", 5).wait(ws);
  char buf[16] = {};
  CHECK(b.tryRead(buf, 5, sizeof buf).wait(ws) == 5);
  CHECK(std::string(buf, 5) == "hello");

  // The read is issued first, so it has to wait for READABLE.
  auto reply = b.write("world!", 6);
  char buf2[16] = {};
  auto read = a.tryRead(buf2, 6, sizeof buf2);
  reply.wait(ws);
  CHECK(read.wait(ws) == 6);
  CHECK(std::string(buf2, 6) == "world!");
}

TEST_CASE("a read issued before the data arrives completes when it arrives") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  SocketPair sp;
  int peer = sp.b.get();
  UvSocketStream a(loop.get(), std::move(sp.a));
  char buf[8] = {};
  auto read = a.tryRead(buf, 4, sizeof buf);
  Timer timer(loop.get(), 20, [&] { REQUIRE(::write(peer, "ab", 2) == 2); });
  Timer timer2(loop.get(), 40, [&] { REQUIRE(::write(peer, "cd", 2) == 2); });
  CHECK(read.wait(kj.waitScope()) == 4);
  CHECK(std::string(buf, 4) == "abcd");
}

TEST_CASE("an 8 MiB write completes through a small socket buffer and a slow reader") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  int small = 16 * 1024;
  REQUIRE(::setsockopt(sp.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
  REQUIRE(::setsockopt(sp.b.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small) == 0);
  UvSocketStream writer(loop.get(), std::move(sp.a));
  UvSocketStream reader(loop.get(), std::move(sp.b));

  const size_t total = 8u << 20;
  auto data = patternBytes(total);
  std::vector<kj::byte> got(total);
  auto writeDone = writer.write(data.data(), data.size());
  // The reader starts only after a pause, so the writer must hit EAGAIN and resume.
  auto readDone = uvSleep(loop.get(), 30).then(
      [&] { return readAll(reader, got.data(), total, 48 * 1024); });
  CHECK(settle(kj::mv(writeDone), loop.get(), ws, 20000).kind == Outcome::Resolved);
  CHECK(settle(kj::mv(readDone), loop.get(), ws, 20000).kind == Outcome::Resolved);
  CHECK(got == data);
}

TEST_CASE("a gathered write of several pieces arrives in order when sent in partial chunks") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream writer(loop.get(), std::move(sp.a));
  UvSocketStream reader(loop.get(), std::move(sp.b));

  const size_t total = (3u << 20) + 17 + 1 + (5u << 20);
  auto data = patternBytes(total);
  size_t cuts[] = {0, (3u << 20) + 1, (3u << 20) + 18, (3u << 20) + 19, total};
  kj::ArrayPtr<const kj::byte> pieces[4];
  for (int i = 0; i < 4; ++i) pieces[i] = kj::arrayPtr(data.data() + cuts[i], cuts[i + 1] - cuts[i]);
  std::vector<kj::byte> got(total);
  auto writeDone = writer.write(kj::arrayPtr(pieces, 4));
  auto readDone = readAll(reader, got.data(), total, 100 * 1000);
  CHECK(settle(kj::mv(writeDone), loop.get(), ws, 20000).kind == Outcome::Resolved);
  CHECK(settle(kj::mv(readDone), loop.get(), ws, 20000).kind == Outcome::Resolved);
  CHECK(got == data);
}

TEST_CASE("both directions of one stream can be pending at once (full duplex, 4 MiB each way)") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  UvSocketStream b(loop.get(), std::move(sp.b));
  const size_t total = 4u << 20;
  auto data = patternBytes(total);
  std::vector<kj::byte> gotA(total), gotB(total);
  auto all = kj::joinPromises(kj::arr(a.write(data.data(), total), b.write(data.data(), total),
                                      readAll(a, gotA.data(), total, 64 * 1024),
                                      readAll(b, gotB.data(), total, 64 * 1024)));
  CHECK(settle(kj::mv(all), loop.get(), ws, 20000).kind == Outcome::Resolved);
  CHECK(gotA == data);
  CHECK(gotB == data);
}

TEST_CASE("tryRead returns 0 at EOF and the bytes it had before EOF") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  REQUIRE(::write(sp.b.get(), "xyz", 3) == 3);
  sp.b.reset();
  char buf[16];
  CHECK(a.tryRead(buf, 10, sizeof buf).wait(ws) == 3);
  CHECK(a.tryRead(buf, 1, sizeof buf).wait(ws) == 0);
}

TEST_CASE("a pending read sees EOF when the peer closes later") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  char buf[16];
  auto read = a.tryRead(buf, 1, sizeof buf);
  Timer closer(loop.get(), 20, [&] { sp.b.reset(); });
  CHECK(read.wait(kj.waitScope()) == 0);
}

TEST_CASE("writing after the peer closed fails with DISCONNECTED and raises no SIGPIPE") {
  struct sigaction before {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &before) == 0);
  bool defaultBefore = before.sa_handler == SIG_DFL;
  REQUIRE(defaultBefore);  // otherwise this test would prove nothing
  TestLoop loop;
  KjOnUv kj(loop.get());
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  sp.b.reset();
  // SIG_DFL for SIGPIPE terminates the process: reaching the checks below is the proof.
  Outcome o = settle(a.write("data", 4), loop.get(), kj.waitScope(), 1000);
  CHECK(o.kind == Outcome::Failed);
  CHECK(o.type == kj::Exception::Type::DISCONNECTED);
  // A second write on the same dead socket fails the same way.
  Outcome o2 = settle(a.write("more", 4), loop.get(), kj.waitScope(), 1000);
  CHECK(o2.type == kj::Exception::Type::DISCONNECTED);
  struct sigaction after {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &after) == 0);
  bool defaultAfter = after.sa_handler == SIG_DFL;
  CHECK(defaultAfter);
  sigset_t pending;
  sigemptyset(&pending);
  REQUIRE(::sigpending(&pending) == 0);
  CHECK_FALSE(sigismember(&pending, SIGPIPE));
}

TEST_CASE("a write blocked on a full buffer fails with DISCONNECTED when the peer goes away") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  auto data = patternBytes(4u << 20);
  auto write = a.write(data.data(), data.size());
  Timer closer(loop.get(), 30, [&] { sp.b.reset(); });
  Outcome o = settle(kj::mv(write), loop.get(), kj.waitScope(), 2000);
  CHECK(o.kind == Outcome::Failed);
  CHECK(o.type == kj::Exception::Type::DISCONNECTED);
}

TEST_CASE("destroying a stream with a read pending does not crash, in either order") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SUBCASE("stream first, then the promise") {
    SocketPair sp;
    auto stream = kj::heap<UvSocketStream>(loop.get(), std::move(sp.a));
    char buf[8];
    auto read = stream->tryRead(buf, 1, sizeof buf);
    ws.poll();  // the poll handle is now armed for READABLE
    stream = nullptr;
    // Its fd is closed now: the peer's write fails (EPIPE, not SIGPIPE, thanks to the flag).
    CHECK(::send(sp.b.get(), "late", 4, MSG_NOSIGNAL) == -1);
    Outcome o = settle(read.ignoreResult(), loop.get(), ws, 200);
    CHECK(o.kind == Outcome::Failed);
  }
  SUBCASE("the promise first, then the stream") {
    SocketPair sp;
    auto stream = kj::heap<UvSocketStream>(loop.get(), std::move(sp.a));
    char buf[8];
    {
      auto read = stream->tryRead(buf, 1, sizeof buf);
      ws.poll();
    }
    REQUIRE(::send(sp.b.get(), "late", 4, MSG_NOSIGNAL) == 4);
    uv_run(loop.get(), UV_RUN_NOWAIT);
    stream = nullptr;
  }
  uv_run(loop.get(), UV_RUN_NOWAIT);
}

TEST_CASE("a cancelled read leaves the data for the next read") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  char buf[8] = {};
  {
    auto dropped = a.tryRead(buf, 1, sizeof buf);
    ws.poll();
  }
  REQUIRE(::write(sp.b.get(), "next", 4) == 4);
  CHECK(settle(a.tryRead(buf, 4, sizeof buf).ignoreResult(), loop.get(), ws, 1000).kind ==
        Outcome::Resolved);
  CHECK(std::string(buf, 4) == "next");
}

// ---------------------------------------------------------------------------------------------
// UvSocketStream: the read buffer and the poll that stays armed.

TEST_CASE("a burst of whole messages costs one recv: every header and body comes from the buffer") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  auto wire = capnpShapedMessages(100);
  REQUIRE(wire.size() < UvSocketStream::kReadBufferBytes);
  writeFully(sp.a.get(), wire.data(), wire.size());
  readCapnpShapedMessages(reader, ws, 100);
  CHECK(reader.recvCalls() == 1);
  CHECK(reader.recvEagains() == 0);
  CHECK(reader.buffered() == 0);
  // The buffer is empty and the last recv was short: the next read waits for the poll instead
  // of asking the socket again just to meet an EAGAIN.
  uint32_t header[2] = {};
  auto next = reader.tryRead(header, 8, 8);
  Timer later(loop.get(), 10, [&] { writeFully(sp.a.get(), wire.data(), 8); });
  CHECK(next.wait(ws) == 8);
  CHECK(reader.recvCalls() == 2);
  CHECK(reader.recvEagains() == 0);
}

TEST_CASE("reads that wait cost no poll re-arming: READABLE stays armed across round trips") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream a(loop.get(), std::move(sp.a));
  UvSocketStream b(loop.get(), std::move(sp.b));
  for (int i = 0; i < 200; ++i) {
    char got[4] = {};
    auto atB = b.tryRead(got, 4, 4);  // issued first: it waits for READABLE
    a.write("ping", 4).wait(ws);
    REQUIRE(atB.wait(ws) == 4);
    REQUIRE(std::string(got, 4) == "ping");
    auto atA = a.tryRead(got, 4, 4);
    b.write("pong", 4).wait(ws);
    REQUIRE(atA.wait(ws) == 4);
    REQUIRE(std::string(got, 4) == "pong");
  }
  // Armed once, at the first read; never stopped and restarted per wait.
  CHECK(a.pollChanges() == 1);
  CHECK(b.pollChanges() == 1);
  CHECK(a.armedEvents() == UV_READABLE);
  CHECK(b.armedEvents() == UV_READABLE);
  // One recv per message, no EAGAIN but the very first read's (nothing had been sent yet).
  CHECK(b.recvCalls() == 201);
  CHECK(b.recvEagains() == 1);
}

TEST_CASE("a message that arrives a byte at a time is assembled into one read") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  int peer = sp.a.get();
  UvSocketStream reader(loop.get(), std::move(sp.b));
  auto wire = capnpShapedMessages(3);  // 8 + 8, 8 + 16, 8 + 24 bytes
  size_t sent = 0;
  // A repeating 1 ms timer writes the next byte.
  auto tick = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop.get(), t); });
  std::function<void()> writeOne = [&] {
    if (sent < wire.size()) writeFully(peer, &wire[sent++], 1);
    if (sent == wire.size()) uv_timer_stop(tick.get());
  };
  tick->data = &writeOne;
  uv_timer_start(
      tick.get(), [](uv_timer_t* t) { (*static_cast<std::function<void()>*>(t->data))(); }, 1,
      1);
  readCapnpShapedMessages(reader, ws, 3);
  CHECK(sent == wire.size());
  CHECK(reader.recvCalls() >= 10);  // it really came in pieces
  CHECK(reader.buffered() == 0);
}

TEST_CASE("a read larger than the buffer gets every byte, and the buffer shrinks back after") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  const size_t total = (3u << 20) + 8 + 5;
  auto data = patternBytes(total);
  // A blocking writer in small pieces, so the body arrives over many readable events.
  std::thread writer([&, fd = sp.a.get()] {
    for (size_t off = 0; off < total; off += 4093) {
      writeFully(fd, data.data() + off, std::min<size_t>(4093, total - off));
    }
  });
  std::vector<kj::byte> got(total);
  auto header = reader.tryRead(got.data(), 8, 8);
  auto all = header.then([&](size_t n) {
    KJ_REQUIRE(n == 8);
    return reader.tryRead(got.data() + 8, 3u << 20, 3u << 20);
  }).then([&](size_t n) {
    KJ_REQUIRE(n == 3u << 20);
    return reader.tryRead(got.data() + 8 + (3u << 20), 5, 5);
  }).then([&](size_t n) { KJ_REQUIRE(n == 5); });
  Outcome o = settle(kj::mv(all), loop.get(), ws, 20000);
  writer.join();
  CHECK(o.kind == Outcome::Resolved);
  CHECK(o.description == "");
  CHECK(got == data);
  CHECK(reader.buffered() == 0);
  // Small messages still work once the big buffer is gone.
  writeFully(sp.a.get(), "tail!", 5);
  char tail[5];
  CHECK(reader.tryRead(tail, 5, 5).wait(ws) == 5);
  CHECK(std::string(tail, 5) == "tail!");
}

TEST_CASE("EOF in the middle of a message: the read returns the bytes before it, then 0") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  auto wire = capnpShapedMessages(3);  // message 2: 8-byte header, 24-byte body
  const size_t second = 8 + 8 + 8 + 16;
  // Two whole messages, then the third's header and 5 of its 24 body bytes, then EOF.
  SUBCASE("the EOF is already there when the read is issued") {
    writeFully(sp.a.get(), wire.data(), second + 8 + 5);
    sp.a.reset();
    readCapnpShapedMessages(reader, ws, 2);
  }
  std::unique_ptr<Timer> part, close;  // outlive the subcase: the close comes after its reads
  SUBCASE("the EOF arrives while the read waits") {
    part = std::make_unique<Timer>(
        loop.get(), 5, [&] { writeFully(sp.a.get(), wire.data(), second + 8 + 5); });
    close = std::make_unique<Timer>(loop.get(), 15, [&] { sp.a.reset(); });
    readCapnpShapedMessages(reader, ws, 2);
  }
  uint32_t header[2] = {};
  CHECK(reader.tryRead(header, 8, 8).wait(ws) == 8);
  CHECK(header[1] == 3);
  kj::byte body[24] = {};
  CHECK(reader.tryRead(body, 24, 24).wait(ws) == 5);
  for (size_t j = 0; j < 5; ++j) CHECK(body[j] == kj::byte((2 * 13 + j) & 0xff));
  CHECK(reader.tryRead(body, 1, 24).wait(ws) == 0);
  CHECK(reader.tryRead(body, 1, 24).wait(ws) == 0);
  // Nothing left to wait for: the poll is no longer armed (a level-triggered EOF would
  // otherwise wake the loop on every turn).
  CHECK(reader.armedEvents() == 0);
}

TEST_CASE("a read cancelled after part of its bytes arrived loses none of them") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  int peer = sp.a.get();
  UvSocketStream reader(loop.get(), std::move(sp.b));
  char dropped[10] = {};
  {
    auto pending = reader.tryRead(dropped, 10, 10);
    writeFully(peer, "0123", 4);
    // Until the socket has handed those 4 bytes to the stream.
    REQUIRE(runUntil(loop.get(), ws, [&] { return queuedBytes(reader.fd()) == 0; }, 2000));
  }  // cancelled with 4 of its 10 bytes received
  writeFully(peer, "456789", 6);
  char got[10] = {};
  Outcome o = settle(reader.tryRead(got, 10, 10).then([](size_t n) { KJ_REQUIRE(n == 10, n); }),
                     loop.get(), ws, 2000);
  CHECK(o.kind == Outcome::Resolved);
  CHECK(std::string(got, 10) == "0123456789");
}

TEST_CASE("with nobody reading, the stream buffers up to its capacity, then stops polling") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  const size_t total = 3 * UvSocketStream::kReadBufferBytes + 7;
  auto data = patternBytes(total);
  std::thread writer([&, fd = sp.a.get()] { writeFully(fd, data.data(), total); });
  std::vector<kj::byte> got(total);
  REQUIRE(reader.tryRead(got.data(), 1, 1).wait(ws) == 1);  // reading has begun
  // No read is pending: the poll keeps filling the buffer until it is full, then lets go of
  // READABLE (a level-triggered poll left armed would spin).
  REQUIRE(runUntil(
      loop.get(), ws,
      [&] { return reader.buffered() == UvSocketStream::kReadBufferBytes; }, 5000));
  CHECK(reader.armedEvents() == 0);
  // Reading resumes it, and every byte arrives in order.
  auto rest = readAll(reader, got.data() + 1, total - 1, 10000);
  Outcome o = settle(kj::mv(rest), loop.get(), ws, 20000);
  writer.join();
  CHECK(o.kind == Outcome::Resolved);
  CHECK(got == data);
  CHECK(reader.armedEvents() == UV_READABLE);
}

TEST_CASE("an fd passed by a peer (SCM_RIGHTS) is dropped, not leaked, and the bytes stay in order") {
  // The stream carries bytes only; a peer that passes an fd anyway must not plant it in us.
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  int before = openFdCount();
  int pipefd[2];
  REQUIRE(::pipe2(pipefd, O_CLOEXEC) == 0);
  {
    char bytes[3] = {'a', 'b', 'c'};
    iovec iov{bytes, sizeof bytes};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pipefd[0], sizeof(int));
    REQUIRE(::sendmsg(sp.a.get(), &msg, 0) == 3);
  }
  ::close(pipefd[0]);
  ::close(pipefd[1]);
  writeFully(sp.a.get(), "def", 3);
  char got[6] = {};
  REQUIRE(readAll(reader, reinterpret_cast<kj::byte*>(got), 6, 6)
              .then([] { return true; })
              .exclusiveJoin(uvSleep(loop.get(), 2000).then([] { return false; }))
              .wait(ws));
  CHECK(std::string(got, 6) == "abcdef");
  CHECK(openFdCount() == before);
}

TEST_CASE("after abortRead a pending read ends with 0 bytes instead of waiting") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SocketPair sp;
  UvSocketStream reader(loop.get(), std::move(sp.b));
  char buf[8];
  auto pending = reader.tryRead(buf, 1, sizeof buf);
  ws.poll();
  reader.abortRead();
  auto n = pending.then([](size_t got) { return int(got); })
               .exclusiveJoin(uvSleep(loop.get(), 2000).then([] { return -1; }))
               .wait(ws);
  CHECK(n == 0);
}

TEST_CASE("creating and destroying 200 streams leaves the fd count unchanged") {
  int before = openFdCount();
  {
    TestLoop loop;
    KjOnUv kj(loop.get());
    auto& ws = kj.waitScope();
    for (int i = 0; i < 200; ++i) {
      SocketPair sp;
      UvSocketStream a(loop.get(), std::move(sp.a));
      UvSocketStream b(loop.get(), std::move(sp.b));
      char c = 0;
      auto read = b.tryRead(&c, 1, 1);
      a.write("!", 1).wait(ws);
      CHECK(read.wait(ws) == 1);
    }
    uv_run(loop.get(), UV_RUN_NOWAIT);
  }
  CHECK(openFdCount() == before);
}

TEST_CASE("KjOnUv on a loop leaves no fd and no handle behind") {
  int before = openFdCount();
  for (int i = 0; i < 20; ++i) {
    TestLoop loop;
    KjOnUv kj(loop.get());
    kj::evalLater([] {}).wait(kj.waitScope());
  }
  CHECK(openFdCount() == before);
}

// ---------------------------------------------------------------------------------------------
// uvSleep.

TEST_CASE("uvSleep resolves after roughly the requested time") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto start = vsup::monoNow();
  uvSleep(loop.get(), 60).wait(kj.waitScope());
  double ms = elapsedMs(start);
  CHECK(ms >= 59.0);
  CHECK(ms < 1000.0);
}

TEST_CASE("a timer that comes due while KJ runs its queue ends a blocking wait, not a hang") {
  // The wait's first turn of the queue outlasts the 1 ms sleep, so the timer is already due
  // when KJ next blocks: libuv runs it at the top of uv_run, before it decides how long to
  // poll. KJ, still inside wait(), does not tell the port it became runnable again (it never
  // said it stopped being runnable), so the port itself must not poll without a timeout then.
  TestLoop loop;
  KjOnUv kj(loop.get());
  bool guardFired = false;
  // With the bug, only this referenced timer ends the poll: 3 s instead of forever.
  Timer guard(loop.get(), 3000, [&] { guardFired = true; });
  auto sleep = uvSleep(loop.get(), 1);
  auto busy = kj::evalLater([] {
                auto until = vsup::monoNow() + 20 * vsup::kNsPerMs;
                while (vsup::monoNow() < until) {
                }
              }).eagerlyEvaluate(nullptr);
  auto start = vsup::monoNow();
  sleep.wait(kj.waitScope());
  CHECK_FALSE(guardFired);
  CHECK(elapsedMs(start) < 1500.0);
  uv_timer_stop(guard.handle.get());
}

TEST_CASE("uvSleep resolves inside uv_run") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  bool done = false;
  auto p = uvSleep(loop.get(), 30).then([&] { done = true; }).eagerlyEvaluate(nullptr);
  auto start = vsup::monoNow();
  uv_run(loop.get(), UV_RUN_DEFAULT);
  CHECK(done);
  CHECK(elapsedMs(start) >= 29.0);
}

TEST_CASE("dropping a uvSleep promise cancels its timer so the loop can exit") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  bool fired = false;
  {
    auto p = uvSleep(loop.get(), 10000).then([&] { fired = true; }).eagerlyEvaluate(nullptr);
    kj.waitScope().poll();
  }
  auto start = vsup::monoNow();
  uv_run(loop.get(), UV_RUN_DEFAULT);
  CHECK(elapsedMs(start) < 500.0);
  CHECK_FALSE(fired);
}

TEST_CASE("many concurrent uvSleeps fire in deadline order") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  std::vector<int> order;
  kj::Vector<kj::Promise<void>> all;
  for (int ms : {40, 10, 30, 20}) {
    // eagerlyEvaluate: a join runs lazy continuations only at the end, in array order.
    all.add(uvSleep(loop.get(), uint64_t(ms))
                .then([&order, ms] { order.push_back(ms); })
                .eagerlyEvaluate(nullptr));
  }
  kj::joinPromises(all.releaseAsArray()).wait(kj.waitScope());
  CHECK(order == std::vector<int>{10, 20, 30, 40});
}
