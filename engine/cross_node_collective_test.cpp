// The cross-node collective between real processes over real TCP: every "node" listens on an
// address of its own (127.0.0.1, 127.0.0.2, ... are all loopback on Linux), ranks of one node
// share a memfd region as on one machine, and the rendezvous goes through a directory store.
// The rehearsal with network namespaces and whole process trees is the multi-node integration
// suite's; this one checks the collective's contract: the bits, the failures and their bounds,
// and what a rank leaves behind.
#include "engine/cross_node_collective.h"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "engine/rank_test_util.h"

namespace vsup::engine {
namespace {

using namespace rank_test;

constexpr size_t kOpSizes[] = {7, 2500, 1000};
constexpr uint32_t kOps = 200;
constexpr size_t kBigN = 2500;

// A fresh directory for one group's rendezvous, removed with everything in it.
class StoreDir {
 public:
  StoreDir() {
    char tmpl[] = "/tmp/vsup-rendezvous-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path_ = tmpl;
  }
  ~StoreDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string nodeAddress(uint32_t node) { return "127.0.0." + std::to_string(node + 1); }

// One memfd region per node with more than one rank, made before the fork.
std::vector<OwnFd> nodeRegions(uint32_t nodes, uint32_t perNode) {
  std::vector<OwnFd> regions;
  for (uint32_t k = 0; k < nodes && perNode > 1; ++k) {
    regions.emplace_back(createSharedCollective(perNode));
  }
  return regions;
}

// Rank r's collective over the whole group: its node's region (or the identity) plus Gloo.
std::unique_ptr<Collective> joinRank(uint32_t r, uint32_t nodes, uint32_t perNode,
                                     const std::vector<OwnFd>& regions, const std::string& dir,
                                     int64_t timeoutMs, const std::string& group = "tp") {
  const uint32_t node = r / perNode;
  std::unique_ptr<Collective> local =
      perNode == 1 ? makeSingleRankCollective()
                   : joinSharedCollective(regions[node].get(), r % perNode, perNode, timeoutMs);
  auto store = makeDirectoryStore(dir);
  CrossNodeJoin join;
  join.rank = r;
  join.ranks = nodes * perNode;
  join.ranksPerNode = perNode;
  join.listenAddress = nodeAddress(node);
  join.timeoutMs = timeoutMs;
  join.groupKey = group;
  return joinCrossNodeCollective(join, std::move(local), *store);
}

int countThreads() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    (void)e;
    ++n;
  }
  return n;
}

}  // namespace

TEST_CASE("all-reduce across 2 nodes x 1, 2 x 2 and 4 x 1 ranks is bit-identical to the rank-order sum on every rank, over 200 operations, and all-gather places rank r at r times n") {
  struct Layout {
    uint32_t nodes;
    uint32_t perNode;
  };
  for (Layout layout : {Layout{2, 1}, Layout{2, 2}, Layout{4, 1}}) {
    const uint32_t ranks = layout.nodes * layout.perNode;
    CAPTURE(layout.nodes);
    CAPTURE(layout.perNode);
    int fdsBefore = countFds();
    {
      StoreDir dir;
      std::vector<OwnFd> regions = nodeRegions(layout.nodes, layout.perNode);
      SharedPage page(kMaxTestRanks * kBigN);
      FinishTogether finish;
      Children children;
      for (uint32_t r = 0; r < ranks; ++r) {
        children.spawn([&, r] {
          RankReport& rep = page.report(r);
          auto c = joinRank(r, layout.nodes, layout.perNode, regions, dir.path(), kChildWaitMs);
          if (c->rank() != r || c->size() != ranks) return 2;
          std::vector<float> data(kBigN);
          for (uint32_t op = 0; op < kOps; ++op) {
            size_t n = kOpSizes[op % 3];
            for (size_t i = 0; i < n; ++i) data[i] = valueAt(op, r, i);
            c->allReduceSum(data.data(), n);
            for (size_t i = 0; i < n; ++i) {
              if (!sameBits(data[i], expectedSum(op, ranks, i))) rep.mismatches++;
            }
          }
          std::vector<float> mine(kBigN);
          std::vector<float> all(size_t(ranks) * kBigN, -1.0f);
          for (size_t i = 0; i < kBigN; ++i) mine[i] = valueAt(kOps, r, i);
          c->allGather(mine.data(), kBigN, all.data());
          for (uint32_t q = 0; q < ranks; ++q) {
            for (size_t i = 0; i < kBigN; ++i) {
              if (!sameBits(all[q * kBigN + i], valueAt(kOps, q, i))) rep.mismatches++;
            }
          }
          std::memcpy(page.floats() + r * kBigN, data.data(), kBigN * sizeof(float));
          rep.done = 1;
          return finish.leave(0);
        });
      }
      CHECK(finish.releaseAll(int(ranks), 30000) == int(ranks));
      for (uint32_t r = 0; r < ranks; ++r) CHECK(children.wait(r, 10000) == 0);
      for (uint32_t r = 0; r < ranks; ++r) {
        CAPTURE(r);
        CHECK(page.report(r).done == 1);
        CHECK(page.report(r).mismatches == 0);
        // The last all-reduce (199 % 3 == 1: 2500 floats), the same bits on every rank.
        CHECK(std::memcmp(page.floats() + r * kBigN, page.floats(), kBigN * sizeof(float)) == 0);
      }
    }
    CHECK(noChildLeft());
    CHECK(countFds() == fdsBefore);
  }
}

