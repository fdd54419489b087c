#include "kvconnector/kv_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <utility>

#include "base/check.h"
#include "base/error.h"

namespace vsup::kv {
namespace {

constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux

[[noreturn]] void sysFail(const std::string& what) {
  int err = errno;
  throw SysError(what + ": " + std::strerror(err), err);
}

int pollMs(MonoNs deadline) {
  if (deadline == kNoDeadline) return -1;
  MonoNs now = monoNow();
  if (deadline <= now) return 0;
  return int(std::min<int64_t>((deadline - now + kNsPerMs - 1) / kNsPerMs, INT_MAX));
}

thread_local const std::atomic<bool>* tlsCancel = nullptr;

// Waits for `events` on `fd` until `deadline`; false at the deadline. Throws KvTransferError
// when this thread's KvCancelScope is cancelled.
bool waitFor(int fd, short events, MonoNs deadline) {
  for (;;) {
    if (tlsCancel != nullptr && tlsCancel->load()) throw KvTransferError("cancelled");
    pollfd p{fd, events, 0};
    int ms = pollMs(deadline);
    if (tlsCancel != nullptr && (ms < 0 || ms > 50)) ms = 50;
    int n = ::poll(&p, 1, ms);
    if (n > 0) return true;
    if (n == 0) {
      if (monoNow() >= deadline) return false;
      continue;
    }
    if (errno != EINTR) sysFail("poll");
  }
}

void setNonBlocking(int fd) {
  int flags = VSUP_SYSCALL(::fcntl(fd, F_GETFL));
  VSUP_SYSCALL(::fcntl(fd, F_SETFL, flags | O_NONBLOCK));
}

// Moves iovecs [first..] past `n` bytes that were sent or received; `first` then names the first
// one with bytes left.
void advance(std::vector<iovec>& iov, size_t& first, size_t n) {
  while (n > 0 && first < iov.size()) {
    size_t k = std::min(n, iov[first].iov_len);
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + k;
    iov[first].iov_len -= k;
    n -= k;
    if (iov[first].iov_len == 0) ++first;
  }
}

// Sends every byte of the iovecs (modified in place) before `deadline`.
void sendIov(int fd, std::vector<iovec>& iov, MonoNs deadline, const char* what,
             int passFd = -1) {
  size_t first = 0;
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min(kMaxIov, iov.size() - first);
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (passFd >= 0) {
      std::memset(control, 0, sizeof control);
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &passFd, sizeof(int));
    }
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        if (!waitFor(fd, POLLOUT, deadline)) {
          throw KvTransferError(std::string("timed out sending ") + what);
        }
        continue;
      }
      throw KvTransferError(std::string("sending ") + what + " failed: " + std::strerror(errno));
    }
    passFd = -1;  // sent with the first byte
    advance(iov, first, size_t(n));
  }
}

void sendFrame(int fd, const Message& m, MonoNs deadline, int passFd = -1) {
  std::string bytes = encode(m);
  std::vector<iovec> iov{{bytes.data(), bytes.size()}};
  sendIov(fd, iov, deadline, "a KV frame", passFd);
}

// One recvmsg into `buf` before `deadline`: the bytes read (0: EOF). An fd passed with them is
// stored in `*passed` when that is non-null, else closed.
size_t recvSome(int fd, void* buf, size_t n, MonoNs deadline, OwnFd* passed, const char* what) {
  for (;;) {
    iovec v{buf, n};
    msghdr msg{};
    msg.msg_iov = &v;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        if (!waitFor(fd, POLLIN, deadline)) {
          throw KvTransferError(std::string("timed out waiting for ") + what);
        }
        continue;
      }
      throw KvTransferError(std::string("receiving ") + what + " failed: " + std::strerror(errno));
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int f;
        std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        if (passed != nullptr && !*passed) {
          passed->reset(f);
        } else {
          ::close(f);
        }
      }
    }
    return size_t(got);
  }
}

