// The cost of one round trip between two processes on this machine: the floor under every
// request that crosses the serving tree's process boundaries (API server <-> engine-core <->
// rank), measured the cheapest way there is.
//
//   build/bench/hop_floor [--round-trips N] [--json]
//
// A parent and a forked child ping-pong one byte over an AF_UNIX stream socketpair with blocking
// read and write (no event loop, no framing, no copy beyond the byte): each round trip wakes the
// child, then the parent. Prints, per round trip: wall time, CPU time (user + sys of both
// processes, from getrusage) and context switches (voluntary and involuntary, both processes),
// three ways: where the scheduler puts the two processes, both pinned to one CPU, and pinned to
// two different CPUs (with fewer than two CPUs allowed, the last is left out). On a VM the
// cross-CPU wake-up of an idle vCPU (an IPI and the hypervisor's wake of a halted vCPU) can cost
// several times the same-CPU one.
// A serving request at low concurrency makes at least three such round trips (the API server's
// submit and the deltas call with engine-core, engine-core's step call with the rank), so three
// times this CPU is the least a multi-process tree can add to a single-process server's cost.
//
// --json: one JSON object on stdout (the table then goes to stderr): hop_rtt_wall_us,
// hop_rtt_cpu_us and hop_rtt_context_switches (unpinned), the same with _same_cpu and _cross_cpu
// inserted after hop_rtt (hop_rtt_same_cpu_wall_us, ...), and round_trips.
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

struct Result {
  double wallUs, cpuUs, switches;  // per round trip
};

void pin(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
}

// `trips` round trips, the parent on CPU `parentCpu` and the child on `childCpu` (-1: unpinned).
Result measure(long trips, int parentCpu, int childCpu) {
  cpu_set_t before;
  if (::sched_getaffinity(0, sizeof before, &before) != 0) die("sched_getaffinity");
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
  pid_t child = ::fork();
  if (child < 0) die("fork");
  if (child == 0) {
    ::close(sv[0]);
    pin(childCpu);
    for (;;) put(sv[1], get(sv[1]));  // echoes until the parent closes
  }
  ::close(sv[1]);
  pin(parentCpu);
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
  if (::sched_setaffinity(0, sizeof before, &before) != 0) die("sched_setaffinity");
  // The child's usage covers its warm-up too: its share of the timed trips is what counts.
  const double kidShare = double(trips) / double(trips + 1000);
  double cpu = (cpuUs(self1) - cpuUs(self0)) + cpuUs(kid) * kidShare;
  double switches = double(self1.ru_nvcsw + self1.ru_nivcsw - self0.ru_nvcsw - self0.ru_nivcsw) +
                    double(kid.ru_nvcsw + kid.ru_nivcsw) * kidShare;
  const double n = double(trips);
  return {wallUs / n, cpu / n, switches / n};
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
  // The CPUs this process may run on: the first two are the pinned variants'.
  cpu_set_t allowed;
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) die("sched_getaffinity");
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  struct Row {
    const char* label;
    const char* key;
    Result r;
  };
  std::vector<Row> rows;
  rows.push_back({"unpinned", "", measure(trips, -1, -1)});
  rows.push_back({"both on one CPU", "_same_cpu", measure(trips, cpus[0], cpus[0])});
  if (cpus.size() > 1) {
    rows.push_back({"on two CPUs", "_cross_cpu", measure(trips, cpus[0], cpus[1])});
  }
  FILE* table = json ? stderr : stdout;
  std::fprintf(table,
               "| round trip between two processes (AF_UNIX, blocking, %ld trips) | wall | CPU, "
               "both processes | context switches |\n|---|---:|---:|---:|\n",
               trips);
  for (const Row& row : rows) {
    std::fprintf(table, "| %s | %.2f us | %.2f us | %.2f |\n", row.label, row.r.wallUs,
                 row.r.cpuUs, row.r.switches);
  }
  if (json) {
    nlohmann::json out;
    out["round_trips"] = trips;
    for (const Row& row : rows) {
      out[std::string("hop_rtt") + row.key + "_wall_us"] = row.r.wallUs;
      out[std::string("hop_rtt") + row.key + "_cpu_us"] = row.r.cpuUs;
      out[std::string("hop_rtt") + row.key + "_context_switches"] = row.r.switches;
    }
    std::printf("%s\n", out.dump(2).c_str());
  }
  return 0;
}
