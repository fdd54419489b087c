// The control link between the nodes of an engine that spans machines (docs/architecture.md,
// "Across nodes"): TCP, since the tree's socketpairs and pidfds do not cross hosts. What both
// ends need: resolving the leader's address, a connect that retries until a deadline (the
// leader's pod may come up after the workers'), and a heartbeat, since a host that vanishes or
// a process that is stopped closes no connection.
//
// Runs on the loop thread only.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>

#include <kj/async.h>

#include "base/clock.h"
#include "base/fd.h"

namespace vsup::workers {

// `host` (an address literal or a host name) as an address literal, the first address
// getaddrinfo(3) gives for TCP. Blocking (a DNS lookup): called once, before serving. Throws
// std::runtime_error naming `what` and the host ("--master-addr 'x': no such host (...)").
std::string resolveHost(const std::string& host, const std::string& what);

// Connects to host:port (an address literal), retrying every 200 ms while the peer refuses or
// cannot be reached yet, until `deadline`. Fails with a KJ exception naming the address, how
// long it tried and the last error. The socket is non-blocking and close-on-exec, with
// TCP_NODELAY and keepalive.
kj::Promise<OwnFd> connectTcp(uv_loop_t* loop, const std::string& host, uint16_t port,
                              MonoNs deadline);

// The local address of a connected socket ("10.0.0.2"): the address of the interface that
// reaches the peer, which is where this node's ranks listen for their peers.
std::string localAddressOf(int fd);

// A TCP address for messages: "10.0.0.1:29500", "[fd00::1]:29500".
std::string hostPort(const std::string& host, uint16_t port);

// Calls `ping` every intervalMs. When one fails (the connection is gone) or stays unanswered
// for timeoutMs, calls onLost once with why, and stops. Lost within intervalMs + timeoutMs of
// the peer's last answer. Destroying it stops it (onLost is then never called).
class Heartbeat {
 public:
  Heartbeat(uv_loop_t* loop, int64_t intervalMs, int64_t timeoutMs,
            std::function<kj::Promise<void>()> ping, std::function<void(std::string)> onLost);
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

 private:
  kj::Promise<void> beat();

  uv_loop_t* loop_;
  int64_t intervalMs_;
  int64_t timeoutMs_;
  std::function<kj::Promise<void>()> ping_;
  std::function<void(std::string)> onLost_;
  kj::Promise<void> running_;
};

}  // namespace vsup::workers
