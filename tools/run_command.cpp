// `vsup run --topology FILE`: the root supervisor process.
//
// The root owns SIGTERM/SIGINT (no other node of a tree handles signals). They are blocked and
// read from a signalfd on the loop, so no handler runs at all and the children, whose masks are
// reset at spawn, are unaffected. First signal: ordered shutdown. Second: the rest of it must
// finish within 1 s. Third: SIGKILL every child process group now.
//
// As a container's PID 1 (and only there: OrphanReaper::wanted) the root also reaps every
// orphan the kernel reparents to it: SIGCHLD joins the signalfd's set, and each one runs an
// OrphanReaper pass, plus one last pass before the root exits. Its own children are never
// touched by a pass; their Processes reap them through their pidfds, so the exit status is the
// same as anywhere else. (PID 1 gets no signal it has not blocked or handled: blocked and read
// from the signalfd, SIGTERM works there as everywhere.)
#include <limits.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>

#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/control_socket.h"
#include "supervisor/orphan_reaper.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "supervisor/topology.h"
#include "tools/commands.h"

namespace vsup::tools {

using namespace vsup::supervisor;

namespace {

// After a second signal, no child gets more than this between its stop request and SIGKILL.
constexpr int64_t kHurryMs = 500;

// The root serves the same Node interface as every other node, to `vsup tree`.
class RootNode final : public NodeHandler {
 public:
  explicit RootNode(Supervisor& sup) : sup_(sup) {}
  kj::Promise<void> start(SupervisorSpec, std::string) override {
    return KJ_EXCEPTION(FAILED, "the root is already started");
  }
  kj::Promise<NodeStatus> status() override { return sup_.status(); }
  kj::Promise<bool> shutdown(MonoNs deadline, DeferralReporter) override {
    vsup::log().info("[shutdown] {}: shutdown requested over the control socket", sup_.spec().name);
    return sup_.shutdown(deadline).then([this]() { return sup_.escalations() == 0; });
  }
  kj::Promise<void> leaveRotation() override {
    vsup::log().info("[shutdown] {}: leaving the load balancers' rotation (vsup drain)",
                     sup_.spec().name);
    return sup_.leaveRotationChildren();
  }

 private:
  Supervisor& sup_;
};

// SIGTERM and SIGINT, and SIGCHLD when `childSignals` (PID 1 only), from a signalfd.
class SignalWatch {
 public:
  SignalWatch(uv_loop_t* loop, bool childSignals, std::function<void(int)> onSignal)
      : onSignal_(std::move(onSignal)) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    if (childSignals) sigaddset(&set, SIGCHLD);
    VSUP_SYSCALL(::sigprocmask(SIG_BLOCK, &set, nullptr));
    fd_.reset(VSUP_SYSCALL(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)));
    poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) { uv_poll_init(loop, h, fd_.get()); });
    poll_->data = this;
    uv_poll_start(poll_.get(), UV_READABLE, [](uv_poll_t* h, int, int) {
      auto* self = static_cast<SignalWatch*>(h->data);
      if (self == nullptr) return;
      signalfd_siginfo info;
      while (::read(self->fd_.get(), &info, sizeof info) == sizeof info) {
        self->onSignal_(int(info.ssi_signo));
      }
    });
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_.get()));
  }

 private:
  std::function<void(int)> onSignal_;
  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
};

}  // namespace

int runTopology(const RunOptions& options) {
  SupervisorSpec spec;
  try {
    spec = loadTopology(options.topology);
  } catch (const vsup::Error& e) {
    printMessage("vsup", e.what());
    return kExitUsage;
  }
  return runTree(spec, options.controlSocket, RootHooks{});
}

