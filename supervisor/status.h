// The status of one node and its subtree: what `vsup tree` prints and Supervisor::status()
// returns. Plain values; the control protocol carries them (supervisor/node_codec.h).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vsup::supervisor {

struct Deferral {
  std::string reason;  // empty: not deferring
  std::string progress;
  bool active() const { return !reason.empty(); }
};

struct NodeStatus {
  std::string name;
  pid_t pid = 0;  // 0 when not running
  std::string type;   // "supervisor" | "worker"
  std::string state;  // "starting" | "running" | "stopping" | "stopped" | "restarting" | "unresponsive"
  int64_t uptimeMs = 0;
  uint32_t restarts = 0;
  Deferral deferral;
  int64_t inFlight = -1;
  std::vector<NodeStatus> children;
};

}  // namespace vsup::supervisor
