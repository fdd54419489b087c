#include "supervisor/control_socket.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "base/check.h"
#include "base/log.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"

namespace vsup::supervisor {

struct ControlSocket::Connection {
  std::unique_ptr<ipc::RpcLink> link;
};

void ControlSocket::taskFailed(kj::Exception&& e) {
  vsup::log().debug("[control] connection task failed: {}", ipc::userMessage(e));
}

bool ensurePrivateDirectory(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) == 0) return true;
  VSUP_REQUIRE(errno == EEXIST, dir + ": cannot create directory: " + std::strerror(errno));
  struct stat st;
  VSUP_REQUIRE(::lstat(dir.c_str(), &st) == 0, dir + ": " + std::strerror(errno));
  VSUP_REQUIRE(S_ISDIR(st.st_mode), dir + ": exists and is not a directory");
  VSUP_REQUIRE(st.st_uid == ::geteuid(), dir + ": owned by another user (uid " +
                                             std::to_string(st.st_uid) + "); refusing to use it");
  VSUP_REQUIRE((st.st_mode & 0077) == 0, dir + ": must have mode 0700 (it is open to others)");
  return false;
}

std::string ControlSocket::defaultDirectory() {
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  if (xdg != nullptr && *xdg == '/') return std::string(xdg) + "/vsup";
  return "/tmp/vsup-" + std::to_string(::geteuid());
}

std::string ControlSocket::defaultPath(const std::string& name) {
  return defaultDirectory() + "/" + name + "-" + std::to_string(::getpid()) + ".sock";
}

ControlSocket::ControlSocket(uv_loop_t* loop, std::string path, NodeHandler& handler)
    : loop_(loop), path_(std::move(path)), handler_(handler), tasks_(kj::heap<kj::TaskSet>(*this)) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  VSUP_REQUIRE(path_.size() < sizeof addr.sun_path,
               "control socket path too long (" + std::to_string(path_.size()) + " bytes, max " +
                   std::to_string(sizeof addr.sun_path - 1) + "): " + path_);
  std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);

  std::string dir = path_.substr(0, path_.rfind('/'));
  if (dir.empty()) dir = "/";
  if (path_.rfind(defaultDirectory() + "/", 0) == 0 && ensurePrivateDirectory(dir)) {
    createdDir_ = dir;
  }

  fd_.reset(VSUP_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)));
  // On Linux, bind() creates the socket file with the socket's own inode mode (less the umask):
  // set to 0600 first, the file never exists with a wider mode, not even for an instant (a
  // chmod after bind left a window another user's connect, or a test, could see).
  VSUP_SYSCALL(::fchmod(fd_.get(), 0600));
  if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
    VSUP_REQUIRE(errno == EADDRINUSE, path_ + ": cannot bind control socket: " + std::strerror(errno));
    // Something is there. A live tree answers a connect; a stale socket file does not.
    OwnFd probe(VSUP_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)));
    bool live = ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    VSUP_REQUIRE(!live, path_ + ": another vsup tree is serving this control socket");
    struct stat st;
    VSUP_REQUIRE(::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode),
                 path_ + ": exists and is not a socket; refusing to replace it");
    ::unlink(path_.c_str());
    VSUP_SYSCALL(::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr));
  }
  ::chmod(path_.c_str(), 0600);  // where fchmod before bind is not honoured (not Linux)
  VSUP_SYSCALL(::listen(fd_.get(), 16));
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) { uv_poll_init(loop_, h, fd_.get()); });
  poll_->data = this;
  uv_poll_start(poll_.get(), UV_READABLE, &ControlSocket::onAccept);
  // Listening alone does not keep the process alive; the tree does.
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_.get()));
}

ControlSocket::~ControlSocket() {
  tasks_ = nullptr;
  poll_.reset();
  connections_.clear();
  ::unlink(path_.c_str());
  fd_.reset();
  if (!createdDir_.empty()) ::rmdir(createdDir_.c_str());  // only if empty: others may use it
}

void ControlSocket::onAccept(uv_poll_t* handle, int status, int) {
  auto* self = static_cast<ControlSocket*>(handle->data);
  if (self == nullptr || status < 0) return;
  try {
    self->accept();
  } catch (const std::exception& e) {
    vsup::log().warn("[control] accept failed: {}", e.what());
  }
}

void ControlSocket::accept() {
  for (;;) {
    int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // EAGAIN: no more
    }
    OwnFd conn(fd);
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
        (cred.uid != ::geteuid() && cred.uid != 0)) {
      vsup::log().warn("[control] refused a connection from uid {} (pid {})", cred.uid, cred.pid);
      continue;
    }
    auto c = std::make_unique<Connection>();
    c->link = ipc::RpcLink::serve(loop_, std::move(conn), makeNodeServer(handler_));
    Connection* raw = c.get();
    // The watcher lives in tasks_, not in the connection, and the removal is a later event:
    // a link must not be destroyed from inside its own callback.
    tasks_->add(c->link->onDisconnect().then([this, raw]() {
      return kj::evalLater([this, raw]() {
        connections_.remove_if([raw](const auto& p) { return p.get() == raw; });
      });
    }));
    connections_.push_back(std::move(c));
  }
}

}  // namespace vsup::supervisor
