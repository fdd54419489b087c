#include "workers/engine_core/step_executor.h"

#include <doctest/doctest.h>

#include <kj/debug.h>

#include "ipc/test_util.h"
#include "ipc/uv_kj.h"

namespace vsup::workers {
namespace {

using vsup::testing::TestLoop;

// A rank whose answer the test decides: at once, after a delay, never, or a failure.
class FakeRank final : public RankClient {
 public:
  enum class Mode { Answer, Silent, Fail, Disconnect };
  FakeRank(uv_loop_t* loop, uint32_t rank, Mode mode, uint64_t delayMs = 0)
      : loop_(loop), rank_(rank), mode_(mode), delayMs_(delayMs) {}

  kj::Promise<engine::StepOutput> step(const engine::StepInput& input) override {
    ++calls;
    engine::StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    out.tokens.assign(input.seqs.size(), 7);
    switch (mode_) {
      case Mode::Answer:
        return ipc::uvSleep(loop_, delayMs_).then([out]() { return out; });
      case Mode::Silent:
        return kj::NEVER_DONE;
      case Mode::Fail:
        return ipc::uvSleep(loop_, delayMs_).then([]() -> engine::StepOutput {
          KJ_FAIL_REQUIRE("collective: peer rank 1 died");
        });
      case Mode::Disconnect:
        return ipc::uvSleep(loop_, delayMs_).then([]() -> engine::StepOutput {
          kj::throwFatalException(
              kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__, kj::str("gone")));
        });
    }
    KJ_UNREACHABLE;
  }
  int calls = 0;

 private:
  uv_loop_t* loop_;
  uint32_t rank_;
  Mode mode_;
  uint64_t delayMs_;
};

engine::StepInput stepWith(uint64_t step, size_t seqs) {
  engine::StepInput in;
  in.step = step;
  in.seqs.resize(seqs);
  return in;
}

struct Fixture {
  TestLoop loop;
  std::unique_ptr<ipc::KjOnUv> kj = std::make_unique<ipc::KjOnUv>(loop.get());
  ~Fixture() { kj.reset(); }

  std::unique_ptr<StepExecutor> executor(std::vector<FakeRank::Mode> modes,
                                         std::vector<uint64_t> delays, uint64_t stepTimeoutMs,
                                         int64_t stragglerMs) {
    std::vector<std::unique_ptr<RankClient>> ranks;
    for (size_t r = 0; r < modes.size(); ++r) {
      ranks.push_back(std::make_unique<FakeRank>(loop.get(), uint32_t(r), modes[r], delays[r]));
    }
    return std::make_unique<StepExecutor>(loop.get(), std::move(ranks),
                                          StepExecutor::Options{stepTimeoutMs, stragglerMs});
  }

  // The step's error description ("" when it succeeded), and how long it took.
  std::string failure(StepExecutor& ex, const engine::StepInput& in, double* tookMs) {
    MonoNs t0 = monoNow();
    std::string why;
    ex.run(in)
        .then([](std::vector<engine::StepOutput>) {},
              [&why](kj::Exception&& e) { why = e.getDescription().cStr(); })
        .wait(kj->waitScope());
    *tookMs = vsup::testing::elapsedMs(t0);
    return why;
  }
};

TEST_CASE("every rank's output comes back in rank order") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Answer, FakeRank::Mode::Answer, FakeRank::Mode::Answer},
                       {30, 0, 10}, 5000, 5000);
  auto outs = ex->run(stepWith(4, 2)).wait(f.kj->waitScope());
  REQUIRE(outs.size() == 3);
  for (uint32_t r = 0; r < 3; ++r) {
    CHECK(outs[r].rank == r);
    CHECK(outs[r].step == 4);
    CHECK(outs[r].tokens.size() == 2);
  }
  CHECK_FALSE(ex->running());
}