TEST_CASE("a rank on another node killed during a collective makes the others fail within a second, and every later call fail at once") {
  constexpr uint32_t nodes = 2;
  constexpr uint32_t perNode = 2;
  constexpr uint32_t ranks = nodes * perNode;
  constexpr uint32_t victim = 3;  // node 1's second rank
  int fdsBefore = countFds();
  {
    StoreDir dir;
    std::vector<OwnFd> regions = nodeRegions(nodes, perNode);
    SharedPage page(0);
    Pipe events;  // 'p' the victim is parked, 'e' a survivor enters the operation
    Pipe never;
    FinishTogether finish;
    Children children;
    for (uint32_t r = 0; r < ranks; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        // The timeout is far off: only the death can end the wait quickly.
        auto c = joinRank(r, nodes, perNode, regions, dir.path(), kChildWaitMs);
        float warm[2] = {1, float(r)};
        c->allReduceSum(warm, 2);
        if (warm[0] != float(ranks) || warm[1] != 6.0f) return 2;
        if (r == victim) {
          writeByte(events.write.get(), 'p');
          readByte(never.read.get(), kChildWaitMs);
          return 3;
        }
        float x[4] = {1, 1, 1, 1};
        writeByte(events.write.get(), 'e');
        rep.startNs = monoNs();
        try {
          c->allReduceSum(x, 4);
          return 4;
        } catch (const CollectiveError& e) {
          rep.thrownAtNs = monoNs();
          copyWhat(rep.what, e.what());
        }
        int64_t again = monoNs();
        try {
          c->allReduceSum(x, 4);
          return 5;
        } catch (const CollectiveError& e) {
          rep.secondElapsedNs = monoNs() - again;
          copyWhat(rep.secondWhat, e.what());
        }
        rep.done = 1;
        return finish.leave(0);
      });
    }
    int parked = 0;
    int entered = 0;
    for (uint32_t i = 0; i < ranks; ++i) {
      char c = readByte(events.read.get(), 10000);
      parked += c == 'p';
      entered += c == 'e';
    }
    REQUIRE(parked == 1);
    REQUIRE(entered == 3);
    int64_t killedAt = monoNs();
    REQUIRE(::kill(children.pid(victim), SIGKILL) == 0);
    CHECK(finish.releaseAll(3, 10000) == 3);
    for (uint32_t r = 0; r < 3; ++r) {
      CAPTURE(r);
      CHECK(children.wait(r, 10000) == 0);
      const RankReport& rep = page.report(r);
      CHECK(rep.done == 1);
      double seconds = double(rep.thrownAtNs - killedAt) / 1e9;
      CAPTURE(seconds);
      CHECK(rep.thrownAtNs > 0);
      CHECK(seconds < 1.0);
      std::string what = rep.what;
      CAPTURE(what);
      // Node 0's ranks lose a TCP connection; rank 2 (the victim's node) sees it by pidfd or by
      // its connections, whichever comes first.
      if (r < 2) CHECK(what.find("lost the connection") != std::string::npos);
      CHECK(rep.secondElapsedNs < 200000000);
      CHECK(std::string(rep.secondWhat).find("broken") != std::string::npos);
    }
    CHECK(children.wait(victim, 10000) == 128 + SIGKILL);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a stopped rank on another node makes its peers time out after timeoutMs") {
  constexpr int64_t timeoutMs = 300;
  int fdsBefore = countFds();
  {
    StoreDir dir;
    std::vector<OwnFd> regions;
    SharedPage page(0);
    Pipe events;  // 'p': rank 1 finished the first operation
    Pipe go;      // test -> rank 0: rank 1 is stopped, enter the second operation
    Pipe never;
    Children children;
    for (uint32_t r = 0; r < 2; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        auto c = joinRank(r, 2, 1, regions, dir.path(), timeoutMs);
        float warm[1] = {1};
        c->allReduceSum(warm, 1);
        if (r == 1) {
          writeByte(events.write.get(), 'p');
          readByte(never.read.get(), kChildWaitMs);
          return 3;
        }
        if (readByte(go.read.get(), kChildWaitMs) != 'g') return 6;
        float x[2] = {1, 2};
        rep.startNs = monoNs();
        try {
          c->allReduceSum(x, 2);
          return 4;
        } catch (const CollectiveError& e) {
          rep.thrownAtNs = monoNs();
          copyWhat(rep.what, e.what());
        }
        rep.done = 1;
        return 0;
      });
    }
    REQUIRE(readByte(events.read.get(), 10000) == 'p');
    REQUIRE(::kill(children.pid(1), SIGSTOP) == 0);
    REQUIRE(waitUntilStopped(children.pid(1), 5000));
    writeByte(go.write.get(), 'g');
    CHECK(children.wait(0, 10000) == 0);
    const RankReport& rep = page.report(0);
    CHECK(rep.done == 1);
    double ms = double(rep.thrownAtNs - rep.startNs) / 1e6;
    CAPTURE(ms);
    CHECK(ms >= double(timeoutMs));
    CHECK(ms < 3000.0);
    std::string what = rep.what;
    CAPTURE(what);
    CHECK(what.find("timed out after 300 ms") != std::string::npos);
    CHECK(what.find("another node") != std::string::npos);
    REQUIRE(::kill(children.pid(1), SIGKILL) == 0);
    CHECK(children.wait(1, 10000) == 128 + SIGKILL);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("cancel from another thread ends a wait for a peer on another node at once") {
  int fdsBefore = countFds();
  {
    StoreDir dir;
    std::vector<OwnFd> regions;
    SharedPage page(0);
    Pipe events;
    Pipe never;
    Children children;
    for (uint32_t r = 0; r < 2; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        auto c = joinRank(r, 2, 1, regions, dir.path(), kChildWaitMs);
        float warm[1] = {1};
        c->allReduceSum(warm, 1);
        if (r == 1) {  // joined, then never enters the next operation
          writeByte(events.write.get(), 'p');
          readByte(never.read.get(), kChildWaitMs);
          return 3;
        }
        std::atomic<int64_t> cancelledAt{0};
        std::thread canceller([&] {
          // Rank 0 is inside the operation (or about to be: a cancel before the wait counts too).
          struct timespec t {0, 100 * 1000 * 1000};
          ::nanosleep(&t, nullptr);
          cancelledAt = monoNs();
          c->cancel();
        });
        float x[2] = {1, 2};
        try {
          c->allReduceSum(x, 2);
        } catch (const CollectiveError& e) {
          rep.thrownAtNs = monoNs();
          copyWhat(rep.what, e.what());
        }
        canceller.join();
        rep.startNs = cancelledAt.load();
        rep.done = 1;
        return 0;
      });
    }
    REQUIRE(readByte(events.read.get(), 10000) == 'p');
    CHECK(children.wait(0, 10000) == 0);
    const RankReport& rep = page.report(0);
    CHECK(rep.done == 1);
    CHECK(std::string(rep.what).find("cancelled") != std::string::npos);
    CHECK(double(rep.thrownAtNs - rep.startNs) / 1e9 < 1.0);
    REQUIRE(::kill(children.pid(1), SIGKILL) == 0);
    CHECK(children.wait(1, 10000) == 128 + SIGKILL);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a rank whose peers never join fails the rendezvous after timeoutMs, naming what it waited for") {
  StoreDir dir;
  auto store = makeDirectoryStore(dir.path());
  CrossNodeJoin join;
  join.rank = 1;
  join.ranks = 2;
  join.listenAddress = "127.0.0.2";
  join.timeoutMs = 300;
  int64_t start = monoNs();
  std::string what;
  try {
    joinCrossNodeCollective(join, makeSingleRankCollective(), *store);
  } catch (const CollectiveError& e) {
    what = e.what();
  }
  double ms = double(monoNs() - start) / 1e6;
  CAPTURE(what);
  CAPTURE(ms);
  CHECK(what.find("rank 1 of 2") != std::string::npos);
  CHECK(what.find("rendezvous") != std::string::npos);
  CHECK(what.find("tp/0") != std::string::npos);  // rank 0's address, the first it needs
  CHECK(what.find("300 ms") != std::string::npos);
  CHECK(ms >= 300.0);
  CHECK(ms < 3000.0);
}

