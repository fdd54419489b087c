#include "supervisor/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <optional>

#include "base/check.h"
#include "base/log.h"
#include "ipc/node.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"
#include "ipc/uv_handle.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/node_codec.h"
#include "supervisor/notify.h"
#include "supervisor/orphan_guard.h"
#include "supervisor/output_collector.h"
#include "supervisor/process.h"

extern char** environ;

namespace vsup::supervisor {

namespace schema = ipc::schema;

int exitCodeFor(Outcome outcome) {
  switch (outcome) {
    case Outcome::Clean: return kExitClean;
    case Outcome::Escalated: return kExitEscalated;
    case Outcome::StartFailed: return kExitStartFailed;
    case Outcome::IntensityExceeded: return kExitIntensity;
    case Outcome::ChildFailed: return kExitIntensity;  // the same as an unexpected death
  }
  return kExitError;
}

const char* nameOf(Outcome outcome) {
  switch (outcome) {
    case Outcome::Clean: return "clean";
    case Outcome::Escalated: return "escalated";
    case Outcome::StartFailed: return "start failed";
    case Outcome::IntensityExceeded: return "intensity exceeded";
    case Outcome::ChildFailed: return "a child failed during shutdown";
  }
  return "?";
}

namespace {

// See pingAfter().
constexpr uint64_t kLivenessGraceMs = 100;

// "start failed: WHY", once: a nested supervisor's start failure already says it, and its
// parent's would otherwise read "start failed: start failed: ...".
std::string startFailedMessage(const std::string& why) {
  static const std::string kPrefix = "start failed: ";
  return why.rfind(kPrefix, 0) == 0 ? why : kPrefix + why;
}

std::string seconds(int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fs", double(ns) / 1e9);
  return buf;
}

std::string millis(int64_t ns) {
  char buf[32];
  if (ns < 10 * kNsPerMs) {
    std::snprintf(buf, sizeof buf, "%.1fms", double(ns) / 1e6);
  } else {
    std::snprintf(buf, sizeof buf, "%" PRId64 "ms", ns / kNsPerMs);
  }
  return buf;
}

// The deadline a node gives its child: its own, less what it keeps for its own cleanup after
// the child is gone (DeadlineBudget has the rule).
MonoNs withMargin(MonoNs deadline) { return DeadlineBudget::forChildren(deadline, monoNow()); }


}  // namespace

void Supervisor::taskFailed(kj::Exception&& exception) {
  if (exception.getType() == kj::Exception::Type::DISCONNECTED) return;  // peer exited
  vsup::log().warn("[supervisor] {}: background task failed: {}", spec_.name,
                   ipc::userMessage(exception));
}

// Everything the supervisor knows about one child, across its incarnations.
struct Supervisor::Child {
  enum class State { Stopped, Starting, Running, Stopping, Restarting };

  ChildSpec spec;
  size_t index = 0;
  State state = State::Stopped;
  std::optional<Process> proc;
  UvHandle<uv_poll_t> exitPoll;
  kj::Own<kj::PromiseFulfiller<void>> exitFulfiller;
  kj::Maybe<kj::ForkedPromise<void>> exitPromise;
  kj::Own<kj::PromiseFulfiller<void>> readyFulfiller;  // ready = notify
  MonoNs startedAt = 0;
  uint32_t restarts = 0;
  bool exitExpected = false;  // we asked it to stop: its exit is not a failure
  // It died while starting, before its start's own watch reported it: a shutdown that begins
  // now cancels that report, so beginShutdown() reports the start failure instead.
  bool diedStarting = false;
  bool ended = false;         // exited and will not be restarted (auto_shutdown bookkeeping)
  bool killed = false;        // SIGKILLed by us at a deadline during this stop
  std::string statusText;     // last STATUS= from the notify protocol
  Deferral deferral;
  // Stop bookkeeping.
  MonoNs stopStartedAt = 0;
  MonoNs stopDeadline = kNoDeadline;  // SIGKILL at this instant
  MonoNs stopCap = kNoDeadline;       // deferrals can never extend past this
  kj::Own<kj::PromiseFulfiller<void>> deadlineMoved;
  // vsup-aware children.
  std::unique_ptr<ipc::RpcLink> link;
  std::optional<schema::Node::Client> node;
  std::optional<ExitStatus> lastExit;
  Supervisor* owner = nullptr;
  bool unresponsive = false;  // SIGKILLed by us: it did not answer a liveness ping in time
  kj::Maybe<kj::ForkedPromise<void>> stopDone;  // the stop in progress (or done) of this run
  // The liveness pings of this run (last: destroyed first, it refers to the members above).
  kj::Promise<void> liveness = nullptr;
};

namespace {

// Receives deferrals reported by a vsup-aware child's subtree while it shuts down.
class DeferralSink final : public schema::ShutdownObserver::Server {
 public:
  DeferralSink(std::function<void(const std::string&, const Deferral&)> sink)
      : sink_(std::move(sink)) {}

 protected:
  kj::Promise<void> deferral(DeferralContext context) override {
    auto params = context.getParams();
    sink_(params.getNode(), decode(params.getDeferral()));
    return kj::READY_NOW;
  }