sockaddr_un abstractAddress(const std::string& name, socklen_t& len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (name.empty() || name.size() + 1 > sizeof a.sun_path) {
    throw std::invalid_argument("abstract socket name \"" + name + "\" must be 1.." +
                                std::to_string(sizeof a.sun_path - 1) + " bytes");
  }
  a.sun_path[0] = '\0';
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  len = socklen_t(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}

addrinfo* resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0) {
    throw KvTransferError("cannot resolve KV host \"" + host + "\": " + ::gai_strerror(rc));
  }
  return res;
}

// Waits for a non-blocking connect to finish; throws with `where` on failure.
void finishConnect(int fd, MonoNs deadline, const std::string& where) {
  if (!waitFor(fd, POLLOUT, deadline)) throw KvTransferError("timed out connecting to " + where);
  int err = 0;
  socklen_t len = sizeof err;
  VSUP_SYSCALL(::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len));
  if (err != 0) {
    throw KvTransferError("cannot connect to " + where + ": " + std::strerror(err));
  }
}

KvTransferError refusal(const ErrorMsg& e, const std::string& context) {
  return KvTransferError(context + ": " + errorCodeName(e.code) + ": " + e.message, e.code);
}

}  // namespace

bool isLocalHost(const std::string& host) {
  addrinfo* res = nullptr;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0) return false;
  ifaddrs* ifs = nullptr;
  if (::getifaddrs(&ifs) != 0) ifs = nullptr;
  bool local = false;
  for (addrinfo* a = res; a != nullptr && !local; a = a->ai_next) {
    if (a->ai_family == AF_INET) {
      in_addr want = reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr;
      if ((ntohl(want.s_addr) >> 24) == 127) local = true;
      for (ifaddrs* i = ifs; i != nullptr && !local; i = i->ifa_next) {
        if (i->ifa_addr != nullptr && i->ifa_addr->sa_family == AF_INET &&
            reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr == want.s_addr) {
          local = true;
        }
      }
    } else if (a->ai_family == AF_INET6) {
      in6_addr want = reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr;
      if (IN6_IS_ADDR_LOOPBACK(&want)) local = true;
      for (ifaddrs* i = ifs; i != nullptr && !local; i = i->ifa_next) {
        if (i->ifa_addr != nullptr && i->ifa_addr->sa_family == AF_INET6 &&
            std::memcmp(&reinterpret_cast<sockaddr_in6*>(i->ifa_addr)->sin6_addr, &want,
                        sizeof want) == 0) {
          local = true;
        }
      }
    }
  }
  if (ifs != nullptr) ::freeifaddrs(ifs);
  ::freeaddrinfo(res);
  return local;
}

KvCancelScope::KvCancelScope(const std::atomic<bool>& flag) { tlsCancel = &flag; }
KvCancelScope::~KvCancelScope() { tlsCancel = nullptr; }

std::string shmSocketName(uint16_t port, uint32_t rank) {
  return "vsup-kv/" + std::to_string(port) + "/tp" + std::to_string(rank);
}

OwnFd listenTcp(const std::string& host, uint16_t port) {
  addrinfo* res = resolve(host, port, true);
  std::string where = "KV port " + host + ":" + std::to_string(port);
  int lastErr = 0;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    OwnFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) {
      lastErr = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd.get(), 64) == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    lastErr = errno;
  }
  ::freeaddrinfo(res);
  throw SysError("cannot listen on " + where + ": " + std::strerror(lastErr), lastErr);
}

OwnFd listenUnixAbstract(const std::string& name) {
  socklen_t len = 0;
  sockaddr_un a = abstractAddress(name, len);
  OwnFd fd(VSUP_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), len) != 0) {
    sysFail("cannot listen on the abstract socket @" + name);
  }
  VSUP_SYSCALL(::listen(fd.get(), 64));
  return fd;
}

