// Supervisor: OTP supervision of OS processes on one libuv loop.
//
// Lifecycle:  start() ──► running ──► shutdown(deadline) ──► terminated
//                 │            │                               ▲
//                 │            └─ intensity exceeded / auto_shutdown (stops itself) ──┘
//                 └─ a child failed to start: started ones stopped in reverse ───────┘
//
// Threading: every method runs on the loop thread, with a KjOnUv current on it. Children are
// spawned from that thread only (their PR_SET_PDEATHSIG is tied to it).
// Lifetime: the Supervisor must outlive every promise it returned. Destroying it before it
// terminated is a backstop, not a shutdown: every child's process group is SIGKILLed and reaped
// synchronously, and the escalation is logged.
#pragma once

#include <uv.h>

#include <deque>
#include <list>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <capnp/capability.h>
#include <kj/async.h>

#include "base/clock.h"
#include "ipc/uv_handle.h"
#include "supervisor/spec.h"
#include "supervisor/status.h"

namespace vsup::supervisor {

// How a supervisor ended. The exit status of a supervisor process is exitCodeFor(outcome).
enum class Outcome {
  Clean,              // ordered shutdown (or auto_shutdown), nothing SIGKILLed
  Escalated,          // shutdown completed, but at least one child had to be SIGKILLed
  StartFailed,        // a child failed to start; the started ones were stopped
  IntensityExceeded,  // more than `intensity` restarts within `period`
  ChildFailed,        // shutdown completed, but a child died or failed on its own during it
                      // (a vsup-aware child exiting non-zero, or any child dying unasked)
};
int exitCodeFor(Outcome outcome);
const char* nameOf(Outcome outcome);

inline constexpr int kExitClean = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitStartFailed = 3;
inline constexpr int kExitEscalated = 4;
inline constexpr int kExitIntensity = 5;

struct SupervisorOptions {
  // The vsup executable, re-executed (`vsup __node`) for children of type "supervisor", and
  // (`vsup __guard`) as the OrphanGuard that kills what this supervisor's children left behind
  // should this process be SIGKILLed. Empty: no nested supervisors, no guard.
  std::string selfExe;
  // Called for every deferral reported in this subtree while it shuts down (a generic child's
  // EXTEND_TIMEOUT_USEC, or a vsup-aware descendant's shutdown hook). `node` names who defers.
  std::function<void(const std::string& node, const Deferral&)> onDeferral;
  // Read children's stdout/stderr through pipes and write them to this process's fd 1/2, each
  // line prefixed with the child's name and pid (OutputCollector). For the vsup executable;
  // off for library hosts, whose children inherit fds 1 and 2 as they are.
  bool collectOutput = false;
};

// (It is its own TaskSet error handler: kj::TaskSet::ErrorHandler has no virtual destructor, so
// a handler must never be owned through a base-class pointer.)
class Supervisor final : public kj::TaskSet::ErrorHandler {
 public:
  Supervisor(uv_loop_t* loop, SupervisorSpec spec, SupervisorOptions options = {});
  ~Supervisor() noexcept(false);
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts the children in spec order, each after the previous one is ready (after it is
  // spawned, for a child with startConcurrently). Resolves when all are ready; on failure (of
  // any child, one started concurrently included), rejects with a message naming the child,
  // after the already-started children were stopped in reverse order. Call once.
  kj::Promise<void> start();

  // Ordered shutdown: children stopped in reverse start order, one at a time, the whole of it
  // finished before `deadline` (kNoDeadline: each child's own `shutdown` policy governs).
  // Idempotent; a later call with an earlier deadline shortens the running shutdown. Resolves
  // when every child has been reaped.
  kj::Promise<void> shutdown(MonoNs deadline);

  // "Stop now" (a second signal): from now on, no child gets more than `capMs` between its
  // stop request and SIGKILL, the one being stopped included. Stop requests are still sent
  // first. Combine with shutdown(): this only shortens it.
  void hurry(int64_t capMs);

  // "Stop now" from a parent (a hurried Node.shutdown, at any depth below the root): shutdown
  // with `deadline`, and every child not stopped yet gets its stop request now, at once, each
  // killed by the deadline at the latest (less this node's margin), so the whole subtree is gone
  // by `deadline` and every process got its stop request (SIGTERM, or its stop RPC) first.
  void stopAllNow(MonoNs deadline);
  // The same without the hurry (a stop request like any other, not passed on as "hurry"): a
  // shutdown that stops all the children at the same time, for peers that need no order
  // (engine-core's ranks, idle at a step boundary, each waiting for its own KV transfers
  // under one deadline). Resolve with shutdown() or terminated().
  void shutdownAtOnce(MonoNs deadline);

  // SIGKILL to every child's process group at once ("kill the tree now"). The children are
  // still reaped through the normal path.
  void killAll();

  // Resolves once, when the supervisor has terminated for any reason (all children reaped).
  kj::Promise<Outcome> terminated();
  bool isTerminated() const;
  Outcome outcome() const;
  // Why the supervisor terminated when it was not asked to (start failure, intensity).
  const std::string& failure() const { return failure_; }
  // One line for a person: what made the outcome what it is, naming the child; empty after a
  // clean shutdown. "start failed: child 'db' did not become ready within 5000ms
  // (start_timeout)", "failed: child 'engine-core' (pid 12) exited (signal 9 (Killed));
  // intensity exceeded (…)", "failed: child 'x' (pid 7) exited (code 9) during the shutdown",
  // "failed: child 'x' stopped with code 1", "shutdown escalated: child 'db' killed: shutdown
  // timeout passed". Valid once terminated.
  std::string outcomeDetail() const;

  // This supervisor and its subtree; vsup-aware children are asked over RPC, each within
  // `budgetMs` and given 3/4 of it for their own children (statusBudgetForChildren): a child
  // that does not answer in time, or that failed a liveness ping, is reported "unresponsive",
  // and this answer comes within the budget.
  kj::Promise<NodeStatus> status(int64_t budgetMs = kStatusBudgetMs);

  // The calls below follow OTP's supervisor module. Each rejects with a message saying so when
  // the supervisor has terminated (or is shutting down), or for an unknown name.
  // OTP terminate_child: stops the child with its own policy and does not restart it.
  kj::Promise<void> stopChild(const std::string& name);
  // OTP start_child: appends the child and starts it (after any operation in progress).
  // Rejects for an invalid spec or a duplicate name, or when the start fails: a child that
  // failed to start is not added (its name is free again).
  kj::Promise<void> addChild(ChildSpec child);
  // OTP restart_child: starts again a child that is stopped (terminated with stopChild(), or
  // ended and not restarted). Rejects for a running (starting, stopping, restarting) child and
  // for a temporary one (OTP forgets a temporary child once it ended: add it again).
  kj::Promise<void> restartChild(const std::string& name);
  // OTP delete_child: removes a stopped child's spec. Rejects for a child that is not stopped.
  kj::Promise<void> deleteChild(const std::string& name);

  // The application capability of a running vsup-aware child (Node.service).
  kj::Promise<capnp::Capability::Client> service(const std::string& child);
  // Node.quiesce on every running vsup-aware child at once (stop intake everywhere before the
  // ordered, one-at-a-time shutdown). Resolves when all answered (a child that does not answer
  // is waited for until the drain deadline and a second more). The liveness pings stop here:
  // from now on a hung child is stopped (and killed) by its stop deadline.
  kj::Promise<void> quiesceChildren(MonoNs drainDeadline);
  // Node.leaveRotation on every running vsup-aware child at once (`vsup drain`). Resolves when
  // all answered (bounded wait; a child that does not answer is skipped with a warning).
  kj::Promise<void> leaveRotationChildren();

  const SupervisorSpec& spec() const { return spec_; }
  size_t escalations() const { return escalations_; }

  struct Child;  // internal

 private:
  enum class Phase { Idle, Starting, Running, ShuttingDown, Terminated };

  void taskFailed(kj::Exception&& exception) override;
  struct ConcurrentStarts;
  kj::Promise<void> startAll();
  kj::Promise<void> startFrom(size_t index, ConcurrentStarts* concurrent);
  kj::Promise<void> startChild(Child& c);
  kj::Promise<void> stopChild(Child& c);
  kj::Promise<void> stopRange(size_t from, size_t to);  // reverse order, [from, to)
  kj::Promise<void> waitStopDeadline(Child& c);
  kj::Promise<void> exited(Child& c);
  void watchExit(Child& c);
  void pollExit(Child& c);
  void onExit(Child& c);
  void onUnexpectedExit(Child& c, bool success);
  kj::Promise<std::string> notReadyIn(Child& c);
  void startLiveness(Child& c);
  kj::Promise<void> pingAfter(Child& c, int64_t delayMs);
  bool pinging(const Child& c) const;
  void onUnresponsive(Child& c);
  kj::Maybe<kj::Exception> refuseCall(const std::string& what) const;
  Child* find(const std::string& name);
  void removeChild(Child& c);
  void restartAfter(Child& c);
  void restartFailed(Child& c, const std::string& why);
  bool recordRestart();
  void checkAutoShutdown();
  void enqueue(kj::Function<kj::Promise<void>()> op);
  void beginShutdown(MonoNs deadline);
  void terminateSelf(Outcome outcome, const std::string& why);
  void retireGuard();
  void shorten(MonoNs deadline);
  void setStopDeadline(Child& c, MonoNs deadline);
  void sendStopRequest(Child& c);
  void onNotify(pid_t sender, const struct NotifyMessage& message);
  void reportDeferral(const std::string& node, const Deferral& deferral);
  MonoNs childCap() const;
  NodeStatus localStatus(const Child& c) const;
  std::vector<std::string> childEnvironment(const Child& c) const;
  NodeState phaseState() const;

  uv_loop_t* loop_;
  SupervisorSpec spec_;
  SupervisorOptions options_;
  std::unique_ptr<class NotifySocket> notify_;
  std::unique_ptr<class OrphanGuard> guard_;  // only with options_.selfExe
  UvHandle<uv_poll_t> guardExit_;  // reaps the dismissed guard (retireGuard())
  std::list<std::unique_ptr<class OutputCollector>> collectors_;
  std::vector<std::unique_ptr<Child>> children_;
  Phase phase_ = Phase::Idle;
  MonoNs startedAt_ = 0;
  MonoNs shutdownStartedAt_ = 0;
  MonoNs deadline_ = kNoDeadline;
  std::deque<MonoNs> restartTimes_;
  size_t escalations_ = 0;
  size_t failures_ = 0;  // children that died or failed on their own during the shutdown
  bool terminating_ = false;  // terminateSelf() ran: the shutdown is on its way
  kj::Promise<void> quiesceNow_ = kj::READY_NOW;  // a failing tree's last quiesce
  std::optional<Outcome> forcedOutcome_;
  std::string failure_;
  // What outcomeDetail() says, recorded where it happens (the first of each kind).
  std::string lastUnexpectedExit_;   // the latest "child 'x' (pid N) exited (…)" while running
  std::string intensityCause_;       // lastUnexpectedExit_ when the intensity was exceeded
  std::string exitInShutdown_;       // the first child that died unasked during the shutdown
  std::string failedStop_;           // the first child asked to stop that exited failing
  std::string firstKill_;            // the first child SIGKILLed at a deadline or on request
  std::string startFailure_;  // set when start() failed; it rejects once the tree is down
  Outcome outcome_ = Outcome::Clean;
  Child* stopping_ = nullptr;  // the child whose stop is in progress during shutdown
  int64_t hurryMs_ = -1;  // hurry(): per-child cap on stop timeouts; -1: none
  bool quiesced_ = false;  // quiesceChildren() ran: the shutdown began, no more liveness pings
  bool hurried_ = false;  // stopAllNow() (or hurry()): stop requests say "hurry" downwards

  kj::Own<kj::PromiseFulfiller<void>> startFulfiller_;
  kj::Own<kj::PromiseFulfiller<void>> doneFulfiller_;
  kj::ForkedPromise<void> done_;
  kj::Promise<void> ops_;         // serialized start/restart operations; dropped on shutdown
  kj::Promise<void> stopAll_;     // the shutdown traversal
  kj::Own<kj::TaskSet> tasks_;    // detached work (stop RPCs); errors are logged

};

}  // namespace vsup::supervisor
