// The status of one node and its subtree: what `vsup tree` prints and Supervisor::status()
// returns. Plain values; the control protocol carries them (supervisor/node_codec.h).
//
// Self-contained (an installed public header): the standard library and <sys/types.h> only.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vsup::supervisor {

// What a node is: a worker (a program that does the work, vsup-aware or not) or a supervisor
// (the root, or a sub-supervisor that `vsup __node` runs).
enum class NodeType { Worker, Supervisor };

// Where a node is in its life, as its parent (or, for a vsup-aware node, the node itself) sees it.
enum class NodeState {
  Starting,      // spawned, not ready yet (a supervisor: starting its children)
  Running,       // ready
  Stopping,      // asked to stop (or, for a supervisor, stopping its children)
  Stopped,       // not running, and not about to be restarted
  Restarting,    // exited; its supervisor will start it again
  Unresponsive,  // running, but its status request failed or took longer than its budget, or
                 // killed by its supervisor for not answering a liveness ping
  Failed,        // the node gave up on its own (reported by the node itself)
};

// The words `vsup tree` prints and its `--json` carries: "worker" | "supervisor", and
// "starting" | "running" | "stopping" | "stopped" | "restarting" | "unresponsive" | "failed".
// "?" for a value outside the enum (a newer peer's).
inline const char* nameOf(NodeType type) {
  switch (type) {
    case NodeType::Worker: return "worker";
    case NodeType::Supervisor: return "supervisor";
  }
  return "?";
}

inline const char* nameOf(NodeState state) {
  switch (state) {
    case NodeState::Starting: return "starting";
    case NodeState::Running: return "running";
    case NodeState::Stopping: return "stopping";
    case NodeState::Stopped: return "stopped";
    case NodeState::Restarting: return "restarting";
    case NodeState::Unresponsive: return "unresponsive";
    case NodeState::Failed: return "failed";
  }
  return "?";
}

// How long a status request waits for a node's answer when its caller names no budget. A
// supervisor gives its vsup-aware children 3/4 of its own budget (statusBudgetForChildren), so a
// hung node is reported as itself ("unresponsive") while its ancestors still answer in time.
inline constexpr int64_t kStatusBudgetMs = 1000;
inline int64_t statusBudgetForChildren(int64_t budgetMs) {
  return budgetMs * 3 / 4 > 0 ? budgetMs * 3 / 4 : 1;
}

struct Deferral {
  std::string reason;  // empty: not deferring
  std::string progress;
  bool active() const { return !reason.empty(); }
};

struct NodeStatus {
  std::string name;
  pid_t pid = 0;  // 0 when not running
  NodeType type = NodeType::Worker;
  NodeState state = NodeState::Stopped;
  int64_t uptimeMs = 0;
  uint32_t restarts = 0;
  Deferral deferral;
  int64_t inFlight = -1;  // requests in flight (an API server); -1: not applicable
  std::vector<NodeStatus> children;
  // After children, so existing aggregate initializers keep their meaning.
  int64_t requestsTotal = -1;  // requests accepted since start (an API server); -1: n/a
  bool outOfRotation = false;  // leaveRotation() was called (an API server: /health is 503)
  std::string detail = "";     // one line the node says of its work (a KV agent's leases); may be empty
};

}  // namespace vsup::supervisor
