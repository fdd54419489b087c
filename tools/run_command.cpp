// `vsup run --topology FILE`: the root supervisor process.
//
// The root owns SIGTERM/SIGINT (no other node of a tree handles signals). They are blocked and
// read from a signalfd on the loop, so no handler runs at all and the children, whose masks are
// reset at spawn, are unaffected. First signal: ordered shutdown. Second: every remaining stop is
// capped at 500 ms, at every depth (Supervisor::hurry). Third: SIGKILL every child process group now.
//
// One signal, counted once: a stop signal that arrives within kRepeatWindowMs (50 ms) of the
// last one counted is the same request delivered twice, and is logged and ignored. timeout(1)
// does exactly that (SIGTERM to its child, then to its own process group, which holds the child
// too), as do a service manager and a terminal both signalling. 50 ms: the two copies of such a
// double delivery arrive microseconds apart (a few ms on a loaded machine), and a person's
// deliberate second Ctrl-C or second `kill` comes well over 100 ms after the first, so 50 ms
// separates the two with a margin on both sides.
//
// Nothing escapes the tree: the root is a child subreaper (OrphanReaper::becomeSubreaper, before
// the first child exists), so every process of the tree whose parent dies is reparented to it
// (or to a supervisor process below it that is a subreaper too), and a process that left its
// process group (setsid, setpgid, a daemon's double fork) is SIGKILLed as soon as it is seen,
// logged as "[supervisor] ROOT: killed process N (CMD) that escaped its process group". A last
// sweep, after every child of ours is reaped and before the root exits, kills and reaps
// whatever orphan is left (bounded). Its own children are never touched by the reaper; their
// Processes reap them through their pidfds, so the exit status is the same as anywhere else.
// As a container's PID 1 the same reaper reaps every orphan of the namespace. (PID 1 gets no
// signal it has not blocked or handled: blocked and read from a signalfd, SIGTERM works there
// as everywhere.)
//
// The last line: when the tree ends in anything but a clean shutdown, the root's last line
// (through printMessage, so in the text or json log format) says what happened, naming the node:
// "vsup run: start failed: child 'db' did not become ready within 5000ms (start_timeout)",
// "vsup run: failed: child 'engine-core' (pid 12) exited (signal 9 (Killed)); intensity
// exceeded (...)", "vsup run: shutdown escalated: child 'db' killed: shutdown timeout passed".
// The supervisor records the cause where it happens (Supervisor::outcomeDetail).
#include <limits.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>


#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/control_socket.h"
#include "supervisor/notify.h"
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
// A stop signal within this of the last one counted is the same one delivered twice (header).
constexpr int64_t kRepeatWindowMs = 50;

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

// SIGTERM and SIGINT from a signalfd (SIGCHLD has the Subreaper's own).
class SignalWatch {
 public:
  SignalWatch(uv_loop_t* loop, std::function<void(int)> onSignal)
      : onSignal_(std::move(onSignal)) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
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
    printMessage("vsup run", e.what());
    return kExitUsage;
  }
  // A command named `vsup` is this very executable (a topology of vsup trees, such as
  // examples/topologies/pd.toml, works from a build directory without vsup on PATH).
  std::function<void(SupervisorSpec&)> self = [&](SupervisorSpec& s) {
    for (ChildSpec& child : s.children) {
      if (!child.command.empty() && child.command[0] == "vsup") {
        child.command[0] = selfExecutable();
      }
      if (child.supervisor) self(*child.supervisor);
    }
  };
  self(spec);
  return runTree(spec, options.controlSocket, RootHooks{});
}

