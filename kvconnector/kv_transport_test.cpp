// The KV data plane over real sockets, both transports: a KvServer on a real abstract Unix
// socket and a real TCP port serves a memfd cache to KvPullers in the same process.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <numeric>
#include <random>

#include "kvconnector/kv_transport.h"

namespace vsup::kv {
namespace {

int openFds() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n - 1;
}

engine::KvCacheLayout layout(int32_t blocks, int32_t headDim = 8) {
  engine::KvCacheLayout l;
  l.layers = 3;
  l.kvHeads = 2;
  l.headDim = headDim;
  l.blockSize = 4;
  l.numBlocks = blocks;
  return l;
}

KvCompat compat(int32_t headDim = 8) {
  KvCompat c;
  c.model = "test-model";
  c.dtype = "f32";
  c.layers = 3;
  c.kvHeads = 2;
  c.headDim = uint32_t(headDim);
  c.blockSize = 4;
  c.tpSize = 1;
  return c;
}

// The ended leases the book reported, awaited with a timeout.
struct Ended {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<EndedLease> all;
  void add(const std::vector<EndedLease>& e) {
    std::lock_guard lock(mu);
    all.insert(all.end(), e.begin(), e.end());
    cv.notify_all();
  }
  bool waitFor(size_t n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(5), [&] { return all.size() >= n; });
  }
};

// A prefill rank: a memfd cache of random bytes served on an abstract socket and a TCP port.
struct Agent {
  Ended ended;
  int32_t headDim;
  engine::KvCacheLayout l = layout(16, headDim);
  OwnFd region = engine::createKvCacheRegion(l.totalBytes());
  engine::KvCacheMapping map{region.get(), l.totalBytes(), "the test cache"};
  LeaseBook book;
  std::string name = "vsup-kv-test/" + std::to_string(::getpid()) + "/" + std::to_string(next++);
  uint16_t port = 0;
  std::unique_ptr<KvServer> server;
  static inline int next = 0;

  explicit Agent(int64_t leaseMs = 10000, int32_t dim = 8)
      : headDim(dim),
        book(leaseMs * kNsPerMs, [this](const std::vector<EndedLease>& e) { ended.add(e); }) {
    std::mt19937 rng(7);
    auto* words = reinterpret_cast<uint32_t*>(map.data());
    for (int64_t i = 0; i < l.totalBytes() / 4; ++i) words[i] = rng();
    OwnFd tcp = listenTcp("127.0.0.1", 0);
    port = boundPort(tcp.get());
    KvSource s{l, map.data(), region.get(), "engine-a", 0, compat(headDim)};
    server = std::make_unique<KvServer>(s, book, listenUnixAbstract(name), std::move(tcp));
  }
  ~Agent() { server->stop(); }

  OwnFd connect(Transport t) {
    MonoNs deadline = monoNow() + 2000 * kNsPerMs;
    return t == Transport::Shm ? connectUnixAbstract(name, deadline)
                               : connectTcp("127.0.0.1", port, deadline);
  }
  // A TCP connection whose receive buffer is tiny, so that a large pull stalls the sender.
  OwnFd connectNarrow() {
    OwnFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int small = 4096;
    REQUIRE(::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small) == 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    return fd;
  }
  KvPuller puller(Transport t, const std::string& engineId = "engine-a", KvCompat c = compat()) {
    return KvPuller(connect(t), t, c, 0, engineId, layout(24), monoNow() + 2000 * kNsPerMs);
  }
};

// For the tests that speak the protocol by hand: a blocking socket.
OwnFd blocking(OwnFd fd) {
  int flags = ::fcntl(fd.get(), F_GETFL);
  REQUIRE(::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) == 0);
  return fd;
}

MonoNs soon() { return monoNow() + 2000 * kNsPerMs; }

std::optional<ErrorCode> refusedWith(const std::function<void()>& f, std::string* what = nullptr) {
  try {
    f();
  } catch (const KvTransferError& e) {
    if (what != nullptr) *what = e.what();
    return e.code();
  }
  return std::nullopt;
}

}  // namespace

