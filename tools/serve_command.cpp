// `vsup run`: the serving tree (docs/architecture.md, "The process tree"):
//
//   root (this process)            owns SIGTERM/SIGINT and the port, never serves traffic
//   ├── engine-core                scheduler + step loop; supervises the ranks (intensity 0)
//   │   ├── worker-tp0 … tpN-1     one per tensor-parallel rank
//   └── api-server-0 … M-1         HTTP front ends accepting from one listening socket
//
// API servers start while engine-core loads (start_concurrently): each listens at once and
// answers /health 503 "starting" (and inference 503) until engine-core, ready, answers its
// attach; the root is ready when all are. They come after engine-core in the spec, so they
// stop before it. The root's own intensity is 0:
// no partial restart; any unexpected death shuts the tree down and `vsup run` exits non-zero.
// Each API server talks to engine-core over its own socketpair, made here and inherited by
// both at spawn (no path on disk).
//
// Everything that can be checked before a process starts is checked here first, each a usage
// error (exit 2) naming the flag: the flags themselves, the engine's configuration and model
// (engine::preflight: config.json, the tokenizer, the checkpoint's headers, the memory), and
// the port. The port is bound here, once, before anything is spawned, and the one listening
// socket is inherited by every API server (never SO_REUSEPORT): a port another server holds is
// refused with nothing started, rather than shared with it. What only a rank can find (reading
// its weights) fails the start (exit 3), naming the node and the cause.
#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <vector>

#include "base/check.h"
#include "base/error.h"
#include "base/fd.h"
#include "base/log.h"
#include "engine/registry.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/engine_codec.h"
#include "workers/engine_flags.h"
#include "workers/http/http_server.h"

