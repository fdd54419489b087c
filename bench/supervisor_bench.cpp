// Supervisor start/stop cost, next to the floor measured in the same run.
//
//   build/bench/supervisor_bench [--vsup PATH] [--runs N] [--json] [--check]
//
// For a flat tree of N generic children (N = 1, 8, 64) and a depth-3 nested tree, measures:
//   ready: Supervisor::start() until every child is ready (ready = none: spawned)
//   stop:  Supervisor::shutdown() until every child has been reaped
// The floor, with no supervisor: posix_spawn of the same binary for every child (ready: like
// Process::spawn it returns once the child has exec'd, so an exec failure could be reported),
// then SIGTERM + waitpid of each, one at a time in reverse order (stop). Each repetition measures
// the floor and then the supervisor, so load from elsewhere hits both; medians of --runs
// repetitions (default 7). With --vsup every supervisor also runs its orphan guard (as vsup
// does), and the nested tree is measured.
//
// --json: one JSON object on stdout (the table then goes to stderr): the ratios
// ready_<tree>_vs_floor and stop_<tree>_vs_floor (<tree>: 1, 8, 64, nested) and the raw medians
// ready_<tree>_ms, ready_<tree>_floor_ms, stop_<tree>_ms, stop_<tree>_floor_ms.
// --check: the regression test (CI smoke, a second or two): the one-child stop, medians of 21
// repetitions; exits 1 when it is over 10x its floor in each of 3 attempts (one noisy attempt
// does not fail it; a stop that waits on something other than the child's exit fails all).
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/supervisor.h"

extern char** environ;

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
  char arg0[] = "sleep";
  char arg1[] = "1000";
  char* argv[] = {arg0, arg1, nullptr};
  MonoNs t0 = monoNow();
  for (int i = 0; i < n; ++i) {
    pid_t pid;
    int rc = posix_spawn(&pid, kChild, nullptr, nullptr, argv, environ);
    if (rc != 0) {
      std::fprintf(stderr, "posix_spawn %s: %s\n", kChild, std::strerror(rc));
      std::exit(1);
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

struct Row {
  double ready, readyFloor, stop, stopFloor;
};

Row measure(int processes, int runs, const std::function<Sample()>& run) {
  std::vector<double> r, s, fr, fs;
  for (int i = 0; i < runs; ++i) {
    Sample f = floorRun(processes);
    Sample v = run();
    fr.push_back(f.readyMs);
    fs.push_back(f.stopMs);
    r.push_back(v.readyMs);
    s.push_back(v.stopMs);
  }
  return {median(r), median(fr), median(s), median(fs)};
}

int check(const std::string& vsupExe) {
  constexpr double kLimit = 10.0;
  constexpr int kAttempts = 3;
  SupervisorSpec spec = flat(1);
  for (int attempt = 1; attempt <= kAttempts; ++attempt) {
    Row row = measure(1, 21, [&] { return supervisorRun(spec, vsupExe); });
    double ratio = row.stop / row.stopFloor;
    std::printf("one-child stop: %.3f ms, floor %.3f ms: %.1fx (limit %.0fx), attempt %d of %d\n",
                row.stop, row.stopFloor, ratio, kLimit, attempt, kAttempts);
    if (ratio <= kLimit) return 0;
  }
  std::printf("FAILED: stopping one idle child costs over %.0fx the kill + reap floor: the stop "
              "waits on something other than the child's exit\n",
              kLimit);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string vsupExe;
  int runs = 7;
  bool json = false;
  bool checkOnly = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--vsup" && i + 1 < argc) {
      vsupExe = argv[++i];
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--json") {
      json = true;
    } else if (a == "--check") {
      checkOnly = true;
    } else {
      std::fprintf(stderr, "usage: %s [--vsup PATH] [--runs N] [--json] [--check]\n", argv[0]);
      return 2;
    }
  }
  if (!vsupExe.empty() && ::access(vsupExe.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "--vsup %s: not an executable file\n", vsupExe.c_str());
    return 2;
  }
  vsup::setLogLevel("off");
  if (checkOnly) return check(vsupExe);
  FILE* table = json ? stderr : stdout;
  nlohmann::ordered_json out;
  out["runs"] = runs;
  out["orphan_guards"] = !vsupExe.empty();
  std::fprintf(table, "%-26s %12s %12s %12s %12s %8s %8s\n", "tree", "ready ms", "floor ms",
               "stop ms", "floor ms", "ready x", "stop x");
  auto report = [&](const std::string& label, const std::string& key, const Row& r) {
    std::fprintf(table, "%-26s %12.2f %12.2f %12.2f %12.2f %8.1f %8.1f\n", label.c_str(), r.ready,
                 r.readyFloor, r.stop, r.stopFloor, r.ready / r.readyFloor, r.stop / r.stopFloor);
    std::fflush(table);
    out["ready_" + key + "_vs_floor"] = r.ready / r.readyFloor;
    out["stop_" + key + "_vs_floor"] = r.stop / r.stopFloor;
    out["ready_" + key + "_ms"] = r.ready;
    out["ready_" + key + "_floor_ms"] = r.readyFloor;
    out["stop_" + key + "_ms"] = r.stop;
    out["stop_" + key + "_floor_ms"] = r.stopFloor;
  };
  for (int n : {1, 8, 64}) {
    SupervisorSpec spec = flat(n);
    report("flat, " + std::to_string(n) + " children", std::to_string(n),
           measure(n, runs, [&] { return supervisorRun(spec, vsupExe); }));
  }
  if (!vsupExe.empty()) {
    SupervisorSpec spec = nested(3, "root");
    // 6 sub-supervisor processes + 8 leaves: the floor spawns as many processes.
    report("nested depth 3 (14 procs)", "nested",
           measure(14, runs, [&] { return supervisorRun(spec, vsupExe); }));
  }
  if (json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
