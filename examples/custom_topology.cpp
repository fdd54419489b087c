// A host program that supervises a tree of processes built in code, with vsup::Supervisor.
//
//   custom_topology [--run-for-ms N]
//
// It starts two `sleep` workers, a nested supervisor (with its own `sleep` worker) and a custom
// vsup-aware program (aware_child, built beside it), prints
// the tree, and runs until SIGTERM or SIGINT (or N ms, if given), then shuts the tree down with
// a 5 s deadline. The signal handling is the host's own: vsup installs no signal handler, so the
// host catches SIGTERM itself (the handler only writes to a pipe) and calls shutdown().
//
// Build against an installed vsup: see examples/meson.build. Children of type "supervisor" are
// run by the `vsup` executable: $VSUP_EXE, else the installed one.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <vsup/supervisor.h>

namespace sv = vsup::supervisor;

namespace {

int stopPipe[2] = {-1, -1};

// Async-signal-safe: one write() to a non-blocking pipe, errno preserved.
void onStopSignal(int) {
  int saved = errno;
  char byte = 1;
  ssize_t ignored = ::write(stopPipe[1], &byte, 1);
  (void)ignored;
  errno = saved;
}

void printTree(const sv::NodeStatus& node, int depth) {
  std::printf("%*s%s [%s] %s", depth * 2, "", node.name.c_str(), sv::nameOf(node.type),
              sv::nameOf(node.state));
  if (node.pid > 0) std::printf(" pid %d", static_cast<int>(node.pid));
  if (node.restarts > 0) std::printf(" restarts %u", node.restarts);
  std::printf("\n");
  for (const auto& child : node.children) printTree(child, depth + 1);
}

sv::ChildSpec sleeper(const std::string& name) {
  sv::ChildSpec c;
  c.name = name;
  c.command = {"sleep", "3600"};
  c.shutdown = sv::ShutdownPolicy::timeout(2000);  // SIGTERM, then SIGKILL after 2 s
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  int runForMs = -1;  // -1: until a signal
  if (argc == 3 && std::strcmp(argv[1], "--run-for-ms") == 0) {
    runForMs = std::atoi(argv[2]);
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [--run-for-ms N]\n", argv[0]);
    return 2;
  }

  // The host's own SIGTERM/SIGINT handling: a self-pipe.
  if (::pipe2(stopPipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    std::perror("pipe2");
    return 1;
  }
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = onStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);

  // The same tree a topology file would describe.
  sv::SupervisorSpec spec;
  spec.name = "app";
  spec.strategy = sv::Strategy::OneForOne;
  spec.intensity = 3;
  spec.periodMs = 5000;
  spec.children.push_back(sleeper("frontend"));
  spec.children.push_back(sleeper("indexer"));

  sv::ChildSpec batch;
  batch.name = "batch";
  batch.type = sv::ChildType::Supervisor;
  batch.vsupAware = true;  // supervisors always are
  batch.supervisor = sv::SupervisorSpec{};
  batch.supervisor->name = "batch";
  batch.supervisor->strategy = sv::Strategy::OneForAll;
  batch.supervisor->children.push_back(sleeper("job"));
  spec.children.push_back(std::move(batch));

  // A custom vsup-aware program (examples/aware_child.cpp, built beside this one): ready when
  // it says so, stopped over RPC, deferring its shutdown while it flushes.
  sv::ChildSpec flusher;
  flusher.name = "flusher";
  flusher.vsupAware = true;
  flusher.ready = sv::Readiness::Notify;
  std::string self = argv[0];
  flusher.command = {self.substr(0, self.rfind('/') + 1) + "aware_child"};
  spec.children.push_back(std::move(flusher));

  try {
    vsup::Supervisor sup(spec);
    sup.start();  // returns once every child is up; throws vsup::Error naming a child that is not
    std::printf("started:\n");
    printTree(sup.status(), 1);
    std::fflush(stdout);

    // Wait for SIGTERM/SIGINT (or the time limit).
    struct pollfd pfd = {stopPipe[0], POLLIN, 0};
    int ready;
    do {
      ready = ::poll(&pfd, 1, runForMs);
    } while (ready < 0 && errno == EINTR);
    std::printf("%s: shutting down\n", ready > 0 ? "signal received" : "time is up");

    bool clean = sup.shutdown(std::chrono::seconds(5));
    std::printf("shut down %s\n", clean ? "cleanly" : "after killing what did not stop in time");
    return clean ? 0 : 1;
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "custom_topology: %s\n", e.what());
    return 1;
  }
}