 private:
  std::function<void(const std::string&, const Deferral&)> sink_;
};

}  // namespace

Supervisor::Supervisor(uv_loop_t* loop, SupervisorSpec spec, SupervisorOptions options)
    : loop_(loop),
      spec_(std::move(spec)),
      options_(std::move(options)),
      done_(nullptr),
      ops_(kj::READY_NOW),
      stopAll_(kj::READY_NOW) {
  normalize(spec_);
  validate(spec_, "supervisor spec");
  tasks_ = kj::heap<kj::TaskSet>(*this);
  auto paf = kj::newPromiseAndFulfiller<void>();
  doneFulfiller_ = kj::mv(paf.fulfiller);
  done_ = paf.promise.fork();
  notify_ = std::make_unique<NotifySocket>(
      loop_, [this](pid_t sender, const NotifyMessage& m) { onNotify(sender, m); });
  if (!options_.selfExe.empty()) {
    guard_ = std::make_unique<OrphanGuard>(options_.selfExe);
    // Armed by retireGuard() (made here: the shutdown is then spared its syscalls).
    guardExit_ = UvHandle<uv_poll_t>::make(
        [&](uv_poll_t* h) { uv_poll_init(loop_, h, guard_->pidfd()); });
    guardExit_->data = this;
  }
  for (size_t i = 0; i < spec_.children.size(); ++i) {
    auto c = std::make_unique<Child>();
    c->spec = spec_.children[i];
    c->index = i;
    c->owner = this;
    children_.push_back(std::move(c));
  }
}

Supervisor::~Supervisor() noexcept(false) {
  // Backstop only: a caller that shut down properly finds nothing running here.
  tasks_ = nullptr;
  ops_ = kj::READY_NOW;
  stopAll_ = kj::READY_NOW;
  for (auto it = children_.rbegin(); it != children_.rend(); ++it) {
    Child& c = **it;
    c.exitPoll.reset();
    if (c.proc && c.proc->running()) {
      vsup::log().error("[shutdown] {}: {} still running at destruction: killing process group {}",
                        spec_.name, c.spec.name, c.proc->pid());
      c.proc->killAndReap();
    }
    c.node.reset();
  }
  children_.clear();
}

// --------------------------------------------------------------------------------------------
// Starting

kj::Promise<void> Supervisor::start() {
  KJ_IF_MAYBE(e, refuseCall("start")) { return kj::mv(*e); }
  VSUP_REQUIRE(phase_ == Phase::Idle, "Supervisor::start() called twice");
  phase_ = Phase::Starting;
  startedAt_ = monoNow();
  auto paf = kj::newPromiseAndFulfiller<void>();
  startFulfiller_ = kj::mv(paf.fulfiller);
  // Starting is the first serialized operation: exits of already-started children queue behind
  // it and are handled once the whole tree is up (or has failed).
  enqueue([this]() {
    return startAll().then(
        [this]() {
          if (phase_ != Phase::Starting) return;
          phase_ = Phase::Running;
          vsup::log().info("[supervisor] {}: all {} children ready in {}", spec_.name,
                           children_.size(), millis(monoNow() - startedAt_));
          startFulfiller_->fulfill();
        },
        [this](kj::Exception&& e) {
          std::string why = ipc::userMessage(e);
          vsup::log().error("[supervisor] {}: start failed: {}", spec_.name, why);
          startFailure_ = why;
          terminateSelf(Outcome::StartFailed, why);
          // start() fails only once the children already started have been stopped, so a
          // caller that sees the error sees nothing left running. (tasks_, not this operation:
          // the shutdown cancels the operation chain.)
          tasks_->add(done_.addBranch().then([this]() {
            if (startFulfiller_ && startFulfiller_->isWaiting()) {
              startFulfiller_->reject(ipc::failure(startFailedMessage(startFailure_)));
            }
          }));
        });
  });
  return kj::mv(paf.promise);
}

// The children started concurrently (spec.h, startConcurrently) whose readiness the start
// awaits at its end, and the first failure among them, which fails the start at once.
struct Supervisor::ConcurrentStarts {
  kj::Vector<kj::ForkedPromise<void>> ready;
  kj::Vector<kj::Promise<void>> watches;  // each passes its child's failure to `failed`
  kj::Own<kj::PromiseFulfiller<void>> failed;
};

kj::Promise<void> Supervisor::startAll() {
  auto concurrent = kj::heap<ConcurrentStarts>();
  auto failure = kj::newPromiseAndFulfiller<void>();
  concurrent->failed = kj::mv(failure.fulfiller);
  ConcurrentStarts* raw = concurrent.get();
  // `failure` never resolves; it rejects with the first concurrently started child's failure.
  return startFrom(0, raw).exclusiveJoin(kj::mv(failure.promise)).attach(kj::mv(concurrent));
}

kj::Promise<void> Supervisor::startFrom(size_t index, ConcurrentStarts* concurrent) {
  if (index >= children_.size()) {
    // Every child is spawned, and the serial ones are ready: now the concurrent ones.
    kj::Vector<kj::Promise<void>> all;
    for (auto& ready : concurrent->ready) all.add(ready.addBranch());
    return kj::joinPromises(all.releaseAsArray());
  }
  Child& c = *children_[index];
  if (!c.spec.startConcurrently) {
    return startChild(c).then(
        [this, index, concurrent]() { return startFrom(index + 1, concurrent); });
  }
  // Spawned now (startChild spawns before it returns); the next child does not wait for it.
  kj::ForkedPromise<void> started = startChild(c).fork();
  // Eager: nothing else pulls on this branch, and its failure must fail the start now.
  concurrent->watches.add(started.addBranch().eagerlyEvaluate([concurrent](kj::Exception&& e) {
    if (concurrent->failed->isWaiting()) concurrent->failed->reject(kj::mv(e));
  }));
  concurrent->ready.add(kj::mv(started));
  return startFrom(index + 1, concurrent);
}

std::vector<std::string> Supervisor::childEnvironment(const Child& c) const {
  std::vector<std::string> env;
  auto overridden = [&](const std::string& kv) {
    std::string key = kv.substr(0, kv.find('='));
    if (key == "NOTIFY_SOCKET" || key == "VSUP_CONTROL_FD" || key == "VSUP_NODE_NAME" ||
        key == "VSUP_LOG_LEVEL" || key == kLogFormatEnv) {
      return true;
    }
    for (const auto& [k, v] : c.spec.env) {
      if (k == key) return true;
    }
    return false;
  };
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv = *e;
    if (!overridden(kv)) env.push_back(std::move(kv));
  }
  for (const auto& [k, v] : c.spec.env) env.push_back(k + "=" + v);
  env.push_back("NOTIFY_SOCKET=" + notify_->address());
  env.push_back("VSUP_NODE_NAME=" + c.spec.name);
  // Every child logs in this process's format (a vsup child's logger reads it at start-up), so
  // the collected output of the whole tree is in one format.
  env.push_back(std::string(kLogFormatEnv) + "=" + vsup::nameOf(vsup::logFormat()));
  if (c.spec.vsupAware) {
    env.push_back("VSUP_CONTROL_FD=3");
    // A vsup-aware child logs at the level its parent does.
    auto level = spdlog::level::to_string_view(vsup::log().level());
    env.push_back("VSUP_LOG_LEVEL=" + std::string(level.data(), level.size()));
  }
  return env;
}

kj::Promise<void> Supervisor::startChild(Child& c) {
  VSUP_ASSERT(!c.proc, c.spec.name);
  c.exitExpected = false;
  c.ended = false;
  c.killed = false;
  c.unresponsive = false;
  c.stopDone = nullptr;
  c.liveness = nullptr;
  c.deferral = {};
  c.statusText.clear();
  c.state = Child::State::Starting;
  c.diedStarting = false;
  c.node.reset();
  c.link.reset();

  SpawnRequest request;
  request.env = childEnvironment(c);
  OwnFd parentEnd;
  OwnFd childEnd;
  if (c.spec.type == ChildType::Supervisor) {
    VSUP_REQUIRE(!options_.selfExe.empty(),
                 "child '" + c.spec.name + "' is a supervisor, but the vsup executable is unknown");
    request.argv = {options_.selfExe, "__node"};
  } else {
    request.argv = c.spec.command;
  }
  if (c.spec.vsupAware) {
    int sv[2];
    VSUP_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    parentEnd.reset(sv[0]);
    childEnd.reset(sv[1]);
    request.passFds.emplace_back(childEnd.get(), 3);
  }
  for (int fd : c.spec.inheritFds) {
    request.passFds.emplace_back(fd, int(request.passFds.size()) + 3);
  }
  OwnFd outRead, outWrite, errRead, errWrite;
  if (options_.collectOutput) {
    int out[2];
    int err[2];
    VSUP_SYSCALL(::pipe2(out, O_CLOEXEC));
    outRead.reset(out[0]);
    outWrite.reset(out[1]);
    VSUP_SYSCALL(::pipe2(err, O_CLOEXEC));
    errRead.reset(err[0]);
    errWrite.reset(err[1]);
    request.stdoutFd = outWrite.get();
    request.stderrFd = errWrite.get();
  }
  try {
    c.proc.emplace(Process::spawn(request));
  } catch (const std::exception& e) {
    c.state = Child::State::Stopped;
    return ipc::failure("child '" + c.spec.name + "': " + e.what());
  }
  childEnd.reset();
  if (options_.collectOutput) {
    // Only the child holds the write ends now: EOF comes when it (and its group) is gone.
    outWrite.reset();
    errWrite.reset();
    for (auto [fd, target] : {std::pair{&outRead, 1}, std::pair{&errRead, 2}}) {
      collectors_.push_back(nullptr);
      auto it = std::prev(collectors_.end());
      *it = std::make_unique<OutputCollector>(
          loop_, std::move(*fd), target, c.spec.name, c.proc->pid(), [this, it]() {
            // Deferred: the collector is still on the stack of its own callback.
            tasks_->add(kj::evalLater([this, it]() { collectors_.erase(it); }));
          });
    }
  }
  if (guard_) guard_->add(c.proc->pid());
  c.startedAt = monoNow();
  watchExit(c);
  vsup::log().info("[supervisor] {}: started {} (pid {})", spec_.name, c.spec.name, c.proc->pid());

  kj::Promise<void> ready = kj::READY_NOW;
  if (c.spec.vsupAware) {
    c.link = ipc::RpcLink::connect(loop_, std::move(parentEnd));
    c.node = c.link->bootstrap<schema::Node>();
    auto request = c.node->startRequest();
    if (c.spec.supervisor) {
      encode(*c.spec.supervisor, request.initSpec());
    } else {
      request.initSpec().setName(c.spec.name);
    }
    if (!c.spec.startConfig.empty()) request.setConfig(asData(c.spec.startConfig));
    ready = request.send().ignoreResult();
  } else if (c.spec.ready == Readiness::Notify) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    c.readyFulfiller = kj::mv(paf.fulfiller);
    ready = kj::mv(paf.promise);
  }

  bool waits = c.spec.vsupAware || c.spec.ready == Readiness::Notify;
  if (waits) {
    std::string name = c.spec.name;
    // Dying before ready is a start failure, whatever the exit status.
    ready = ready.exclusiveJoin(exited(c).then([&c]() -> kj::Promise<void> {
      return ipc::failure("child '" + c.spec.name + "' exited before it was ready (" +
                  (c.lastExit ? c.lastExit->describe() : std::string("?")) + ")");
    }));
    if (c.spec.startTimeoutMs >= 0) {
      int64_t ms = c.spec.startTimeoutMs;
      ready = ready.exclusiveJoin(
          ipc::uvSleep(loop_, uint64_t(ms)).then([this, &c, name, ms]() -> kj::Promise<void> {
            std::string why = "child '" + name + "' did not become ready within " +
                              std::to_string(ms) + "ms (start_timeout)";
            if (!c.node) return ipc::failure(why);
            return notReadyIn(c).then([why](std::string stuck) -> kj::Promise<void> {
              return ipc::failure(why + stuck);
            });
          }));
    }
  }
  return ready.then(
      [this, &c]() -> kj::Promise<void> {
        c.state = Child::State::Running;
        if (c.spec.vsupAware || c.spec.ready == Readiness::Notify) {
          vsup::log().info("[supervisor] {}: {} ready in {}", spec_.name, c.spec.name,
                           millis(monoNow() - c.startedAt));
        }
        startLiveness(c);
        return kj::READY_NOW;
      },
      [this, &c](kj::Exception&& e) -> kj::Promise<void> {
        if (e.getType() == kj::Exception::Type::DISCONNECTED && c.proc) {
          // The control connection broke because the child is dying: its exit status says
          // more than the broken connection, so wait for it (briefly) before reporting.
          return exited(c)
              .exclusiveJoin(ipc::uvSleep(loop_, 1000))
              .then([this, &c]() -> kj::Promise<void> {
                std::string why =
                    c.lastExit && !c.proc
                        ? "child '" + c.spec.name + "' exited before it was ready (" +
                              c.lastExit->describe() + ")"
                        : "child '" + c.spec.name +
                              "' closed its control connection before it was ready";
                if (c.proc) {
                  return stopChild(c).then([why]() -> kj::Promise<void> { return ipc::failure(why); });
                }
                return ipc::failure(why);
              });
        }
        // The child failed to become ready: it must not outlive the failure.
        std::string why = ipc::userMessage(e);
        if (e.getType() == kj::Exception::Type::DISCONNECTED && c.lastExit) {
          why = "child '" + c.spec.name + "' exited before it was ready (" +
                c.lastExit->describe() + ")";
        }
        if (c.proc) {
          // Stopped like any other child (its own policy, SIGKILL at the end): a sub-supervisor
          // then stops the children it had already started, in order.
          return stopChild(c).then([why]() -> kj::Promise<void> { return ipc::failure(why); });
        }
        return ipc::failure(why);
      });
}

