// vsup::LLM life cycle: construct → first token → destroy, for TP = 1, 2, 4, first with the sim
// engine (free steps: what the life cycle itself costs), then with the CPU engine (its default
// preset, vsup-tiny-25m with dummy weights: the ranks load a model), each row labelled, next to
// the floor measured in the same repetition: posix_spawn + SIGTERM + waitpid of as many bare
// processes as the LLM starts (engine-core, its ranks, and the two orphan guards).
//
//   build/bench/llm_bench [--runs N] [--engines sim,cpu] [--json]   (needs $VSUP_EXE or an
//                                                                     installed vsup)
//
// --json: one JSON object on stdout (the table then goes to stderr): per engine and TP the
// ratio <engine>_tp<N>_vs_floor (total life cycle against the floor) and the raw medians
// <engine>_tp<N>_construct_ms, _first_token_ms, _destroy_ms, _total_ms, _floor_ms.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    size_t comma = s.find(',', at);
    if (comma == std::string::npos) comma = s.size();
    out.push_back(s.substr(at, comma - at));
    at = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 7;
  bool json = false;
  std::vector<std::string> engines = {"sim", "cpu"};
  auto usage = [&]() {
    std::fprintf(stderr, "usage: %s [--runs N] [--engines sim,cpu] [--json]\n", argv[0]);
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--engines" && i + 1 < argc) {
      engines = split(argv[++i]);
      for (const auto& e : engines) {
        if (e != "sim" && e != "cpu") {
          std::fprintf(stderr, "--engines: unknown engine '%s' (accepted: sim, cpu)\n",
                       e.c_str());
          return 2;
        }
      }
    } else if (a == "--json") {
      json = true;
    } else {
      return usage();
    }
  }
  FILE* table = json ? stderr : stdout;
  nlohmann::ordered_json out;
  out["runs"] = runs;
  std::fprintf(table,
               "| engine | TP | construct | first token | destroy | total | floor (same "
               "processes) | ratio |\n");
  std::fprintf(table, "|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (const std::string& engine : engines) {
    for (uint32_t tp : {1u, 2u, 4u}) {
      std::vector<double> construct, first, destroy, total, floor;
      for (int r = 0; r < runs; ++r) {
        floor.push_back(floorRun(int(tp) + 3));
        auto t0 = Clock::now();
        vsup::LLMConfig config;
        config.engine = engine;  // never the default: it changed once under this bench's feet
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
      const char* label = engine == "sim" ? "sim (free steps)" : "cpu (vsup-tiny-25m)";
      std::fprintf(table, "| %s | %u | %.1f ms | %.2f ms | %.1f ms | %.1f ms | %.1f ms | %.1f |\n",
                   label, tp, median(construct), median(first), median(destroy), median(total),
                   median(floor), median(total) / median(floor));
      std::fflush(table);
      std::string key = engine + "_tp" + std::to_string(tp);
      out[key + "_vs_floor"] = median(total) / median(floor);
      out[key + "_construct_ms"] = median(construct);
      out[key + "_first_token_ms"] = median(first);
      out[key + "_destroy_ms"] = median(destroy);
      out[key + "_total_ms"] = median(total);
      out[key + "_floor_ms"] = median(floor);
    }
  }
  if (json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
