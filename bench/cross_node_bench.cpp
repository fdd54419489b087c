// The cross-node all-reduce at TP 2 (one rank per node, engine/cross_node_collective.h) against
// the floor under it, measured between the same two addresses in the same run: a raw TCP
// exchange of the same bytes (both sides send n bytes and receive n bytes at once, over one
// connection, with a poll loop: the data movement of a two-rank all-reduce and nothing else).
// The shared-memory all-reduce of two ranks on one machine is the third column: what the same
// TP costs when it does not leave the node.
//
//   build/bench/cross_node_bench [--addresses A0,A1] [--netns NS0,NS1] [--quick] [--json]
//
// Rank 0 is this process, rank 1 a forked child. By default they listen on 127.0.0.1 and
// 127.0.0.2 (loopback: the floor of the kernel's TCP stack on this machine). With --netns, each
// rank first enters its network namespace (root; /run/netns/NAME, e.g. two namespaces joined by
// a veth pair, whose addresses --addresses then names), so the bytes cross a real virtual link.
// Sizes: one token's hidden vector of a 4096-wide model (decode at batch 1), 32 of them (decode
// at batch 32) and 512 (a prefill chunk). Times are medians per operation, as rank 0 sees them.
//
// --json: one JSON object on stdout (the table then goes to stderr): {"addresses", "rows": [{
// "name", "floats", "tcp_exchange_us", "cross_node_us", "one_node_us", "cross_node_mib_s"}]}.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "base/fd.h"
#include "engine/collective.h"
#include "engine/cross_node_collective.h"

namespace {

using vsup::OwnFd;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "cross_node_bench: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

struct Size {
  const char* name;
  size_t floats;
  int iterations;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void sendAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t k = ::send(fd, c, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) die("send");
    c += k;
    n -= size_t(k);
  }
}

void recvAll(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t k = ::recv(fd, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) die("recv");
    c += k;
    n -= size_t(k);
  }
}

// Both directions at once on a non-blocking socket: `out` goes out while `in` comes in.
void exchange(int fd, const char* out, char* in, size_t n) {
  size_t sent = 0;
  size_t got = 0;
  while (sent < n || got < n) {
    struct pollfd p {fd, short((got < n ? POLLIN : 0) | (sent < n ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 10000) != 1) die("poll (the peer is gone or stuck)");
    if (sent < n && (p.revents & POLLOUT)) {
      ssize_t k = ::send(fd, out + sent, n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (k > 0) sent += size_t(k);
      else if (k < 0 && errno != EAGAIN && errno != EINTR) die("send");
    }
    if (got < n && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
      ssize_t k = ::recv(fd, in + got, n - got, MSG_DONTWAIT);
      if (k > 0) got += size_t(k);
      else if (k == 0 || (errno != EAGAIN && errno != EINTR)) die("recv");
    }
  }
}

OwnFd tcpSocket() {
  OwnFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) die("socket");
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

sockaddr_in addressOf(const std::string& ip, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (::inet_pton(AF_INET, ip.c_str(), &a.sin_addr) != 1) {
    std::fprintf(stderr, "cross_node_bench: \"%s\" is not an IPv4 address\n", ip.c_str());
    std::exit(2);
  }
  return a;
}

void enterNetns(const std::string& name) {
  if (name.empty()) return;
  OwnFd ns(::open(("/run/netns/" + name).c_str(), O_RDONLY | O_CLOEXEC));
  if (!ns) die("open /run/netns/" + name);
  if (::setns(ns.get(), CLONE_NEWNET) != 0) die("setns " + name);
}

struct Row {
  Size size;
  double tcpUs = 0;
  double crossUs = 0;
  double oneNodeUs = 0;
};

// The median all-reduce of `size`, after 3 untimed ones.
double allReduceUs(vsup::engine::Collective& c, std::vector<float>& data, const Size& size) {
  std::vector<double> us;
  for (int it = -3; it < size.iterations; ++it) {
    vsup::MonoNs t0 = vsup::monoNow();
    c.allReduceSum(data.data(), size.floats);
    if (it >= 0) us.push_back(double(vsup::monoNow() - t0) / 1e3);
    std::fill(data.begin(), data.end(), 1.0f);  // keep the values finite
  }
  return median(us);
}

// One rank's whole run; rank 0 fills `rows`. `control` is a socketpair between the two
// processes (ports and barriers).
void runRank(uint32_t rank, const std::vector<std::string>& addresses,
             const std::vector<std::string>& netns, const std::vector<Size>& sizes,
             const std::string& storeDir, int sharedFd, int control, std::vector<Row>& rows) {
  enterNetns(netns.empty() ? "" : netns[rank]);
  size_t most = 0;
  for (const Size& s : sizes) most = std::max(most, s.floats);
  std::vector<float> data(most, 1.0f);
  std::vector<float> back(most);
  char sync = 's';
  auto barrier = [&] {
    sendAll(control, &sync, 1);
    recvAll(control, &sync, 1);
  };

  // The floor: a raw TCP exchange between the same two addresses.
  OwnFd conn;
  if (rank == 0) {
    OwnFd listener = tcpSocket();
    sockaddr_in a = addressOf(addresses[0], 0);
    if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) die("bind");
    if (::listen(listener.get(), 1) != 0) die("listen");
    socklen_t len = sizeof(a);
    ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&a), &len);
    uint16_t port = ntohs(a.sin_port);
    sendAll(control, &port, sizeof(port));
    conn = OwnFd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) die("accept");
    int one = 1;
    ::setsockopt(conn.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  } else {
    uint16_t port = 0;
    recvAll(control, &port, sizeof(port));
    conn = tcpSocket();
    sockaddr_in mine = addressOf(addresses[1], 0);
    if (::bind(conn.get(), reinterpret_cast<sockaddr*>(&mine), sizeof(mine)) != 0) die("bind");
    sockaddr_in a = addressOf(addresses[0], port);
    if (::connect(conn.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) die("connect");
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    const size_t bytes = sizes[i].floats * sizeof(float);
    std::vector<double> us;
    for (int it = -3; it < sizes[i].iterations; ++it) {
      vsup::MonoNs t0 = vsup::monoNow();
      exchange(conn.get(), reinterpret_cast<const char*>(data.data()),
               reinterpret_cast<char*>(back.data()), bytes);
      if (it >= 0) us.push_back(double(vsup::monoNow() - t0) / 1e3);
    }
    if (rank == 0) rows[i].tcpUs = median(us);
  }
  conn.reset();
  barrier();

  // The cross-node collective: one rank per node.
  {
    auto store = vsup::engine::makeDirectoryStore(storeDir);
    vsup::engine::CrossNodeJoin join;
    join.rank = rank;
    join.ranks = 2;
    join.listenAddress = addresses[rank];
    join.timeoutMs = 10000;
    auto c = vsup::engine::joinCrossNodeCollective(join, vsup::engine::makeSingleRankCollective(),
                                                    *store);
    for (size_t i = 0; i < sizes.size(); ++i) {
      double us = allReduceUs(*c, data, sizes[i]);
      if (rank == 0) rows[i].crossUs = us;
    }
  }
  barrier();

  // Two ranks on one machine: the shared-memory region.
  {
    auto c = vsup::engine::joinSharedCollective(sharedFd, rank, 2, 10000);
    for (size_t i = 0; i < sizes.size(); ++i) {
      double us = allReduceUs(*c, data, sizes[i]);
      if (rank == 0) rows[i].oneNodeUs = us;
    }
  }
  barrier();
}