uint16_t boundPort(int fd) {
  sockaddr_storage s{};
  socklen_t len = sizeof s;
  VSUP_SYSCALL(::getsockname(fd, reinterpret_cast<sockaddr*>(&s), &len));
  if (s.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&s)->sin_port);
  if (s.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&s)->sin6_port);
  return 0;
}

OwnFd connectTcp(const std::string& host, uint16_t port, MonoNs deadline) {
  std::string where = "the KV agent at " + host + ":" + std::to_string(port);
  addrinfo* res = resolve(host, port, false);
  std::string lastError = "no address";
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    OwnFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) continue;
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(fd.get(), a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      lastError = std::strerror(errno);
      continue;
    }
    try {
      finishConnect(fd.get(), deadline, where);
    } catch (const KvTransferError& e) {
      lastError = e.what();
      continue;
    }
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  throw KvTransferError("cannot connect to " + where + ": " + lastError);
}

OwnFd connectUnixAbstract(const std::string& name, MonoNs deadline) {
  socklen_t len = 0;
  sockaddr_un a = abstractAddress(name, len);
  OwnFd fd(VSUP_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), len) != 0 && errno != EINPROGRESS &&
      errno != EAGAIN) {
    throw KvTransferError("cannot connect to the KV agent at @" + name + ": " +
                          std::strerror(errno));
  }
  finishConnect(fd.get(), deadline, "the KV agent at @" + name);
  return fd;
}

// ---- LeaseBook

LeaseBook::LeaseBook(int64_t leaseNs, OnEnded onEnded)
    : table_(leaseNs), onEnded_(std::move(onEnded)) {}

void LeaseBook::tell(std::vector<EndedLease> ended) {
  if (!ended.empty() && onEnded_) onEnded_(ended);
}

void LeaseBook::grant(const std::string& id, std::vector<int32_t> blocks) {
  std::lock_guard lock(mu_);
  table_.grant(id, std::move(blocks), monoNow());
}

MonoNs LeaseBook::expireOverdue() {
  std::vector<EndedLease> ended;
  MonoNs next;
  {
    std::lock_guard lock(mu_);
    ended = table_.expire(monoNow());
    next = table_.nextExpiry();
  }
  tell(std::move(ended));
  return next;
}

void LeaseBook::abandonAll() {
  std::vector<EndedLease> ended;
  {
    std::lock_guard lock(mu_);
    ended = table_.abandonAll();
  }
  tell(std::move(ended));
}

LeaseBook::Counts LeaseBook::counts() const {
  std::lock_guard lock(mu_);
  Counts c;
  c.live = table_.live();
  c.pulling = table_.pulling();
  c.granted = table_.granted();
  c.done = table_.endedCount(LeaseEnd::Done);
  c.gaveUp = table_.endedCount(LeaseEnd::GaveUp);
  c.disconnected = table_.endedCount(LeaseEnd::Disconnected);
  c.expired = table_.endedCount(LeaseEnd::Expired);
  c.abandoned = table_.endedCount(LeaseEnd::Abandoned);
  c.bytesSent = bytesSent_;
  c.pullsServed = pullsServed_;
  c.pullsRefused = pullsRefused_;
  return c;
}

LeaseTable::PullCheck LeaseBook::beginPull(const std::string& id,
                                           const std::vector<int32_t>& blocks,
                                           LeaseTable::ConnId conn) {
  std::vector<EndedLease> ended;
  LeaseTable::PullCheck check;
  {
    std::lock_guard lock(mu_);
    ended = table_.expire(monoNow());
    check = table_.beginPull(id, blocks, conn, monoNow());
  }
  tell(std::move(ended));
  return check;
}

std::optional<EndedLease> LeaseBook::end(const std::string& id, LeaseEnd reason,
                                         LeaseTable::ConnId conn,
                                         LeaseTable::PullCheck* refusal) {
  std::vector<EndedLease> ended;
  std::optional<EndedLease> e;
  {
    std::lock_guard lock(mu_);
    ended = table_.expire(monoNow());  // a lease past its expiry was not live throughout
    e = table_.end(id, reason, conn, refusal);
  }
  if (e) ended.push_back(*e);
  tell(std::move(ended));
  return e;
}