namespace {

// The deepest nodes of a subtree that are not running (a rank still loading, a hung one):
// "worker-tp0 (unresponsive)", comma-separated; empty when there are none.
std::string notRunning(const NodeStatus& s) {
  std::string out;
  for (const auto& child : s.children) {
    if (child.state == NodeState::Running) continue;
    std::string below = notRunning(child);
    std::string here = below.empty() ? child.name + " (" + nameOf(child.state) + ")" : below;
    out += (out.empty() ? "" : ", ") + here;
  }
  return out;
}

}  // namespace

// Which part of a vsup-aware child's subtree keeps it from being ready, for the start timeout's
// message: ": still starting: worker-tp0 (unresponsive)", or ": it does not answer" (it is hung
// itself), or "" when it cannot tell.
kj::Promise<std::string> Supervisor::notReadyIn(Child& c) {
  constexpr int64_t kBudgetMs = 500;
  auto request = c.node->statusRequest();
  request.setBudgetMs(statusBudgetForChildren(kBudgetMs));
  return request.send()
      .then(
          [](capnp::Response<schema::Node::StatusResults>&& r) -> std::string {
            std::string stuck = notRunning(decode(r.getStatus()));
            return stuck.empty() ? std::string() : ": still starting: " + stuck;
          },
          [](kj::Exception&&) { return std::string(); })
      .exclusiveJoin(ipc::uvSleep(loop_, uint64_t(kBudgetMs)).then([]() {
        return std::string(": it does not answer (hung?)");
      }));
}

// --------------------------------------------------------------------------------------------
// Exits

void Supervisor::watchExit(Child& c) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  c.exitFulfiller = kj::mv(paf.fulfiller);
  c.exitPromise = paf.promise.fork();
  pollExit(c);
}

void Supervisor::pollExit(Child& c) {
  c.exitPoll = UvHandle<uv_poll_t>::make(
      [&](uv_poll_t* h) { uv_poll_init(loop_, h, c.proc->pidfd()); });
  c.exitPoll->data = &c;
  uv_poll_start(c.exitPoll.get(), UV_READABLE, [](uv_poll_t* h, int, int) {
    auto* child = static_cast<Child*>(h->data);
    if (child != nullptr) child->owner->onExit(*child);
  });
}

kj::Promise<void> Supervisor::exited(Child& c) {
  if (!c.proc) return kj::READY_NOW;
  KJ_IF_MAYBE(p, c.exitPromise) { return p->addBranch(); }
  return kj::READY_NOW;
}

void Supervisor::onExit(Child& c) {
  // The poll goes before the reap closes the pidfd (libuv: never close the fd of an active
  // handle); it is made again after a spurious wake-up.
  c.exitPoll.reset();
  std::optional<ExitStatus> status;
  try {
    status = c.proc->tryReap();
  } catch (const std::exception& e) {
    vsup::log().error("[supervisor] {}: reaping {} failed: {}", spec_.name, c.spec.name, e.what());
    status = c.proc->killAndReap();
  }
  if (!status) {
    pollExit(c);  // spurious wake-up
    return;
  }
  c.liveness = nullptr;  // (a uv callback: never inside the ping loop itself)
  // A child that dies while starting is a start failure, handled by startChild alone.
  bool wasStarting = c.state == Child::State::Starting;
  pid_t pid = c.proc->pid();
  c.proc.reset();
  if (guard_) guard_->remove(pid);
  c.lastExit = *status;
  c.state = Child::State::Stopped;
  c.diedStarting = wasStarting && !c.exitExpected && phase_ != Phase::ShuttingDown;
  // A ready = notify child that never said READY=1: its start fails with its exit status (the
  // exit watch of startChild says the same; whichever is seen first, the message is this one).
  if (c.readyFulfiller && c.readyFulfiller->isWaiting()) {
    c.readyFulfiller->reject(ipc::failure("child '" + c.spec.name + "' exited before it was ready (" +
                                  status->describe() + ")"));
  }
  c.readyFulfiller = nullptr;
  // (Once the shutdown began, the start that would report it is cancelled: a child that dies
  // unasked while starting is then an unexpected death like any other.)
  bool unexpected = !c.exitExpected && (!wasStarting || phase_ == Phase::ShuttingDown);
  if (unexpected) {
    vsup::log().warn("[supervisor] {}: {} (pid {}) exited ({}){}", spec_.name, c.spec.name, pid,
                     status->describe(),
                     c.unresponsive ? ": killed as unresponsive" : "");
    std::string what = "child '" + c.spec.name + "' (pid " + std::to_string(pid) + ") " +
                       (c.unresponsive ? "was unresponsive: killed (" + status->describe() + ")"
                                       : "exited (" + status->describe() + ")");
    if (phase_ == Phase::Running || phase_ == Phase::Starting) {
      lastUnexpectedExit_ = what;
    } else if (exitInShutdown_.empty()) {
      exitInShutdown_ = what;
    }
  }
  auto fulfiller = kj::mv(c.exitFulfiller);
  fulfiller->fulfill();
  if (unexpected && (phase_ == Phase::Running || phase_ == Phase::Starting)) {
    onUnexpectedExit(c, status->success());
  } else if (unexpected) {
    ++failures_;  // died on its own while the tree was shutting down: not a clean shutdown
  }
}