std::vector<std::string> splitComma(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"the cross-node all-reduce against a raw TCP exchange of the same bytes"};
  std::string addressList = "127.0.0.1,127.0.0.2";
  std::string netnsList;
  bool quick = false;
  bool json = false;
  app.add_option("--addresses", addressList, "rank 0's and rank 1's IPv4 addresses");
  app.add_option("--netns", netnsList, "rank 0's and rank 1's network namespaces (root)");
  app.add_flag("--quick", quick, "a few iterations only (a smoke run; the numbers mean nothing)");
  app.add_flag("--json", json, "one JSON object on stdout");
  CLI11_PARSE(app, argc, argv);
  std::vector<std::string> addresses = splitComma(addressList);
  std::vector<std::string> netns = netnsList.empty() ? std::vector<std::string>{}
                                                      : splitComma(netnsList);
  if (addresses.size() != 2 || (!netns.empty() && netns.size() != 2)) {
    std::fprintf(stderr, "cross_node_bench: --addresses and --netns take two comma-separated "
                         "values (rank 0's, rank 1's)\n");
    return 2;
  }
  auto runs = [&](int n) { return quick ? 3 : n; };
  std::vector<Size> sizes = {{"decode, batch 1", 4096, runs(2000)},
                             {"decode, batch 32", 32 * 4096, runs(500)},
                             {"prefill, 512 tokens", 512 * 4096, runs(50)}};
  std::vector<Row> rows(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) rows[i].size = sizes[i];

  char tmpl[] = "/tmp/vsup-cross-node-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) die("mkdtemp");
  const std::string storeDir = tmpl;
  OwnFd shared(vsup::engine::createSharedCollective(2));
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
  OwnFd mine(pair[0]);
  OwnFd theirs(pair[1]);
  pid_t child = ::fork();
  if (child < 0) die("fork");
  if (child == 0) {
    mine.reset();
    std::vector<Row> unused(sizes.size());
    try {
      runRank(1, addresses, netns, sizes, storeDir, shared.get(), theirs.get(), unused);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cross_node_bench: rank 1: %s\n", e.what());
      ::_exit(1);
    }
    ::_exit(0);
  }
  theirs.reset();
  int rc = 0;
  try {
    runRank(0, addresses, netns, sizes, storeDir, shared.get(), mine.get(), rows);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cross_node_bench: rank 0: %s\n", e.what());
    ::kill(child, SIGKILL);
    rc = 1;
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  std::filesystem::remove_all(storeDir);
  if (rc != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;

  FILE* table = json ? stderr : stdout;
  std::fprintf(table, "TP 2, one rank per node, %s <-> %s%s\n", addresses[0].c_str(),
               addresses[1].c_str(), netns.empty() ? "" : " (network namespaces)");
  std::fprintf(table, "%-22s %10s %16s %16s %8s %14s %16s\n", "message", "floats",
               "tcp exchange us", "cross-node us", "x floor", "cross MiB/s", "one-node shm us");
  nlohmann::json out;
  out["addresses"] = addresses;
  out["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    const double mib = double(r.size.floats * sizeof(float)) / (1 << 20);
    std::fprintf(table, "%-22s %10zu %16.1f %16.1f %8.2f %14.0f %16.1f\n", r.size.name,
                 r.size.floats, r.tcpUs, r.crossUs, r.crossUs / r.tcpUs, mib / (r.crossUs / 1e6),
                 r.oneNodeUs);
    out["rows"].push_back({{"name", r.size.name},
                           {"floats", r.size.floats},
                           {"tcp_exchange_us", r.tcpUs},
                           {"cross_node_us", r.crossUs},
                           {"one_node_us", r.oneNodeUs},
                           {"cross_node_mib_s", mib / (r.crossUs / 1e6)}});
  }
  if (json) std::printf("%s\n", out.dump().c_str());
  return 0;
}
