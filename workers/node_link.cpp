#include "workers/node_link.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_handle.h"
#include "ipc/uv_kj.h"

namespace vsup::workers {
using ipc::failure;

namespace {

constexpr int64_t kRetryMs = 200;

bool parseAddress(const std::string& host, uint16_t port, sockaddr_storage& out, socklen_t& len) {
  std::memset(&out, 0, sizeof out);
  auto* v4 = reinterpret_cast<sockaddr_in*>(&out);
  if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    len = sizeof(sockaddr_in);
    return true;
  }
  std::string h = host;
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&out);
  if (::inet_pton(AF_INET6, h.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    len = sizeof(sockaddr_in6);
    return true;
  }
  return false;
}

// Errors worth another try: the peer is not listening yet, or not reachable yet.
bool transient(int err) {
  return err == ECONNREFUSED || err == ETIMEDOUT || err == EHOSTUNREACH || err == ENETUNREACH ||
         err == ECONNRESET || err == EADDRNOTAVAIL;
}

// One connect attempt: resolves with the connected socket, or with an errno.
struct Attempt {
  kj::Own<kj::PromiseFulfiller<int>> done;  // 0: connected
  int fd = -1;                              // borrowed: the caller's socket
  UvHandle<uv_poll_t> poll;
};

kj::Promise<int> connectOnce(uv_loop_t* loop, int fd, const sockaddr_storage& addr,
                             socklen_t len) {
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) return 0;
  if (errno != EINPROGRESS) return errno;
  auto paf = kj::newPromiseAndFulfiller<int>();
  auto attempt = kj::heap<Attempt>();
  attempt->done = kj::mv(paf.fulfiller);
  attempt->fd = fd;
  attempt->poll = UvHandle<uv_poll_t>::make([&](uv_poll_t* p) { uv_poll_init_socket(loop, p, fd); });
  attempt->poll->data = attempt.get();
  uv_poll_start(attempt->poll.get(), UV_WRITABLE, [](uv_poll_t* p, int, int) {
    auto* a = static_cast<Attempt*>(p->data);
    if (a == nullptr || !a->done->isWaiting()) return;
    int err = 0;
    socklen_t n = sizeof err;
    ::getsockopt(a->fd, SOL_SOCKET, SO_ERROR, &err, &n);
    uv_poll_stop(p);
    a->done->fulfill(int(err));
  });
  return paf.promise.attach(kj::mv(attempt));
}

kj::Promise<OwnFd> connectFrom(uv_loop_t* loop, std::string host, uint16_t port, MonoNs deadline,
                               MonoNs started, std::string lastError) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  if (!parseAddress(host, port, addr, len)) {
    return failure("connect to " + hostPort(host, port) + ": not an address literal");
  }
  auto tried = [host, port, started, deadline](const std::string& last) {
    return failure("cannot reach the leader at " + hostPort(host, port) + " within " +
                   std::to_string((deadline - started) / kNsPerMs) + " ms (last: " + last + ")");
  };
  if (monoNow() >= deadline) return tried(lastError.empty() ? "no attempt" : lastError);
  auto fd = std::make_shared<OwnFd>(
      ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!*fd) return failure(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  ::setsockopt(fd->get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd->get(), SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  // The attempt itself is bounded by the deadline: a SYN into a black hole waits for no answer.
  uint64_t leftMs = uint64_t(std::max<int64_t>(1, (deadline - monoNow()) / kNsPerMs));
  auto timedOut = ipc::uvSleep(loop, leftMs).then([]() { return ETIMEDOUT; });
  return connectOnce(loop, fd->get(), addr, len)
      .exclusiveJoin(kj::mv(timedOut))
      .then([loop, host, port, deadline, started, fd, tried](int err) -> kj::Promise<OwnFd> {
        if (err == 0) return kj::mv(*fd);
        std::string why = std::strerror(err);
        if (!transient(err) || monoNow() + kRetryMs * kNsPerMs >= deadline) return tried(why);
        return ipc::uvSleep(loop, kRetryMs).then([loop, host, port, deadline, started, why]() {
          return connectFrom(loop, host, port, deadline, started, why);
        });
      });
}

}  // namespace

std::string resolveHost(const std::string& host, const std::string& what) {
  sockaddr_storage probe{};
  socklen_t len = 0;
  if (parseAddress(host, 0, probe, len)) {
    return host.size() >= 2 && host.front() == '[' ? host.substr(1, host.size() - 2) : host;
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (rc != 0 || found == nullptr) {
    throw std::runtime_error(what + " '" + host + "': cannot resolve it (" +
                             (rc != 0 ? ::gai_strerror(rc) : "no address") + ")");
  }
  char text[INET6_ADDRSTRLEN] = {};
  if (found->ai_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr, text,
                sizeof text);
  } else {
    ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(found->ai_addr)->sin6_addr, text,
                sizeof text);
  }
  ::freeaddrinfo(found);
  return text;
}

kj::Promise<OwnFd> connectTcp(uv_loop_t* loop, const std::string& host, uint16_t port,
                              MonoNs deadline) {
  return connectFrom(loop, host, port, deadline, monoNow(), "");
}

std::string localAddressOf(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return "";
  char text[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&a)->sin_addr, text, sizeof text);
  } else if (a.ss_family == AF_INET6) {
    ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&a)->sin6_addr, text, sizeof text);
  }
  return text;
}

std::string hostPort(const std::string& host, uint16_t port) {
  bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Heartbeat::Heartbeat(uv_loop_t* loop, int64_t intervalMs, int64_t timeoutMs,
                     std::function<kj::Promise<void>()> ping,
                     std::function<void(std::string)> onLost)
    : loop_(loop), intervalMs_(intervalMs), timeoutMs_(timeoutMs), ping_(std::move(ping)),
      onLost_(std::move(onLost)), running_(beat().eagerlyEvaluate(nullptr)) {}

kj::Promise<void> Heartbeat::beat() {
  return ipc::uvSleep(loop_, uint64_t(intervalMs_)).then([this]() {
    auto unanswered = ipc::uvSleep(loop_, uint64_t(timeoutMs_)).then([this]() -> bool {
      return false;
    });
    return ping_()
        .then([]() { return true; })
        .exclusiveJoin(kj::mv(unanswered))
        .then(
            [this](bool answered) -> kj::Promise<void> {
              if (answered) return beat();
              onLost_("no answer to a heartbeat for " + std::to_string(timeoutMs_) + " ms");
              return kj::READY_NOW;
            },
            [this](kj::Exception&& e) -> kj::Promise<void> {
              onLost_("the connection is gone (" + ipc::userMessage(e) + ")");
              return kj::READY_NOW;
            });
  });
}

}  // namespace vsup::workers