void LeaseBook::dropConnection(LeaseTable::ConnId conn) {
  std::vector<EndedLease> ended;
  {
    std::lock_guard lock(mu_);
    ended = table_.dropConnection(conn);
  }
  tell(std::move(ended));
}

bool LeaseBook::stillLive(const std::string& id, LeaseTable::ConnId conn) {
  std::vector<EndedLease> ended;
  bool live;
  {
    std::lock_guard lock(mu_);
    ended = table_.expire(monoNow());
    live = table_.isLive(id) && table_.boundTo(id) == conn;
  }
  tell(std::move(ended));
  return live;
}

void LeaseBook::countSent(uint64_t bytes) {
  std::lock_guard lock(mu_);
  bytesSent_ += bytes;
  ++pullsServed_;
}

void LeaseBook::countRefused() {
  std::lock_guard lock(mu_);
  ++pullsRefused_;
}

// ---- the serving side

namespace {

ErrorCode codeFor(LeaseTable::Refusal r) {
  switch (r) {
    case LeaseTable::Refusal::Expired: return ErrorCode::LeaseExpired;
    case LeaseTable::Refusal::OutsideLease: return ErrorCode::OutsideLease;
    case LeaseTable::Refusal::Unknown:
    case LeaseTable::Refusal::OtherConnection:
    case LeaseTable::Refusal::None: break;
  }
  return ErrorCode::UnknownLease;
}

class Session {
 public:
  Session(OwnFd fd, Transport transport, const KvSource& source, LeaseBook& leases,
          int64_t ioTimeoutMs)
      : fd_(std::move(fd)), transport_(transport), source_(source), leases_(leases),
        conn_(leases.newConnId()), ioTimeoutMs_(ioTimeoutMs) {}

  void run(const std::atomic<bool>& stop) {
    setNonBlocking(fd_.get());
    std::vector<char> buf(64 * 1024);
    try {
      while (!stop.load() && open_) {
        if (!waitFor(fd_.get(), POLLIN, monoNow() + 100 * kNsPerMs)) continue;
        size_t n = recvSome(fd_.get(), buf.data(), buf.size(), monoNow(), nullptr, "a request");
        if (n == 0) break;  // the peer closed
        decoder_.feed(buf.data(), n);
        Message m;
        for (;;) {
          try {
            if (!decoder_.next(m)) break;
          } catch (const ProtocolError& e) {
            closeWith(ErrorCode::BadFrame, e.what());
            break;
          }
          handle(m);
          if (!open_) break;
        }
      }
    } catch (const std::exception&) {
      // The peer stalled, reset or vanished: its leases end below, and it will see the EOF.
    }
    leases_.dropConnection(conn_);
  }

 private:
  MonoNs ioDeadline() const { return monoNow() + ioTimeoutMs_ * kNsPerMs; }
  void reply(const Message& m, int passFd = -1) { sendFrame(fd_.get(), m, ioDeadline(), passFd); }
  void closeWith(ErrorCode code, const std::string& why) {
    reply(ErrorMsg{code, 0, "", why});
    open_ = false;
  }

  void handle(const Message& m) {
    if (const auto* h = std::get_if<Hello>(&m)) return hello(*h);
    if (!welcomed_) return closeWith(ErrorCode::BadFrame, "the first frame must be Hello");
    if (const auto* p = std::get_if<Pull>(&m)) return pull(*p);
    if (const auto* d = std::get_if<Done>(&m)) return done(*d);
    closeWith(ErrorCode::BadFrame, "a KV agent accepts only Hello, Pull and Done");
  }

