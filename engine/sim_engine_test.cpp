#include <doctest/doctest.h>

#include <map>
#include <stdexcept>

#include "engine/engine.h"

namespace vsup::engine {
namespace {

GenerateRequest request(const std::string& id, const std::string& prompt, int64_t maxTokens) {
  GenerateRequest r;
  r.id = id;
  r.prompt = prompt;
  r.sampling.maxTokens = maxTokens;
  return r;
}

// Runs steps on `ranks` sim workers until nothing is in flight; returns the text per request.
std::map<std::string, std::string> runToEnd(Scheduler& s, uint32_t ranks,
                                            std::map<std::string, FinishReason>* finish = nullptr,
                                            int maxSteps = 1000) {
  std::vector<std::unique_ptr<WorkerEngine>> workers;
  for (uint32_t r = 0; r < ranks; ++r) workers.push_back(makeSimWorker({}, r));
  std::map<std::string, std::string> text;
  for (int i = 0; i < maxSteps && s.inFlight() > 0; ++i) {
    StepInput in = s.nextStep();
    std::vector<StepOutput> outs;
    for (auto& w : workers) outs.push_back(w->execute(in));
    for (const TokenDelta& d : s.complete(outs)) {
      text[d.requestId] += d.text;
      if (finish != nullptr && d.finish != FinishReason::None) (*finish)[d.requestId] = d.finish;
    }
  }
  return text;
}

}  // namespace

TEST_CASE("the sim engine's output is deterministic and the same on every tensor-parallel size") {
  auto a = makeSimScheduler({});
  a->admit(request("r1", "hello world", 12));
  auto b = makeSimScheduler({});
  b->admit(request("r1", "hello world", 12));
  auto one = runToEnd(*a, 1);
  auto four = runToEnd(*b, 4);
  CHECK(one["r1"] == four["r1"]);
  CHECK(!one["r1"].empty());
}

TEST_CASE("a request stops at max_tokens with finish reason length") {
  auto s = makeSimScheduler({});
  s->admit(request("r", "p", 5));
  std::map<std::string, FinishReason> finish;
  auto text = runToEnd(*s, 2, &finish);
  CHECK(finish["r"] == FinishReason::Length);
  CHECK(s->inFlight() == 0);
}

TEST_CASE("continuous batching admits waiting requests at step boundaries up to max_num_seqs") {
  auto s = makeSimScheduler({.maxNumSeqs = 2, .tokenMs = 0});
  auto w = makeSimWorker({}, 0);
  s->admit(request("a", "x", 1));
  s->admit(request("b", "y", 3));
  s->admit(request("c", "z", 3));
  StepInput first = s->nextStep();
  REQUIRE(first.seqs.size() == 2);
  CHECK(first.seqs[0].id == "a");
  CHECK(first.seqs[1].id == "b");
  auto deltas = s->complete({w->execute(first)});
  CHECK(deltas[0].finish == FinishReason::Length);  // a had max_tokens 1
  // a's slot is taken by c at the next boundary; b continues at position 1.
  StepInput second = s->nextStep();
  REQUIRE(second.seqs.size() == 2);
  CHECK(second.seqs[0].id == "b");
  CHECK(second.seqs[0].position == 1);
  CHECK(second.seqs[1].id == "c");
  CHECK(second.seqs[1].position == 0);
  CHECK(s->inFlight() == 2);
}

TEST_CASE("a stop string ends the text before the match and is never sent, even across steps") {
  // Find what the engine generates, then use a two-word piece of it as the stop string.
  auto probe = makeSimScheduler({});
  probe->admit(request("p", "stop test", 10));
  std::string full = runToEnd(*probe, 1)["p"];
  REQUIRE(full.size() > 12);
  size_t second = full.find(' ', 1);
  REQUIRE(second != std::string::npos);
  std::string stop = full.substr(second, 6);  // spans a token boundary
  auto s = makeSimScheduler({});
  GenerateRequest r = request("p", "stop test", 10);
  r.sampling.stop = {stop};
  s->admit(r);
  std::map<std::string, FinishReason> finish;
  std::string text = runToEnd(*s, 1, &finish)["p"];
  CHECK(finish["p"] == FinishReason::Stop);
  CHECK(text == full.substr(0, full.find(stop)));
  CHECK(text.find(stop) == std::string::npos);
}

TEST_CASE("aborting a request removes it and reports what was generated so far") {
  auto s = makeSimScheduler({});
  s->admit(request("a", "x", 100));
  auto w = makeSimWorker({}, 0);
  for (int i = 0; i < 3; ++i) s->complete({w->execute(s->nextStep())});
  TokenDelta final;
  REQUIRE(s->abort("a", &final));
  CHECK(final.finish == FinishReason::Abort);
  CHECK(final.completionTokens == 3);
  CHECK(s->inFlight() == 0);
  CHECK_FALSE(s->abort("a", nullptr));
}

TEST_CASE("ranks that disagree on a step are a broken collective") {
  auto s = makeSimScheduler({});
  s->admit(request("a", "x", 10));
  StepInput in = s->nextStep();
  StepOutput r0 = makeSimWorker({}, 0)->execute(in);
  StepOutput r1 = r0;
  r1.rank = 1;
  r1.tokens[0] += 1;
  CHECK_THROWS_AS(s->complete({r0, r1}), std::runtime_error);
}

TEST_CASE("a duplicate request id is refused") {
  auto s = makeSimScheduler({});
  s->admit(request("a", "x", 10));
  CHECK_THROWS_AS(s->admit(request("a", "y", 10)), std::invalid_argument);
}

TEST_CASE("greedy sampling ignores the seed; a seed changes sampled output") {
  auto run = [](double temperature, uint64_t seed) {
    auto s = makeSimScheduler({});
    GenerateRequest r = request("a", "same prompt", 8);
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    s->admit(r);
    return runToEnd(*s, 1)["a"];
  };
  CHECK(run(0, 1) == run(0, 2));
  CHECK(run(1, 1) != run(1, 2));
  CHECK(run(1, 7) == run(1, 7));
}

}  // namespace vsup::engine
