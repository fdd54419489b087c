# The control protocol: every node of a vsup tree serves `Node` to its parent, and the root
# serves it to `vsup tree` on its control socket. Every process of a tree is the same vsup binary
# (or links the same library), so both ends always agree on this schema.
@0xaad22fa97b4e0523;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("vsup::ipc::schema");

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

struct ChildSpec {
  name @0 :Text;
  command @1 :List(Text);
  env @2 :List(EnvVar);
  restart @3 :Restart;
  shutdown @4 :Shutdown;
  type @5 :ChildType;
  significant @6 :Bool;
  ready @7 :Readiness;
  startTimeoutMs @8 :Int64;      # -1: no start timeout
  vsupAware @9 :Bool;
  supervisor @10 :SupervisorSpec; # set when type == supervisor
  startConfig @11 :Data;          # opaque to vsup: sent to the child (vsup-aware) in Node.start
  livenessTimeoutMs @12 :Int64 = -1;   # -1: no liveness pings
  livenessIntervalMs @13 :Int64 = 1000;
  startConcurrently @14 :Bool;    # the next child is spawned without waiting for this one's ready

  enum Restart { permanent @0; transient @1; temporary @2; }
  enum ChildType { worker @0; supervisor @1; }
  enum Readiness { none @0; notify @1; }
  struct Shutdown {
    union {
      timeoutMs @0 :Int64;
      brutalKill @1 :Void;
      infinite @2 :Void;   # "infinity" (that name clashes with the C macro)
    }
  }
}

struct SupervisorSpec {
  name @0 :Text;
  strategy @1 :Strategy;
  intensity @2 :UInt32;
  periodMs @3 :Int64;
  autoShutdown @4 :AutoShutdown;
  children @5 :List(ChildSpec);

  enum Strategy { oneForOne @0; oneForAll @1; restForOne @2; }
  enum AutoShutdown { never @0; anySignificant @1; allSignificant @2; }
}

struct Deferral {
  reason @0 :Text;     # empty: not deferring
  progress @1 :Text;
}

struct NodeStatus {
  name @0 :Text;
  pid @1 :Int32;              # 0 when not running
  type @2 :Type;
  state @3 :State;
  uptimeMs @4 :Int64;
  restarts @5 :UInt32;
  deferral @6 :Deferral;
  inFlight @7 :Int64;         # -1: not applicable
  children @8 :List(NodeStatus);
  requestsTotal @9 :Int64;    # requests accepted since start (an API server); -1: not applicable
  outOfRotation @10 :Bool;    # leaveRotation() was called: /health says "draining"
  detail @11 :Text;           # one line of what the node is doing (a KV agent: its leases, pulls)

  # In the order of supervisor::NodeType and supervisor::NodeState (supervisor/status.h).
  enum Type { worker @0; supervisor @1; }
  enum State {
    starting @0; running @1; stopping @2; stopped @3; restarting @4; unresponsive @5; failed @6;
  }
}

# Passed by a parent with shutdown(); the node reports each deferral to it while it runs.
interface ShutdownObserver {
  deferral @0 (node :Text, deferral :Deferral) -> ();
}

interface Node {
  # Become ready. A sub-supervisor starts its children (in order, each after the previous is
  # ready) and returns when all are ready; it throws, naming the child, when the start failed.
  # A vsup-aware worker returns once its program declared itself ready.
  # `config` is the child's start configuration (ChildSpec.startConfig): bytes only the child's
  # program interprets (the serving tree's engine configuration, as a Cap'n Proto message); empty
  # when it has none. A sub-supervisor ignores it.
  start @0 (spec :SupervisorSpec, config :Data) -> ();

  # This node and its subtree, recursively, answered within `budgetMs` (0: the receiver's
  # default, 1000 ms): a supervisor waits for each vsup-aware child's answer for the budget and
  # gives the child a smaller one (3/4 of it), so a hung node deep in the tree is reported as
  # itself, "unresponsive", and its ancestors still answer in time.
  status @1 (budgetMs :Int64) -> (status :NodeStatus);

  # Ordered shutdown, finished before `deadlineNs` (CLOCK_MONOTONIC, absolute). Idempotent: a
  # second call with an earlier deadline shortens the running shutdown. `clean` is false when
  # anything in the subtree had to be killed.
  # `hurry` (a second signal at the root): stop every remaining child now, at once (each gets
  # its stop request first, and is killed by `deadlineNs` at the latest), not one after another.
  shutdown @2 (deadlineNs :Int64, observer :ShutdownObserver, hurry :Bool) -> (clean :Bool);

  # Liveness.
  ping @3 () -> ();

  # The node's own application interface (engine-core's Worker, say), if it has one.
  service @4 () -> (service :Capability);

  # Stop intake now (an API server closes its listener), keep serving what is in flight until
  # `drainDeadlineNs`. The ordered shutdown follows with shutdown(). Idempotent.
  quiesce @5 (drainDeadlineNs :Int64) -> ();

  # Leave the load balancers' rotation but keep serving (`vsup drain`, a Kubernetes preStop): an
  # API server turns /health to 503 "draining" and goes on answering every request; a
  # supervisor forwards the call to every running vsup-aware child. Idempotent; there is no way
  # back (the shutdown follows).
  leaveRotation @6 () -> ();
}