  void hello(const Hello& h) {
    if (welcomed_) return closeWith(ErrorCode::BadFrame, "Hello was sent twice");
    std::string mismatch = compatMismatch(source_.compat, h.compat);
    if (!mismatch.empty()) {
      return closeWith(ErrorCode::Incompatible, "the instances' KV caches differ: " + mismatch);
    }
    if (h.rank != source_.rank) {
      return closeWith(ErrorCode::WrongRank, "this agent serves rank " +
                                                 std::to_string(source_.rank) + ", not rank " +
                                                 std::to_string(h.rank));
    }
    if (!h.expectEngineId.empty() && h.expectEngineId != source_.engineId) {
      return closeWith(ErrorCode::EngineRestarted,
                       "engine " + h.expectEngineId + " is gone; this agent serves engine " +
                           source_.engineId);
    }
    if (h.transport == Transport::Shm) {
      ucred cred{};
      socklen_t len = sizeof cred;
      if (transport_ != Transport::Shm ||
          ::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        return closeWith(ErrorCode::BadFrame, "shared memory is offered on the Unix socket only");
      }
      if (cred.uid != ::getuid()) {
        return closeWith(ErrorCode::BadFrame,
                         "shared memory is offered to processes of uid " +
                             std::to_string(::getuid()) + " only, not " + std::to_string(cred.uid));
      }
    }
    shm_ = h.transport == Transport::Shm;
    welcomed_ = true;
    reply(Welcome{source_.engineId, source_.rank, uint64_t(source_.layout.totalBytes())},
          shm_ ? source_.regionFd : -1);
  }

  void pull(const Pull& p) {
    auto refuse = [&](ErrorCode code, const std::string& why) {
      leases_.countRefused();
      reply(ErrorMsg{code, p.pullId, p.leaseId, why});
    };
    if (!leases_.admitting()) return refuse(ErrorCode::ShuttingDown, "the agent is shutting down");
    for (int32_t b : p.blocks) {
      if (b < 0 || b >= source_.layout.numBlocks) {
        return refuse(ErrorCode::OutsideLease, "block " + std::to_string(b) + " is not in the cache");
      }
    }
    LeaseTable::PullCheck check = leases_.beginPull(p.leaseId, p.blocks, conn_);
    if (check.refusal != LeaseTable::Refusal::None) return refuse(codeFor(check.refusal), check.message);
    const engine::KvCacheLayout& l = source_.layout;
    uint64_t bytes = uint64_t(l.blockBytes()) * p.blocks.size();
    if (source_.servedDigest) {
      source_.servedDigest(p.leaseId, engine::kvBlocksDigest(source_.base, l, p.blocks));
    }
    reply(PullReady{p.pullId, bytes});
    if (!shm_) {
      std::vector<iovec> iov;
      iov.reserve(p.blocks.size() * size_t(l.chunksPerBlock()));
      for (int32_t b : p.blocks) {
        for (int32_t c = 0; c < l.chunksPerBlock(); ++c) {
          iov.push_back({const_cast<std::byte*>(source_.base + l.chunkOffset(c, b)),
                         size_t(l.chunkBytes())});
        }
      }
      sendIov(fd_.get(), iov, ioDeadline(), "KV blocks");
      // Read from the mapping while the lease was live only if it is live still.
      if (!leases_.stillLive(p.leaseId, conn_)) {
        leases_.countRefused();
        return reply(ErrorMsg{ErrorCode::LeaseExpired, p.pullId, p.leaseId,
                              "lease " + p.leaseId + " expired while its blocks were sent"});
      }
      reply(PullEnd{p.pullId});
    }
    leases_.countSent(bytes);
  }

  void done(const Done& d) {
    LeaseTable::PullCheck why;
    auto ended = leases_.end(d.leaseId, d.gaveUp ? LeaseEnd::GaveUp : LeaseEnd::Done, conn_, &why);
    if (ended) return reply(DoneOk{d.leaseId});
    reply(ErrorMsg{codeFor(why.refusal), 0, d.leaseId, why.message});
  }

  OwnFd fd_;
  Transport transport_;
  const KvSource& source_;
  LeaseBook& leases_;
  LeaseTable::ConnId conn_;
  int64_t ioTimeoutMs_;
  FrameDecoder decoder_;
  bool welcomed_ = false;
  bool shm_ = false;
  bool open_ = true;
};

}  // namespace