TEST_CASE("a pull copies exactly the leased blocks into the destination blocks, over shm and tcp") {
  int fdsBefore = openFds();
  for (Transport t : {Transport::Shm, Transport::Tcp}) {
    std::string transport = transportName(t);
    CAPTURE(transport);
    {
      Agent a;
      a.book.grant("req-1", {2, 9, 15});
      engine::KvCacheLayout dl = layout(24);
      engine::KvCacheMapping dst(-1, dl.totalBytes(), "the destination");
      KvPuller p = a.puller(t);
      CHECK(p.peerEngineId() == "engine-a");
      uint64_t moved = p.pull("req-1", {2, 9, 15}, {20, 0, 7}, dst.data(), dl, soon());
      CHECK(moved == uint64_t(3 * a.l.blockBytes()));
      std::vector<std::pair<int32_t, int32_t>> pairs{{2, 20}, {9, 0}, {15, 7}};
      for (int32_t c = 0; c < a.l.chunksPerBlock(); ++c) {
        for (auto [from, to] : pairs) {
          CHECK(std::memcmp(dst.data() + dl.chunkOffset(c, to), a.map.data() + a.l.chunkOffset(c, from),
                            size_t(a.l.chunkBytes())) == 0);
        }
        // Every other destination chunk is untouched.
        std::vector<std::byte> zero(size_t(dl.chunkBytes()));
        for (int32_t b : {1, 8, 19, 23}) {
          CHECK(std::memcmp(dst.data() + dl.chunkOffset(c, b), zero.data(), zero.size()) == 0);
        }
      }
      REQUIRE(a.ended.waitFor(1));
      CHECK(a.ended.all[0].id == "req-1");
      CHECK(a.ended.all[0].reason == LeaseEnd::Done);
      auto counts = a.book.counts();
      CHECK(counts.live == 0);
      CHECK(counts.done == 1);
      CHECK(counts.bytesSent == moved);
      // The lease is over: pulling it again is refused, never served.
      std::string what;
      CHECK(refusedWith([&] { p.pull("req-1", {2}, {1}, dst.data(), dl, soon()); }, &what) ==
            ErrorCode::UnknownLease);
      CHECK(what.find("has ended (done)") != std::string::npos);
    }
  }
  CHECK(openFds() == fdsBefore);  // sockets, the memfds and the server's threads are all gone
}

TEST_CASE("a pull is refused, with the reason, for what it must not read") {
  for (Transport t : {Transport::Shm, Transport::Tcp}) {
    std::string transport = transportName(t);
    CAPTURE(transport);
    Agent a;
    a.book.grant("req-1", {2, 3});
    engine::KvCacheLayout dl = layout(24);
    engine::KvCacheMapping dst(-1, dl.totalBytes(), "the destination");
    KvPuller p = a.puller(t);
    std::string what;
    CHECK(refusedWith([&] { p.pull("nope", {2}, {0}, dst.data(), dl, soon()); }, &what) ==
          ErrorCode::UnknownLease);
    CHECK(what.find("lease nope is unknown") != std::string::npos);
    CHECK(refusedWith([&] { p.pull("req-1", {2, 4}, {0, 1}, dst.data(), dl, soon()); }, &what) ==
          ErrorCode::OutsideLease);
    CHECK(what.find("block 4 is not one of lease req-1's") != std::string::npos);
    // The connection stays usable after a refusal.
    CHECK(p.pull("req-1", {3}, {0}, dst.data(), dl, soon()) == uint64_t(a.l.blockBytes()));
    a.book.stopAdmitting();
    a.book.grant("req-2", {5});
    CHECK(refusedWith([&] { p.pull("req-2", {5}, {0}, dst.data(), dl, soon()); }) ==
          ErrorCode::ShuttingDown);
    CHECK(a.book.counts().pullsRefused == 3);
  }
}

TEST_CASE("a restarted or incompatible peer is refused at the handshake, naming why") {
  for (Transport t : {Transport::Shm, Transport::Tcp}) {
    std::string transport = transportName(t);
    CAPTURE(transport);
    Agent a;
    std::string what;
    CHECK(refusedWith([&] { a.puller(t, "engine-old"); }, &what) == ErrorCode::EngineRestarted);
    CHECK(what.find("remote engine restarted") != std::string::npos);
    KvCompat other = compat();
    other.tpSize = 2;
    CHECK(refusedWith([&] { a.puller(t, "", other); }, &what) == ErrorCode::Incompatible);
    CHECK(what.find("tensor-parallel size: this instance 1, the peer 2") != std::string::npos);
    KvPuller any = a.puller(t, "");  // no engine expected: any is accepted
    CHECK(any.peerEngineId() == "engine-a");
  }
}

