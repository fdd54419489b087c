// ChildRuntime: what a vsup-aware child process runs.
//
// It connects to its parent over the socket inherited as $VSUP_CONTROL_FD, serves `Node`
// there, and when the parent asks it to shut down: runs the registered shutdown hooks in order
// (a hook may defer, reporting a reason and progress that the parent and `vsup tree` see), then
// stops this process's own children, then ends run(). If the parent's connection drops (the
// parent died), it tears the same path down with a 500 ms deadline and exits non-zero.
//
// Threading: construct, use and destroy on the thread that runs the loop.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/clock.h"
#include "supervisor/node_service.h"
#include "supervisor/spec.h"
#include "supervisor/status.h"

namespace vsup::ipc {
class RpcLink;
}

namespace vsup::supervisor {

// Handed to each shutdown hook.
class ShutdownContext {
 public:
  ShutdownContext(std::string node, MonoNs deadline, std::function<void(const Deferral&)> report)
      : node_(std::move(node)), deadline_(deadline), report_(std::move(report)) {}
  MonoNs deadline() const { return deadline_; }
  // Say why this node is not done yet, e.g. defer("kv: 3 transfers pending", "1 of 4 done").
  // Logged as `[shutdown] <node>: deferring: ...`, shown in `vsup tree`, reported to the parent.
  void defer(const std::string& reason, const std::string& progress = "");

 private:
  std::string node_;
  MonoNs deadline_;
  std::function<void(const Deferral&)> report_;
  std::string lastReason_;
  std::string lastProgress_;
};

class ChildRuntime final : private NodeHandler, public kj::TaskSet::ErrorHandler {
 public:
  using StartFn = std::function<kj::Promise<void>(const SupervisorSpec&)>;
  using StatusFn = std::function<kj::Promise<NodeStatus>()>;
  // The same, answered within a time budget (milliseconds; see Node.status).
  using StatusWithinFn = std::function<kj::Promise<NodeStatus>(int64_t budgetMs)>;
  // Stops this node's own children before `deadline`; resolves to true if nothing was killed.
  using StopChildrenFn = std::function<kj::Promise<bool>(MonoNs deadline)>;
  using HookFn = std::function<kj::Promise<void>(ShutdownContext&)>;

  // True when this process was started by vsup as a vsup-aware child.
  static bool launchedByVsup();

  // Takes over $VSUP_CONTROL_FD. Throws vsup::Error when there is none.
  explicit ChildRuntime(uv_loop_t* loop);
  ~ChildRuntime() override;

  const std::string& name() const { return name_; }
  // The start configuration the parent sent with Node.start (its ChildSpec::startConfig): opaque
  // bytes, empty when it sent none. Set before the onStart() callback is called, and valid from
  // then on (a later Node.start, which a parent never sends, would replace it).
  const std::string& startConfig() const { return startConfig_; }

  // Called when the parent asks this node to start: resolve when ready. Default: ready at once.
  void onStart(StartFn fn) { start_ = std::move(fn); }
  // This node's subtree for `vsup tree`. Default: this process alone.
  void onStatus(StatusFn fn) { status_ = std::move(fn); }
  // The same for a node with children of its own: the budget is the time its answer may take
  // (its supervisor's status(budget) then gives its own children less). Replaces onStatus().
  void onStatusWithin(StatusWithinFn fn) { statusWithin_ = std::move(fn); }
  // Called when the parent hurries the shutdown (a second signal at the root): stop every
  // remaining child now, at once, each killed by `deadline` at the latest
  // (Supervisor::stopAllNow). The shutdown request with that deadline follows.
  void onHurry(std::function<void(MonoNs deadline)> fn) { hurry_ = std::move(fn); }
  void onStopChildren(StopChildrenFn fn) { stopChildren_ = std::move(fn); }
  // One of this node's children died or failed on its own while it stopped them: this node then
  // exits non-zero (not 4), so the failure reaches the root's exit status.
  void reportChildFailure() { childFailed_ = true; }
  // The parent's connection dropped and this node is tearing itself down (its hooks and
  // onStopChildren run as in a shutdown, but nobody asked for it: the tree above is gone).
  bool parentLost() const { return parentLost_; }
  void addShutdownHook(std::string name, HookFn hook);
  // This node's application interface, handed to the parent on Node.service.
  void setService(capnp::Capability::Client service);
  // Called on Node.quiesce: stop intake now, drain until the deadline.
  void onQuiesce(std::function<kj::Promise<void>(MonoNs drainDeadline)> fn) { quiesce_ = std::move(fn); }
  // Called on Node.leaveRotation: leave the load balancers' rotation, keep serving.
  void onLeaveRotation(std::function<kj::Promise<void>()> fn) { leaveRotation_ = std::move(fn); }
  // Forward a descendant's deferral to the parent.
  void reportDeferral(const std::string& node, const Deferral& deferral);

  // Ends run() with `code` without a parent's request (e.g. the node's supervisor gave up).
  // The node's children must already be stopped.
  void exit(int code);

  // Runs the loop until the node has shut down (or exit() was called); returns the exit status.
  int run();

 private:
  kj::Promise<void> start(SupervisorSpec spec, std::string config) override;
  kj::Promise<NodeStatus> status() override;
  kj::Promise<NodeStatus> statusWithin(int64_t budgetMs) override;
  void hurry(MonoNs deadline) override;
  kj::Promise<bool> shutdown(MonoNs deadline, DeferralReporter reporter) override;
  kj::Promise<capnp::Capability::Client> service() override;
  kj::Promise<void> quiesce(MonoNs drainDeadline) override;
  kj::Promise<void> leaveRotation() override;
  kj::Promise<void> runHooks(size_t index);
  void taskFailed(kj::Exception&& e) override;
  void onParentLost();

  uv_loop_t* loop_;
  std::string name_;
  MonoNs startedAt_;
  std::unique_ptr<ipc::RpcLink> link_;
  StartFn start_;
  StatusFn status_;
  StatusWithinFn statusWithin_;
  std::function<void(MonoNs)> hurry_;
  StopChildrenFn stopChildren_;
  bool childFailed_ = false;
  bool startFailed_ = false;  // start() failed: the exit status says so (kExitStartFailed)
  std::vector<std::pair<std::string, HookFn>> hooks_;
  std::optional<capnp::Capability::Client> service_;
  std::function<kj::Promise<void>(MonoNs)> quiesce_;
  std::function<kj::Promise<void>()> leaveRotation_;
  std::string startConfig_;
  NodeState state_ = NodeState::Starting;
  Deferral deferral_;
  DeferralReporter reporter_;
  MonoNs deadline_ = kNoDeadline;
  bool shuttingDown_ = false;
  bool clean_ = true;
  int exitCode_ = 0;
  bool exiting_ = false;
  bool parentLost_ = false;
  kj::Maybe<kj::ForkedPromise<bool>> shutdownDone_;
  kj::Promise<void> lifeline_;
  kj::Own<kj::TaskSet> tasks_;

};

}  // namespace vsup::supervisor
