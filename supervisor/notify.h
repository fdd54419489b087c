// The systemd notify protocol, served by a supervisor to its generic children: one SOCK_DGRAM
// Unix socket in the abstract namespace (no file on disk, nothing to clean up), whose address
// children find in $NOTIFY_SOCKET ("@vsup-..."). The sender of each datagram is identified by
// its kernel-checked SCM_CREDENTIALS pid, so a child cannot speak for another.
// Runs on the loop thread only.
#pragma once

#include <sys/types.h>
#include <uv.h>

#include <functional>
#include <string>
#include <string_view>

#include "base/fd.h"
#include "ipc/uv_handle.h"

namespace vsup::supervisor {

// One parsed datagram: any of the fields may be absent.
struct NotifyMessage {
  bool ready = false;
  bool stopping = false;
  std::string status;          // STATUS=...
  int64_t extendTimeoutUs = -1;  // EXTEND_TIMEOUT_USEC=...
  static NotifyMessage parse(std::string_view datagram);
};

class NotifySocket {
 public:
  using Handler = std::function<void(pid_t sender, const NotifyMessage&)>;
  NotifySocket(uv_loop_t* loop, Handler handler);
  ~NotifySocket();
  NotifySocket(const NotifySocket&) = delete;
  NotifySocket& operator=(const NotifySocket&) = delete;

  // The value for $NOTIFY_SOCKET.
  const std::string& address() const { return address_; }

 private:
  static void onReadable(uv_poll_t* handle, int status, int events);

  Handler handler_;
  OwnFd fd_;
  std::string address_;
  UvHandle<uv_poll_t> poll_;
};

// The other side of the protocol, for a tree's root that is itself someone's child (a child of
// another vsup tree with ready = "notify", or a systemd Type=notify service): sends `state`
// ("READY=1", "STOPPING=1") to $NOTIFY_SOCKET, an abstract ("@...") or filesystem socket.
// Returns false when $NOTIFY_SOCKET is unset, or the send failed (then it logs why once).
bool notifyServiceManager(std::string_view state);

}  // namespace vsup::supervisor