// Speaks the protocol by hand on a blocking socket.
struct RawPeer {
  OwnFd fd;
  FrameDecoder d;
  void send(const Message& m) {
    std::string s = encode(m);
    REQUIRE(::send(fd.get(), s.data(), s.size(), MSG_NOSIGNAL) == ssize_t(s.size()));
  }
  Message next() {
    Message m;
    char buf[65536];
    while (!d.next(m)) {
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
      REQUIRE(n > 0);
      d.feed(buf, size_t(n));
    }
    return m;
  }
  void skipRaw(size_t left) {
    std::vector<char> sink(65536);
    left -= d.takeRaw(sink.data(), std::min(left, d.buffered()));
    while (left > 0) {
      ssize_t n = ::recv(fd.get(), sink.data(), std::min(left, sink.size()), 0);
      REQUIRE(n > 0);
      left -= size_t(n);
    }
  }
};

void waitPast(MonoNs from, int64_t ms) {
  while (monoNow() < from + ms * kNsPerMs) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the lease runs out meanwhile
  }
}

TEST_CASE("shm: a copy is good only if the lease is still live at Done") {
  Agent a(20);  // 20 ms leases
  a.book.grant("req-1", {1});
  RawPeer p{blocking(a.connect(Transport::Shm)), {}};
  p.send(Hello{compat(), 0, "engine-a", Transport::Shm});
  REQUIRE(std::holds_alternative<Welcome>(p.next()));
  p.send(Pull{1, "req-1", {1}});
  REQUIRE(std::holds_alternative<PullReady>(p.next()));
  waitPast(monoNow(), 40);  // the copy took longer than the lease
  p.send(Done{"req-1", false});
  Message m = p.next();
  REQUIRE(std::holds_alternative<ErrorMsg>(m));
  CHECK(std::get<ErrorMsg>(m).code == ErrorCode::LeaseExpired);
  REQUIRE(a.ended.waitFor(1));
  CHECK(a.ended.all[0].reason == LeaseEnd::Expired);
}

TEST_CASE("tcp: blocks whose lease expired while they were sent end with an error, not PullEnd") {
  Agent a(20, 4096);  // 20 ms leases; 768 KiB blocks, 12 MiB in all
  std::vector<int32_t> all(16);
  std::iota(all.begin(), all.end(), 0);
  a.book.grant("req-1", all);
  RawPeer p{a.connectNarrow(), {}};
  p.send(Hello{compat(4096), 0, "engine-a", Transport::Tcp});
  REQUIRE(std::holds_alternative<Welcome>(p.next()));
  p.send(Pull{1, "req-1", all});
  Message ready = p.next();
  REQUIRE(std::holds_alternative<PullReady>(ready));
  waitPast(monoNow(), 40);  // the sender stalls on our full window past the lease
  p.skipRaw(size_t(std::get<PullReady>(ready).bytes));
  Message m = p.next();
  REQUIRE(std::holds_alternative<ErrorMsg>(m));
  CHECK(std::get<ErrorMsg>(m).code == ErrorCode::LeaseExpired);
  CHECK(std::get<ErrorMsg>(m).pullId == 1);
  CHECK(std::get<ErrorMsg>(m).message.find("expired while its blocks were sent") !=
        std::string::npos);
  REQUIRE(a.ended.waitFor(1));
  CHECK(a.ended.all[0].reason == LeaseEnd::Expired);
}

TEST_CASE("tcp: a pull that finishes inside its lease ends with PullEnd") {
  Agent a;
  a.book.grant("req-1", {1, 2});
  RawPeer p{blocking(a.connect(Transport::Tcp)), {}};
  p.send(Hello{compat(), 0, "", Transport::Tcp});
  REQUIRE(std::holds_alternative<Welcome>(p.next()));
  p.send(Pull{9, "req-1", {1, 2}});
  Message ready = p.next();
  REQUIRE(std::holds_alternative<PullReady>(ready));
  CHECK(std::get<PullReady>(ready).bytes == uint64_t(2 * a.l.blockBytes()));
  p.skipRaw(size_t(std::get<PullReady>(ready).bytes));
  Message end = p.next();
  REQUIRE(std::holds_alternative<PullEnd>(end));
  CHECK(std::get<PullEnd>(end).pullId == 9);
}

