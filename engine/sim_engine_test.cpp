// The sim backend: its tokenizer, its runner alone, and both under the core Scheduler.
#include "engine/sim_engine.h"

#include <doctest/doctest.h>

#include <chrono>
#include <future>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/core/scheduler.h"

namespace vsup::engine {
namespace {

using core::Scheduler;
using core::SchedulerConfig;
using core::TokenizedRequest;

GenerateRequest request(const std::string& id, const std::string& prompt, int64_t maxTokens) {
  GenerateRequest r;
  r.id = id;
  r.prompt = prompt;
  r.sampling.maxTokens = maxTokens;
  return r;
}

SchedulerConfig simScheduler(int32_t numBlocks = 1024, uint32_t maxNumSeqs = 8,
                             uint32_t maxNumBatchedTokens = 2048, int32_t blockSize = 4) {
  SchedulerConfig c;
  c.numBlocks = numBlocks;
  c.blockSize = blockSize;
  c.maxNumSeqs = maxNumSeqs;
  c.maxNumBatchedTokens = maxNumBatchedTokens;
  c.vocabSize = int32_t(kSimVocabSize);
  return c;
}

// The sim engine as engine-core and its ranks run it: the sim tokenizer, the core scheduler and
// `ranks` sim runners.
class SimEngine {
 public:
  explicit SimEngine(SchedulerConfig config, uint32_t ranks = 1)
      : numBlocks_(config.numBlocks), blockSize_(config.blockSize),
        scheduler_(config, makeSimTokenizer()) {
    for (uint32_t r = 0; r < ranks; ++r) {
      runners_.push_back(makeSimRunner(numBlocks_, blockSize_, 0, r));
    }
  }

  void admit(GenerateRequest r) {
    TokenizedRequest t;
    t.promptTokens = makeSimTokenizer()->encode(r.prompt, true);
    t.request = std::move(r);
    std::optional<Rejection> rejected = scheduler_.admit(std::move(t));
    REQUIRE_MESSAGE(!rejected, "rejected: ", rejected ? rejected->message : "");
  }

  std::vector<TokenDelta> step() {
    StepInput in = scheduler_.nextStep();
    std::vector<StepOutput> outs;
    for (auto& r : runners_) outs.push_back(r->execute(in));
    return scheduler_.complete(outs).deltas;
  }

  // Steps until nothing is in flight; the text per request.
  std::map<std::string, std::string> runToEnd(int maxSteps = 5000) {
    for (int i = 0; i < maxSteps && scheduler_.inFlight() > 0; ++i) {
      for (const TokenDelta& d : step()) {
        text_[d.requestId] += d.text;
        if (d.finish != FinishReason::None) finish_[d.requestId] = d.finish;
      }
    }
    REQUIRE(scheduler_.inFlight() == 0);
    CHECK(scheduler_.stats().freeBlocks == scheduler_.stats().totalBlocks);
    return text_;
  }

  Scheduler& scheduler() { return scheduler_; }
  FinishReason finish(const std::string& id) { return finish_[id]; }