void serveKvConnection(OwnFd fd, Transport transport, const KvSource& source, LeaseBook& leases,
                       const std::atomic<bool>& stop, int64_t ioTimeoutMs) {
  Session(std::move(fd), transport, source, leases, ioTimeoutMs).run(stop);
}

KvServer::KvServer(KvSource source, LeaseBook& leases, OwnFd unixListener, OwnFd tcpListener,
                   int64_t ioTimeoutMs)
    : source_(std::move(source)), leases_(leases), unix_(std::move(unixListener)),
      tcp_(std::move(tcpListener)), ioTimeoutMs_(ioTimeoutMs) {
  acceptor_ = std::thread([this] { acceptLoop(); });
}

KvServer::~KvServer() { stop(); }

void KvServer::stop() {
  stop_ = true;
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<Worker> workers;
  {
    std::lock_guard lock(mu_);
    workers.swap(workers_);
  }
  for (Worker& w : workers) w.thread.join();
  unix_.reset();
  tcp_.reset();
}

size_t KvServer::connections() const {
  std::lock_guard lock(mu_);
  return open_;
}

void KvServer::acceptLoop() {
  while (!stop_.load()) {
    pollfd fds[2];
    nfds_t n = 0;
    Transport kinds[2];
    if (unix_) {
      fds[n] = {unix_.get(), POLLIN, 0};
      kinds[n++] = Transport::Shm;
    }
    if (tcp_) {
      fds[n] = {tcp_.get(), POLLIN, 0};
      kinds[n++] = Transport::Tcp;
    }
    if (n == 0) return;
    int ready = ::poll(fds, n, 100);
    if (ready <= 0) continue;
    for (nfds_t i = 0; i < n; ++i) {
      if ((fds[i].revents & POLLIN) == 0) continue;
      int c = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (c < 0) continue;  // the peer gave up already, or fds ran out: try again later
      if (kinds[i] == Transport::Tcp) {
        int one = 1;
        ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      }
      std::lock_guard lock(mu_);
      for (auto it = workers_.begin(); it != workers_.end();) {
        if (it->finished->load()) {
          it->thread.join();
          it = workers_.erase(it);
        } else {
          ++it;
        }
      }
      ++open_;
      auto finished = std::make_shared<std::atomic<bool>>(false);
      workers_.push_back({std::thread([this, c, kind = kinds[i], finished] {
                            serveKvConnection(OwnFd(c), kind, source_, leases_, stop_,
                                              ioTimeoutMs_);
                            std::lock_guard lock(mu_);
                            --open_;
                            finished->store(true);
                          }),
                          finished});
    }
  }
}

// ---- the pulling side

