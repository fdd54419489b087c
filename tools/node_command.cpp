// `vsup __node`: a sub-supervisor (a child of type "supervisor"). Its parent passes the control
// socket on fd 3, sends the spec with Node.start, and stops it with Node.shutdown — never with a
// signal: this process ignores SIGINT, SIGTERM and SIGHUP (DESIGN.md 2.1), and if its parent
// disappears it tears its subtree down by itself (ChildRuntime).
#include <signal.h>

#include <cstdio>
#include <memory>

#include <kj/debug.h>

#include "ipc/check.h"
#include "ipc/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/child_runtime.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"

namespace vsup::tools {

using namespace vsup::supervisor;

int nodeMain() {
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_IGN);
  ::signal(SIGHUP, SIG_IGN);
  uv_loop_t loop;
  uv_loop_init(&loop);
  int code = kExitError;
  {
    ipc::KjOnUv kj(&loop);
    std::unique_ptr<ChildRuntime> runtime;
    try {
      runtime = std::make_unique<ChildRuntime>(&loop);
    } catch (const vsup::Error& e) {
      std::fprintf(stderr, "vsup __node: %s\n", e.what());
      return kExitUsage;
    }
    setLogProcessName(runtime->name());
    std::unique_ptr<Supervisor> sup;
    kj::Promise<void> watchdog = kj::READY_NOW;
    std::string exe = selfExe();

    runtime->onStart([&](const SupervisorSpec& spec) -> kj::Promise<void> {
      if (sup) return KJ_EXCEPTION(FAILED, "already started");
      SupervisorOptions options;
      options.selfExe = exe;
      options.collectOutput = true;
      options.onDeferral = [&](const std::string& node, const Deferral& d) {
        runtime->reportDeferral(node, d);
      };
      sup = std::make_unique<Supervisor>(&loop, spec, options);
      // A supervisor that terminates on its own (intensity exceeded, auto_shutdown) ends this
      // process with its outcome; the parent sees the exit status.
      watchdog = sup->terminated()
                     .then([&](Outcome o) { runtime->exit(exitCodeFor(o)); })
                     .eagerlyEvaluate(nullptr);
      return sup->start();
    });
    runtime->onStatus([&]() -> kj::Promise<NodeStatus> {
      if (sup) return sup->status();
      NodeStatus s;
      s.type = "supervisor";
      s.state = "starting";
      return s;
    });
    runtime->onStopChildren([&](MonoNs deadline) -> kj::Promise<bool> {
      if (!sup) return true;
      return sup->shutdown(deadline).then([&]() { return sup->escalations() == 0; });
    });
    code = runtime->run();
    watchdog = kj::READY_NOW;
    sup.reset();
    runtime.reset();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return code;
}

}  // namespace vsup::tools