 private:
  int32_t numBlocks_;
  int32_t blockSize_;
  Scheduler scheduler_;
  std::vector<std::unique_ptr<ModelRunner>> runners_;
  std::map<std::string, std::string> text_;
  std::map<std::string, FinishReason> finish_;
};

SeqStep seq(const std::string& id, std::vector<int32_t> tokens, uint32_t startPos,
            std::vector<int32_t> table, bool sample = true) {
  SeqStep q;
  q.id = id;
  q.tokens = std::move(tokens);
  q.startPos = startPos;
  q.blockTable = std::move(table);
  q.sample = sample;
  q.temperature = 0;
  return q;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer

TEST_CASE("the sim tokenizer makes one token per whitespace-separated word and one for no words") {
  auto t = makeSimTokenizer();
  CHECK(t->encode("hello world").size() == 2);
  CHECK(t->encode("  a\tb\nc\r\nd  ").size() == 4);
  CHECK(t->encode("") == std::vector<int32_t>{0});
  CHECK(t->encode(" \n\t ") == std::vector<int32_t>{0});
  // A word's id is its own: the same word anywhere is the same token.
  std::vector<int32_t> ids = t->encode("fox jumps fox");
  REQUIRE(ids.size() == 3);
  CHECK(ids[0] == ids[2]);
  std::set<int32_t> distinct;
  for (int32_t id : t->encode("the quick brown fox jumps over a lazy dog and then runs far")) {
    CHECK(id >= 0);
    CHECK(id < int32_t(kSimVocabSize));
    distinct.insert(id);
  }
  CHECK(distinct.size() > 1);
}

TEST_CASE("the sim tokenizer decodes its 32 tokens to words and has no specials") {
  auto t = makeSimTokenizer();
  CHECK(t->vocabSize() == 32);
  CHECK(t->tokenBytes(0) == " the");
  CHECK(t->tokenBytes(1) == " quick");
  CHECK(t->tokenBytes(31) == " good");
  CHECK(t->tokenBytes(32).empty());
  CHECK(t->tokenBytes(-1).empty());
  for (int32_t id = 0; id < 32; ++id) CHECK_FALSE(t->isSpecial(id));
  CHECK(t->tokenId(" quick") == 1);
  CHECK_FALSE(t->tokenId("<|im_end|>").has_value());
}

// ---------------------------------------------------------------------------------------------
// Runner

TEST_CASE("sim runners on every rank sample the same tokens, and -1 where not sampling") {
  auto a = makeSimRunner(8, 4, 0, 0);
  auto b = makeSimRunner(8, 4, 0, 3);
  StepInput in;
  in.step = 7;
  in.seqs = {seq("x", {1, 2, 3, 4, 5}, 0, {6, 2}), seq("y", {9, 9}, 0, {0}, false)};
  StepOutput ra = a->execute(in);
  StepOutput rb = b->execute(in);
  CHECK(ra.step == 7);
  CHECK(ra.rank == 0);
  CHECK(rb.rank == 3);
  REQUIRE(ra.tokens.size() == 2);
  CHECK(ra.tokens == rb.tokens);
  CHECK(ra.tokens[0] >= 0);
  CHECK(ra.tokens[0] < 32);
  CHECK(ra.tokens[1] == -1);
  CHECK_NOTHROW(checkRankOutputs(in, {ra, rb}));
}

TEST_CASE("a sim token depends on the whole sequence, not on how it was chunked or where its blocks are") {
  std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  auto sampleWhole = [&](std::vector<int32_t> table) {
    auto r = makeSimRunner(16, 4, 0, 0);
    StepInput in;
    in.seqs = {seq("s", prompt, 0, std::move(table))};
    return r->execute(in).tokens[0];
  };
  int32_t whole = sampleWhole({0, 1});
  CHECK(sampleWhole({9, 4}) == whole);  // other blocks, same cache contents
  // The same prompt in three chunks, sampling after the last.
  auto r = makeSimRunner(16, 4, 0, 0);
  std::vector<int32_t> table = {5, 11};
  StepInput in;
  in.seqs = {seq("s", {3, 1, 4}, 0, table, false)};
  CHECK(r->execute(in).tokens[0] == -1);
  in.seqs = {seq("s", {1, 5, 9}, 3, table, false)};
  r->execute(in);
  in.seqs = {seq("s", {2, 6}, 6, table)};
  CHECK(r->execute(in).tokens[0] == whole);
  // A different first token is a different sequence.
  std::vector<int32_t> other = prompt;
  other[0] = 4;
  auto r2 = makeSimRunner(16, 4, 0, 0);
  std::set<int32_t> seen;
  for (int32_t first = 0; first < 8; ++first) {
    other[0] = first;
    in.seqs = {seq("s", other, 0, {0, 1})};
    seen.insert(r2->execute(in).tokens[0]);
  }
  CHECK(seen.size() > 1);
}

TEST_CASE("a sim runner refuses a block table that does not cover the step") {
  auto r = makeSimRunner(4, 4, 0, 0);
  StepInput in;
  in.seqs = {seq("s", {1, 2, 3, 4, 5}, 0, {0})};  // 5 positions, one block
  CHECK_THROWS_AS(r->execute(in), std::runtime_error);
  in.seqs = {seq("s", {1}, 0, {4})};  // no block 4
  CHECK_THROWS_AS(r->execute(in), std::runtime_error);
}

TEST_CASE("a sim step with sequences takes token_ms and an empty one none") {
  auto r = makeSimRunner(4, 4, 60, 0);
  StepInput empty;
  auto t0 = std::chrono::steady_clock::now();
  r->execute(empty);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(50));
  StepInput in;
  in.seqs = {seq("s", {1}, 0, {0})};
  t0 = std::chrono::steady_clock::now();
  r->execute(in);
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(60));
}

TEST_CASE("cancel interrupts a sim step's wait, which then fails, and every later step fails at once") {
  auto r = makeSimRunner(4, 4, 600000, 0);
  StepInput in;
  in.seqs = {seq("s", {1}, 0, {0})};
  auto t0 = std::chrono::steady_clock::now();
  auto running = std::async(std::launch::async, [&] { r->execute(in); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(running.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);
  r->cancel();
  REQUIRE(running.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK_THROWS_AS(running.get(), std::runtime_error);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  CHECK_THROWS_AS(r->execute(StepInput{}), std::runtime_error);
}

// ---------------------------------------------------------------------------------------------
// Under the core scheduler

TEST_CASE("the sim engine's output is deterministic and the same on every tensor-parallel size") {
  SimEngine one(simScheduler(), 1);
  SimEngine four(simScheduler(), 4);
  one.admit(request("r1", "hello world", 12));
  four.admit(request("r1", "hello world", 12));
  std::string a = one.runToEnd()["r1"];
  CHECK(a == four.runToEnd()["r1"]);
  CHECK(!a.empty());
  SimEngine again(simScheduler(), 2);
  again.admit(request("r1", "hello world", 12));
  CHECK(again.runToEnd()["r1"] == a);
}

TEST_CASE("the sim engine's text is the same with and without chunked prefill and preemption") {
  auto run = [](SchedulerConfig config, uint64_t* preemptions) {
    SimEngine e(config, 2);
    e.admit(request("a", "one two three four five six seven eight nine ten", 12));
    e.admit(request("b", "the quick brown fox", 14));
    e.admit(request("c", "a b c d e f", 10));
    auto text = e.runToEnd();
    *preemptions = e.scheduler().stats().preemptions;
    return text;
  };
  uint64_t roomyP = 0, chunkedP = 0, tightP = 0;
  auto roomy = run(simScheduler(1024, 8, 2048), &roomyP);
  auto chunked = run(simScheduler(1024, 3, 3), &chunkedP);  // 3 tokens a step: prompts chunked
  auto tight = run(simScheduler(8, 3, 64), &tightP);  // 32 positions for up to 64: preemption
  CHECK(roomyP == 0);
  CHECK(tightP > 0);
  for (const char* id : {"a", "b", "c"}) {
    CAPTURE(id);
    CHECK(!roomy[id].empty());
    CHECK(chunked[id] == roomy[id]);
    CHECK(tight[id] == roomy[id]);
  }
}

TEST_CASE("a sim request stops at max_tokens with finish reason length") {
  SimEngine e(simScheduler(), 2);
  e.admit(request("r", "p", 5));
  std::string text = e.runToEnd()["r"];
  CHECK(e.finish("r") == FinishReason::Length);
  // Every generated token is one word of the vocabulary, each starting with a space or
  // punctuation: five of them.
  int words = 0;
  for (char c : text) words += (c == ' ' || c == ',' || c == '.') ? 1 : 0;
  CHECK(words == 5);
}

TEST_CASE("a sim stop string ends the text before the match and is never sent, even across steps") {
  SimEngine probe(simScheduler());
  probe.admit(request("p", "stop test", 10));
  std::string full = probe.runToEnd()["p"];
  REQUIRE(full.size() > 12);
  size_t second = full.find(' ', 1);
  REQUIRE(second != std::string::npos);
  std::string stop = full.substr(second, 6);  // spans a token boundary
  SimEngine e(simScheduler());
  GenerateRequest r = request("p", "stop test", 10);
  r.sampling.stop = {stop};
  e.admit(r);
  std::string text = e.runToEnd()["p"];
  CHECK(e.finish("p") == FinishReason::Stop);
  CHECK(text == full.substr(0, full.find(stop)));
  CHECK(text.find(stop) == std::string::npos);
}

TEST_CASE("sim greedy sampling ignores the seed; a seed changes sampled output") {
  auto run = [](double temperature, uint64_t seed) {
    SimEngine e(simScheduler());
    GenerateRequest r = request("a", "same prompt", 8);
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    e.admit(r);
    return e.runToEnd()["a"];
  };
  CHECK(run(0, 1) == run(0, 2));
  CHECK(run(1, 1) != run(1, 2));
  CHECK(run(1, 7) == run(1, 7));
}

// ---------------------------------------------------------------------------------------------
// Plan

TEST_CASE("the sim plan sizes its cache at 8 bytes a token, at most 2^20 tokens per rank") {
  EngineConfig c;
  c.backend = SimConfig{};
  c.common.model = "anything";
  c.common.blockSize = 16;
  EnginePlan p = simBackend().plan(c);  // 256 MiB: capped
  CHECK(p.scheduler.numBlocks == (1 << 20) / 16);
  CHECK(p.scheduler.blockSize == 16);
  CHECK(p.scheduler.maxModelLen == 0);
  CHECK(p.scheduler.vocabSize == 32);
  CHECK(p.scheduler.eosTokenIds.empty());
  CHECK(p.scheduler.kvHoldMs == 0);
  CHECK(p.chatFormat == ChatFormat::Plain);
  CHECK_FALSE(p.sharedCollective);
  CHECK(p.summary.find("model anything") != std::string::npos);
  c.common.kvCacheBytes = 1024;  // 128 tokens
  c.common.maxModelLen = 100;
  p = simBackend().plan(c);
  CHECK(p.scheduler.numBlocks == 8);
  CHECK(p.scheduler.maxModelLen == 100);
  CHECK(p.summary.find("context 100 tokens, KV cache 8 blocks of 16 tokens per rank") !=
        std::string::npos);
  c.common.kv.connector = "sim";
  CHECK(simBackend().plan(c).scheduler.kvHoldMs > 0);
  c.common.kvCacheBytes = 64;  // 8 tokens: less than one block
  CHECK_THROWS_AS(simBackend().plan(c), std::invalid_argument);
  c.common.kvCacheBytes = 1024;
  c.common.blockSize = 0;
  CHECK_THROWS_AS(simBackend().plan(c), std::invalid_argument);
}

TEST_CASE("the sim backend's tokenizer and runner work together through its plan") {
  EngineConfig c;
  c.backend = SimConfig{0};
  c.common.kvCacheBytes = 4096;
  EnginePlan p = simBackend().plan(c);
  Scheduler s(p.scheduler, simBackend().tokenizer(c));
  std::unique_ptr<ModelRunner> r = simBackend().makeRunner(c, 0, {});
  TokenizedRequest t;
  t.request = request("r", "hi there", 4);
  t.promptTokens = simBackend().tokenizer(c)->encode("hi there");
  REQUIRE_FALSE(s.admit(t));
  std::string text;
  for (int i = 0; i < 10 && s.inFlight() > 0; ++i) {
    for (const TokenDelta& d : s.complete({r->execute(s.nextStep())}).deltas) text += d.text;
  }
  CHECK(s.inFlight() == 0);
  CHECK(!text.empty());
}

}  // namespace vsup::engine