void Supervisor::onUnexpectedExit(Child& c, bool success) {
  bool restart = c.spec.restart == Restart::Permanent ||
                 (c.spec.restart == Restart::Transient && !success);
  if (!restart) {
    c.ended = true;
    if (c.spec.significant) checkAutoShutdown();
    return;
  }
  if (!recordRestart()) {
    std::string why = "intensity exceeded (" + std::to_string(restartTimes_.size()) +
                      " restarts in " + seconds(spec_.periodMs * kNsPerMs) + ", intensity " +
                      std::to_string(spec_.intensity) + ")";
    vsup::log().error("[supervisor] {}: {}: shutting down", spec_.name, why);
    if (intensityCause_.empty()) intensityCause_ = lastUnexpectedExit_;
    terminateSelf(Outcome::IntensityExceeded, why);
    return;
  }
  c.state = Child::State::Restarting;
  restartAfter(c);
}

// --------------------------------------------------------------------------------------------
// Liveness

bool Supervisor::pinging(const Child& c) const {
  // Only while the tree serves: a stopping child is governed by its stop deadline, and a tree
  // that is shutting down by its own.
  return c.state == Child::State::Running && c.proc && c.node && !c.unresponsive &&
         !terminating_ && !quiesced_ && (phase_ == Phase::Running || phase_ == Phase::Starting);
}

void Supervisor::startLiveness(Child& c) {
  if (!c.spec.vsupAware || c.spec.livenessTimeoutMs < 0 || !c.node) return;
  std::string name = c.spec.name;
  c.liveness = pingAfter(c, c.spec.livenessIntervalMs)
                   .eagerlyEvaluate([this, name](kj::Exception&& e) {
                     vsup::log().warn("[supervisor] {}: liveness pings of {} failed: {}",
                                      spec_.name, name, ipc::userMessage(e));
                   });
}

// One ping `delayMs` from now; the next one `livenessIntervalMs` after this one was sent. A
// child that hangs just after it answered is found within interval + timeout + grace.
kj::Promise<void> Supervisor::pingAfter(Child& c, int64_t delayMs) {
  return ipc::uvSleep(loop_, uint64_t(std::max<int64_t>(delayMs, 0)))
      .then([this, &c]() -> kj::Promise<void> {
        if (!pinging(c)) return kj::READY_NOW;
        enum class Answer { Answered, Broken, Late };
        MonoNs sent = monoNow();
        auto reply = c.node->pingRequest()
                         .send()
                         .then([](auto&&) { return Answer::Answered; },
                               [](kj::Exception&&) { return Answer::Broken; })
                         .fork();
        kj::Promise<Answer> answer = reply.addBranch().exclusiveJoin(
            ipc::uvSleep(loop_, uint64_t(c.spec.livenessTimeoutMs)).then([]() {
              return Answer::Late;
            }));
        // At the timeout, one more look (kLivenessGraceMs) before it counts: a timer runs before
        // the loop reads its sockets, so after a stall of this process (it was stopped, or
        // starved of CPU) an answer that arrived in time may not have been read yet.
        answer = answer.then([this, reply = kj::mv(reply)](Answer a) mutable -> kj::Promise<Answer> {
          if (a != Answer::Late) return a;
          return reply.addBranch().exclusiveJoin(
              ipc::uvSleep(loop_, kLivenessGraceMs).then([]() { return Answer::Late; }));
        });
        return answer.then([this, &c, sent](Answer a) -> kj::Promise<void> {
          if (!pinging(c)) return kj::READY_NOW;
          // A broken connection: the child is going, and its exit says more than we could.
          if (a == Answer::Broken) return kj::READY_NOW;
          if (a == Answer::Late) {
            onUnresponsive(c);
            return kj::READY_NOW;
          }
          int64_t elapsedMs = (monoNow() - sent) / kNsPerMs;
          return pingAfter(c, c.spec.livenessIntervalMs - elapsedMs);
        });
      });
}

void Supervisor::onUnresponsive(Child& c) {
  c.unresponsive = true;
  vsup::log().error("[supervisor] {}: {} (pid {}) is unresponsive: no answer to a liveness ping "
                    "in {}ms: killing it",
                    spec_.name, c.spec.name, c.proc->pid(), c.spec.livenessTimeoutMs);
  // Its exit is then an unexpected death like any other (restart policy, intensity).
  c.proc->killGroup();
}

bool Supervisor::recordRestart() {
  MonoNs now = monoNow();
  restartTimes_.push_back(now);
  while (!restartTimes_.empty() && restartTimes_.front() <= now - spec_.periodMs * kNsPerMs) {
    restartTimes_.pop_front();
  }
  return restartTimes_.size() <= spec_.intensity;
}

void Supervisor::restartAfter(Child& failed) {
  size_t i = failed.index;
  size_t n = children_.size();
  // Which children are restarted: the failed one, all of them, or it and the ones after it.
  size_t from = i;
  size_t to = i + 1;
  if (spec_.strategy == Strategy::OneForAll) {
    from = 0;
    to = n;
  } else if (spec_.strategy == Strategy::RestForOne) {
    to = n;
  }
  enqueue([this, &failed, from, to]() -> kj::Promise<void> {
    if (phase_ != Phase::Running && phase_ != Phase::Starting) return kj::READY_NOW;
    // Stop the siblings that go down with it, in reverse order, with their own policies.
    return stopRange(from, to).then([this, &failed, from, to]() {
      kj::Promise<void> chain = kj::READY_NOW;
      for (size_t k = from; k < to; ++k) {
        Child& c = *children_[k];
        // A temporary child is never restarted; one that ended normally stays ended.
        if (&c != &failed && (c.spec.restart == Restart::Temporary || c.ended)) continue;
        chain = chain.then([this, &c, &failed]() -> kj::Promise<void> {
          if (phase_ != Phase::Running && phase_ != Phase::Starting) return kj::READY_NOW;
          c.restarts++;
          vsup::log().info("[supervisor] {}: restarting {} (restart {} of intensity {} in {})",
                           spec_.name, c.spec.name, restartTimes_.size(), spec_.intensity,
                           seconds(spec_.periodMs * kNsPerMs));
          (void)failed;
          return startChild(c).catch_([this, &c](kj::Exception&& e) {
            restartFailed(c, ipc::userMessage(e));
          });
        });
      }
      return chain;
    });
  });
}

void Supervisor::restartFailed(Child& c, const std::string& why) {
  vsup::log().error("[supervisor] {}: restart of {} failed: {}", spec_.name, c.spec.name, why);
  // A failed restart counts as another exit: intensity decides whether to try again.
  tasks_->add(kj::evalLater([this, &c]() {
    if (phase_ == Phase::Running || phase_ == Phase::Starting) onUnexpectedExit(c, false);
  }));
}

void Supervisor::checkAutoShutdown() {
  if (spec_.autoShutdown == AutoShutdown::Never) return;
  bool all = std::all_of(children_.begin(), children_.end(), [](const auto& c) {
    return !c->spec.significant || c->ended;
  });
  if (spec_.autoShutdown == AutoShutdown::AnySignificant || all) {
    vsup::log().info("[supervisor] {}: significant child ended: auto_shutdown = {}", spec_.name,
                     nameOf(spec_.autoShutdown));
    terminateSelf(Outcome::Clean, "");
  }
}