KvPuller::KvPuller(OwnFd fd, Transport transport, const KvCompat& compat, uint32_t rank,
                   const std::string& expectEngineId, const engine::KvCacheLayout& ownLayout,
                   MonoNs deadline)
    : fd_(std::move(fd)), transport_(transport), peerLayout_(ownLayout) {
  setNonBlocking(fd_.get());
  send(Hello{compat, rank, expectEngineId, transport}, deadline);
  OwnFd region;
  Message m;
  std::vector<char> buf(4096);
  while (!decoder_.next(m)) {
    size_t n = recvSome(fd_.get(), buf.data(), buf.size(), deadline,
                        transport == Transport::Shm ? &region : nullptr, "the KV agent's welcome");
    if (n == 0) throw KvTransferError("the KV agent closed the connection before its welcome");
    decoder_.feed(buf.data(), n);
  }
  if (const auto* e = std::get_if<ErrorMsg>(&m)) throw refusal(*e, "the KV agent refused us");
  const auto* w = std::get_if<Welcome>(&m);
  if (w == nullptr) throw KvTransferError("the KV agent answered Hello with something else");
  peerEngineId_ = w->engineId;
  int64_t blockBytes = ownLayout.blockBytes();
  if (w->regionBytes == 0 || w->regionBytes % uint64_t(blockBytes) != 0 ||
      w->regionBytes / uint64_t(blockBytes) > uint64_t(INT32_MAX)) {
    throw KvTransferError("the KV agent's cache (" + std::to_string(w->regionBytes) +
                          " bytes) is not a whole number of " + std::to_string(blockBytes) +
                          "-byte blocks");
  }
  peerLayout_.numBlocks = int32_t(w->regionBytes / uint64_t(blockBytes));
  if (transport == Transport::Shm) {
    if (!region) throw KvTransferError("the KV agent sent no cache region with its welcome");
    // The region must be sealed against shrinking, or the peer could make our reads fault.
    struct stat st {};
    int seals = ::fcntl(region.get(), F_GET_SEALS);
    if (::fstat(region.get(), &st) != 0 || uint64_t(st.st_size) != w->regionBytes || seals < 0 ||
        (seals & F_SEAL_SHRINK) == 0) {
      throw KvTransferError("the KV agent's cache region is not a sealed memfd of " +
                            std::to_string(w->regionBytes) + " bytes");
    }
    void* p = ::mmap(nullptr, w->regionBytes, PROT_READ, MAP_SHARED, region.get(), 0);
    if (p == MAP_FAILED) {
      throw KvTransferError(std::string("cannot map the KV agent's cache: ") + std::strerror(errno));
    }
    peerBase_ = static_cast<const std::byte*>(p);
    peerBytes_ = int64_t(w->regionBytes);
  }
}

KvPuller::~KvPuller() {
  if (peerBase_ != nullptr) ::munmap(const_cast<std::byte*>(peerBase_), size_t(peerBytes_));
}

void KvPuller::send(const Message& m, MonoNs deadline) { sendFrame(fd_.get(), m, deadline); }

Message KvPuller::receive(MonoNs deadline) {
  for (;;) {
    Message m = receiveAny(deadline);
    bool doneAnswer = std::holds_alternative<DoneOk>(m) ||
                      (std::holds_alternative<ErrorMsg>(m) && std::get<ErrorMsg>(m).pullId == 0 &&
                       !std::get<ErrorMsg>(m).leaseId.empty());
    if (doneAnswer && doneAnswersDue_ > 0) {
      --doneAnswersDue_;  // an earlier Done's: the lease it ended is no business of this call
      continue;
    }
    return m;
  }
}

Message KvPuller::receiveAny(MonoNs deadline) {
  Message m;
  char buf[4096];
  while (!decoder_.next(m)) {
    size_t n = recvSome(fd_.get(), buf, sizeof buf, deadline, nullptr, "the KV agent");
    if (n == 0) throw KvTransferError("the KV agent closed the connection");
    decoder_.feed(buf, n);
  }
  return m;
}

