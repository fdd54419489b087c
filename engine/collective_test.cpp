// The shared-memory collective between real processes: the test process forks the ranks
// (it is single-threaded when it forks), they join one memfd region, and they report what they
// saw through a separate MAP_SHARED page. Every wait is bounded: children wait with poll()
// timeouts and die with the test process (PR_SET_PDEATHSIG), and the test process waits for them
// through pidfds with a deadline, then SIGKILLs and reaps whatever is left.
#include "engine/collective.h"

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "engine/rank_test_util.h"

namespace vsup::engine {
namespace {

using namespace rank_test;

constexpr size_t kSlotFloats = 1000;  // small: operations of 2500 floats take three rounds
constexpr size_t kOpSizes[] = {7, 2500, 1000};
constexpr uint32_t kOps = 200;
constexpr size_t kBigN = 2500;

}  // namespace

TEST_CASE("all-reduce over 2 and 4 ranks sums bit-identically on every rank, over rounds and 200 consecutive operations") {
  for (uint32_t ranks : {2u, 4u}) {
    CAPTURE(ranks);
    int fdsBefore = countFds();
    {
      SharedPage page(kMaxTestRanks * kBigN);
      OwnFd fd(createSharedCollective(ranks, kSlotFloats));
      FinishTogether finish;
      Children children;
      for (uint32_t r = 0; r < ranks; ++r) {
        children.spawn([&, r] {
          RankReport& rep = page.report(r);
          auto c = joinSharedCollective(fd.get(), r, ranks, kChildWaitMs, kSlotFloats);
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
          // The last operation (199 % 3 == 1: 2500 floats) for the test process to compare.
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
        size_t wrong = 0;
        for (size_t i = 0; i < kBigN; ++i) {
          if (!sameBits(page.floats()[r * kBigN + i], expectedSum(kOps - 1, ranks, i))) ++wrong;
        }
        CHECK(wrong == 0);
        CHECK(std::memcmp(page.floats() + r * kBigN, page.floats(), kBigN * sizeof(float)) == 0);
      }
    }
    CHECK(noChildLeft());
    CHECK(countFds() == fdsBefore);
  }
}

TEST_CASE("all-gather places rank r's data at r times n on every rank, over rounds") {
  constexpr uint32_t ranks = 3;
  int fdsBefore = countFds();
  {
    SharedPage page(ranks * ranks * kBigN);
    OwnFd fd(createSharedCollective(ranks, kSlotFloats));
    FinishTogether finish;
    Children children;
    for (uint32_t r = 0; r < ranks; ++r) {
      children.spawn([&, r] {
        auto c = joinSharedCollective(fd.get(), r, ranks, kChildWaitMs, kSlotFloats);
        std::vector<float> all(ranks * kBigN, -1.0f);
        // A small gather, then one of three rounds.
        for (size_t n : {size_t(5), kBigN}) {
          std::vector<float> mine(n);
          for (size_t i = 0; i < n; ++i) mine[i] = valueAt(uint32_t(n), r, i);
          c->allGather(mine.data(), n, all.data());
          for (uint32_t q = 0; q < ranks; ++q) {
            for (size_t i = 0; i < n; ++i) {
              if (!sameBits(all[q * n + i], valueAt(uint32_t(n), q, i))) page.report(r).mismatches++;
            }
          }
        }
        std::memcpy(page.floats() + r * ranks * kBigN, all.data(), all.size() * sizeof(float));
        page.report(r).done = 1;
        return finish.leave(0);
      });
    }
    CHECK(finish.releaseAll(int(ranks), 30000) == int(ranks));
    for (uint32_t r = 0; r < ranks; ++r) CHECK(children.wait(r, 10000) == 0);
    for (uint32_t r = 0; r < ranks; ++r) {
      CAPTURE(r);
      CHECK(page.report(r).done == 1);
      CHECK(page.report(r).mismatches == 0);
      const float* all = page.floats() + r * ranks * kBigN;
      size_t wrong = 0;
      for (uint32_t q = 0; q < ranks; ++q) {
        for (size_t i = 0; i < kBigN; ++i) {
          if (!sameBits(all[q * kBigN + i], valueAt(uint32_t(kBigN), q, i))) ++wrong;
        }
      }
      CHECK(wrong == 0);
    }
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a peer killed during a collective makes the others fail within a second naming it, and every later call fail at once") {
  constexpr uint32_t ranks = 3;
  constexpr uint32_t victim = 1;
  int fdsBefore = countFds();
  {
    SharedPage page(0);
    OwnFd fd(createSharedCollective(ranks, kSlotFloats));
    Pipe events;  // children -> test: 'p' the victim is parked, 'e' a survivor enters the op
    Pipe never;   // nothing is ever written: the victim waits on it until it is killed
    FinishTogether finish;
    Children children;
    for (uint32_t r = 0; r < ranks; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        // The timeout is far off: only the death can end the wait quickly.
        auto c = joinSharedCollective(fd.get(), r, ranks, kChildWaitMs, kSlotFloats);
        float warm[4] = {1, 2, 3, float(r)};
        c->allReduceSum(warm, 4);  // every rank has joined and published its pid
        if (warm[0] != float(ranks) || warm[3] != 3.0f) return 2;
        if (r == victim) {
          writeByte(events.write.get(), 'p');
          readByte(never.read.get(), kChildWaitMs);
          return 3;  // not killed in time
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
        // Stay until both survivors have failed: a survivor that exits first would itself be
        // a dead peer to the other, which might then name it instead of the victim.
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
    REQUIRE(entered == 2);
    // Kill the victim only once both survivors sleep in the barrier.
    for (uint32_t r : {0u, 2u}) {
      bool waiting = waitUntilInFutex("/proc/" + std::to_string(children.pid(r)) + "/syscall", 5000);
      if (!waiting) WARN_MESSAGE(false, "could not see rank ", r, " wait in futex()");
    }
    int64_t killedAt = monoNs();
    REQUIRE(::kill(children.pid(victim), SIGKILL) == 0);
    CHECK(finish.releaseAll(2, 10000) == 2);
    for (uint32_t r : {0u, 2u}) {
      CAPTURE(r);
      CHECK(children.wait(r, 10000) == 0);
      const RankReport& rep = page.report(r);
      CHECK(rep.done == 1);
      double seconds = double(rep.thrownAtNs - killedAt) / 1e9;
      CAPTURE(seconds);
      CHECK(rep.thrownAtNs > 0);
      CHECK(seconds < 3.0);
      std::string what = rep.what;
      CAPTURE(what);
      CHECK(what.find("rank 1") != std::string::npos);
      CHECK(what.find("died") != std::string::npos);
      CHECK(what.find(std::to_string(children.pid(victim))) != std::string::npos);
      // Broken for good: the next call does not wait at all.
      CHECK(rep.secondElapsedNs < 200000000);
      CHECK(std::string(rep.secondWhat).find("broken") != std::string::npos);
    }
    CHECK(children.wait(victim, 10000) == 128 + SIGKILL);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a peer that never arrives makes the others time out after timeoutMs") {
  constexpr uint32_t ranks = 2;
  constexpr int64_t timeoutMs = 300;
  int fdsBefore = countFds();
  {
    SharedPage page(0);
    OwnFd fd(createSharedCollective(ranks, kSlotFloats));
    Pipe events;  // 'p': rank 1 finished the first operation
    Pipe go;      // test -> rank 0: rank 1 is stopped, enter the second operation
    Pipe never;
    Children children;
    for (uint32_t r = 0; r < ranks; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        auto c = joinSharedCollective(fd.get(), r, ranks, timeoutMs, kSlotFloats);
        float x[2] = {1, 2};
        c->allReduceSum(x, 2);
        if (r == 1) {
          writeByte(events.write.get(), 'p');
          readByte(never.read.get(), kChildWaitMs);
          return 3;
        }
        if (readByte(go.read.get(), kChildWaitMs) != 'g') return 6;
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
    CHECK(what.find("timed out") != std::string::npos);
    CHECK(what.find("300 ms") != std::string::npos);
    REQUIRE(::kill(children.pid(1), SIGKILL) == 0);
    CHECK(children.wait(1, 10000) == 128 + SIGKILL);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("cancel from another thread makes a rank waiting for its peers fail at once") {
  int fdsBefore = countFds();
  {
    OwnFd fd(createSharedCollective(2, kSlotFloats));
    // Rank 1 never joins; only cancel() can end rank 0's wait before the (far) timeout.
    auto c = joinSharedCollective(fd.get(), 0, 2, kChildWaitMs, kSlotFloats);
    std::string self = "/proc/self/task/" + std::to_string(::gettid()) + "/syscall";
    std::atomic<bool> sawWait{false};
    std::atomic<int64_t> cancelledAt{0};
    std::thread canceller([&] {
      sawWait = waitUntilInFutex(self, 5000);
      cancelledAt = monoNs();
      c->cancel();
    });
    float x[3] = {1, 2, 3};
    std::string what;
    int64_t start = monoNs();
    try {
      c->allReduceSum(x, 3);
    } catch (const CollectiveError& e) {
      what = e.what();
    }
    int64_t end = monoNs();
    canceller.join();
    CHECK(sawWait);
    CHECK(what.find("cancelled") != std::string::npos);
    CHECK(double(end - start) / 1e9 < 6.0);  // the thread's own bound is 5 s
    CHECK(double(end - cancelledAt.load()) / 1e9 < 1.0);
    // Broken for good.
    int64_t again = monoNs();
    CHECK_THROWS_AS(c->allReduceSum(x, 3), CollectiveError);
    float all[6];
    CHECK_THROWS_AS(c->allGather(x, 3, all), CollectiveError);
    CHECK(double(monoNs() - again) / 1e9 < 0.2);
  }
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a rank whose peer completed the barrier and then exited still completes the collective") {
  // The barrier completed (the peer arrived last and bumped the generation), so the waiting
  // rank holds a valid result; the peer's exit afterwards must not turn it into an error.
  // Rank 0 is stopped while it waits, so that when it wakes, its periodic peer check (every
  // 100 ms) is due and finds rank 1 gone.
  constexpr uint32_t ranks = 2;
  int fdsBefore = countFds();
  {
    SharedPage page(2);
    OwnFd fd(createSharedCollective(ranks, kSlotFloats));
    Pipe events;  // rank 0 -> test: 'e' entering the operation
    Pipe go;      // test -> rank 1: arrive now
    Children children;
    for (uint32_t r = 0; r < ranks; ++r) {
      children.spawn([&, r] {
        RankReport& rep = page.report(r);
        auto c = joinSharedCollective(fd.get(), r, ranks, kChildWaitMs, kSlotFloats);
        float warm[1] = {1};
        c->allReduceSum(warm, 1);
        float x[2] = {r == 0 ? 1.0f : 10.0f, r == 0 ? 2.0f : 20.0f};
        if (r == 1) {
          if (readByte(go.read.get(), kChildWaitMs) != 'g') return 6;
          c->allReduceSum(x, 2);
          return 0;  // and exits at once
        }
        writeByte(events.write.get(), 'e');
        try {
          c->allReduceSum(x, 2);
          page.floats()[0] = x[0];
          page.floats()[1] = x[1];
        } catch (const CollectiveError& e) {
          copyWhat(rep.what, e.what());
        }
        rep.done = 1;
        return 0;
      });
    }
    REQUIRE(readByte(events.read.get(), 10000) == 'e');
    REQUIRE(waitUntilInFutex("/proc/" + std::to_string(children.pid(0)) + "/syscall", 5000));
    REQUIRE(::kill(children.pid(0), SIGSTOP) == 0);
    REQUIRE(waitUntilStopped(children.pid(0), 5000));
    int64_t stoppedAt = monoNs();
    writeByte(go.write.get(), 'g');
    CHECK(children.wait(1, 10000) == 0);
    // Rank 0's next wake must fall due for a peer check: keep it stopped for 150 ms in all.
    // (The time stopped is the scenario itself, not a wait for an event.)
    int64_t left = stoppedAt + 150000000 - monoNs();
    if (left > 0) {
      struct timespec t {0, long(left)};
      ::nanosleep(&t, nullptr);
    }
    REQUIRE(::kill(children.pid(0), SIGCONT) == 0);
    CHECK(children.wait(0, 10000) == 0);
    const RankReport& rep = page.report(0);
    CHECK(rep.done == 1);
    std::string what = rep.what;
    CHECK_MESSAGE(what.empty(), "rank 0 failed a completed collective: ", what);
    CHECK(page.floats()[0] == 11.0f);
    CHECK(page.floats()[1] == 22.0f);
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("the single-rank collective is the identity") {
  auto c = makeSingleRankCollective();
  CHECK(c->rank() == 0);
  CHECK(c->size() == 1);
  float x[3] = {1.5f, -2.0f, 1e-30f};
  c->allReduceSum(x, 3);
  CHECK(x[0] == 1.5f);
  CHECK(x[1] == -2.0f);
  CHECK(x[2] == 1e-30f);
  float all[3] = {0, 0, 0};
  c->allGather(x, 3, all);
  CHECK(std::memcmp(all, x, sizeof(x)) == 0);
  c->cancel();
  c->allReduceSum(x, 3);  // nothing to wait for: cancel changes nothing
  CHECK(x[0] == 1.5f);
}

TEST_CASE("the region's memfd is close-on-exec and a rank that leaves unmaps it and closes its pidfds") {
  int fdsBefore = countFds();
  {
    OwnFd fd(createSharedCollective(2, kSlotFloats));
    int flags = ::fcntl(fd.get(), F_GETFD);
    CHECK((flags & FD_CLOEXEC) != 0);
    char link[256] = {};
    ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd.get())).c_str(), link,
                           sizeof(link) - 1);
    CHECK(n > 0);
    CHECK(std::string(link).find("memfd:vsup-tp") != std::string::npos);
    CHECK(::lseek(fd.get(), 0, SEEK_END) == off_t(sharedCollectiveBytes(2, kSlotFloats)));
    Pipe release;
    Children children;
    children.spawn([&] {
      auto c = joinSharedCollective(fd.get(), 1, 2, kChildWaitMs, kSlotFloats);
      // Arrive late, so that rank 0 (this test process) waits long enough to watch this rank
      // through a pidfd (it checks its peers every 100 ms). Not synchronisation: any delay works.
      struct timespec t {0, 300000000};
      ::nanosleep(&t, nullptr);
      float x[2] = {10, 20};
      c->allReduceSum(x, 2);
      if (readByte(release.read.get(), kChildWaitMs) != 'r') return 7;
      return x[0] == 11.0f && x[1] == 22.0f ? 0 : 2;
    });
    {
      auto c = joinSharedCollective(fd.get(), 0, 2, kChildWaitMs, kSlotFloats);
      CHECK(mapsMention("vsup-tp"));
      float x[2] = {1, 2};
      c->allReduceSum(x, 2);
      CHECK(x[0] == 11.0f);
      CHECK(x[1] == 22.0f);
      writeByte(release.write.get(), 'r');
      CHECK(children.wait(0, 10000) == 0);
    }
    CHECK_FALSE(mapsMention("vsup-tp"));  // the mapping went with the collective
  }
  CHECK(noChildLeft());
  CHECK(countFds() == fdsBefore);
}

TEST_CASE("a group of no ranks, a rank outside the group, or a region of the wrong size is refused") {
  CHECK_THROWS_AS(createSharedCollective(0, kSlotFloats), std::invalid_argument);
  CHECK_THROWS_AS(createSharedCollective(65, kSlotFloats), std::invalid_argument);
  int fdsBefore = countFds();
  {
    OwnFd fd(createSharedCollective(2, kSlotFloats));
    CHECK_THROWS_AS(joinSharedCollective(fd.get(), 2, 2, 1000, kSlotFloats), std::invalid_argument);
    std::string what;
    try {
      joinSharedCollective(fd.get(), 0, 4, 1000, kSlotFloats);
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    CHECK(what.find("expected " + std::to_string(sharedCollectiveBytes(4, kSlotFloats))) !=
          std::string::npos);
  }
  CHECK(countFds() == fdsBefore);
  CHECK_FALSE(mapsMention("vsup-tp"));
}

}  // namespace vsup::engine
