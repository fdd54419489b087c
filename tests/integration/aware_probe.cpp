// A vsup-aware test child built on ChildRuntime: readiness over RPC, a shutdown hook that
// defers with a reason and progress (like a KV connector waiting for transfers), and event
// logging for the integration tests. It ignores SIGINT/SIGTERM/SIGHUP: only its parent's RPC
// stops it.
//
//   --name NAME         name in log lines (default $VSUP_NODE_NAME)
//   --log FILE          append "<monotonic ns> <name> <event> <pid>" lines
//   --ready-after MS    become ready MS after the parent's start request
//   --fail-start        refuse to start (start() throws)
//   --defer-ms MS       on shutdown, defer for MS, reporting progress every 100 ms
//   --defer-reason TXT  the deferral reason (default "kv: 3 transfers pending")
//   --start-config-out FILE  on each start request, write the start configuration it carried
//                       (ChildRuntime::startConfig()), byte for byte, to FILE (truncated first)
//   --rotation          act as an API server does toward its parent: the status carries
//                       requestsTotal (0) and outOfRotation, and Node.leaveRotation logs
//                       "leave_rotation" and sets outOfRotation
//   --leave-rotation-ms MS  with --rotation: answer Node.leaveRotation only MS later (a child
//                       slow to answer)
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <kj/debug.h>

#include "base/clock.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/child_runtime.h"
#include "supervisor/supervisor.h"

using namespace vsup;
using namespace vsup::supervisor;

namespace {

struct Options {
  std::string name;
  std::string log;
  long readyAfterMs = 0;
  bool failStart = false;
  long deferMs = 0;
  std::string deferReason = "kv: 3 transfers pending";
  std::string startConfigOut;
  bool rotation = false;
  long leaveRotationMs = 0;
};

Options options;

// Writes all of `bytes` to `path`; false on any error (the caller then refuses to start).
bool writeAll(const std::string& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += size_t(n);
  }
  return ::close(fd) == 0 && done == bytes.size();
}

void event(const std::string& what) {
  if (options.log.empty()) return;
  int fd = ::open(options.log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  std::string line = std::to_string(monoNow()) + " " + options.name + " " + what + " " +
                     std::to_string(::getpid()) + "\n";
  ssize_t n = ::write(fd, line.data(), line.size());
  (void)n;
  ::close(fd);
}

kj::Promise<void> deferLoop(uv_loop_t* loop, ShutdownContext& ctx, MonoNs until, int step,
                            int steps) {
  if (monoNow() >= until) return kj::READY_NOW;
  ctx.defer(options.deferReason, std::to_string(step) + " of " + std::to_string(steps) + " done");
  return ipc::uvSleep(loop, 100).then([loop, &ctx, until, step, steps]() {
    return deferLoop(loop, ctx, until, step + 1, steps);
  });
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "aware-probe: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--name") options.name = value();
    else if (a == "--log") options.log = value();
    else if (a == "--ready-after") options.readyAfterMs = std::stol(value());
    else if (a == "--fail-start") options.failStart = true;
    else if (a == "--defer-ms") options.deferMs = std::stol(value());
    else if (a == "--defer-reason") options.deferReason = value();
    else if (a == "--start-config-out") options.startConfigOut = value();
    else if (a == "--rotation") options.rotation = true;
    else if (a == "--leave-rotation-ms") options.leaveRotationMs = std::stol(value());
    else {
      std::fprintf(stderr, "aware-probe: unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_IGN);
  ::signal(SIGHUP, SIG_IGN);
  if (options.name.empty()) {
    const char* n = std::getenv("VSUP_NODE_NAME");
    options.name = n != nullptr ? n : "aware";
  }
  setLogProcessName(options.name);
  event("start");
  uv_loop_t loop;
  uv_loop_init(&loop);
  int code = 1;
  {
    ipc::KjOnUv kj(&loop);
    bool ready = false;          // for --rotation's status
    bool outOfRotation = false;
    ChildRuntime runtime(&loop);
    runtime.onStart([&](const SupervisorSpec&) -> kj::Promise<void> {
      if (options.failStart) return KJ_EXCEPTION(FAILED, "aware-probe refused to start");
      if (!options.startConfigOut.empty() &&
          !writeAll(options.startConfigOut, runtime.startConfig())) {
        return KJ_EXCEPTION(FAILED, "aware-probe cannot write", options.startConfigOut.c_str());
      }
      return ipc::uvSleep(&loop, uint64_t(options.readyAfterMs)).then([&ready]() {
        ready = true;
        event("ready");
      });
    });
    if (options.rotation) {
      runtime.onStatus([&]() -> kj::Promise<NodeStatus> {
        NodeStatus st;
        st.type = NodeType::Worker;
        st.state = ready ? NodeState::Running : NodeState::Starting;
        st.requestsTotal = 0;
        st.outOfRotation = outOfRotation;
        return st;
      });
      runtime.onLeaveRotation([&]() -> kj::Promise<void> {
        return ipc::uvSleep(&loop, uint64_t(options.leaveRotationMs)).then([&]() {
          outOfRotation = true;
          event("leave_rotation");
        });
      });
    }
    runtime.addShutdownHook("probe", [&](ShutdownContext& ctx) -> kj::Promise<void> {
      event("shutdown");
      if (options.deferMs <= 0) return kj::READY_NOW;
      int steps = int((options.deferMs + 99) / 100);
      return deferLoop(&loop, ctx, monoNow() + options.deferMs * kNsPerMs, 0, steps)
          .then([]() { event("hook_done"); });
    });
    code = runtime.run();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  event("exit " + std::to_string(code));
  return code;
}