TEST_CASE("before connect() every operation fails at once, and a peer that is gone by then fails the connect within the timeout, naming it") {
  CrossNodeJoin join;
  join.ranks = 2;
  join.timeoutMs = 500;
  join.rank = 1;
  join.listenAddress = "127.0.0.2";
  std::vector<char> goneAddress;
  {
    auto peer = listenCrossNode(join, makeSingleRankCollective());
    goneAddress = peer->address();
  }  // rank 1 closed its sockets: nobody is there any more
  join.rank = 0;
  join.listenAddress = "127.0.0.1";
  auto c = listenCrossNode(join, makeSingleRankCollective());
  CHECK_FALSE(c->address().empty());
  CHECK(c->address().size() == goneAddress.size());
  float x[2] = {1, 2};
  std::string what;
  try {
    c->allReduceSum(x, 2);
  } catch (const CollectiveError& e) {
    what = e.what();
  }
  CHECK(what.find("not connected") != std::string::npos);
  int64_t start = monoNs();
  what.clear();
  try {
    c->connect({{}, goneAddress});
  } catch (const CollectiveError& e) {
    what = e.what();
  }
  double ms = double(monoNs() - start) / 1e6;
  CAPTURE(what);
  CAPTURE(ms);
  CHECK(what.find("cannot connect to rank 1") != std::string::npos);
  CHECK(ms < 3000.0);
  // A table of the wrong shape is refused before anything is tried.
  auto d = listenCrossNode(join, makeSingleRankCollective());
  CHECK_THROWS_AS(d->connect({{}}), CollectiveError);
  CHECK_THROWS_AS(d->connect({{}, std::vector<char>(3)}), CollectiveError);
}