uint64_t KvPuller::pull(const std::string& leaseId, const std::vector<int32_t>& remoteBlocks,
                        const std::vector<int32_t>& localBlocks, std::byte* dst,
                        const engine::KvCacheLayout& dstLayout, MonoNs deadline) {
  if (remoteBlocks.size() != localBlocks.size()) {
    throw std::invalid_argument("a pull of " + std::to_string(remoteBlocks.size()) +
                                " block(s) into " + std::to_string(localBlocks.size()));
  }
  if (dstLayout.chunkBytes() != peerLayout_.chunkBytes() ||
      dstLayout.chunksPerBlock() != peerLayout_.chunksPerBlock()) {
    throw std::invalid_argument("the destination cache's blocks differ from the peer's");
  }
  for (int32_t b : localBlocks) {
    if (b < 0 || b >= dstLayout.numBlocks) {
      throw std::invalid_argument("destination block " + std::to_string(b) + " is not in the cache");
    }
  }
  for (int32_t b : remoteBlocks) {
    if (b < 0 || b >= peerLayout_.numBlocks) {
      throw KvTransferError("block " + std::to_string(b) + " is not in the peer's cache");
    }
  }
  uint64_t pullId = nextPull_++;
  std::string context = "pulling lease " + leaseId;
  uint64_t bytes = uint64_t(dstLayout.blockBytes()) * remoteBlocks.size();
  size_t chunk = size_t(dstLayout.chunkBytes());
  int32_t chunks = dstLayout.chunksPerBlock();
  auto checkReady = [&](const Message& m) {
    if (const auto* e = std::get_if<ErrorMsg>(&m)) throw refusal(*e, context);
    const auto* ready = std::get_if<PullReady>(&m);
    if (ready == nullptr || ready->pullId != pullId || ready->bytes != bytes) {
      throw KvTransferError(context + ": the KV agent's answer does not match the pull");
    }
  };
  send(Pull{pullId, leaseId, remoteBlocks}, deadline);
  if (transport_ == Transport::Shm) {
    // Copy at once; whether the copy is good is known from the two answers.
    for (size_t i = 0; i < remoteBlocks.size(); ++i) {
      for (int32_t c = 0; c < chunks; ++c) {
        std::memcpy(dst + dstLayout.chunkOffset(c, localBlocks[i]),
                    peerBase_ + peerLayout_.chunkOffset(c, remoteBlocks[i]), chunk);
      }
    }
    send(Done{leaseId, false}, deadline);
    Message ready = receive(deadline);
    ++doneAnswersDue_;
    try {
      checkReady(ready);
    } catch (...) {
      flush(deadline);  // the Done's answer, which is of no use now
      throw;
    }
    --doneAnswersDue_;
    Message d = receiveAny(deadline);
    if (const auto* e = std::get_if<ErrorMsg>(&d)) throw refusal(*e, context);
    const auto* ok = std::get_if<DoneOk>(&d);
    if (ok == nullptr || ok->leaseId != leaseId) {
      throw KvTransferError(context + ": the KV agent's answer to Done does not match");
    }
    return bytes;
  }
  checkReady(receive(deadline));
  std::vector<iovec> iov;
  iov.reserve(localBlocks.size() * size_t(chunks));
  for (int32_t b : localBlocks) {
    for (int32_t c = 0; c < chunks; ++c) iov.push_back({dst + dstLayout.chunkOffset(c, b), chunk});
  }
  size_t first = 0;
  // Bytes that arrived with the PullReady frame first, then straight from the socket.
  while (first < iov.size() && decoder_.buffered() > 0) {
    advance(iov, first, decoder_.takeRaw(iov[first].iov_base, iov[first].iov_len));
  }
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min(kMaxIov, iov.size() - first);
    ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        if (!waitFor(fd_.get(), POLLIN, deadline)) throw KvTransferError(context + ": timed out");
        continue;
      }
      throw KvTransferError(context + ": " + std::strerror(errno));
    }
    if (n == 0) throw KvTransferError(context + ": the KV agent closed the connection mid-pull");
    advance(iov, first, size_t(n));
  }
  Message end = receive(deadline);
  if (const auto* e = std::get_if<ErrorMsg>(&end)) throw refusal(*e, context);
  const auto* pe = std::get_if<PullEnd>(&end);
  if (pe == nullptr || pe->pullId != pullId) {
    throw KvTransferError(context + ": the KV agent did not end the pull it started");
  }
  send(Done{leaseId, false}, deadline);  // its answer is read with the next message
  ++doneAnswersDue_;
  return bytes;
}

void KvPuller::giveUp(const std::string& leaseId, MonoNs deadline) {
  try {
    send(Done{leaseId, true}, deadline);
    ++doneAnswersDue_;
  } catch (const std::exception&) {
    // Best effort: a peer that is gone ends the lease itself (Disconnected or Expired).
  }
}

void KvPuller::flush(MonoNs deadline) {
  while (doneAnswersDue_ > 0) {
    receiveAny(deadline);
    --doneAnswersDue_;
  }
}

}  // namespace vsup::kv