void Supervisor::enqueue(kj::Function<kj::Promise<void>()> op) {
  ops_ = ops_.then(kj::mv(op)).eagerlyEvaluate([this](kj::Exception&& e) {
    vsup::log().error("[supervisor] {}: operation failed: {}", spec_.name,
                      ipc::userMessage(e));
  });
}

// --------------------------------------------------------------------------------------------
// Stopping

void Supervisor::terminateSelf(Outcome outcome, const std::string& why) {
  if (phase_ == Phase::ShuttingDown || phase_ == Phase::Terminated) return;
  if (terminating_) return;
  terminating_ = true;
  if (outcome != Outcome::Clean) forcedOutcome_ = outcome;
  failure_ = why;
  // Deferred: this may run inside the operation that the shutdown is about to cancel.
  bool failed = outcome != Outcome::Clean;
  tasks_->add(kj::evalLater([this, failed]() {
    // A failure ends the tree: the surviving children are told to stop intake and abort what
    // they are doing now, telling their clients (found by the fault matrix: an API server's
    // clients were otherwise cut when its sibling died). The request goes out on each child's
    // connection before the stop request of the ordered shutdown, so it is handled first.
    if (failed) quiesceNow_ = quiesceChildren(monoNow()).eagerlyEvaluate(nullptr);
    beginShutdown(kNoDeadline);
  }));
}

kj::Promise<void> Supervisor::shutdown(MonoNs deadline) {
  if (phase_ == Phase::Terminated) return kj::READY_NOW;
  if (phase_ == Phase::ShuttingDown) {
    shorten(deadline);
  } else {
    beginShutdown(deadline);
  }
  return done_.addBranch();
}

void Supervisor::beginShutdown(MonoNs deadline) {
  if (phase_ == Phase::Terminated) return;
  if (phase_ == Phase::ShuttingDown) {
    shorten(deadline);
    return;
  }
  bool wasStarting = phase_ == Phase::Starting || phase_ == Phase::Idle;
  phase_ = Phase::ShuttingDown;
  deadline_ = deadline;
  shutdownStartedAt_ = monoNow();
  // Why first: nothing may be started or restarted once shutdown began (OTP).
  ops_ = kj::READY_NOW;
  if (wasStarting && startFailure_.empty()) {
    // A child that died while starting, in the same turn of the loop as the signal: its start
    // failure must not be lost to the cancelled start.
    for (const auto& c : children_) {
      if (!c->diedStarting || forcedOutcome_) continue;
      forcedOutcome_ = Outcome::StartFailed;
      failure_ = "child '" + c->spec.name + "' failed to start (" +
                 (c->lastExit ? c->lastExit->describe() : std::string("exited")) +
                 ") as the shutdown began";
      vsup::log().error("[supervisor] {}: {}", spec_.name, failure_);
    }
  }
  if (wasStarting && startFailure_.empty() && startFulfiller_ && startFulfiller_->isWaiting()) {
    startFulfiller_->reject(ipc::failure("shut down while starting"));
  }
  vsup::log().info("[shutdown] {}: stopping {} children in reverse order{}", spec_.name,
                   std::count_if(children_.begin(), children_.end(),
                                 [](const auto& c) { return c->proc.has_value(); }),
                   deadline == kNoDeadline ? std::string()
                                           : " (deadline " + seconds(deadline - monoNow()) + ")");
  stopAll_ = stopRange(0, children_.size())
                 .then([this]() {
                   phase_ = Phase::Terminated;
                   stopping_ = nullptr;
                   if (forcedOutcome_) {
                     outcome_ = *forcedOutcome_;
                   } else if (failures_ > 0) {
                     outcome_ = Outcome::ChildFailed;
                   } else {
                     outcome_ = escalations_ > 0 ? Outcome::Escalated : Outcome::Clean;
                   }
                   std::string how = failures_ > 0
                                         ? std::to_string(failures_) + " child failure(s)"
                                         : escalations_ > 0
                                               ? std::to_string(escalations_) + " escalations"
                                               : std::string("clean");
                   vsup::log().info("[shutdown] {}: done in {} ({})", spec_.name,
                                    millis(monoNow() - shutdownStartedAt_), how);
                   notify_.reset();
                   retireGuard();
                   doneFulfiller_->fulfill();
                 })
                 .eagerlyEvaluate([this](kj::Exception&& e) {
                   vsup::log().critical("[shutdown] {}: shutdown failed: {}", spec_.name,
                                        ipc::userMessage(e));
                   for (auto& c : children_) {
                     if (c->proc) c->proc->killAndReap();
                   }
                   phase_ = Phase::Terminated;
                   outcome_ = Outcome::Escalated;
                   doneFulfiller_->fulfill();
                 });
}

// Every child is reaped: the guard has nothing left to protect. Dismissed now and reaped once it
// has exited (or by the destructor): the shutdown does not wait for it, and it may still be
// loading its executable (a tree stopped just after it started).
void Supervisor::retireGuard() {
  if (!guard_) return;
  guard_->dismiss();
  uv_poll_start(guardExit_.get(), UV_READABLE, [](uv_poll_t* h, int, int) {
    auto* self = static_cast<Supervisor*>(h->data);
    if (self == nullptr) return;
    // Exited (its pidfd is readable): the poll goes first, then the reap closes the pidfd.
    self->guardExit_.reset();
    self->guard_.reset();
  });
}

kj::Promise<void> Supervisor::stopRange(size_t from, size_t to) {
  if (to <= from) return kj::READY_NOW;
  Child& c = *children_[to - 1];
  return stopChild(c).then([this, from, to]() { return stopRange(from, to - 1); });
}

MonoNs Supervisor::childCap() const { return withMargin(deadline_); }

