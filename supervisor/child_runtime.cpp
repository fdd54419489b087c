#include "supervisor/child_runtime.h"

#include "supervisor/fault_injection.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>

#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/supervisor.h"

namespace vsup::supervisor {
namespace {

constexpr int64_t kParentLostDeadlineMs = 500;


int controlFd() {
  const char* v = std::getenv("VSUP_CONTROL_FD");
  if (v == nullptr) return -1;
  int fd = -1;
  std::string_view s(v);
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), fd);
  if (ec != std::errc() || end != s.data() + s.size() || fd < 0) return -1;
  return fd;
}

}  // namespace

void ChildRuntime::taskFailed(kj::Exception&& e) {
  if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
  vsup::log().warn("[node] task failed: {}", ipc::userMessage(e));
}

void ShutdownContext::defer(const std::string& reason, const std::string& progress) {
  // One line per change: a hook that reports every 100 ms must not flood the log.
  if (reason == lastReason_ && progress == lastProgress_) return;
  lastReason_ = reason;
  lastProgress_ = progress;
  vsup::log().info("[shutdown] {}: deferring: {}{}", node_, reason,
                   progress.empty() ? std::string() : " (" + progress + ")");
  report_(Deferral{reason, progress});
}

bool ChildRuntime::launchedByVsup() { return controlFd() >= 0; }

ChildRuntime::ChildRuntime(uv_loop_t* loop)
    : loop_(loop), startedAt_(monoNow()), lifeline_(kj::READY_NOW) {
  int fd = controlFd();
  VSUP_REQUIRE(fd >= 0 && ::fcntl(fd, F_GETFD) >= 0,
               "this program must be started by vsup as a vsup-aware child ($VSUP_CONTROL_FD "
               "names no open socket)");
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);  // our own children must not inherit the control socket
  const char* name = std::getenv("VSUP_NODE_NAME");
  name_ = name != nullptr ? name : "node";
  if (const char* level = std::getenv("VSUP_LOG_LEVEL")) {
    try {
      setLogLevel(level);
    } catch (const vsup::Error&) {
      // An unknown level from a newer parent: keep the default.
    }
  }
  // The variables describe this process's edge, not its children's.
  ::unsetenv("VSUP_CONTROL_FD");
  tasks_ = kj::heap<kj::TaskSet>(*this);
  link_ = ipc::RpcLink::serve(loop_, OwnFd(fd), makeNodeServer(*this));
  lifeline_ = link_->onDisconnect().then([this]() { onParentLost(); }).eagerlyEvaluate(nullptr);
}

ChildRuntime::~ChildRuntime() {
  lifeline_ = kj::READY_NOW;
  shutdownDone_ = nullptr;
  tasks_ = nullptr;
  link_.reset();
}

void ChildRuntime::addShutdownHook(std::string name, HookFn hook) {
  hooks_.emplace_back(std::move(name), std::move(hook));
}

void ChildRuntime::setService(capnp::Capability::Client service) { service_ = kj::mv(service); }

kj::Promise<capnp::Capability::Client> ChildRuntime::service() {
  if (!service_) return KJ_EXCEPTION(UNIMPLEMENTED, "node '" + name_ + "' has no service");
  return *service_;
}

kj::Promise<void> ChildRuntime::quiesce(MonoNs drainDeadline) {
  crashIfInjected(name_, "drain");
  if (!quiesce_) return kj::READY_NOW;
  return quiesce_(drainDeadline);
}

kj::Promise<void> ChildRuntime::leaveRotation() {
  if (!leaveRotation_) return kj::READY_NOW;
  return leaveRotation_();
}

void ChildRuntime::reportDeferral(const std::string& node, const Deferral& deferral) {
  if (reporter_) reporter_(node, deferral);
}

kj::Promise<void> ChildRuntime::start(SupervisorSpec spec, std::string config) {
  crashIfInjected(name_, "start");
  pauseIfInjected(name_, "start");
  startConfig_ = std::move(config);
  kj::Promise<void> ready = start_ ? start_(spec) : kj::Promise<void>(kj::READY_NOW);
  return ready.then(
      [this]() -> kj::Promise<void> {
        if (!shuttingDown_) state_ = NodeState::Running;
        return kj::READY_NOW;
      },
      [this](kj::Exception&& e) -> kj::Promise<void> {
        // Remembered for the exit status: a parent that was already shutting down when this
        // failure reached it (the start it waited for is cancelled) still learns of it. A start
        // cut short by our own shutdown is not a failure of its own.
        if (!shuttingDown_) startFailed_ = true;
        return kj::mv(e);
      });
}

kj::Promise<NodeStatus> ChildRuntime::status() { return statusWithin(kStatusBudgetMs); }

void ChildRuntime::hurry(MonoNs deadline) {
  if (hurry_) hurry_(deadline);  // (a node without children has nothing to hurry)
}

