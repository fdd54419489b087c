// `vsup __engine-core --api-fd FD [--api-fd FD …] [--worker-start-timeout-ms N]
// [--liveness-timeout-ms N] [--liveness-interval-ms N]`: the engine-core process. Its engine
// configuration arrives in Node.start (never argv); the flags set how it supervises its ranks
// (start timeout, liveness pings); the EngineCore module does the rest.
#include <CLI/CLI.hpp>
#include <memory>
#include <vector>

#include <kj/debug.h>

#include "supervisor/orphan_reaper.h"
#include "workers/engine_codec.h"
#include "workers/engine_core/engine_core.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {

int engineCoreMain(int argc, char** argv) {
  // Before any thread exists, so that every thread has it blocked: the Subreaper reads SIGCHLD
  // from a signalfd.
  supervisor::OrphanReaper::blockChildSignal();
  CLI::App app{"vsup engine-core (started by vsup run)"};
  std::vector<int> apiFds;
  app.add_option("--api-fd", apiFds, "a connected socket to serve the Engine interface on");
  EngineCore::RankOptions ranks;
  app.add_option("--worker-start-timeout-ms", ranks.startTimeoutMs,
                 "how long a rank may take to become ready (loading its weights), ms")
      ->check(CLI::PositiveNumber);
  app.add_option("--liveness-timeout-ms", ranks.livenessTimeoutMs,
                 "a rank that does not answer a liveness ping within this is killed (ms; 0 or "
                 "-1: no pings)")
      ->check(CLI::Range(int64_t(-1), int64_t(3600) * 1000));
  app.add_option("--liveness-interval-ms", ranks.livenessIntervalMs,
                 "time between two liveness pings of a rank, ms")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  if (ranks.livenessTimeoutMs <= 0) ranks.livenessTimeoutMs = -1;  // off

  return runNodeProcess("vsup __engine-core",
                        [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    // The core is made in Node.start, where the configuration arrives; destroyed with the
    // node's state, before the subreaper (made now, before the first rank exists), whose last
    // sweep then finds every orphan of the ranks (supervisor/orphan_reaper.h).
    struct CoreState {
      std::unique_ptr<supervisor::Subreaper> subreaper;
      std::unique_ptr<EngineCore> core;  // declared last: destroyed first
    };
    auto holder = std::make_unique<CoreState>();
    holder->subreaper = supervisor::OrphanReaper::becomeSubreaper(loop, runtime.name());
    std::unique_ptr<EngineCore>* core = &holder->core;
    runtime.onStart([core, loop, &runtime, apiFds, ranks](const supervisor::SupervisorSpec&) {
      try {
        *core = std::make_unique<EngineCore>(
            loop, runtime, decodeEngineConfig(runtime.startConfig()), apiFds, ranks);
      } catch (const std::exception& e) {
        return kj::Promise<void>(KJ_EXCEPTION(FAILED, e.what()));
      }
      return (*core)->start();
    });
    runtime.onStatusWithin([core](int64_t budgetMs) -> kj::Promise<supervisor::NodeStatus> {
      if (*core) return (*core)->status(budgetMs);
      supervisor::NodeStatus s;
      s.type = supervisor::NodeType::Supervisor;
      s.state = supervisor::NodeState::Starting;
      return s;
    });
    runtime.addShutdownHook("engine", [core](supervisor::ShutdownContext&) -> kj::Promise<void> {
      if (*core) return (*core)->stopAtStepBoundary();
      return kj::READY_NOW;
    });
    runtime.onStopChildren([core](MonoNs deadline) -> kj::Promise<bool> {
      if (*core) return (*core)->stopRanks(deadline);
      return true;
    });
    return holding(std::move(holder));
  });
}

}  // namespace vsup::workers
