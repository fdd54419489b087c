// `vsup __node`: a sub-supervisor (a child of type "supervisor"). Its parent passes the control
// socket on fd 3, sends the spec with Node.start (and no start configuration: a sub-supervisor has
// none, and ignores any), and stops it with Node.shutdown — never with a signal, which only the
// root handles; if its parent disappears it tears its subtree down by itself (ChildRuntime).
// Node.leaveRotation is passed on to every running vsup-aware child; a hurried Node.shutdown (a
// second signal at the root) stops every remaining child at once (Supervisor::stopAllNow).
#include <memory>

#include <kj/debug.h>

#include "base/log.h"
#include "supervisor/child_runtime.h"
#include "supervisor/orphan_reaper.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/node_process.h"

namespace vsup::tools {

using namespace vsup::supervisor;

namespace {

// The supervisor this process is, created when the parent sends the spec.
class SubSupervisor final : public workers::NodeState {
 public:
  // A subreaper before the first child exists: orphans of this subtree are killed and reaped
  // here (supervisor/orphan_reaper.h).
  SubSupervisor(uv_loop_t* loop, ChildRuntime& runtime)
      : loop_(loop),
        runtime_(runtime),
        subreaper_(OrphanReaper::becomeSubreaper(loop, runtime.name())) {}

  kj::Promise<void> start(const SupervisorSpec& spec) {
    if (sup_) return KJ_EXCEPTION(FAILED, "already started");
    SupervisorOptions options;
    options.selfExe = selfExecutable();
    options.collectOutput = true;
    options.onDeferral = [this](const std::string& node, const Deferral& d) {
      runtime_.reportDeferral(node, d);
    };
    sup_ = std::make_unique<Supervisor>(loop_, spec, options);
    // A supervisor that terminates on its own (intensity exceeded, auto_shutdown) ends this
    // process with its outcome; the parent sees the exit status.
    watchdog_ = sup_->terminated()
                    .then([this](Outcome o) { runtime_.exit(exitCodeFor(o)); })
                    .eagerlyEvaluate(nullptr);
    return sup_->start();
  }

  kj::Promise<NodeStatus> status(int64_t budgetMs) {
    if (sup_) return sup_->status(budgetMs);
    NodeStatus s;
    s.type = NodeType::Supervisor;
    // Qualified: inside this class, NodeState names its base, workers::NodeState.
    s.state = supervisor::NodeState::Starting;
    return s;
  }

  // Node.leaveRotation: passed on to every running vsup-aware child (an API server below a
  // sub-supervisor leaves the rotation too).
  kj::Promise<void> leaveRotation() {
    if (!sup_) return kj::READY_NOW;
    return sup_->leaveRotationChildren();
  }

  // A hurried shutdown (a second signal at the root): every remaining child stopped at once.
  void hurry(MonoNs deadline) {
    if (sup_) sup_->stopAllNow(deadline);
  }

  kj::Promise<bool> stopChildren(MonoNs deadline) {
    if (!sup_) return true;
    return sup_->shutdown(deadline).then([this]() {
      if (sup_->outcome() == Outcome::ChildFailed) runtime_.reportChildFailure();
      return sup_->escalations() == 0;
    });
  }

  ~SubSupervisor() override {
    watchdog_ = kj::READY_NOW;
    sup_.reset();
    subreaper_.reset();  // its last sweep, once every child of the supervisor is reaped
  }

 private:
  uv_loop_t* loop_;
  ChildRuntime& runtime_;
  std::unique_ptr<Subreaper> subreaper_;
  std::unique_ptr<Supervisor> sup_;
  kj::Promise<void> watchdog_ = kj::READY_NOW;
};

}  // namespace

int nodeMain() {
  // Before any thread exists, so that every thread has it blocked: the Subreaper reads SIGCHLD
  // from a signalfd.
  OrphanReaper::blockChildSignal();
  return workers::runNodeProcess("vsup __node", [](uv_loop_t* loop, ChildRuntime& runtime) {
    auto node = std::make_unique<SubSupervisor>(loop, runtime);
    SubSupervisor* n = node.get();
    runtime.onStart([n](const SupervisorSpec& spec) { return n->start(spec); });
    runtime.onStatusWithin([n](int64_t budgetMs) { return n->status(budgetMs); });
    runtime.onHurry([n](MonoNs deadline) { n->hurry(deadline); });
    runtime.onStopChildren([n](MonoNs deadline) { return n->stopChildren(deadline); });
    runtime.onLeaveRotation([n]() { return n->leaveRotation(); });
    return std::unique_ptr<workers::NodeState>(std::move(node));
  });
}

}  // namespace vsup::tools
