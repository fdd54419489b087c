// The vsup executable's subcommands. Each returns the process exit status.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "supervisor/spec.h"
#include "workers/engine_flags.h"

namespace vsup::tools {

struct RunOptions {
  std::string topology;
  std::string controlSocket;  // empty: the default path
};
int runTopology(const RunOptions& options);

// How the root of a tree shuts down on the first SIGTERM/SIGINT.
struct RootHooks {
  int64_t drainMs = -1;  // Node.quiesce deadline for every child, from the signal; -1: none
  int64_t totalMs = -1;  // the whole tree's shutdown deadline, from the signal; -1: none
  // Runs once every child has been started (e.g. to close fds only the children need).
  std::function<void()> afterStart;
};
// Runs `spec` as the root of a tree until it has shut down; returns the exit status.
int runTree(const supervisor::SupervisorSpec& spec, const std::string& controlSocket,
            const RootHooks& hooks);

struct ServeOptions {
  workers::EngineFlags engine;  // --engine, --model, TP, batching, KV cache and connector
  uint32_t apiServerCount = 1;
  std::string host = "127.0.0.1";
  uint16_t port = 8000;
  double shutdownTimeout = 30;
  std::string apiKey;
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  std::string controlSocket;
};
// `vsup run` without --topology: the serving tree.
int serve(const ServeOptions& options);

struct TreeOptions {
  std::string socket;  // empty: find the running tree
  bool json = false;
  bool watch = false;
  double intervalSeconds = 1.0;
};
int tree(const TreeOptions& options);

// `vsup __node`: a sub-supervisor, started by its parent with the control socket on fd 3.
int nodeMain();

}  // namespace vsup::tools
