// A host program for tests/integration/test_embedding.py: it embeds vsup the way an application
// would, in one of two modes.
//
//   vsup-host-program generate [--tp N]
//       Constructs a vsup::LLM, generates once, prints "text: <completion>" and the pids of its
//       descendants ("descendants: PID..."), then returns from main WITHOUT calling shutdown():
//       the LLM's destructor (run during the return) must tear everything down quietly.
//
//   vsup-host-program drain
//       Constructs a vsup::LLM (sim engine, TP 2, 5 ms a step), runs an endless stream and a
//       40-token stream on two threads, calls drain(1 s) once both are flowing, and prints
//       "report: completed=C aborted=A failed=F kv=K", one "stream <name>: <finish> <tokens>
//       <streamed-text-matches yes|no>" line per stream, "after: <what a later generate() threw>"
//       and "descendants: PID..." (taken before the drain). Exit 0.
//
//   vsup-host-program sampling
//       Constructs a vsup::LLM (sim engine, maxTokensLimit 4096 as the API server) and calls
//       generate() with each out-of-range Sampling of a fixed table, printing
//       "<case>\t<the vsup::Error's message>" per case (the case names are the test's keys).
//
//   vsup-host-program supervise
//       Installs its own SIGTERM handler (the handler only writes to a pipe), starts a
//       vsup::Supervisor (two `sleep` workers and a nested supervisor), prints
//       "ready PID..." with every pid of the tree, waits for SIGTERM, then calls
//       shutdown(5 s) and exits 0 when it was clean.
//
// Exit status: 0 on success, 1 on a vsup::Error (printed), 2 on bad usage.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <atomic>
#include <cmath>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "supervisor/public/supervisor.h"
#include "workers/public/llm.h"

namespace {

namespace sv = vsup::supervisor;

int usage() {
  std::fprintf(stderr, "usage: vsup-host-program generate [--tp N] | drain | sampling | supervise\n");
  return 2;
}

// Live descendants of this process, from /proc (ppid chains).
std::vector<pid_t> descendants() {
  std::vector<std::pair<pid_t, pid_t>> all;  // pid, ppid
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      char* end = nullptr;
      long pid = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0') continue;
      std::ifstream in("/proc/" + std::string(e->d_name) + "/stat");
      std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      auto close = stat.rfind(')');
      if (close == std::string::npos || close + 4 > stat.size()) continue;
      all.emplace_back(static_cast<pid_t>(pid), std::atoi(stat.c_str() + close + 4));
    }
    ::closedir(d);
  }
  std::set<pid_t> tree{::getpid()};
  for (bool grew = true; grew;) {
    grew = false;
    for (auto [pid, ppid] : all) {
      if (tree.count(ppid) != 0 && tree.insert(pid).second) grew = true;
    }
  }
  tree.erase(::getpid());
  return {tree.begin(), tree.end()};
}

int generate(uint32_t tp) {
  vsup::LLMConfig config;
  config.tensorParallelSize = tp;
  vsup::LLM llm(config);  // $VSUP_EXE names the vsup executable
  vsup::Sampling sampling;
  sampling.maxTokens = 8;
  auto out = llm.generate({"Hello from a host program"}, sampling);
  std::printf("text: %s\n", out.at(0).text.c_str());
  std::printf("finish: %s\n", out.at(0).finishReason.c_str());
  std::printf("descendants:");
  for (pid_t p : descendants()) std::printf(" %d", p);
  std::printf("\n");
  std::fflush(stdout);
  return 0;  // no shutdown(): the destructor does it
}

vsup::LLMConfig simConfig() {
  vsup::LLMConfig config;
  config.engine = "sim";
  config.tensorParallelSize = 2;
  config.simTokenMs = 5;
  return config;
}

struct Stream {
  std::string name;
  int64_t maxTokens;
  std::atomic<int> pieces{0};
  std::string streamed;
  vsup::Completion result;
  std::string error;
  std::thread thread;

  Stream(vsup::LLM& llm, std::string n, int64_t tokens) : name(std::move(n)), maxTokens(tokens) {
    thread = std::thread([this, &llm]() {
      vsup::Sampling s;
      s.maxTokens = maxTokens;
      s.seed = 1;
      try {
        result = llm.generateStream("a host's request", s, [this](std::string_view piece) {
          streamed += piece;
          ++pieces;
        });
      } catch (const vsup::Error& e) {
        error = e.what();
      }
    });
  }
};

