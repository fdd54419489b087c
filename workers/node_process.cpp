#include "workers/node_process.h"

#include <signal.h>

#include <cstdio>

#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/supervisor.h"

namespace vsup::workers {

int runNodeProcess(const char* program, const NodeSetup& setup) {
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_IGN);
  ::signal(SIGHUP, SIG_IGN);
  uv_loop_t loop;
  uv_loop_init(&loop);
  int code = supervisor::kExitError;
  {
    ipc::KjOnUv kj(&loop);
    std::unique_ptr<supervisor::ChildRuntime> runtime;
    try {
      runtime = std::make_unique<supervisor::ChildRuntime>(&loop);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: %s\n", program, e.what());
      return supervisor::kExitUsage;
    }
    setLogProcessName(runtime->name());
    std::unique_ptr<NodeState> state = setup(&loop, *runtime);
    code = runtime->run();
    state.reset();
    runtime.reset();
  }
  // Let every closed handle's callback run; then the loop is empty.
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return code;
}

}  // namespace vsup::workers
