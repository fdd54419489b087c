// `vsup run`: the serving tree (docs/architecture.md, "The process tree"):
//
//   root (this process)            owns SIGTERM/SIGINT, never serves traffic
//   ├── engine-core                scheduler + step loop; supervises the ranks (intensity 0)
//   │   ├── worker-tp0 … tpN-1     one per tensor-parallel rank
//   └── api-server-0 … M-1         HTTP front ends sharing the port (SO_REUSEPORT)
//
// API servers start after engine-core, so they stop before it. The root's own intensity is 0:
// no partial restart; any unexpected death shuts the tree down and `vsup run` exits non-zero.
// Each API server talks to engine-core over its own socketpair, made here and inherited by
// both at spawn (no path on disk).
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "base/check.h"
#include "base/fd.h"
#include "engine/registry.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/engine_codec.h"
#include "workers/engine_flags.h"

namespace vsup::tools {

using namespace vsup::supervisor;

int serve(const ServeOptions& o) {
  // Bad engine flags (an engine this build lacks, no such model, sizes that cannot work) are
  // usage errors, found before any process starts.
  engine::EngineConfig config;
  try {
    config = workers::toEngineConfig(o.engine);
    (void)engine::backendFor(config).plan(config);
  } catch (const std::exception& e) {
    printMessage("vsup run", e.what());
    return kExitUsage;
  }
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
  core.shutdown = ShutdownPolicy::timeout(budget.engineCoreStopMs);
  core.startTimeoutMs = 120000;
  spec.children.push_back(core);

  for (uint32_t i = 0; i < o.apiServerCount; ++i) {
    ChildSpec api;
    api.name = "api-server-" + std::to_string(i);
    api.vsupAware = true;
    api.command = {exe, "__api-server", "--index", std::to_string(i), "--host", o.host,
                   "--port", std::to_string(o.port), "--model", config.common.model,
                   "--max-request-bytes", std::to_string(o.maxRequestBytes), "--engine-fd", "4"};
    // The model as given is /v1/models' `root`; the served names (default: that same string)
    // are what requests name.
    for (const auto& name : o.servedModelNames) {
      api.command.push_back("--served-model-name=" + name);  // one word: a name may start with '-'
    }
    if (o.logRequests) api.command.push_back("--log-requests");
    api.inheritFds = {apiEnds[i].get()};
    if (!o.apiKey.empty()) api.env.emplace_back("VSUP_API_KEY", o.apiKey);
    api.shutdown = ShutdownPolicy::timeout(budget.apiServerStopMs);
    api.startTimeoutMs = 30000;
    spec.children.push_back(api);
  }

  RootHooks hooks;
  // Once engine-core and the API servers hold their ends, the root must not: an end kept open
  // here would hide a dead peer (no EOF) from the survivor. No restarts need them again.
  hooks.afterStart = [&]() {
    engineEnds.clear();
    apiEnds.clear();
  };
  hooks.drainMs = drainMs;
  hooks.totalMs = budget.totalMs;
  return runTree(spec, o.controlSocket, hooks);
}

}  // namespace vsup::tools