namespace vsup::tools {

using namespace vsup::supervisor;

namespace {

// The host as bindListener() takes it: an IPv4 or IPv6 literal, one in brackets, or localhost.
bool isAddress(const std::string& host) {
  std::string h = host;
  if (h == "localhost") return true;
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  in6_addr a6{};
  in_addr a4{};
  return ::inet_pton(AF_INET, h.c_str(), &a4) == 1 || ::inet_pton(AF_INET6, h.c_str(), &a6) == 1;
}

// The checks of the serving flags that need no model and no socket and that CLI11 cannot
// express: each returns what is wrong ("" when nothing), naming the flag. Every number's range
// is main.cpp's (its validators, on the one path that fills ServeOptions), not repeated here.
std::string badServeOption(const ServeOptions& o) {
  if (!isAddress(o.host)) {
    return "--host '" + o.host +
           "': not an IP address (give an IPv4 or IPv6 literal, e.g. 127.0.0.1, 0.0.0.0, ::1, "
           "[::1] or ::, or localhost; host names are not resolved)";
  }
  for (char ch : o.apiKey) {
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) {
      return "--api-key: the key holds a control character (a request's Authorization header "
             "cannot carry it, so no request could ever match)";
    }
  }
  if (!o.apiKey.empty() && (o.apiKey.front() == ' ' || o.apiKey.back() == ' ')) {
    return "--api-key: the key starts or ends with a space (HTTP trims header values, so no "
           "request could ever match)";
  }
  if (o.livenessTimeout > 0 && o.livenessTimeout < 0.1) {
    char text[200];
    std::snprintf(text, sizeof text,
                  "--liveness-timeout %g: give 0 (no pings) or at least 0.1 seconds (a busy "
                  "node answers a ping within milliseconds, not microseconds)",
                  o.livenessTimeout);
    return text;
  }
  return "";
}

// Why binding the port failed, for the user: the address, the errno text, and what it means.
std::string bindFailure(const ServeOptions& o, const SysError& e) {
  std::string why = e.what();
  switch (e.errnoValue()) {
    case EADDRINUSE:
      why += " (another server listens there: stop it, or choose another --port; --port 0 "
             "takes a free one)";
      break;
    case EADDRNOTAVAIL:
      why += " (--host is not an address of this machine)";
      break;
    case EACCES:
      why += " (a port below 1024 needs privileges: choose a higher --port)";
      break;
    case EAFNOSUPPORT:
      why += " (this machine has no " + std::string(o.host.find(':') != std::string::npos
                                                        ? "IPv6"
                                                        : "IPv4") +
             ")";
      break;
    default:
      break;
  }
  return "--host/--port " + why;
}

// A whole number from the environment, or why not.
std::string envNumber(const char* name, uint32_t lo, uint32_t hi, uint32_t& out) {
  const char* v = std::getenv(name);
  std::string text = v == nullptr ? "" : v;
  bool digits = !text.empty() && text.size() <= 9 &&
                text.find_first_not_of("0123456789") == std::string::npos;
  uint32_t n = digits ? uint32_t(std::stoul(text)) : 0;
  if (!digits || n < lo || n > hi) {
    return std::string(name) + "='" + text + "': must be a whole number " + std::to_string(lo) +
           ".." + std::to_string(hi);
  }
  out = n;
  return "";
}

// The tree of a worker node (`vsup run --headless`): the root and one agent, which connects to
// the leader and runs this node's ranks for it (workers/node_agent/node_agent.h). Nothing is
// bound: the leader's engine-core is where the agent connects.
int serveHeadless(const ServeOptions& o, const engine::EngineConfig& config) {
  const engine::CommonConfig& c = config.common;
  setLogProcessName("root");
  int64_t drainMs = int64_t(std::llround(o.shutdownTimeout * 1000));
  ServingBudget budget = DeadlineBudget::serving(drainMs, 0);
  SupervisorSpec spec;
  spec.name = "root";
  spec.intensity = 0;
  // The agent exits 0 when the leader releases this node: the tree is then done.
  spec.autoShutdown = AutoShutdown::AnySignificant;
  ChildSpec agent;
  agent.name = "node-agent";
  agent.vsupAware = true;
  agent.significant = true;
  agent.restart = Restart::Transient;
  const int64_t connectMs = ms(o.engineStartTimeout > 0 ? o.engineStartTimeout
                                                        : o.workerStartTimeout + 60);
  agent.command = {selfExecutable(), "__node-agent",
                   "--node-rank", std::to_string(o.nodeRank),
                   "--master-addr", c.masterAddr,
                   "--master-port", std::to_string(c.masterPort),
                   "--nnodes", std::to_string(c.nnodes),
                   "--tensor-parallel-size", std::to_string(c.tensorParallelSize),
                   "--connect-timeout-ms", std::to_string(connectMs),
                   "--worker-start-timeout-ms", std::to_string(ms(o.workerStartTimeout)),
                   "--liveness-timeout-ms", std::to_string(ms(o.livenessTimeout)),
                   "--liveness-interval-ms", std::to_string(ms(o.livenessInterval))};
  // Its start is the connect to the leader (and the join).
  agent.startTimeoutMs = connectMs + 5000;
  agent.livenessTimeoutMs = o.livenessTimeout > 0 ? ms(o.livenessTimeout) : -1;
  agent.livenessIntervalMs = ms(o.livenessInterval);
  // A SIGTERM here may come with the leader's (a LeaderWorkerSet rollout signals every pod at
  // once): the agent keeps its ranks serving until the leader, done draining, releases it. So it
  // gets the leader's whole budget.
  agent.shutdown = ShutdownPolicy::timeout(budget.totalMs);
  spec.children.push_back(agent);
  vsup::log().info("[serve] root: node {} of {}, headless: ranks {}..{} for the leader at {}:{}",
                   o.nodeRank, c.nnodes, o.nodeRank * c.ranksPerNode(),
                   (o.nodeRank + 1) * c.ranksPerNode() - 1, c.masterAddr, c.masterPort);
  RootHooks hooks;
  hooks.drainMs = 0;
  hooks.totalMs = budget.totalMs + 5000;
  return runTree(spec, o.controlSocket, hooks);
}

}  // namespace

std::string applyLeaderWorkerSetEnv(ServeOptions& o, bool nnodesGiven, bool masterGiven,
                                    bool nodeRankGiven) {
  engine::CommonConfig& c = o.engine.common;
  if (!masterGiven && std::getenv("LWS_LEADER_ADDRESS") != nullptr) {
    c.masterAddr = std::getenv("LWS_LEADER_ADDRESS");
    if (c.masterAddr.empty()) return "LWS_LEADER_ADDRESS is set but empty";
  }
  if (!nnodesGiven && std::getenv("LWS_GROUP_SIZE") != nullptr) {
    if (std::string bad = envNumber("LWS_GROUP_SIZE", 1, 64, c.nnodes); !bad.empty()) return bad;
  }
  if (!nodeRankGiven && std::getenv("LWS_WORKER_INDEX") != nullptr) {
    if (std::string bad = envNumber("LWS_WORKER_INDEX", 0, 63, o.nodeRank); !bad.empty()) {
      return bad;
    }
  }
  return "";
}