TEST_CASE("a listen address that is not this machine's is refused with the address named") {
  StoreDir dir;
  auto store = makeDirectoryStore(dir.path());
  CrossNodeJoin join;
  join.rank = 0;
  join.ranks = 2;
  join.listenAddress = "192.0.2.1";  // TEST-NET-1: never assigned to a host
  join.timeoutMs = 300;
  std::string what;
  try {
    joinCrossNodeCollective(join, makeSingleRankCollective(), *store);
  } catch (const CollectiveError& e) {
    what = e.what();
  }
  CAPTURE(what);
  CHECK(what.find("192.0.2.1") != std::string::npos);
  CHECK(what.find("cannot listen") != std::string::npos);
}

TEST_CASE("a layout that does not add up is refused before anything is opened") {
  StoreDir dir;
  auto store = makeDirectoryStore(dir.path());
  CrossNodeJoin join;
  join.rank = 0;
  join.ranks = 3;
  join.ranksPerNode = 2;
  CHECK_THROWS_AS(joinCrossNodeCollective(join, makeSingleRankCollective(), *store),
                  std::invalid_argument);
  join.ranks = 2;
  join.ranksPerNode = 1;
  join.rank = 2;
  CHECK_THROWS_AS(joinCrossNodeCollective(join, makeSingleRankCollective(), *store),
                  std::invalid_argument);
  // The node's collective must be this rank's place in its node.
  join.rank = 1;
  join.ranksPerNode = 2;
  CHECK_THROWS_AS(joinCrossNodeCollective(join, makeSingleRankCollective(), *store),
                  std::invalid_argument);
  CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("a rank that joins and leaves three groups in turn leaves no socket and no Gloo thread behind") {
  int fdsBefore = countFds();
  {
    StoreDir dir;
    std::vector<OwnFd> regions;
    SharedPage page(0);
    FinishTogether finish;
    Children children;
    for (uint32_t r = 0; r < 2; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        const int fds = countFds();
        const int threads = countThreads();
        // One group per engine start: each under a key of its own in the same store.
        for (int round = 0; round < 3; ++round) {
          auto c = joinRank(r, 2, 1, regions, dir.path(), kChildWaitMs,
                            "start-" + std::to_string(round));
          float x[3] = {1, 2, float(r)};
          c->allReduceSum(x, 3);
          if (x[0] != 2.0f || x[2] != 1.0f) rep.mismatches++;
          c.reset();
        }
        rep.startNs = countFds() - fds;            // fds the collectives left open
        rep.thrownAtNs = countThreads() - threads;  // threads they left running
        rep.done = 1;
        return finish.leave(0);
      });
    }
    CHECK(finish.releaseAll(2, 30000) == 2);
    for (uint32_t r = 0; r < 2; ++r) {
      CAPTURE(r);
      CHECK(children.wait(r, 10000) == 0);
      CHECK(page.report(r).done == 1);
      CHECK(page.report(r).mismatches == 0);
      CHECK(page.report(r).startNs == 0);
      CHECK(page.report(r).thrownAtNs == 0);
    }
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

}  // namespace vsup::engine
