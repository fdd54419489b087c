// Supervisor start/stop cost, next to the floor measured in the same run.
//
//   build/bench/supervisor_bench [--vsup PATH] [--runs N]
//
// For a flat tree of N generic children (N = 1, 8, 64) and a depth-3 nested tree, measures:
//   ready: Supervisor::start() until every child is ready (ready = none: spawned)
//   stop:  Supervisor::shutdown() until every child has been reaped
// The floor: fork + exec of the same binary for every child (ready), then SIGTERM + waitpid
// each (stop), with no supervisor. Medians of --runs runs (default 7).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "base/clock.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/supervisor.h"

using namespace vsup;
using namespace vsup::supervisor;

namespace {

const char* kChild = "/bin/sleep";

struct Sample {
  double readyMs;
  double stopMs;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Sample floorRun(int n) {
  std::vector<pid_t> pids;
  MonoNs t0 = monoNow();
  for (int i = 0; i < n; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::execl(kChild, "sleep", "1000", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  MonoNs t1 = monoNow();
  // Reverse order, one at a time, like the supervisor.
  for (auto it = pids.rbegin(); it != pids.rend(); ++it) {
    ::kill(*it, SIGTERM);
    int st;
    ::waitpid(*it, &st, 0);
  }
  MonoNs t2 = monoNow();
  return {double(t1 - t0) / 1e6, double(t2 - t1) / 1e6};
}

ChildSpec sleeper(const std::string& name) {
  ChildSpec c;
  c.name = name;
  c.command = {kChild, "1000"};
  return c;
}

SupervisorSpec flat(int n) {
  SupervisorSpec s;
  s.name = "bench";
  for (int i = 0; i < n; ++i) s.children.push_back(sleeper("c" + std::to_string(i)));
  return s;
}

// root → 2 supervisors → 2 supervisors each → 2 leaves each: 8 leaves, 6 sub-supervisors.
SupervisorSpec nested(int depth, const std::string& name) {
  SupervisorSpec s;
  s.name = name;
  for (int i = 0; i < 2; ++i) {
    std::string child = name + "-" + std::to_string(i);
    if (depth == 1) {
      s.children.push_back(sleeper(child));
    } else {
      ChildSpec c;
      c.name = child;
      c.type = ChildType::Supervisor;
      c.vsupAware = true;
      c.shutdown = ShutdownPolicy::infinity();
      c.supervisor = nested(depth - 1, child);
      s.children.push_back(std::move(c));
    }
  }
  return s;
}

Sample supervisorRun(const SupervisorSpec& spec, const std::string& vsupExe) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  Sample s{};
  {
    ipc::KjOnUv kj(&loop);
    SupervisorOptions options;
    options.selfExe = vsupExe;
    Supervisor sup(&loop, spec, options);
    MonoNs t0 = monoNow();
    sup.start().wait(kj.waitScope());
    MonoNs t1 = monoNow();
    sup.shutdown(kNoDeadline).wait(kj.waitScope());
    MonoNs t2 = monoNow();
    s = {double(t1 - t0) / 1e6, double(t2 - t1) / 1e6};
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string vsupExe;
  int runs = 7;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--vsup" && i + 1 < argc) vsupExe = argv[++i];
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--vsup PATH] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  vsup::setLogLevel("off");
  std::printf("%-26s %12s %12s %12s %12s %8s %8s\n", "tree", "ready ms", "floor ms", "stop ms",
              "floor ms", "ready x", "stop x");
  auto row = [&](const std::string& label, int processes, auto&& run) {
    std::vector<double> r, s, fr, fs;
    for (int i = 0; i < runs; ++i) {
      Sample f = floorRun(processes);
      Sample v = run();
      fr.push_back(f.readyMs);
      fs.push_back(f.stopMs);
      r.push_back(v.readyMs);
      s.push_back(v.stopMs);
    }
    std::printf("%-26s %12.2f %12.2f %12.2f %12.2f %8.1f %8.1f\n", label.c_str(), median(r),
                median(fr), median(s), median(fs), median(r) / median(fr), median(s) / median(fs));
  };
  for (int n : {1, 8, 64}) {
    SupervisorSpec spec = flat(n);
    row("flat, " + std::to_string(n) + " children", n, [&] { return supervisorRun(spec, vsupExe); });
  }
  if (!vsupExe.empty()) {
    SupervisorSpec spec = nested(3, "root");
    // 6 sub-supervisor processes + 8 leaves: the floor spawns as many processes.
    row("nested depth 3 (14 procs)", 14, [&] { return supervisorRun(spec, vsupExe); });
  }
  return 0;
}
