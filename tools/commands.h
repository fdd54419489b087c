// The vsup executable's subcommands. Each returns the process exit status.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.h"
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
  // --served-model-name: the names requests may use, the first one public; empty: the model as
  // given (--model or MODEL).
  std::vector<std::string> servedModelNames;
  bool logRequests = false;  // --enable-log-requests: one log line per request (never a prompt)
  std::string controlSocket;
  // Hung-node detection (seconds): every parent pings each vsup-aware child every
  // livenessInterval; one that has not answered within livenessTimeout is hung (killed as
  // failed). livenessTimeout 0: off.
  double livenessTimeout = 5;
  double livenessInterval = 1;
  // Start timeouts of the serving tree's nodes (seconds).
  double engineStartTimeout = 0;       // engine-core, its ranks included; 0: the rank timeout
                                       // + 60 s (a rank's load always fits in it)
  double workerStartTimeout = 600;     // each rank (loading its weights)
  double apiServerStartTimeout = 30;
  // HTTP limits of every API server (seconds; 0 disables a timeout).
  size_t maxConnections = 1024;
  double httpFirstByteTimeout = 5;
  double httpHeaderTimeout = 10;
  double httpBodyTimeout = 30;
  double httpIdleTimeout = 60;
  // Across nodes (with --nnodes > 1 in the engine flags): which node this is. Node 0, the
  // leader, serves HTTP and runs engine-core; every other node runs `--headless`: no API
  // server, only its agent and its ranks.
  uint32_t nodeRank = 0;
  bool headless = false;
};
// LeaderWorkerSet's variables stand in for the multi-node flags that were not given:
// LWS_LEADER_ADDRESS for --master-addr, LWS_GROUP_SIZE for --nnodes, LWS_WORKER_INDEX for
// --node-rank. Returns what is wrong ("" when nothing), naming the variable.
std::string applyLeaderWorkerSetEnv(ServeOptions& options, bool nnodesGiven, bool masterGiven,
                                    bool nodeRankGiven);
// `vsup run` without --topology: the serving tree.
int serve(const ServeOptions& options);

// `vsup proxy`: a tree of one node, the disaggregated front end (workers/proxy/proxy.h).
struct ProxyCommandOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;
  std::vector<std::string> prefill;  // URLs, each http://HOST:PORT (a flag may hold several,
  std::vector<std::string> decode;   // comma-separated)
  double shutdownTimeout = 30;       // as vsup run's: in-flight completions get this long
  double connectTimeout = 5;         // per leg
  bool logRequests = false;
  std::string controlSocket;
  double livenessTimeout = 5;
  double livenessInterval = 1;
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  size_t maxConnections = 1024;
};
int proxy(const ProxyCommandOptions& options);

struct TreeOptions {
  std::string socket;  // empty: find the running tree
  bool json = false;
  bool watch = false;
  double intervalSeconds = 1.0;
};
int tree(const TreeOptions& options);

// One message of a command on stderr: "COMMAND: MESSAGE" in the text log format, one JSON
// object ({"time", "level", "process": COMMAND, "pid", "message"}) in the json one.
void printMessage(const char* command, const std::string& message, const char* level = "error");

// Seconds (a flag's value) as the milliseconds of a ChildSpec or a child's flag.
inline int64_t ms(double seconds) { return int64_t(std::llround(seconds * 1000)); }

// How a client command (`vsup tree`, `vsup drain`) finds its tree: `given` (--socket) when not
// empty, else the one live control socket in ControlSocket::defaultDirectory(). When there is
// none, or more than one, it prints why to stderr (starting with `command`) and returns nullopt
// with `rc` set to the exit status (1 none, 2 several: choose with --socket).
std::optional<std::string> findTreeSocket(const std::string& given, const char* command, int& rc);
// A socket connected to the Unix socket `path`; an empty OwnFd (errno set) when it cannot be.
OwnFd connectToSocket(const std::string& path);

// `vsup drain`: the preStop hook that watches traffic instead of sleeping. Takes every API
// server of the tree out of the load balancers' rotation (Node.leaveRotation: /health turns
// 503 "draining" while every request is still served), then polls the tree until no new request
// arrived for `quietForSeconds` (and, with `wait`, nothing is in flight), or `timeoutSeconds`.
struct DrainOptions {
  std::string socket;  // empty: find the running tree
  double quietForSeconds = 5;
  double timeoutSeconds = 60;
  bool wait = false;
};
// Exit status of `vsup drain` when --timeout passed before the tree went quiet (as timeout(1)).
inline constexpr int kExitDrainTimeout = 124;
// 0 when quiet (or the tree exited meanwhile), kExitDrainTimeout, 1 on an error, 2 on a usage
// error (a bad number of seconds, --quiet-for longer than --timeout, several trees running).
int drain(const DrainOptions& options);

// `vsup __node`: a sub-supervisor, started by its parent with the control socket on fd 3.
int nodeMain();

}  // namespace vsup::tools