int runTree(const SupervisorSpec& spec, const std::string& controlSocket, const RootHooks& hooks) {
  setLogProcessName(spec.name);
  // Made before the first child exists (and before the signalfd, which then gets SIGCHLD too).
  std::optional<OrphanReaper> reaper;
  if (OrphanReaper::wanted(::getpid())) {
    reaper.emplace(spec.name);
    vsup::log().info("[supervisor] {}: running as PID 1: reaping every orphaned process",
                     spec.name);
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  int exitCode = kExitError;
  {
    ipc::KjOnUv kj(&loop);
    int signals = 0;
    Supervisor* supPtr = nullptr;
    kj::Own<kj::TaskSet> tasks;
    struct LogErrors final : kj::TaskSet::ErrorHandler {
      void taskFailed(kj::Exception&& e) override {
        vsup::log().warn("[shutdown] root: {}", e.getDescription().cStr());
      }
    } logErrors;
    tasks = kj::heap<kj::TaskSet>(logErrors);
    // Blocked before the first child exists (children reset their masks at spawn anyway).
    SignalWatch watch(&loop, reaper.has_value(), [&](int sig) {
      if (sig == SIGCHLD) {
        reaper->reapOnce();
        return;
      }
      ++signals;
      const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
      if (supPtr == nullptr) return;
      Supervisor& sup = *supPtr;
      if (signals == 1) {
        vsup::log().info("[shutdown] {}: {} received: ordered shutdown", spec.name, name);
        MonoNs drain = hooks.drainMs < 0 ? kNoDeadline : deadlineAfterMs(hooks.drainMs);
        MonoNs deadline = hooks.totalMs < 0 ? kNoDeadline : deadlineAfterMs(hooks.totalMs);
        // Stop intake everywhere at once, then tear down in order.
        tasks->add(sup.quiesceChildren(drain).then([&sup, deadline]() {
          return sup.shutdown(deadline);
        }));
      } else if (signals == 2) {
        vsup::log().warn("[shutdown] {}: second {}: abort in-flight work, stop now (at most {}ms "
                         "per remaining child)", spec.name, name, kHurryMs);
        tasks->add(sup.quiesceChildren(monoNow()));
        sup.shutdown(kNoDeadline).detach([](kj::Exception&&) {});
        sup.hurry(kHurryMs);
      } else {
        vsup::log().error("[shutdown] {}: third {}: killing the tree now", spec.name, name);
        sup.killAll();
      }
    });

    SupervisorOptions supOptions;
    supOptions.selfExe = selfExecutable();
    supOptions.collectOutput = true;
    Supervisor sup(&loop, spec, supOptions);
    supPtr = &sup;
    RootNode rootNode(sup);
    std::unique_ptr<ControlSocket> control;
    try {
      control = std::make_unique<ControlSocket>(
          &loop, controlSocket.empty() ? ControlSocket::defaultPath(spec.name) : controlSocket,
          rootNode);
    } catch (const vsup::Error& e) {
      printMessage("vsup", e.what());
      return kExitError;
    }
    vsup::log().info("[supervisor] {}: control socket {}", spec.name, control->path());

    auto started = sup.start()
                       .then([&hooks]() {
                         if (hooks.afterStart) hooks.afterStart();
                       })
                       .eagerlyEvaluate([](kj::Exception&&) {
                         // Logged by the supervisor; the outcome says StartFailed.
                       });
    bool done = false;
    auto finished = sup.terminated().then([&](Outcome o) {
      exitCode = exitCodeFor(o);
      done = true;
    }).eagerlyEvaluate(nullptr);
    while (!done) {
      if (uv_run(&loop, UV_RUN_ONCE) == 0 && !done) {
        vsup::log().critical("[supervisor] {}: event loop ran dry", spec.name);
        break;
      }
    }
    supPtr = nullptr;
    tasks = nullptr;
    // The control socket answers until here: the very end of the tree's life.
  }
  // Let every closed handle's callback run, then the loop is empty.
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (reaper) {
    // Every child of ours is reaped by now; what exited since the last SIGCHLD was read is not.
    reaper->reapOnce();
    vsup::log().info("[supervisor] {}: reaped {} orphaned process{} as PID 1", spec.name,
                     reaper->reaped(), reaper->reaped() == 1 ? "" : "es");
  }
  return exitCode;
}

}  // namespace vsup::tools