kj::Promise<void> Supervisor::stopChild(Child& c) {
  if (!c.proc) return kj::READY_NOW;
  // One stop per run of the child: a second request (stopAllNow() started it, the ordered
  // traversal reaches it) waits for the same one.
  KJ_IF_MAYBE(running, c.stopDone) { return running->addBranch(); }
  c.liveness = nullptr;  // stopped by the deadlines from now on
  c.exitExpected = true;
  c.killed = false;
  bool wasStarting = c.state == Child::State::Starting;
  c.state = Child::State::Stopping;
  c.readyFulfiller = nullptr;
  MonoNs now = monoNow();
  MonoNs cap = phase_ == Phase::ShuttingDown ? childCap() : kNoDeadline;
  // After hurry() no child gets more than hurryMs_, deferrals included.
  if (hurryMs_ >= 0) cap = std::min(cap, now + hurryMs_ * kNsPerMs);
  MonoNs deadline = cap;
  switch (c.spec.shutdown.kind) {
    case ShutdownPolicy::Kind::BrutalKill: deadline = now; break;
    case ShutdownPolicy::Kind::Timeout:
      deadline = std::min(cap, now + c.spec.shutdown.timeoutMs * kNsPerMs);
      break;
    case ShutdownPolicy::Kind::Infinity: break;
  }
  c.stopStartedAt = now;
  c.stopCap = cap;
  c.stopDeadline = deadline;
  if (phase_ == Phase::ShuttingDown) stopping_ = &c;

  kj::Promise<void> stopped = nullptr;
  if (c.spec.shutdown.kind == ShutdownPolicy::Kind::BrutalKill) {
    // The configured way to stop this child, not an escalation.
    vsup::log().info("[shutdown] {}: killing {} (process group {}): shutdown = brutal_kill",
                     spec_.name, c.spec.name, c.proc->pid());
    c.proc->killGroup();
    stopped = exited(c);
  } else {
    vsup::log().info("[shutdown] {}: stopping {} (deadline {})", spec_.name, c.spec.name,
                     deadline == kNoDeadline ? std::string("none") : seconds(deadline - now));
    sendStopRequest(c);
    kj::Promise<void> killAtDeadline =
        waitStopDeadline(c).then([this, &c]() -> kj::Promise<void> {
          if (!c.proc) return kj::READY_NOW;
          vsup::log().warn("[shutdown] {}: killing {} (process group {}): shutdown timeout passed",
                           spec_.name, c.spec.name, c.proc->pid());
          if (firstKill_.empty()) firstKill_ = "child '" + c.spec.name + "' killed: shutdown timeout passed";
          ++escalations_;
          c.killed = true;
          c.proc->killGroup();
          return exited(c);
        });
    stopped = exited(c).exclusiveJoin(kj::mv(killAtDeadline));
  }
  kj::Promise<void> done = stopped.then([this, &c, wasStarting]() {
    c.state = Child::State::Stopped;
    // A vsup-aware child stopped while it was starting, whose start had failed on its own (it
    // exits kExitStartFailed): the start failure the shutdown cancelled, reported now. Else a
    // vsup-aware child (a sub-supervisor, say) that had to kill or abandon something says so
    // with its exit status: the escalation is the whole tree's, and the root's exit status
    // reports it.
    if (wasStarting && !c.killed && c.spec.vsupAware && c.lastExit &&
        c.lastExit->kind == ExitStatus::Kind::Exited && c.lastExit->code == kExitStartFailed &&
        !forcedOutcome_) {
      forcedOutcome_ = Outcome::StartFailed;
      failure_ = "child '" + c.spec.name + "' failed to start (its start failed as the shutdown "
                 "began)";
    } else if (!c.killed && c.spec.vsupAware && c.lastExit &&
        c.lastExit->kind == ExitStatus::Kind::Exited && c.lastExit->code == kExitEscalated) {
      ++escalations_;
      if (firstKill_.empty()) {
        firstKill_ = "child '" + c.spec.name + "' had to SIGKILL part of its subtree";
      }
    } else if (!c.killed && c.spec.vsupAware && c.lastExit && !c.lastExit->success() &&
               c.exitExpected) {
      // Asked to stop, a vsup-aware child exits 0 (or 4, above): anything else is a failure
      // (a crash while stopping, a sub-tree that failed).
      ++failures_;
      if (failedStop_.empty()) {
        failedStop_ = "child '" + c.spec.name + "' stopped with " + c.lastExit->describe();
      }
    }
    c.deferral = {};
    if (stopping_ == &c) stopping_ = nullptr;
    vsup::log().info("[shutdown] {}: {} stopped in {} ({})", spec_.name, c.spec.name,
                     millis(monoNow() - c.stopStartedAt),
                     c.lastExit ? c.lastExit->describe() : std::string("?"));
  });
  auto& forked = c.stopDone.emplace(done.fork());
  return forked.addBranch();
}

void Supervisor::sendStopRequest(Child& c) {
  if (c.node) {
    auto request = c.node->shutdownRequest();
    request.setDeadlineNs(withMargin(c.stopDeadline));
    request.setHurry(hurried_);
    request.setObserver(kj::heap<DeferralSink>(
        [this, &c](const std::string& node, const Deferral& d) {
          if (node == c.spec.name) c.deferral = d;
          reportDeferral(node, d);
        }));
    tasks_->add(request.send().ignoreResult());
  } else {
    c.proc->signal(SIGTERM);
  }
}

kj::Promise<void> Supervisor::waitStopDeadline(Child& c) {
  auto moved = kj::newPromiseAndFulfiller<void>();
  c.deadlineMoved = kj::mv(moved.fulfiller);
  kj::Promise<void> wake = kj::mv(moved.promise);
  if (c.stopDeadline != kNoDeadline) {
    wake = wake.exclusiveJoin(ipc::uvSleep(loop_, msUntil(c.stopDeadline)));
  }
  return wake.then([this, &c]() -> kj::Promise<void> {
    if (c.stopDeadline != kNoDeadline && monoNow() >= c.stopDeadline) return kj::READY_NOW;
    return waitStopDeadline(c);
  });
}

void Supervisor::setStopDeadline(Child& c, MonoNs deadline) {
  c.stopDeadline = deadline;
  if (c.deadlineMoved) {
    auto f = kj::mv(c.deadlineMoved);
    f->fulfill();
  }
}

void Supervisor::shorten(MonoNs deadline) {
  if (deadline >= deadline_) return;
  deadline_ = deadline;
  vsup::log().info("[shutdown] {}: deadline shortened to {}", spec_.name,
                   seconds(deadline - monoNow()));
  MonoNs cap = childCap();
  for (auto& cp : children_) {
    Child& c = *cp;
    if (!c.proc || c.state != Child::State::Stopping) continue;
    c.stopCap = std::min(c.stopCap, cap);
    if (c.stopDeadline > cap) {
      setStopDeadline(c, cap);
      if (c.node) sendStopRequest(c);  // the child's own shutdown is idempotent: shortens it
    }
  }
}

void Supervisor::hurry(int64_t capMs) {
  if (hurryMs_ >= 0 && hurryMs_ <= capMs) return;
  hurryMs_ = capMs;
  hurried_ = true;  // a vsup-aware child stops its own children at once, within its cap
  vsup::log().info("[shutdown] {}: every remaining stop timeout capped at {}ms", spec_.name, capMs);
  MonoNs capped = monoNow() + capMs * kNsPerMs;
  for (auto& cp : children_) {
    Child& c = *cp;
    if (!c.proc || c.state != Child::State::Stopping) continue;
    c.stopCap = std::min(c.stopCap, capped);
    if (c.stopDeadline > capped) setStopDeadline(c, capped);
    // Its own shutdown is idempotent: this shortens it, and hurries its subtree.
    if (c.node) sendStopRequest(c);
  }
}

void Supervisor::stopAllNow(MonoNs deadline) {
  if (phase_ == Phase::Terminated) return;
  hurried_ = true;
  vsup::log().info("[shutdown] {}: hurried: stopping every remaining child now{}", spec_.name,
                   deadline == kNoDeadline ? std::string()
                                           : " (deadline " + seconds(deadline - monoNow()) + ")");
  shutdownAtOnce(deadline);
}

void Supervisor::shutdownAtOnce(MonoNs deadline) {
  if (phase_ == Phase::Terminated) return;
  beginShutdown(deadline);  // (or shortens the running one)
  for (auto it = children_.rbegin(); it != children_.rend(); ++it) {
    Child& c = **it;
    if (!c.proc || c.state == Child::State::Stopping) continue;
    // The ordered traversal finds these stops under way and waits for them.
    tasks_->add(stopChild(c));
  }
}

void Supervisor::killAll() {
  for (auto& c : children_) {
    if (!c->proc) continue;
    vsup::log().warn("[shutdown] {}: killing {} (process group {}): kill requested", spec_.name,
                     c->spec.name, c->proc->pid());
    if (firstKill_.empty()) firstKill_ = "child '" + c->spec.name + "' killed: kill requested";
    ++escalations_;
    c->exitExpected = true;
    c->killed = true;  // its SIGKILL is ours: an escalation, not a failure of its own
    c->proc->killGroup();
  }
  if (phase_ != Phase::ShuttingDown && phase_ != Phase::Terminated) {
    forcedOutcome_ = Outcome::Escalated;
    beginShutdown(monoNow());
  }
}

kj::Maybe<kj::Exception> Supervisor::refuseCall(const std::string& what) const {
  if (phase_ == Phase::Terminated) {
    std::string how = nameOf(outcome_);
    if (!failure_.empty()) how += ": " + failure_;
    return ipc::failure("supervisor '" + spec_.name + "' has terminated (" + how + "): cannot " + what);
  }
  if (phase_ == Phase::ShuttingDown || terminating_) {
    return ipc::failure("supervisor '" + spec_.name + "' is shutting down: cannot " + what);
  }
  return nullptr;
}

Supervisor::Child* Supervisor::find(const std::string& name) {
  for (auto& c : children_) {
    if (c->spec.name == name) return c.get();
  }
  return nullptr;
}

