// The CUDA engine's wait-and-abort state machine against a scripted fake of CUDA and NCCL: a
// communicator is aborted exactly once, from the compute thread, on every kind of failure, and
// nothing is called on it afterwards.
#include <doctest/doctest.h>

#include <atomic>
#include <deque>
#include <string>
#include <thread>

#include "engine/comm_guard.h"

using vsup::engine::CollectiveError;
using vsup::engine::CommDevice;
using vsup::engine::CommGuard;
using vsup::engine::CommGuardOptions;

namespace {

using State = CommDevice::State;

// Answers from scripts (the last answer repeats), counts every call and where it came from.
class FakeDevice final : public CommDevice {
 public:
  std::deque<State> comm{State::Done};
  std::deque<State> work{State::Done};
  std::string why = "unhandled cuda error";
  int finalizes = 0, destroys = 0, aborts = 0, callsAfterAbort = 0;
  std::thread::id abortThread;

  State commState(std::string& w) override { return next(comm, w); }
  State workState(std::string& w) override { return next(work, w); }
  void finalize() override {
    seen();
    ++finalizes;
  }
  void destroy() override {
    seen();
    ++destroys;
  }
  void abort() override {
    seen();
    ++aborts;
    abortThread = std::this_thread::get_id();
  }

 private:
  void seen() {
    if (aborts > 0) ++callsAfterAbort;
  }
  State next(std::deque<State>& script, std::string& w) {
    seen();
    State s = script.front();
    if (script.size() > 1) script.pop_front();
    if (s == State::Failed) w = why;
    return s;
  }
};

CommGuardOptions options(int64_t timeoutMs = 2000) {
  CommGuardOptions o;
  o.rank = 1;
  o.timeoutMs = timeoutMs;
  return o;
}

std::string failureOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const CollectiveError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("a non-blocking init in progress is polled until it completes, and a clean end "
          "finalizes then destroys without an abort") {
  FakeDevice d;
  d.comm = {State::Pending, State::Pending, State::Pending, State::Done};
  {
    CommGuard g(d, options());
    g.awaitInit(1000);
    d.work = {State::Pending, State::Pending, State::Done};
    g.awaitStep();
    d.comm = {State::Pending, State::Done};  // finalize runs, then completes
    g.finalize();
    CHECK(g.closed());
    CHECK_FALSE(g.broken());
    g.finalize();  // idempotent
  }
  CHECK(d.finalizes == 1);
  CHECK(d.destroys == 1);
  CHECK(d.aborts == 0);
}

TEST_CASE("an init that never completes times out and aborts once; later calls fail at once") {
  FakeDevice d;
  d.comm = {State::Pending};
  CommGuard g(d, options());
  std::string why = failureOf([&] { g.awaitInit(50); });
  CHECK(why.find("rank 1: timed out after 50 ms waiting for the communicator's initialisation") !=
        std::string::npos);
  CHECK(d.aborts == 1);
  CHECK(g.broken());
  CHECK(failureOf([&] { g.awaitStep(); }) == why);
  CHECK(failureOf([&] { g.finalize(); }) == why);
  CHECK(d.callsAfterAbort == 0);
  CHECK(d.destroys == 0);
}

TEST_CASE("an asynchronous NCCL error in a step aborts once and fails the step") {
  FakeDevice d;
  CommGuard g(d, options());
  g.awaitInit(1000);
  d.why = "remote process exited or there was a network error";
  d.work = {State::Pending};
  d.comm = {State::Done, State::Done, State::Failed};
  std::string why = failureOf([&] { g.awaitStep(); });
  CHECK(why.find("a step's collectives: NCCL: remote process exited") != std::string::npos);
  CHECK(d.aborts == 1);
  CHECK(failureOf([&] { g.awaitStep(); }) == why);
  CHECK(d.callsAfterAbort == 0);
}

TEST_CASE("a CUDA error in the step's work aborts the communicator too") {
  FakeDevice d;
  CommGuard g(d, options());
  d.why = "an illegal memory access was encountered";
  d.work = {State::Failed};
  CHECK(failureOf([&] { g.awaitStep(); }).find("CUDA: an illegal memory access") !=
        std::string::npos);
  CHECK(d.aborts == 1);
}

TEST_CASE("a step whose work never completes times out after the collective timeout") {
  FakeDevice d;
  CommGuard g(d, options(80));
  d.work = {State::Pending};
  auto start = std::chrono::steady_clock::now();
  std::string why = failureOf([&] { g.awaitStep(); });
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::steady_clock::now() - start)
                .count();
  CHECK(why.find("timed out after 80 ms waiting for a step's collectives") != std::string::npos);
  CHECK(ms >= 80);
  CHECK(ms < 2000);
  CHECK(d.aborts == 1);
}

