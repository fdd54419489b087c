// `vsup __engine-core --api-fd FD [--api-fd FD …]`: the engine-core process. Its engine
// configuration arrives in Node.start (never argv); the EngineCore module does the rest.
#include <CLI/CLI.hpp>
#include <memory>
#include <vector>

#include <kj/debug.h>

#include "workers/engine_codec.h"
#include "workers/engine_core/engine_core.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {

int engineCoreMain(int argc, char** argv) {
  CLI::App app{"vsup engine-core (started by vsup run)"};
  std::vector<int> apiFds;
  app.add_option("--api-fd", apiFds, "a connected socket to serve the Engine interface on");
  CLI11_PARSE(app, argc, argv);

  return runNodeProcess("vsup __engine-core",
                        [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    // Made in Node.start, where the configuration arrives; destroyed with the node's state.
    auto holder = std::make_unique<std::unique_ptr<EngineCore>>();
    std::unique_ptr<EngineCore>* core = holder.get();
    runtime.onStart([core, loop, &runtime, apiFds](const supervisor::SupervisorSpec&) {
      try {
        *core = std::make_unique<EngineCore>(loop, runtime,
                                             decodeEngineConfig(runtime.startConfig()), apiFds);
      } catch (const std::exception& e) {
        return kj::Promise<void>(KJ_EXCEPTION(FAILED, e.what()));
      }
      return (*core)->start();
    });
    runtime.onStatus([core]() -> kj::Promise<supervisor::NodeStatus> {
      if (*core) return (*core)->status();
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