void Supervisor::removeChild(Child& c) {
  size_t i = c.index;
  VSUP_ASSERT(i < children_.size() && children_[i].get() == &c, c.spec.name);
  auto it = std::find_if(spec_.children.begin(), spec_.children.end(),
                         [&](const ChildSpec& s) { return s.name == c.spec.name; });
  if (it != spec_.children.end()) spec_.children.erase(it);
  children_.erase(children_.begin() + ptrdiff_t(i));
  for (size_t k = i; k < children_.size(); ++k) children_[k]->index = k;
}

kj::Promise<void> Supervisor::stopChild(const std::string& name) {
  KJ_IF_MAYBE(e, refuseCall("stop child '" + name + "'")) { return kj::mv(*e); }
  Child* found = find(name);
  if (found == nullptr) return ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'");
  // If shutdown cancels the operation, the dropped fulfiller rejects the caller's promise.
  // (Found again by name when it is its turn: an operation before it may have deleted it.)
  auto paf = kj::newPromiseAndFulfiller<void>();
  enqueue([this, name, f = kj::mv(paf.fulfiller)]() mutable -> kj::Promise<void> {
    Child* c = find(name);
    if (c == nullptr) {
      f->reject(ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'"));
      return kj::READY_NOW;
    }
    c->ended = true;  // not restarted, and counts as ended for auto_shutdown
    return stopChild(*c).then([f = kj::mv(f)]() mutable { f->fulfill(); });
  });
  return kj::mv(paf.promise);
}

kj::Promise<void> Supervisor::addChild(ChildSpec child) {
  KJ_IF_MAYBE(e, refuseCall("add child '" + child.name + "'")) { return kj::mv(*e); }
  normalize(child);
  SupervisorSpec check = spec_;
  check.children.push_back(child);
  try {
    validate(check, "added child");
  } catch (const std::exception& e) {
    return ipc::failure(e.what());
  }
  spec_.children.push_back(child);
  auto c = std::make_unique<Child>();
  c->spec = std::move(child);
  c->index = children_.size();
  c->owner = this;
  Child& ref = *c;
  children_.push_back(std::move(c));
  auto paf = kj::newPromiseAndFulfiller<void>();
  enqueue([this, &ref, f = kj::mv(paf.fulfiller)]() mutable -> kj::Promise<void> {
    return startChild(ref)
        .then([]() -> kj::Maybe<kj::Exception> { return nullptr; },
              [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); })
        .then([this, &ref, f = kj::mv(f)](kj::Maybe<kj::Exception> error) mutable
              -> kj::Promise<void> {
          KJ_IF_MAYBE(e, error) {
            // OTP start_child: a child that failed to start is not added. (Removed on a later
            // turn: this continuation still runs inside the start's promise chain.)
            return kj::evalLater([this, &ref, e = kj::mv(*e), f = kj::mv(f)]() mutable {
              if (!ref.proc && ref.state == Child::State::Stopped) removeChild(ref);
              f->reject(kj::mv(e));
            });
          }
          f->fulfill();
          return kj::READY_NOW;
        });
  });
  return kj::mv(paf.promise);
}