int drain() {
  vsup::LLM llm(simConfig());
  Stream endless(llm, "endless", 1'000'000'000);
  Stream shortOne(llm, "short", 40);
  for (int i = 0; i < 5000 && (endless.pieces == 0 || shortOne.pieces == 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling for a condition
  }
  std::vector<pid_t> pids = descendants();
  vsup::DrainReport report = llm.drain(std::chrono::seconds(1));
  endless.thread.join();
  shortOne.thread.join();
  std::printf("report: completed=%lld aborted=%lld failed=%lld kv=%lld\n",
              static_cast<long long>(report.completed), static_cast<long long>(report.aborted),
              static_cast<long long>(report.failed),
              static_cast<long long>(report.kvTransfersAbandoned));
  for (Stream* s : {&endless, &shortOne}) {
    if (!s->error.empty()) {
      std::printf("stream %s: threw %s\n", s->name.c_str(), s->error.c_str());
      continue;
    }
    std::printf("stream %s: %s %lld %s\n", s->name.c_str(), s->result.finishReason.c_str(),
                static_cast<long long>(s->result.completionTokens),
                s->result.text == s->streamed && !s->streamed.empty() ? "yes" : "no");
  }
  try {
    llm.generate({"after the drain"});
    std::printf("after: it succeeded\n");
  } catch (const vsup::ShutDownError& e) {
    std::printf("after: ShutDownError: %s\n", e.what());
  } catch (const vsup::Error& e) {
    std::printf("after: vsup::Error: %s\n", e.what());
  }
  std::printf("descendants:");
  for (pid_t p : pids) std::printf(" %d", p);
  std::printf("\n");
  std::fflush(stdout);
  return 0;
}

int sampling() {
  vsup::LLMConfig config = simConfig();
  config.maxTokensLimit = 4096;
  vsup::LLM llm(config);
  struct Case {
    const char* name;
    void (*set)(vsup::Sampling&);
  };
  const Case cases[] = {
      {"max_tokens_0", [](vsup::Sampling& s) { s.maxTokens = 0; }},
      {"max_tokens_4097", [](vsup::Sampling& s) { s.maxTokens = 4097; }},
      {"temperature_2.01", [](vsup::Sampling& s) { s.temperature = 2.01; }},
      {"temperature_-0.1", [](vsup::Sampling& s) { s.temperature = -0.1; }},
      {"top_p_0", [](vsup::Sampling& s) { s.topP = 0; }},
      {"top_p_1.5", [](vsup::Sampling& s) { s.topP = 1.5; }},
      {"top_k_-2", [](vsup::Sampling& s) { s.topK = -2; }},
      {"stop_5", [](vsup::Sampling& s) { s.stop = {"a", "b", "c", "d", "e"}; }},
      {"stop_empty", [](vsup::Sampling& s) { s.stop = {"x", ""}; }},
  };
  for (const Case& c : cases) {
    vsup::Sampling s;
    c.set(s);
    try {
      llm.generate({"hello"}, s);
      std::printf("%s\taccepted\n", c.name);
    } catch (const vsup::Error& e) {
      std::printf("%s\t%s\n", c.name, e.what());
    }
  }
  std::fflush(stdout);
  return 0;
}

int termPipe[2] = {-1, -1};

void onSigterm(int) {
  int saved = errno;
  char byte = 1;
  ssize_t ignored = ::write(termPipe[1], &byte, 1);
  (void)ignored;
  errno = saved;
}

void collectPids(const sv::NodeStatus& node, std::vector<pid_t>& out) {
  for (const auto& c : node.children) {
    if (c.pid > 0) out.push_back(c.pid);
    collectPids(c, out);
  }
}

sv::ChildSpec sleeper(const std::string& name) {
  sv::ChildSpec c;
  c.name = name;
  c.command = {"sleep", "600"};
  c.shutdown = sv::ShutdownPolicy::timeout(2000);
  return c;
}

int supervise() {
  if (::pipe2(termPipe, O_CLOEXEC) != 0) {
    std::perror("pipe2");
    return 1;
  }
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = onSigterm;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);

  sv::SupervisorSpec spec;
  spec.name = "host";
  spec.children.push_back(sleeper("web"));
  spec.children.push_back(sleeper("cache"));
  sv::ChildSpec nested;
  nested.name = "batch";
  nested.type = sv::ChildType::Supervisor;
  nested.vsupAware = true;  // supervisors always are (supervisor/spec.h)
  nested.supervisor = sv::SupervisorSpec{};
  nested.supervisor->name = "batch";
  nested.supervisor->children.push_back(sleeper("job"));
  spec.children.push_back(std::move(nested));

  vsup::Supervisor sup(spec);  // $VSUP_EXE names the vsup executable (for "batch")
  sup.start();
  std::vector<pid_t> pids;
  collectPids(sup.status(), pids);
  std::printf("ready");
  for (pid_t p : pids) std::printf(" %d", p);
  std::printf("\n");
  std::fflush(stdout);

  char byte;
  while (::read(termPipe[0], &byte, 1) < 0 && errno == EINTR) {
  }
  std::printf("stopping\n");
  std::fflush(stdout);
  bool clean = sup.shutdown(std::chrono::seconds(5));
  std::printf("%s\n", clean ? "clean" : "escalated");
  std::fflush(stdout);
  return clean ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string mode = argv[1];
  try {
    if (mode == "generate") {
      uint32_t tp = 2;
      if (argc == 4 && std::string(argv[2]) == "--tp") tp = static_cast<uint32_t>(std::atoi(argv[3]));
      else if (argc != 2) return usage();
      return generate(tp);
    }
    if (mode == "supervise" && argc == 2) return supervise();
    if (mode == "drain" && argc == 2) return drain();
    if (mode == "sampling" && argc == 2) return sampling();
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "vsup-host-program: %s\n", e.what());
    return 1;
  }
  return usage();
}
