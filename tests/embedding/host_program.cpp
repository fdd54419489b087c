// A host program for tests/integration/test_embedding.py: it embeds vsup the way an application
// would, in one of two modes.
//
//   vsup-host-program generate [--tp N]
//       Constructs a vsup::LLM, generates once, prints "text: <completion>" and the pids of its
//       descendants ("descendants: PID..."), then returns from main WITHOUT calling shutdown():
//       the LLM's destructor (run during the return) must tear everything down quietly.
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
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "supervisor/public/supervisor.h"
#include "workers/public/llm.h"

namespace {

namespace sv = vsup::supervisor;

int usage() {
  std::fprintf(stderr, "usage: vsup-host-program generate [--tp N] | supervise\n");
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
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "vsup-host-program: %s\n", e.what());
    return 1;
  }
  return usage();
}