kj::Promise<void> Supervisor::restartChild(const std::string& name) {
  KJ_IF_MAYBE(e, refuseCall("restart child '" + name + "'")) { return kj::mv(*e); }
  Child* found = find(name);
  if (found == nullptr) return ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'");
  if (found->spec.restart == Restart::Temporary) {
    return ipc::failure("child '" + name + "' is temporary: it is never restarted (OTP forgets a "
                "temporary child once it ended); add it again with addChild");
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  enqueue([this, name, f = kj::mv(paf.fulfiller)]() mutable -> kj::Promise<void> {
    // Checked when it is its turn: an operation queued before it may have started, stopped or
    // deleted it.
    Child* found = find(name);
    if (found == nullptr) {
      f->reject(ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'"));
      return kj::READY_NOW;
    }
    Child& c = *found;
    if (c.proc || c.state != Child::State::Stopped) {
      f->reject(ipc::failure("child '" + c.spec.name + "' is " +
                     (c.state == Child::State::Restarting ? "restarting" : "running") +
                     ": only a stopped child can be restarted (stop it first)"));
      return kj::READY_NOW;
    }
    c.ended = false;
    return startChild(c)
        .then([]() -> kj::Maybe<kj::Exception> { return nullptr; },
              [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); })
        .then([f = kj::mv(f)](kj::Maybe<kj::Exception> error) mutable {
          // A failed restart leaves the child stopped (its start failure stopped it).
          KJ_IF_MAYBE(e, error) {
            f->reject(kj::mv(*e));
          } else {
            f->fulfill();
          }
        });
  });
  return kj::mv(paf.promise);
}

kj::Promise<void> Supervisor::deleteChild(const std::string& name) {
  KJ_IF_MAYBE(e, refuseCall("delete child '" + name + "'")) { return kj::mv(*e); }
  if (find(name) == nullptr) {
    return ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'");
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  enqueue([this, name, f = kj::mv(paf.fulfiller)]() mutable -> kj::Promise<void> {
    Child* c = find(name);
    if (c == nullptr) {
      f->reject(ipc::failure("no child '" + name + "' in supervisor '" + spec_.name + "'"));
    } else if (c->proc || c->state != Child::State::Stopped) {
      f->reject(ipc::failure("child '" + name + "' is " +
                     (c->state == Child::State::Restarting ? "restarting" : "running") +
                     ": only a stopped child can be deleted (stop it first)"));
    } else {
      removeChild(*c);
      f->fulfill();
    }
    return kj::READY_NOW;
  });
  return kj::mv(paf.promise);
}

kj::Promise<capnp::Capability::Client> Supervisor::service(const std::string& child) {
  if (phase_ == Phase::Terminated) {
    KJ_IF_MAYBE(e, refuseCall("reach child '" + child + "'")) { return kj::mv(*e); }
  }
  for (auto& c : children_) {
    if (c->spec.name != child) continue;
    if (!c->node || !c->proc) break;
    return c->node->serviceRequest().send().then(
        [](capnp::Response<schema::Node::ServiceResults>&& r) { return r.getService(); });
  }
  return ipc::failure("child '" + child + "' is not a running vsup-aware child of " + spec_.name);
}

// How long after the drain deadline a child may take to answer Node.quiesce.
constexpr int64_t kQuiesceGraceMs = 1000;

kj::Promise<void> Supervisor::quiesceChildren(MonoNs drainDeadline) {
  // The shutdown has begun: from now on the stop deadlines govern a hung child, not the pings.
  quiesced_ = true;
  kj::Vector<kj::Promise<void>> calls;
  for (auto& c : children_) {
    c->liveness = nullptr;
    // A child still starting serves nothing yet (and a hung one would hold the shutdown up
    // until the drain deadline for nothing); one being stopped is asked again (a second
    // signal's quiesce, "now", aborts what it still drains).
    if (!c->node || !c->proc || c->state == Child::State::Starting) continue;
    auto request = c->node->quiesceRequest();
    request.setDrainDeadlineNs(drainDeadline);
    // A child that is gone or fails to quiesce is stopped by the shutdown that follows anyway.
    kj::Promise<void> call = request.send().ignoreResult().catch_([](kj::Exception&&) {});
    if (drainDeadline != kNoDeadline) {
      // A hung child (stopped, deadlocked) never answers: the shutdown must not wait for it
      // past the drain (it is then stopped, and killed at its own deadline, like any other).
      std::string name = c->spec.name;
      uint64_t ms = uint64_t(std::max<int64_t>(msUntil(drainDeadline), 0)) + kQuiesceGraceMs;
      call = call.exclusiveJoin(ipc::uvSleep(loop_, ms).then([this, name]() {
        vsup::log().warn("[shutdown] {}: {} did not answer the request to stop intake: stopping "
                         "it anyway", spec_.name, name);
      }));
    }
    calls.add(kj::mv(call));
  }
  return kj::joinPromises(calls.releaseAsArray());
}

// How long a child may take to answer Node.leaveRotation.
constexpr int64_t kLeaveRotationTimeoutMs = 1000;

kj::Promise<void> Supervisor::leaveRotationChildren() {
  kj::Vector<kj::Promise<void>> calls;
  for (auto& c : children_) {
    if (!c->node || !c->proc || c->state != Child::State::Running) continue;
    std::string name = c->spec.name;
    // A child that fails or does not answer (stopped, deadlocked) must not hold the others up:
    // it is skipped with a warning, and the shutdown that follows stops it like any other.
    kj::Promise<void> call =
        c->node->leaveRotationRequest().send().ignoreResult().catch_(
            [this, name](kj::Exception&& e) {
              vsup::log().warn("[shutdown] {}: {} failed to leave the rotation: {}", spec_.name,
                               name, ipc::userMessage(e));
            });
    call = call.exclusiveJoin(ipc::uvSleep(loop_, kLeaveRotationTimeoutMs).then([this, name]() {
      vsup::log().warn("[shutdown] {}: {} did not answer the request to leave the rotation "
                       "within {}ms: skipped", spec_.name, name, kLeaveRotationTimeoutMs);
    }));
    calls.add(kj::mv(call));
  }
  return kj::joinPromises(calls.releaseAsArray());
}

kj::Promise<Outcome> Supervisor::terminated() {
  return done_.addBranch().then([this]() { return outcome_; });
}

std::string Supervisor::outcomeDetail() const {
  switch (outcome_) {
    case Outcome::Clean: return {};
    case Outcome::StartFailed:
      return startFailedMessage(failure_.empty() ? std::string("a child did not start") : failure_);
    case Outcome::IntensityExceeded: {
      const std::string& cause = intensityCause_.empty() ? lastUnexpectedExit_ : intensityCause_;
      return "failed: " + (cause.empty() ? std::string() : cause + "; ") +
             (failure_.empty() ? std::string("intensity exceeded") : failure_);
    }
    case Outcome::ChildFailed:
      if (!exitInShutdown_.empty()) return "failed: " + exitInShutdown_ + " during the shutdown";
      if (!failedStop_.empty()) return "failed: " + failedStop_;
      return "failed: a child failed while the tree shut down";
    case Outcome::Escalated:
      return "shutdown escalated: " +
             (firstKill_.empty() ? std::to_string(escalations_) + " child(ren) had to be SIGKILLed"
                                 : firstKill_);
  }
  return {};
}

bool Supervisor::isTerminated() const { return phase_ == Phase::Terminated; }
Outcome Supervisor::outcome() const { return outcome_; }

// --------------------------------------------------------------------------------------------
// Notifications and deferrals

void Supervisor::reportDeferral(const std::string& node, const Deferral& deferral) {
  if (options_.onDeferral) options_.onDeferral(node, deferral);
}

void Supervisor::onNotify(pid_t sender, const NotifyMessage& m) {
  Child* from = nullptr;
  pid_t senderGroup = ::getpgid(sender);  // -1 if it is already gone
  for (auto& c : children_) {
    if (!c->proc) continue;
    // The main process, or a helper in its process group (as systemd's NotifyAccess=all would
    // allow within the unit).
    if (c->proc->pid() == sender || senderGroup == c->proc->pid()) {
      from = c.get();
      break;
    }
  }
  if (from == nullptr) return;  // not one of ours: dropped
  Child& c = *from;
  if (!m.status.empty()) c.statusText = m.status;
  if (m.ready && c.state == Child::State::Starting && c.readyFulfiller) {
    auto f = kj::mv(c.readyFulfiller);
    f->fulfill();
  }
  if (m.extendTimeoutUs >= 0 && c.state == Child::State::Stopping) {
    MonoNs now = monoNow();
    MonoNs wanted = now + m.extendTimeoutUs * 1000;
    MonoNs extended = std::min(wanted, c.stopCap);
    c.deferral.reason = c.statusText.empty() ? "extending its stop timeout" : c.statusText;
    c.deferral.progress = "extended by " + seconds(m.extendTimeoutUs * 1000) +
                          (extended < wanted ? " (capped at the parent's deadline)" : "");
    vsup::log().info("[shutdown] {}: deferring: {} ({})", c.spec.name, c.deferral.reason,
                     c.deferral.progress);
    reportDeferral(c.spec.name, c.deferral);
    if (extended > c.stopDeadline || c.stopDeadline == kNoDeadline) {
      if (c.stopDeadline != kNoDeadline) setStopDeadline(c, extended);
    }
  }
}

// --------------------------------------------------------------------------------------------
// Status

NodeState Supervisor::phaseState() const {
  switch (phase_) {
    case Phase::Idle:
    case Phase::Starting: return NodeState::Starting;
    case Phase::Running: return NodeState::Running;
    case Phase::ShuttingDown: return NodeState::Stopping;
    case Phase::Terminated: return NodeState::Stopped;
  }
  return NodeState::Stopped;
}

NodeStatus Supervisor::localStatus(const Child& c) const {
  NodeStatus s;
  s.name = c.spec.name;
  s.pid = c.proc ? c.proc->pid() : 0;
  s.type = c.spec.type == ChildType::Supervisor ? NodeType::Supervisor : NodeType::Worker;
  switch (c.state) {
    case Child::State::Stopped: s.state = NodeState::Stopped; break;
    case Child::State::Starting: s.state = NodeState::Starting; break;
    case Child::State::Running: s.state = NodeState::Running; break;
    case Child::State::Stopping: s.state = NodeState::Stopping; break;
    case Child::State::Restarting: s.state = NodeState::Restarting; break;
  }
  if (c.unresponsive && c.proc) s.state = NodeState::Unresponsive;  // killed, not reaped yet
  s.uptimeMs = c.proc ? (monoNow() - c.startedAt) / kNsPerMs : 0;
  s.restarts = c.restarts;
  s.deferral = c.deferral;
  return s;
}

kj::Promise<NodeStatus> Supervisor::status(int64_t budgetMs) {
  if (budgetMs <= 0) budgetMs = kStatusBudgetMs;
  NodeStatus self;
  self.name = spec_.name;
  self.pid = ::getpid();
  self.type = NodeType::Supervisor;
  self.state = phaseState();
  self.uptimeMs = startedAt_ ? (monoNow() - startedAt_) / kNsPerMs : 0;
  kj::Vector<kj::Promise<NodeStatus>> parts;
  for (auto& cp : children_) {
    Child& c = *cp;
    NodeStatus local = localStatus(c);
    if (!c.node || !c.proc || c.unresponsive) {
      parts.add(kj::mv(local));
      continue;
    }
    auto request = c.node->statusRequest();
    // Less than ours: the child's own children time out first, so a hung node deep down is
    // reported as itself and every node above it still answers within its budget.
    request.setBudgetMs(statusBudgetForChildren(budgetMs));
    auto remote = request.send().then(
        [local](capnp::Response<schema::Node::StatusResults>&& r) {
          NodeStatus s = decode(r.getStatus());
          // The parent knows best how often it restarted the child, and that it is stopping it.
          s.name = local.name;
          s.restarts = local.restarts;
          if (local.state == NodeState::Stopping || local.state == NodeState::Starting) {
            s.state = local.state;
          }
          if (!s.deferral.active()) s.deferral = local.deferral;
          return s;
        },
        [local](kj::Exception&& e) {
          vsup::log().debug("[supervisor] status of {} failed: {}", local.name,
                            ipc::userMessage(e));
          NodeStatus s = local;
          s.state = NodeState::Unresponsive;
          return s;
        });
    auto timeout = ipc::uvSleep(loop_, uint64_t(budgetMs)).then([local]() {
      NodeStatus s = local;
      s.state = NodeState::Unresponsive;
      return s;
    });
    parts.add(remote.exclusiveJoin(kj::mv(timeout)));
  }
  return kj::joinPromises(parts.releaseAsArray())
      .then([self = kj::mv(self)](kj::Array<NodeStatus> children) mutable {
        for (auto& c : children) self.children.push_back(kj::mv(c));
        return kj::mv(self);
      });
}

}  // namespace vsup::supervisor
