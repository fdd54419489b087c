// vsup::LLM life cycle: construct → first token → destroy, for TP = 1, 2, 4 (sim engine, free
// steps), next to the floor measured in the same run: posix_spawn + SIGTERM + waitpid of as
// many bare processes as the LLM starts (engine-core, its ranks, and the two orphan guards).
//
//   build/bench/llm_bench [--runs N]      (needs $VSUP_EXE or an installed vsup)
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "workers/public/llm.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double floorRun(int processes) {
  auto t0 = Clock::now();
  std::vector<pid_t> pids;
  for (int i = 0; i < processes; ++i) {
    pid_t pid;
    char arg0[] = "sleep";
    char arg1[] = "1000";
    char* argv[] = {arg0, arg1, nullptr};
    if (posix_spawn(&pid, "/bin/sleep", nullptr, nullptr, argv, environ) == 0) pids.push_back(pid);
  }
  for (auto it = pids.rbegin(); it != pids.rend(); ++it) {
    ::kill(*it, SIGTERM);
    int st;
    ::waitpid(*it, &st, 0);
  }
  return ms(Clock::now() - t0);
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 7;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--runs N]\n", argv[0]);
      return 2;
    }
  }
  std::printf("| TP | construct | first token | destroy | total | floor (same processes) | ratio |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (uint32_t tp : {1u, 2u, 4u}) {
    std::vector<double> construct, first, destroy, total, floor;
    for (int r = 0; r < runs; ++r) {
      floor.push_back(floorRun(int(tp) + 3));
      auto t0 = Clock::now();
      vsup::LLMConfig config;
      config.tensorParallelSize = tp;
      vsup::Sampling one;
      one.maxTokens = 1;
      auto llm = std::make_unique<vsup::LLM>(config);
      auto t1 = Clock::now();
      llm->generate({"x"}, one);
      auto t2 = Clock::now();
      llm.reset();
      auto t3 = Clock::now();
      construct.push_back(ms(t1 - t0));
      first.push_back(ms(t2 - t1));
      destroy.push_back(ms(t3 - t2));
      total.push_back(ms(t3 - t0));
    }
    std::printf("| %u | %.1f ms | %.2f ms | %.1f ms | %.1f ms | %.1f ms | %.1f |\n", tp,
                median(construct), median(first), median(destroy), median(total), median(floor),
                median(total) / median(floor));
  }
  return 0;
}
