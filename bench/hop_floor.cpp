// The cost of one round trip between two processes on this machine: the floor under every
// request that crosses the serving tree's process boundaries (API server <-> engine-core <->
// rank), measured the cheapest way there is.
//
//   build/bench/hop_floor [--round-trips N] [--json]
//
// A parent and a forked child ping-pong one byte over an AF_UNIX stream socketpair with blocking
// read and write (no event loop, no framing, no copy beyond the byte): each round trip wakes the
// child, then the parent. Prints, per round trip: wall time, CPU time (user + sys of both
// processes, from getrusage) and context switches (voluntary and involuntary, both processes).
// A serving request at low concurrency makes at least three such round trips (the API server's
// submit and the deltas call with engine-core, engine-core's step call with the rank), so three
// times this CPU is the least a multi-process tree can add to a single-process server's cost.
//
// --json: one JSON object on stdout (the table then goes to stderr): hop_rtt_wall_us,
// hop_rtt_cpu_us, hop_rtt_context_switches and round_trips.
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "base/clock.h"

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "hop_floor: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

void put(int fd, char c) {
  while (::write(fd, &c, 1) != 1) {
    if (errno != EINTR) die("write");
  }
}

char get(int fd) {
  char c = 0;
  for (;;) {
    ssize_t n = ::read(fd, &c, 1);
    if (n == 1) return c;
    if (n == 0) std::exit(0);  // the peer is done
    if (errno != EINTR) die("read");
  }
}

double cpuUs(const rusage& r) {
  return double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e6 +
         double(r.ru_utime.tv_usec + r.ru_stime.tv_usec);
}

}  // namespace

int main(int argc, char** argv) {
  long trips = 20000;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--round-trips" && i + 1 < argc) {
      char* end = nullptr;
      trips = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || trips < 100 || trips > 100000000) {
        std::fprintf(stderr, "hop_floor: --round-trips takes 100..100000000, got '%s'\n",
                     argv[i]);
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--round-trips N] [--json]\n", argv[0]);
      return 2;
    }
  }
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
  pid_t child = ::fork();
  if (child < 0) die("fork");
  if (child == 0) {
    ::close(sv[0]);
    for (;;) put(sv[1], get(sv[1]));  // echoes until the parent closes
  }
  ::close(sv[1]);
  for (int i = 0; i < 1000; ++i) {  // warm-up: both processes running, caches warm
    put(sv[0], 'x');
    get(sv[0]);
  }
  rusage self0{};
  ::getrusage(RUSAGE_SELF, &self0);
  vsup::MonoNs t0 = vsup::monoNow();
  for (long i = 0; i < trips; ++i) {
    put(sv[0], 'x');
    get(sv[0]);
  }
  double wallUs = double(vsup::monoNow() - t0) / 1e3;
  rusage self1{};
  ::getrusage(RUSAGE_SELF, &self1);
  ::close(sv[0]);
  int status = 0;
  rusage kid{};
  if (::wait4(child, &status, 0, &kid) != child) die("wait4");
  // The child's usage covers its warm-up too: 1000 of trips + 1000 round trips.
  const double kidShare = double(trips) / double(trips + 1000);
  double cpu = (cpuUs(self1) - cpuUs(self0)) + cpuUs(kid) * kidShare;
  double switches = double(self1.ru_nvcsw + self1.ru_nivcsw - self0.ru_nvcsw - self0.ru_nivcsw) +
                    double(kid.ru_nvcsw + kid.ru_nivcsw) * kidShare;
  const double n = double(trips);
  FILE* table = json ? stderr : stdout;
  std::fprintf(table, "| round trip between two processes (%ld, AF_UNIX, blocking) | per trip |\n",
               trips);
  std::fprintf(table, "|---|---:|\n");
  std::fprintf(table, "| wall | %.2f us |\n", wallUs / n);
  std::fprintf(table, "| CPU, both processes | %.2f us |\n", cpu / n);
  std::fprintf(table, "| context switches, both processes | %.2f |\n", switches / n);
  if (json) {
    nlohmann::json out;
    out["round_trips"] = trips;
    out["hop_rtt_wall_us"] = wallUs / n;
    out["hop_rtt_cpu_us"] = cpu / n;
    out["hop_rtt_context_switches"] = switches / n;
    std::printf("%s\n", out.dump(2).c_str());
  }
  return 0;
}