kj::Promise<NodeStatus> ChildRuntime::statusWithin(int64_t budgetMs) {
  auto overlay = [this](NodeStatus s) {
    s.name = name_;
    s.pid = ::getpid();
    if (s.uptimeMs == 0) s.uptimeMs = (monoNow() - startedAt_) / kNsPerMs;
    if (shuttingDown_) s.state = NodeState::Stopping;
    if (deferral_.active()) s.deferral = deferral_;
    return s;
  };
  if (statusWithin_) return statusWithin_(budgetMs).then(kj::mv(overlay));
  if (status_) return status_().then(kj::mv(overlay));  // by value: then() keeps a reference to an lvalue
  NodeStatus s;
  s.type = NodeType::Worker;
  s.state = state_;
  s.uptimeMs = (monoNow() - startedAt_) / kNsPerMs;
  return overlay(std::move(s));
}

kj::Promise<bool> ChildRuntime::shutdown(MonoNs deadline, DeferralReporter reporter) {
  crashIfInjected(name_, "shutdown");
  if (faultInjected(name_, "ignore-shutdown")) {
    vsup::log().warn("[shutdown] {}: ignoring the shutdown request (VSUP_TEST_FAULT)", name_);
    return kj::NEVER_DONE;
  }
  if (reporter) reporter_ = std::move(reporter);
  if (shuttingDown_) {
    // Idempotent; an earlier deadline shortens what is left (the children's part).
    if (deadline < deadline_) {
      deadline_ = deadline;
      if (stopChildren_) tasks_->add(stopChildren_(deadline).ignoreResult());
    }
    KJ_IF_MAYBE(done, shutdownDone_) { return done->addBranch(); }
    return true;
  }
  shuttingDown_ = true;
  state_ = NodeState::Stopping;
  deadline_ = deadline;
  MonoNs began = monoNow();
  vsup::log().info("[shutdown] {}: shutdown requested (deadline {})", name_,
                   deadline == kNoDeadline ? std::string("none")
                                           : fmt::format("{:.1f}s", double(deadline - began) / 1e9));
  // 1. Hooks first, while this node's children still serve them; bounded so the children keep
  //    a share of the deadline (DeadlineBudget::forHooks). 2. Then the children, in reverse
  //    order.
  kj::Promise<void> hooks = runHooks(0);
  if (deadline != kNoDeadline) {
    MonoNs hookDeadline = DeadlineBudget::forHooks(deadline, began);
    hooks = hooks.exclusiveJoin(ipc::uvSleep(loop_, msUntil(hookDeadline)).then([this]() {
      vsup::log().warn("[shutdown] {}: shutdown hooks abandoned at their deadline", name_);
      clean_ = false;
    }));
  }
  auto done = hooks
                  .then([this]() -> kj::Promise<bool> {
                    deferral_ = {};
                    if (!stopChildren_) return true;
                    return stopChildren_(deadline_);
                  })
                  .then([this, began](bool childrenClean) {
                    clean_ = clean_ && childrenClean;
                    vsup::log().info("[shutdown] {}: stopped in {:.1f}ms ({})", name_,
                                     double(monoNow() - began) / 1e6,
                                     childFailed_ ? "a child failed"
                                     : clean_     ? "clean"
                                                  : "with escalations");
                    // A child that failed on its own outranks our own escalations: the parent
                    // must see a failure (non-zero, not 4), as for an unexpected death.
                    // A start that failed is reported as such (3), whatever the stop was.
                    exit(childFailed_   ? kExitError
                         : startFailed_ ? kExitStartFailed
                         : clean_       ? kExitClean
                                        : kExitEscalated);
                    return clean_;
                  })
                  .fork();
  auto branch = done.addBranch();
  shutdownDone_ = kj::mv(done);
  return branch;
}

kj::Promise<void> ChildRuntime::runHooks(size_t index) {
  if (index >= hooks_.size()) return kj::READY_NOW;
  auto ctx = kj::heap<ShutdownContext>(name_, deadline_, [this](const Deferral& d) {
    deferral_ = d;
    reportDeferral(name_, d);
  });
  auto& ref = *ctx;
  return hooks_[index].second(ref).attach(kj::mv(ctx)).then([this, index]() {
    return runHooks(index + 1);
  });
}

void ChildRuntime::onParentLost() {
  if (exiting_) return;
  if (shuttingDown_) {
    // Already on the way out; the parent no longer waits for the answer.
    return;
  }
  parentLost_ = true;
  vsup::log().error("[shutdown] {}: parent connection lost: tearing down within {}ms", name_,
                    kParentLostDeadlineMs);
  tasks_->add(shutdown(deadlineAfterMs(kParentLostDeadlineMs), nullptr).then([this](bool) {
    exitCode_ = kExitError;
  }));
}

void ChildRuntime::exit(int code) {
  if (exiting_) return;
  exiting_ = true;
  exitCode_ = code;
  // Let the shutdown reply go out first: the stop happens on a later loop turn.
  tasks_->add(kj::evalLater([this]() { uv_stop(loop_); }));
}

int ChildRuntime::run() {
  while (!exiting_) {
    if (uv_run(loop_, UV_RUN_DEFAULT) == 0 && !exiting_) {
      // Nothing is left that could ever wake us: not even the parent's connection.
      vsup::log().error("[node] {}: event loop ran dry before shutdown", name_);
      return kExitError;
    }
  }
  // A parent-lost teardown overrides the clean code: the tree lost its parent unexpectedly.
  return exitCode_;
}

}  // namespace vsup::supervisor