TEST_CASE("a rank that fails fails the step at once, naming the rank, while the others are silent") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Silent, FakeRank::Mode::Fail}, {0, 20}, 10000, 10000);
  double took = 0;
  std::string why = f.failure(*ex, stepWith(1, 1), &took);
  CHECK(why.find("worker-tp1") != std::string::npos);
  CHECK(why.find("peer rank 1 died") != std::string::npos);
  CHECK(took < 2000);  // not the step timeout, not the straggler bound
  CHECK_FALSE(ex->running());
}

TEST_CASE("a rank whose connection drops is reported as a dead process") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Disconnect, FakeRank::Mode::Silent}, {5, 0}, 10000, 10000);
  double took = 0;
  std::string why = f.failure(*ex, stepWith(2, 1), &took);
  CHECK(why.find("worker-tp0 disconnected (the process died)") != std::string::npos);
  CHECK(took < 2000);
}

TEST_CASE("a rank still silent after the straggler bound from the first answer is named as hung") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Answer, FakeRank::Mode::Silent, FakeRank::Mode::Silent},
                       {10, 0, 0}, 20000, 150);
  double took = 0;
  std::string why = f.failure(*ex, stepWith(9, 1), &took);
  CHECK(why.find("worker-tp1, worker-tp2 did not answer step 9 within 150 ms of worker-tp0") !=
        std::string::npos);
  CHECK(took >= 150);
  CHECK(took < 5000);
}

TEST_CASE("a step no rank answers fails at the step timeout") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Silent, FakeRank::Mode::Silent}, {0, 0}, 120, 10000);
  double took = 0;
  std::string why = f.failure(*ex, stepWith(3, 1), &took);
  CHECK(why.find("step 3: a rank did not answer within 120 ms") != std::string::npos);
  CHECK(took >= 120);
}

TEST_CASE("a slow rank within the straggler bound does not fail the step, and the next step runs") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Answer, FakeRank::Mode::Answer}, {0, 60}, 5000, 1000);
  auto first = ex->run(stepWith(1, 1)).wait(f.kj->waitScope());
  CHECK(first.size() == 2);
  auto second = ex->run(stepWith(2, 3)).wait(f.kj->waitScope());
  REQUIRE(second.size() == 2);
  CHECK(second[1].tokens.size() == 3);
}

TEST_CASE("the step timeout still fails a step whose straggler bound would come later") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Answer, FakeRank::Mode::Silent}, {10, 0}, 150, 10000);
  double took = 0;
  std::string why = f.failure(*ex, stepWith(4, 1), &took);
  CHECK(why.find("step 4: a rank did not answer within 150 ms") != std::string::npos);
  CHECK(took >= 150);
  CHECK(took < 5000);
}

TEST_CASE("the step timeout is re-armed for every step: steps that together exceed it pass") {
  Fixture f;
  auto ex = f.executor({FakeRank::Mode::Answer, FakeRank::Mode::Answer}, {0, 40}, 120, 1000);
  MonoNs t0 = monoNow();
  for (uint64_t step = 1; step <= 5; ++step) {
    auto out = ex->run(stepWith(step, 1)).wait(f.kj->waitScope());
    CHECK(out.size() == 2);
  }
  CHECK(vsup::testing::elapsedMs(t0) >= 150);  // longer than one step timeout, in total
  // And a failing step after them still fails at its own timeout.
  auto silent = f.executor({FakeRank::Mode::Silent}, {0}, 80, 1000);
  double took = 0;
  CHECK(f.failure(*silent, stepWith(6, 1), &took).find("within 80 ms") != std::string::npos);
  CHECK(took >= 80);
}

TEST_CASE("ranks that disagree are caught when the step is applied, not here") {
  // The executor only collects; checkRankOutputs (engine/types) judges the outputs.
  engine::StepInput in = stepWith(5, 1);
  engine::StepOutput a{5, 0, {1}, {}};
  engine::StepOutput b{5, 1, {2}, {}};
  CHECK_THROWS_WITH(engine::checkRankOutputs(in, {a, b}),
                    doctest::Contains("ranks 0 and 1 disagree on step 5"));
}

}  // namespace
}  // namespace vsup::workers