TEST_CASE("a connection that drops mid-lease releases it; give-up releases it too") {
  for (Transport t : {Transport::Shm, Transport::Tcp}) {
    std::string transport = transportName(t);
    CAPTURE(transport);
    Agent a;
    a.book.grant("req-1", {1});
    a.book.grant("req-2", {2});
    {
      OwnFd fd = blocking(a.connect(t));
      std::string s = encode(Hello{compat(), 0, "", t}) + encode(Pull{1, "req-1", {1}});
      REQUIRE(::send(fd.get(), s.data(), s.size(), MSG_NOSIGNAL) == ssize_t(s.size()));
      // Wait for the pull to be bound before closing: its PullReady has arrived.
      FrameDecoder d;
      Message m;
      int frames = 0;
      char buf[4096];
      while (frames < 2) {
        ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
        REQUIRE(n > 0);
        d.feed(buf, size_t(n));
        try {
          while (frames < 2 && d.next(m)) ++frames;
        } catch (const ProtocolError&) {
          FAIL("the agent sent a bad frame");
        }
      }
    }
    REQUIRE(a.ended.waitFor(1));
    CHECK(a.ended.all[0].id == "req-1");
    CHECK(a.ended.all[0].reason == LeaseEnd::Disconnected);
    KvPuller p = a.puller(t);
    p.giveUp("req-2", soon());
    REQUIRE(a.ended.waitFor(2));
    CHECK(a.ended.all[1].id == "req-2");
    CHECK(a.ended.all[1].reason == LeaseEnd::GaveUp);
  }
}

TEST_CASE("garbage gets one BadFrame error and the connection closed; the agent serves on") {
  Agent a;
  OwnFd fd = blocking(a.connect(Transport::Tcp));
  std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  REQUIRE(::send(fd.get(), junk.data(), junk.size(), MSG_NOSIGNAL) > 0);
  FrameDecoder d;
  Message m;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    REQUIRE(n > 0);
    d.feed(buf, size_t(n));
    if (d.next(m)) break;
  }
  REQUIRE(std::holds_alternative<ErrorMsg>(m));
  CHECK(std::get<ErrorMsg>(m).code == ErrorCode::BadFrame);
  CHECK(std::get<ErrorMsg>(m).message.find("VSKV") != std::string::npos);
  CHECK(::recv(fd.get(), buf, sizeof buf, 0) == 0);  // closed after it
  a.book.grant("req-1", {1});
  engine::KvCacheLayout dl = layout(24);
  engine::KvCacheMapping dst(-1, dl.totalBytes(), "the destination");
  CHECK(a.puller(Transport::Tcp).pull("req-1", {1}, {1}, dst.data(), dl, soon()) > 0);
}

TEST_CASE("shared memory is never offered over TCP") {
  Agent a;
  std::string what;
  CHECK(refusedWith([&] {
          KvPuller(a.connect(Transport::Tcp), Transport::Shm, compat(), 0, "", layout(24), soon());
        }, &what) == ErrorCode::BadFrame);
  CHECK(what.find("Unix socket only") != std::string::npos);
}

TEST_CASE("loopback and this machine's own addresses are local; others are not") {
  CHECK(isLocalHost("127.0.0.1"));
  CHECK(isLocalHost("localhost"));
  CHECK(isLocalHost("::1"));
  CHECK_FALSE(isLocalHost("192.0.2.1"));  // TEST-NET-1: nobody's
  CHECK_FALSE(isLocalHost("no-such-host.invalid"));
}

TEST_CASE("a cancelled scope ends a handshake with a peer that never answers") {
  OwnFd mute = listenTcp("127.0.0.1", 0);  // accepts (the kernel does) but never speaks
  uint16_t port = boundPort(mute.get());
  std::atomic<bool> cancel{false};
  std::string what;
  MonoNs cancelledAt = 0;
  std::thread t([&] {
    KvCancelScope scope(cancel);
    try {
      KvPuller(connectTcp("127.0.0.1", port, soon()), Transport::Tcp, compat(), 0, "",
               layout(24), monoNow() + 60'000 * kNsPerMs);
    } catch (const KvTransferError& e) {
      what = e.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the handshake is waiting
  cancelledAt = monoNow();
  cancel = true;
  t.join();
  CHECK(what == "cancelled");
  CHECK(monoNow() - cancelledAt < 500 * kNsPerMs);
}

TEST_CASE("connecting where nobody listens fails at once, naming the address") {
  std::string what;
  try {
    connectUnixAbstract("vsup-kv-test/nobody", soon());
  } catch (const KvTransferError& e) {
    what = e.what();
  }
  CHECK(what.find("@vsup-kv-test/nobody") != std::string::npos);
}

}  // namespace vsup::kv
