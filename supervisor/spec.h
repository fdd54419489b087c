// Child and supervisor specifications: the same value types for the TOML topology format, the
// embedding API and the control protocol (which carries a sub-supervisor's spec to it).
// Semantics follow Erlang/OTP's supervisor, for OS processes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vsup::supervisor {

enum class Restart { Permanent, Transient, Temporary };
enum class ChildType { Worker, Supervisor };
enum class Readiness { None, Notify };
enum class Strategy { OneForOne, OneForAll, RestForOne };
enum class AutoShutdown { Never, AnySignificant, AllSignificant };

// How long a child gets between its stop request and SIGKILL.
struct ShutdownPolicy {
  enum class Kind { Timeout, BrutalKill, Infinity };
  Kind kind = Kind::Timeout;
  int64_t timeoutMs = 5000;  // meaningful for Kind::Timeout only

  static ShutdownPolicy timeout(int64_t ms) { return {Kind::Timeout, ms}; }
  static ShutdownPolicy brutalKill() { return {Kind::BrutalKill, 0}; }
  static ShutdownPolicy infinity() { return {Kind::Infinity, 0}; }
  bool operator==(const ShutdownPolicy&) const = default;
};

struct ChildSpec;

struct SupervisorSpec {
  std::string name = "root";
  Strategy strategy = Strategy::OneForOne;
  uint32_t intensity = 1;   // more than `intensity` restarts ...
  int64_t periodMs = 5000;  // ... within `periodMs` stops the supervisor
  AutoShutdown autoShutdown = AutoShutdown::Never;
  std::vector<ChildSpec> children;
};

struct ChildSpec {
  std::string name;
  std::vector<std::string> command;  // argv; argv[0] is looked up in PATH when it has no '/'
  std::vector<std::pair<std::string, std::string>> env;  // added to the inherited environment
  Restart restart = Restart::Permanent;
  ShutdownPolicy shutdown;  // default 5000 ms for workers, infinity for supervisors
  ChildType type = ChildType::Worker;
  bool significant = false;
  Readiness ready = Readiness::None;
  int64_t startTimeoutMs = 10000;  // -1: none. Applies to ready = notify and vsup-aware starts
  // Starting: children start in spec order, each once the one before it is ready. A child with
  // startConcurrently does not hold the next one back: the next child is spawned as soon as this
  // one is (for a child that takes long to become ready while those after it need not wait:
  // engine-core loading its model while the API servers start and answer 503 "starting"). The
  // supervisor's start still completes only once every child is ready, and fails exactly as a
  // serial start does when any child fails to
  // start, dies before it is ready or misses its start timeout, whichever child it is, and
  // whether or not the children after it are still starting (they are stopped with the rest).
  // The stop order stays the reverse of the spec order; restarts (one_for_all, rest_for_one)
  // start their children one after the other as ever. Only for a child with a readiness to
  // wait for (ready = notify, or vsup-aware); a plain child is ready when spawned. TOML:
  // start_concurrently. At any depth: a sub-supervisor's spec carries it to its `vsup node`.
  bool startConcurrently = false;
  // Hung-child detection (vsup-aware children only): while the child runs, its supervisor calls
  // Node.ping every livenessIntervalMs; a child that has not answered one within
  // livenessTimeoutMs (and a 100 ms grace) is hung: it is logged as unresponsive, SIGKILLed
  // (its process group), and its exit handled as an unexpected death (restart policy,
  // intensity). A child that hangs is so killed within interval + timeout + 100 ms. Pings run
  // only while the child is running and its supervisor is not shutting down (quiesceChildren()
  // or a shutdown stops them: the stop deadlines govern from then on). -1: not checked.
  int64_t livenessTimeoutMs = -1;
  int64_t livenessIntervalMs = 1000;
  // A vsup-aware child speaks the control protocol on fd 3 and is stopped over RPC, not by
  // signal. Supervisors are always vsup-aware.
  bool vsupAware = false;
  // For type == Supervisor: its own strategy and children (its `name` is this child's name).
  std::optional<SupervisorSpec> supervisor;
  // For a vsup-aware child: bytes its supervisor hands it in Node.start, on every (re)start
  // (ChildRuntime::startConfig()). vsup never looks inside: a program that takes a typed
  // configuration (a Cap'n Proto message, say) rather than argv puts it here. Empty: none.
  // Not settable from topology files; travels with a sub-supervisor's spec to its children.
  std::string startConfig;
  // Embedding API only (not in topology files, not sent to sub-supervisors): fds of the
  // embedding process the child inherits, numbered from 3 (from 4 for a vsup-aware child, whose
  // control socket is 3) in this order. The embedder keeps them open (and CLOEXEC) for as long
  // as the child may be restarted.
  std::vector<int> inheritFds;
};

// Checks everything that can be checked before anything is spawned. Throws vsup::Error whose
// message names `origin` (a file name or "embedded spec"), the child path ("root/sub/leaf") and
// the field, e.g. `topology.toml: child 'db': field 'significant': ...`.
void validate(const SupervisorSpec& spec, const std::string& origin);

// What is implied and not written: a child of type supervisor is always vsup-aware, and its
// own spec carries its name (empty spec: a supervisor with no children yet). Recursive. The
// TOML loader and every Supervisor apply it, so specs built in code behave like loaded ones.
void normalize(SupervisorSpec& spec);
void normalize(ChildSpec& child);

const char* nameOf(Restart);
const char* nameOf(Strategy);
const char* nameOf(AutoShutdown);
std::string nameOf(const ShutdownPolicy&);

}  // namespace vsup::supervisor
