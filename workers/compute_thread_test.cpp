#include "workers/compute_thread.h"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <kj/vector.h>

#include "ipc/test_util.h"
#include "ipc/uv_kj.h"

namespace vsup::workers {
namespace {

TEST_CASE("jobs run on the compute thread in order and their results reach the loop thread") {
  testing::TestLoop loop;
  {
    ipc::KjOnUv kj(loop.get());
    ComputeThread compute;
    std::thread::id loopThread = std::this_thread::get_id();
    std::vector<int> order;  // written by jobs, read here after each promise: the hand-over
    kj::Vector<kj::Promise<void>> all;
    for (int i = 0; i < 100; ++i) {
      all.add(compute
                  .run<std::string>([i, &order, loopThread]() {
                    CHECK(std::this_thread::get_id() != loopThread);
                    order.push_back(i);
                    return std::string(size_t(i), 'x');
                  })
                  .then([i](std::string s) { CHECK(s.size() == size_t(i)); }));
    }
    kj::joinPromises(all.releaseAsArray()).wait(kj.waitScope());
    REQUIRE(order.size() == 100);
    for (int i = 0; i < 100; ++i) CHECK(order[size_t(i)] == i);
  }
}

TEST_CASE("a job that throws rejects its promise with the message and the thread goes on") {
  testing::TestLoop loop;
  {
    ipc::KjOnUv kj(loop.get());
    ComputeThread compute;
    auto failed = compute.run<int>([]() -> int { throw std::runtime_error("rank 1 died"); });
    bool rejected = false;
    failed
        .then([](int) { FAIL("a throwing job resolved"); },
              [&](kj::Exception&& e) {
                rejected = true;
                CHECK(std::string(e.getDescription().cStr()).find("rank 1 died") !=
                      std::string::npos);
              })
        .wait(kj.waitScope());
    CHECK(rejected);
    CHECK(compute.run<int>([]() { return 7; }).wait(kj.waitScope()) == 7);
  }
}

TEST_CASE("destroying the compute thread waits for the running job and drops queued ones") {
  testing::TestLoop loop;
  {
    ipc::KjOnUv kj(loop.get());
    std::atomic<bool> started{false};
    std::atomic<bool> release{false};
    std::atomic<bool> finished{false};
    std::atomic<bool> secondRan{false};
    std::thread releaser;
    {
      ComputeThread compute;
      auto first = compute.run<void>([&]() {
        started = true;
        while (!release.load()) std::this_thread::yield();
        finished = true;
      });
      auto second = compute.run<void>([&]() { secondRan = true; });
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!started.load() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
      REQUIRE(started.load());
      // Let the running job finish only once the destructor is about to wait for it.
      releaser = std::thread([&]() {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the destructor must wait
        release = true;
      });
    }  // the destructor drops the queued job and joins the running one
    releaser.join();
    CHECK(finished.load());
    CHECK_FALSE(secondRan.load());
  }
}

}  // namespace
}  // namespace vsup::workers
