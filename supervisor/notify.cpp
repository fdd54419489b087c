#include "supervisor/notify.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <charconv>
#include <cstring>
#include <random>

#include "base/check.h"
#include "base/log.h"

namespace vsup::supervisor {

NotifyMessage NotifyMessage::parse(std::string_view datagram) {
  NotifyMessage m;
  while (!datagram.empty()) {
    size_t nl = datagram.find('\n');
    std::string_view line = datagram.substr(0, nl);
    datagram = nl == std::string_view::npos ? std::string_view() : datagram.substr(nl + 1);
    if (line == "READY=1") {
      m.ready = true;
    } else if (line == "STOPPING=1") {
      m.stopping = true;
    } else if (line.rfind("STATUS=", 0) == 0) {
      m.status = std::string(line.substr(7));
    } else if (line.rfind("EXTEND_TIMEOUT_USEC=", 0) == 0) {
      std::string_view v = line.substr(20);
      int64_t us = 0;
      auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), us);
      if (ec == std::errc() && end == v.data() + v.size() && us >= 0) m.extendTimeoutUs = us;
    }
  }
  return m;
}

NotifySocket::NotifySocket(uv_loop_t* loop, Handler handler) : handler_(std::move(handler)) {
  fd_.reset(VSUP_SYSCALL(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)));
  int on = 1;
  VSUP_SYSCALL(::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on));
  // A unique abstract name: pid + per-process counter + randomness (another user cannot guess
  // it to pre-bind it, and two supervisors in one process never collide).
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  std::string name = "vsup-notify-" + std::to_string(::getpid()) + "-" +
                     std::to_string(counter++) + "-" + std::to_string(rd());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  socklen_t len = socklen_t(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  VSUP_SYSCALL(::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), len));
  address_ = "@" + name;
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) { uv_poll_init(loop, h, fd_.get()); });
  poll_->data = this;
  uv_poll_start(poll_.get(), UV_READABLE, &NotifySocket::onReadable);
  // Waiting for notifications alone does not keep a loop alive.
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_.get()));
}

NotifySocket::~NotifySocket() { poll_.reset(); }

void NotifySocket::onReadable(uv_poll_t* handle, int status, int) {
  auto* self = static_cast<NotifySocket*>(handle->data);
  if (self == nullptr || status < 0) return;
  for (;;) {
    char buf[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))];
    iovec iov{buf, sizeof buf - 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(self->fd_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: drained
    }
    pid_t sender = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
        ucred cred;
        std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
        sender = cred.pid;
      }
    }
    if (sender <= 0) continue;  // no credentials: cannot attribute it, drop
    try {
      self->handler_(sender, NotifyMessage::parse(std::string_view(buf, size_t(n))));
    } catch (const std::exception& e) {
      vsup::log().error("[supervisor] notify message handling failed: {}", e.what());
    }
  }
}

bool notifyServiceManager(std::string_view state) {
  const char* where = std::getenv("NOTIFY_SOCKET");
  if (where == nullptr || where[0] == '\0') return false;
  std::string path = where;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path || (path[0] != '@' && path[0] != '/')) {
    vsup::log().warn("[supervisor] NOTIFY_SOCKET '{}': not an absolute or abstract socket "
                     "address: not notifying",
                     path);
    return false;
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len = socklen_t(offsetof(sockaddr_un, sun_path) + path.size());
  OwnFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd || ::sendto(fd.get(), state.data(), state.size(), MSG_NOSIGNAL,
                      reinterpret_cast<const sockaddr*>(&addr), len) < 0) {
    vsup::log().warn("[supervisor] NOTIFY_SOCKET {}: {}: {}", path, std::string(state),
                     std::strerror(errno));
    return false;
  }
  return true;
}

}  // namespace vsup::supervisor