int runTree(const SupervisorSpec& spec, const std::string& controlSocket, const RootHooks& hooks) {
  setLogProcessName(spec.name);
  bool pid1 = ::getpid() == 1;
  uv_loop_t loop;
  uv_loop_init(&loop);
  // A subreaper before the first child exists, with SIGCHLD blocked before any thread does.
  std::unique_ptr<Subreaper> subreaper;
  try {
    subreaper = OrphanReaper::becomeSubreaper(&loop, spec.name);
  } catch (const vsup::Error& e) {
    // Only a kernel older than 3.4 says no: run, with orphans going to the init of the system.
    vsup::log().warn("[supervisor] {}: cannot become a child subreaper ({}): a process of the "
                     "tree that leaves its process group may outlive it", spec.name, e.what());
  }
  if (pid1) {
    vsup::log().info("[supervisor] {}: running as PID 1: reaping every orphaned process",
                     spec.name);
  }
  int exitCode = kExitError;
  std::string finalLine;
  {
    ipc::KjOnUv kj(&loop);
    int signals = 0;
    MonoNs lastCounted = 0;
    Supervisor* supPtr = nullptr;
    kj::Own<kj::TaskSet> tasks;
    struct LogErrors final : kj::TaskSet::ErrorHandler {
      void taskFailed(kj::Exception&& e) override {
        vsup::log().warn("[shutdown] root: {}", ipc::userMessage(e));
      }
    } logErrors;
    tasks = kj::heap<kj::TaskSet>(logErrors);
    // Blocked before the first child exists (children reset their masks at spawn anyway).
    SignalWatch watch(&loop, [&](int sig) {
      const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
      MonoNs now = monoNow();
      if (signals > 0 && now - lastCounted < kRepeatWindowMs * kNsPerMs) {
        vsup::log().info("[shutdown] {}: {} {}ms after the last one: the same request delivered "
                         "twice, counted once (repeats within {}ms are ignored)",
                         spec.name, name, (now - lastCounted) / kNsPerMs, kRepeatWindowMs);
        return;
      }
      lastCounted = now;
      ++signals;
      if (supPtr == nullptr) return;
      Supervisor& sup = *supPtr;
      if (signals == 1) {
        vsup::log().info("[shutdown] {}: {} received: ordered shutdown", spec.name, name);
        notifyServiceManager("STOPPING=1");
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
      printMessage("vsup run", e.what());
      return kExitError;
    }
    vsup::log().info("[supervisor] {}: control socket {}", spec.name, control->path());

    auto started = sup.start()
                       .then([&hooks]() {
                         if (hooks.afterStart) hooks.afterStart();
                         // The tree is up: a parent tree (ready = "notify") or systemd
                         // (Type=notify) may start what comes after it.
                         notifyServiceManager("READY=1");
                       })
                       .eagerlyEvaluate([](kj::Exception&&) {
                         // Logged by the supervisor; the outcome says StartFailed.
                       });
    bool done = false;
    auto finished = sup.terminated().then([&](Outcome o) {
      exitCode = exitCodeFor(o);
      finalLine = sup.outcomeDetail();
      done = true;
    }).eagerlyEvaluate(nullptr);
    while (!done) {
      if (uv_run(&loop, UV_RUN_ONCE) == 0 && !done) {
        vsup::log().critical("[supervisor] {}: event loop ran dry", spec.name);
        finalLine = "failed: the root's event loop ran dry (a bug: please report it)";
        break;
      }
    }
    supPtr = nullptr;
    tasks = nullptr;
    // The control socket answers until here: the very end of the tree's life.
  }
  // Every child of ours is reaped by now: the last sweep kills and reaps what is left.
  if (subreaper) {
    subreaper->sweep();
    const OrphanReaper& reaper = subreaper->reaper();
    if (pid1) {
      vsup::log().info("[supervisor] {}: reaped {} orphaned process{} as PID 1", spec.name,
                       reaper.reaped(), reaper.reaped() == 1 ? "" : "es");
    }
    if (reaper.killed() > 0) {
      vsup::log().info("[supervisor] {}: killed {} process{} that outlived {} parent{}",
                       spec.name, reaper.killed(), reaper.killed() == 1 ? "" : "es",
                       reaper.killed() == 1 ? "its" : "their", reaper.killed() == 1 ? "" : "s");
    }
    subreaper.reset();
  }
  // Let every closed handle's callback run, then the loop is empty.
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (!finalLine.empty()) printMessage("vsup run", finalLine);
  return exitCode;
}

}  // namespace vsup::tools