int serve(const ServeOptions& o) {
  // Bad flags, an engine this build lacks, no such model, a broken model directory, sizes that
  // cannot work: usage errors, found before any process starts.
  if (std::string bad = badServeOption(o); !bad.empty()) {
    printMessage("vsup run", bad);
    return kExitUsage;
  }
  engine::EngineConfig config;
  try {
    config = workers::toEngineConfig(o.engine);
    (void)engine::preflight(config);
  } catch (const std::exception& e) {
    printMessage("vsup run", e.what());
    return kExitUsage;
  }
  const uint32_t nnodes = config.common.nnodes;
  if (o.nodeRank >= nnodes) {
    printMessage("vsup run", "--node-rank " + std::to_string(o.nodeRank) + " with --nnodes " +
                                 std::to_string(nnodes) + ": node ranks are 0.." +
                                 std::to_string(nnodes - 1) + " (0 is the leader)");
    return kExitUsage;
  }
  if (o.headless && nnodes == 1) {
    printMessage("vsup run", "--headless needs --nnodes > 1 (or $LWS_GROUP_SIZE): a headless "
                             "node runs ranks for a leader on another node");
    return kExitUsage;
  }
  if (o.headless && o.nodeRank == 0) {
    printMessage("vsup run", "--headless with --node-rank 0: node 0 is the leader, which serves "
                             "HTTP; give a worker node its rank (1.." +
                                 std::to_string(nnodes - 1) + ")");
    return kExitUsage;
  }
  if (!o.headless && o.nodeRank != 0) {
    printMessage("vsup run", "--node-rank " + std::to_string(o.nodeRank) +
                                 " without --headless: worker nodes run `vsup run --headless`; "
                                 "only node 0 (the leader) serves HTTP");
    return kExitUsage;
  }
  if (o.headless) return serveHeadless(o, config);
  for (size_t i = 0; i < o.servedModelNames.size(); ++i) {
    const std::string& name = o.servedModelNames[i];
    std::string bad = name.empty() ? "an empty name"
                      : std::find(o.servedModelNames.begin(), o.servedModelNames.begin() + i,
                                  name) != o.servedModelNames.begin() + i
                          ? "'" + name + "' twice"
                          : "";
    if (!bad.empty()) {
      printMessage("vsup run", "--served-model-name: " + bad +
                                   " (give each name a request may use once)");
      return kExitUsage;
    }
  }
  // The port, bound once, here, before anything is spawned: a second `vsup run` on it is
  // refused now with nothing started, instead of starting and taking part of this one's traffic
  // (each API server binding with SO_REUSEPORT would have let it).
  OwnFd listener;
  uint16_t port = 0;
  try {
    listener = http::bindListener(o.host, o.port, http::ServerOptions{}.backlog);
    port = http::boundPort(listener.get());
  } catch (const SysError& e) {
    printMessage("vsup run", bindFailure(o, e));
    return kExitUsage;
  } catch (const Error& e) {
    printMessage("vsup run", std::string("--host: ") + e.what());
    return kExitUsage;
  }
  std::string where = o.host.find(':') != std::string::npos && o.host.front() != '['
                          ? "[" + o.host + "]:" + std::to_string(port)
                          : o.host + ":" + std::to_string(port);
  setLogProcessName("root");  // as runTree() names it
  vsup::log().info("[serve] root: bound {} for {} API server(s)", where, o.apiServerCount);

  std::string exe = selfExecutable();
  // One socketpair per API server: [0] stays with engine-core, [1] goes to the API server.
  std::vector<OwnFd> engineEnds;
  std::vector<OwnFd> apiEnds;
  for (uint32_t i = 0; i < o.apiServerCount; ++i) {
    int sv[2];
    VSUP_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    engineEnds.emplace_back(sv[0]);
    apiEnds.emplace_back(sv[1]);
  }
  int64_t drainMs = int64_t(std::llround(o.shutdownTimeout * 1000));
  int64_t kvMs = config.common.kv.connector == "none"
                     ? 0
                     : int64_t(std::llround(config.common.kv.shutdownTimeoutS * 1000));
  ServingBudget budget = DeadlineBudget::serving(drainMs, kvMs);

  SupervisorSpec spec;
  spec.name = "root";
  spec.strategy = Strategy::OneForOne;
  spec.intensity = 0;  // no partial restart of a serving tree (README, "What vsup is")

  ChildSpec core;
  core.name = "engine-core";
  core.vsupAware = true;
  core.command = {exe, "__engine-core"};
  core.startConfig = workers::encodeEngineConfig(config);  // delivered in Node.start
  for (uint32_t i = 0; i < o.apiServerCount; ++i) {
    core.inheritFds.push_back(engineEnds[i].get());
    core.command.push_back("--api-fd");
    core.command.push_back(std::to_string(4 + i));  // after the control socket (fd 3)
  }
  // How engine-core supervises its ranks (flags of `vsup __engine-core`).
  core.command.insert(core.command.end(),
                      {"--worker-start-timeout-ms", std::to_string(ms(o.workerStartTimeout)),
                       "--liveness-timeout-ms", std::to_string(ms(o.livenessTimeout)),
                       "--liveness-interval-ms", std::to_string(ms(o.livenessInterval))});
  core.shutdown = ShutdownPolicy::timeout(budget.engineCoreStopMs);
  core.startTimeoutMs = ms(o.engineStartTimeout > 0 ? o.engineStartTimeout
                                                    : o.workerStartTimeout + 60);
  core.livenessTimeoutMs = o.livenessTimeout > 0 ? ms(o.livenessTimeout) : -1;
  core.livenessIntervalMs = ms(o.livenessInterval);
  // Loading the model (its ranks' weights) does not hold the API servers back.
  core.startConcurrently = true;
  spec.children.push_back(core);

  for (uint32_t i = 0; i < o.apiServerCount; ++i) {
    ChildSpec api;
    api.name = "api-server-" + std::to_string(i);
    api.vsupAware = true;
    // fd 4: its end of the socketpair to engine-core; fd 5: the listening socket (--host and
    // --port only name it in the log).
    api.command = {exe, "__api-server", "--index", std::to_string(i), "--host", o.host,
                   "--port", std::to_string(port), "--model", config.common.model,
                   "--max-request-bytes", std::to_string(o.maxRequestBytes), "--engine-fd", "4",
                   "--listen-fd", "5",
                   "--max-connections", std::to_string(o.maxConnections),
                   "--first-byte-timeout-ms", std::to_string(ms(o.httpFirstByteTimeout)),
                   "--header-timeout-ms", std::to_string(ms(o.httpHeaderTimeout)),
                   "--body-timeout-ms", std::to_string(ms(o.httpBodyTimeout)),
                   "--idle-timeout-ms", std::to_string(ms(o.httpIdleTimeout))};
    // The model as given is /v1/models' `root`; the served names (default: that same string)
    // are what requests name.
    for (const auto& name : o.servedModelNames) {
      api.command.push_back("--served-model-name=" + name);  // one word: a name may start with '-'
    }
    if (o.logRequests) api.command.push_back("--log-requests");
    api.inheritFds = {apiEnds[i].get(), listener.get()};
    if (!o.apiKey.empty()) api.env.emplace_back("VSUP_API_KEY", o.apiKey);
    api.shutdown = ShutdownPolicy::timeout(budget.apiServerStopMs);
    // An API server is ready once engine-core answers its attach, i.e. once engine-core is
    // ready: its start includes engine-core's, which fails first (and names the cause) when
    // engine-core is the one that does not come up.
    api.startTimeoutMs =
        core.startTimeoutMs < 0 ? -1 : core.startTimeoutMs + ms(o.apiServerStartTimeout);
    // Every API server listens while engine-core loads, not only the first.
    api.startConcurrently = true;
    api.livenessTimeoutMs = o.livenessTimeout > 0 ? ms(o.livenessTimeout) : -1;
    api.livenessIntervalMs = ms(o.livenessInterval);
    spec.children.push_back(api);
  }

  RootHooks hooks;
  // Once engine-core and the API servers hold their ends, the root must not: an end kept open
  // here would hide a dead peer (no EOF) from the survivor. Nor the listening socket: a copy
  // held by the root would keep the port open after the last API server has exited (in a
  // shutdown, or a crash), and the kernel would go on completing connections into its queue
  // that nobody accepts, so clients would hang instead of being refused. No restarts need them
  // again (the root's intensity is 0).
  hooks.afterStart = [&]() {
    engineEnds.clear();
    apiEnds.clear();
    listener.reset();
  };
  hooks.drainMs = drainMs;
  hooks.totalMs = budget.totalMs;
  return runTree(spec, o.controlSocket, hooks);
}

}  // namespace vsup::tools
