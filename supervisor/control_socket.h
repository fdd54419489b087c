// The root's control socket: serves `Node` to `vsup tree` (README, "`vsup tree` and the control socket").
//
// Lives at $XDG_RUNTIME_DIR/vsup/<name>-<pid>.sock, else /tmp/vsup-<uid>/<name>-<pid>.sock; the
// directory is 0700 and must be ours, the socket 0600, and every peer's uid is checked with
// SO_PEERCRED (same user or root). It answers until it is destroyed — the root keeps it until
// the last moment, since shutdown is exactly when people look — and the destructor removes it.
// Runs on the loop thread only.
#pragma once

#include <uv.h>

#include <list>
#include <memory>
#include <string>

#include <kj/async.h>

#include "base/fd.h"
#include "ipc/uv_handle.h"
#include "supervisor/node_service.h"

namespace vsup::ipc {
class RpcLink;
}

namespace vsup::supervisor {

class ControlSocket final : public kj::TaskSet::ErrorHandler {
 public:
  // Throws vsup::Error when the path cannot be used (too long, live socket already there,
  // directory not ours or not 0700).
  ControlSocket(uv_loop_t* loop, std::string path, NodeHandler& handler);
  ~ControlSocket();
  ControlSocket(const ControlSocket&) = delete;
  ControlSocket& operator=(const ControlSocket&) = delete;

  const std::string& path() const { return path_; }

  // The directory default sockets live in: $XDG_RUNTIME_DIR/vsup or /tmp/vsup-<uid>.
  static std::string defaultDirectory();
  static std::string defaultPath(const std::string& name);

 private:
  struct Connection;
  static void onAccept(uv_poll_t* handle, int status, int events);
  void accept();
  void taskFailed(kj::Exception&& e) override;

  uv_loop_t* loop_;
  std::string path_;
  std::string createdDir_;  // removed at exit when empty
  NodeHandler& handler_;
  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
  std::list<std::unique_ptr<Connection>> connections_;
  kj::Own<kj::TaskSet> tasks_;  // watches connections; dropped first in the destructor
};

// Creates `dir` with mode 0700 if missing, else checks it is a directory of ours with mode
// 0700. Returns true when it created it.
bool ensurePrivateDirectory(const std::string& dir);

}  // namespace vsup::supervisor
