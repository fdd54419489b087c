// The server side of the control protocol: adapts a NodeHandler (plain C++ values) to the
// Cap'n Proto `Node` interface. Used by every vsup-aware child toward its parent and by the
// root toward `vsup tree`. Runs on the loop thread only.
#pragma once

#include <functional>
#include <string>

#include <kj/async.h>

#include "base/clock.h"
#include <capnp/capability.h>

#include "ipc/node.capnp.h"
#include "supervisor/spec.h"
#include "supervisor/status.h"

namespace vsup::supervisor {

// Reports a deferral of `node` (this node or a descendant) to whoever asked for the shutdown.
using DeferralReporter = std::function<void(const std::string& node, const Deferral&)>;

class NodeHandler {
 public:
  virtual ~NodeHandler() noexcept(false) = default;
  // Become ready (see Node.start in ipc/node.capnp). `config`: the start configuration the
  // parent sent (opaque bytes, empty when none).
  virtual kj::Promise<void> start(SupervisorSpec spec, std::string config) = 0;
  virtual kj::Promise<NodeStatus> status() = 0;
  // The same, answered within `budgetMs` (see Node.status). Default: status().
  virtual kj::Promise<NodeStatus> statusWithin(int64_t budgetMs);
  // A hurried shutdown is coming (Node.shutdown with `hurry`): stop every remaining child at
  // once, each killed by `deadline` at the latest. Called just before shutdown(). Default:
  // nothing (a node without children).
  virtual void hurry(MonoNs deadline);
  // Ordered shutdown before `deadline`; idempotent. Resolves to true when nothing was killed.
  virtual kj::Promise<bool> shutdown(MonoNs deadline, DeferralReporter reporter) = 0;
  // The node's application capability; the default says it has none.
  virtual kj::Promise<capnp::Capability::Client> service();
  // Stop intake, drain until `drainDeadline`. Default: nothing to stop.
  virtual kj::Promise<void> quiesce(MonoNs drainDeadline);
  // Leave the load balancers' rotation, keep serving (see Node.leaveRotation). Default: nothing.
  virtual kj::Promise<void> leaveRotation();
};

// The handler must outlive the returned capability's connection.
ipc::schema::Node::Client makeNodeServer(NodeHandler& handler);

}  // namespace vsup::supervisor