TEST_CASE("a dead peer fails the step at once, naming the peer") {
  FakeDevice d;
  CommGuardOptions o = options(60000);
  std::atomic<int> checks{0};
  o.deadPeer = [&]() -> std::string {
    return ++checks >= 2 ? "rank 0 (pid 4242) died" : "";
  };
  CommGuard g(d, o);
  d.work = {State::Pending};
  auto start = std::chrono::steady_clock::now();
  std::string why = failureOf([&] { g.awaitStep(); });
  CHECK(why == "rank 1: rank 0 (pid 4242) died while waiting for a step's collectives");
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  CHECK(d.aborts == 1);
  CHECK(d.callsAfterAbort == 0);
}

TEST_CASE("cancel from another thread: the compute thread aborts, exactly once") {
  FakeDevice d;
  std::atomic<bool> cancel{false};
  CommGuardOptions o = options(60000);
  o.cancel = &cancel;
  CommGuard g(d, o);
  d.work = {State::Pending};
  std::thread loop([&] { cancel.store(true, std::memory_order_release); });
  std::string why = failureOf([&] { g.awaitStep(); });
  loop.join();
  CHECK(why == "rank 1: cancelled while waiting for a step's collectives");
  CHECK(d.aborts == 1);
  CHECK(d.abortThread == std::this_thread::get_id());
  CHECK(failureOf([&] { g.awaitStep(); }) == why);
  CHECK(d.callsAfterAbort == 0);
}

TEST_CASE("a finalize that fails aborts instead of destroying") {
  FakeDevice d;
  {
    CommGuard g(d, options());
    d.why = "a peer left during finalize";
    d.comm = {State::Pending, State::Failed};
    CHECK(failureOf([&] { g.finalize(); }).find("the communicator's finalize: NCCL: a peer left") !=
          std::string::npos);
  }
  CHECK(d.finalizes == 1);
  CHECK(d.destroys == 0);
  CHECK(d.aborts == 1);
  CHECK(d.callsAfterAbort == 0);
}

TEST_CASE("a guard destroyed without a clean end aborts the communicator once") {
  FakeDevice d;
  { CommGuard g(d, options()); }
  CHECK(d.aborts == 1);
  CHECK(d.destroys == 0);
}

TEST_CASE("a call from another thread than the compute thread is refused") {
  FakeDevice d;
  CommGuard g(d, options());
  bool refused = false;
  std::thread other([&] {
    try {
      g.awaitStep();
    } catch (const std::logic_error&) {
      refused = true;
    }
  });
  other.join();
  CHECK(refused);
  CHECK(d.aborts == 0);
}

TEST_CASE("a rank torn down after a cancel that no step saw still finalizes: finalize is bounded "
          "by the timeout and the peers, not cancellable") {
  FakeDevice d;
  std::atomic<bool> cancel{true};
  CommGuardOptions o = options(2000);
  o.cancel = &cancel;
  {
    CommGuard g(d, o);
    d.comm = {State::Pending, State::Pending, State::Done};
    g.finalize();
    CHECK(g.closed());
    CHECK_FALSE(g.broken());
  }
  CHECK(d.destroys == 1);
  CHECK(d.aborts == 0);
}
