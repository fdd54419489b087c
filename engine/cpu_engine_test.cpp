// The CPU engine's scheduler, driven alone: the tests play the ranks. Each step is checked the
// way a worker would rely on it (its tokens continue the sequence from startPos, its block table
// covers them and shares no block with another sequence), and each test then checks what the
// scheduler promises engine-core (deltas, finish reasons, the free list refilled).
#include "engine/cpu_engine.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/llama_model.h"

namespace vsup::engine {
namespace {

constexpr const char* kModel = "vsup-tiny-4m";

struct Limits {
  int32_t blocks = 64;  // KV blocks in the cache
  int32_t blockSize = 4;
  int64_t maxModelLen = 64;
  uint32_t maxNumSeqs = 8;
  uint32_t maxNumBatchedTokens = 256;
};

CpuOptions optionsFor(const Limits& l) {
  CpuOptions o;
  o.model = kModel;
  o.blockSize = l.blockSize;
  o.maxModelLen = l.maxModelLen;
  o.maxNumSeqs = l.maxNumSeqs;
  o.maxNumBatchedTokens = l.maxNumBatchedTokens;
  LlamaConfig c = resolveModel(kModel, "auto").config;
  o.kvCacheBytes = int64_t(l.blocks) * kvBytesPerBlock(c, 1, l.blockSize);
  return o;
}

GenerateRequest request(const std::string& id, const std::string& prompt, int64_t maxTokens,
                        std::vector<std::string> stop = {}) {
  GenerateRequest r;
  r.id = id;
  r.prompt = prompt;
  r.sampling.maxTokens = maxTokens;
  r.sampling.stop = std::move(stop);
  return r;
}

std::vector<int32_t> bytesOf(const std::string& s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

// True when `s` is whole UTF-8 characters: no character cut at either end.
bool wholeUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

// The token a rank samples for a sequence, given how many it sampled for it before.
using Picker = std::function<int32_t(const SeqStep& seq, size_t sampledBefore)>;

// Every sequence samples the same token.
Picker always(int32_t token) {
  return [token](const SeqStep&, size_t) { return token; };
}

// The token depends only on the request and the position it is sampled at, as a greedy model's
// would: a recomputed sequence samples what it sampled before.
Picker byPosition() {
  return [](const SeqStep& q, size_t) {
    uint32_t pos = q.startPos + uint32_t(q.tokens.size());
    char base = q.id.empty() || q.id[0] % 2 == 0 ? 'a' : 'A';
    return int32_t(base + pos % 26);
  };
}

// Each request samples its script in order (then 'z').
Picker scripted(std::map<std::string, std::vector<int32_t>> scripts) {
  return [scripts = std::move(scripts)](const SeqStep& q, size_t before) {
    auto it = scripts.find(q.id);
    if (it == scripts.end() || before >= it->second.size()) return int32_t('z');
    return it->second[before];
  };
}

struct Outcome {
  std::string text;
  std::vector<std::string> deltas;
  FinishReason finish = FinishReason::None;
  int64_t promptTokens = 0;
  int64_t completionTokens = 0;
};

// Plays every rank of a tensor-parallel group (they all answer alike) and checks each step
// against what the requests are known to hold: the prompt's bytes, then every non-EOS token the
// ranks sampled.
class FakeRanks {
 public:
  explicit FakeRanks(const Limits& limits, uint32_t ranks = 1)
      : limits_(limits), options_(optionsFor(limits)), plan_(planCpuEngine(options_)),
        scheduler_(makeCpuScheduler(options_, plan_)), ranks_(ranks) {}

  CpuScheduler& scheduler() { return *scheduler_; }
  CpuSchedulerStats stats() const { return scheduler_->stats(); }
  const CpuPlan& plan() const { return plan_; }

  void admit(GenerateRequest r) {
    std::string id = r.id;
    std::vector<int32_t> prompt = bytesOf(r.prompt);
    scheduler_->admit(std::move(r));
    sequence_[id] = prompt;
    sampled_[id] = 0;
  }

  bool abort(const std::string& id, TokenDelta* final) {
    bool known = scheduler_->abort(id, final);
    if (known) {
      sequence_.erase(id);
      if (final != nullptr) record(*final);
    }
    return known;
  }

  // nextStep(), checked.
  StepInput next() {
    StepInput in = scheduler_->nextStep();
    check(in);
    return in;
  }

  // What the ranks answer for `in`: -1 exactly where a sequence is not sampled.
  std::vector<StepOutput> answer(const StepInput& in, const Picker& pick) {
    StepOutput out;
    out.step = in.step;
    for (const SeqStep& q : in.seqs) {
      out.tokens.push_back(q.sample ? pick(q, sampledCount(q.id)) : -1);
    }
    std::vector<StepOutput> all;
    for (uint32_t r = 0; r < ranks_; ++r) {
      out.rank = r;
      all.push_back(out);
    }
    return all;
  }

  // complete(), recording every delta and what each sequence now holds.
  std::vector<TokenDelta> complete(const StepInput& in, const std::vector<StepOutput>& outs) {
    std::vector<TokenDelta> deltas = scheduler_->complete(outs);
    std::set<std::string> inStep;
    for (size_t i = 0; i < in.seqs.size(); ++i) {
      const SeqStep& q = in.seqs[i];
      inStep.insert(q.id);
      if (!q.sample || sequence_.count(q.id) == 0) continue;  // a chunk, or aborted meanwhile
      sampled_[q.id]++;
      int32_t token = outs[0].tokens[i];
      if (token != kByteEndOfText && token != kByteImEnd) sequence_[q.id].push_back(token);
    }
    for (const TokenDelta& d : deltas) {
      CHECK_MESSAGE(inStep.count(d.requestId) == 1, "a delta for a request not in the step");
      record(d);
    }
    return deltas;
  }

  std::vector<TokenDelta> step(const Picker& pick) {
    StepInput in = next();
    return complete(in, answer(in, pick));
  }

  // Steps until nothing is in flight (bounded); returns the number of steps.
  int runToEnd(const Picker& pick, int maxSteps = 2000) {
    int steps = 0;
    while (scheduler_->inFlight() > 0 && steps < maxSteps) {
      step(pick);
      ++steps;
    }
    REQUIRE_MESSAGE(scheduler_->inFlight() == 0, "requests still in flight after ", maxSteps,
                    " steps");
    return steps;
  }

  const Outcome& outcome(const std::string& id) { return outcomes_[id]; }
  size_t sampledCount(const std::string& id) const {
    auto it = sampled_.find(id);
    return it == sampled_.end() ? 0 : it->second;
  }
  const std::vector<int32_t>& sequence(const std::string& id) { return sequence_[id]; }

 private:
  void record(const TokenDelta& d) {
    Outcome& o = outcomes_[d.requestId];
    CHECK_MESSAGE(o.finish == FinishReason::None, "a delta after the finish for ", d.requestId);
    CHECK_MESSAGE(wholeUtf8(d.text), "a delta that cuts a UTF-8 character: ", d.text);
    o.text += d.text;
    o.deltas.push_back(d.text);
    o.finish = d.finish;
    o.promptTokens = d.promptTokens;
    o.completionTokens = d.completionTokens;
    if (d.finish != FinishReason::None) sequence_.erase(d.requestId);
  }

  // What a worker relies on for every step.
  void check(const StepInput& in) {
    CpuSchedulerStats st = scheduler_->stats();
    CHECK(in.seqs.size() <= limits_.maxNumSeqs);
    size_t tokens = 0;
    std::set<int32_t> held;
    std::set<std::string> ids;
    for (const SeqStep& q : in.seqs) {
      CHECK_MESSAGE(ids.insert(q.id).second, q.id, " twice in one step");
      REQUIRE_MESSAGE(sequence_.count(q.id) == 1, "a step for unknown request ", q.id);
      const std::vector<int32_t>& full = sequence_[q.id];
      REQUIRE(!q.tokens.empty());
      REQUIRE(q.startPos + q.tokens.size() <= full.size());
      // The step continues the sequence where its KV ends; it samples only at the end.
      std::vector<int32_t> expect(full.begin() + q.startPos,
                                  full.begin() + q.startPos + q.tokens.size());
      CHECK_MESSAGE(q.tokens == expect, q.id, " at ", q.startPos);
      CHECK(q.sample == (q.startPos + q.tokens.size() == full.size()));
      // The block table covers every position written so far, with blocks of the cache.
      CHECK(q.blockTable.size() * size_t(limits_.blockSize) >= q.startPos + q.tokens.size());
      for (int32_t b : q.blockTable) {
        CHECK(b >= 0);
        CHECK(b < st.totalBlocks);
        CHECK_MESSAGE(held.insert(b).second, "block ", b, " held twice (", q.id, ")");
      }
      tokens += q.tokens.size();
    }
    CHECK(tokens <= limits_.maxNumBatchedTokens);
    CHECK(size_t(st.freeBlocks) + held.size() <= size_t(st.totalBlocks));
  }

  Limits limits_;
  CpuOptions options_;
  CpuPlan plan_;
  std::unique_ptr<CpuScheduler> scheduler_;
  uint32_t ranks_;
  std::map<std::string, std::vector<int32_t>> sequence_;  // the prompt, then non-EOS samples
  std::map<std::string, size_t> sampled_;
  std::map<std::string, Outcome> outcomes_;
};

std::vector<std::string> idsOf(const StepInput& in) {
  std::vector<std::string> ids;
  for (const SeqStep& q : in.seqs) ids.push_back(q.id);
  return ids;
}

const SeqStep* find(const StepInput& in, const std::string& id) {
  for (const SeqStep& q : in.seqs) {
    if (q.id == id) return &q;
  }
  return nullptr;
}

std::string messageOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Steps

TEST_CASE("the first step carries the whole prompt at position 0 and the next exactly the sampled token") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hello", 4));
  StepInput first = ranks.next();
  REQUIRE(first.seqs.size() == 1);
  CHECK(first.seqs[0].tokens == bytesOf("hello"));
  CHECK(first.seqs[0].startPos == 0);
  CHECK(first.seqs[0].sample);
  CHECK(first.seqs[0].blockTable.size() == 2);  // 5 tokens in blocks of 4
  auto deltas = ranks.complete(first, ranks.answer(first, always('x')));
  REQUIRE(deltas.size() == 1);
  CHECK(deltas[0].text == "x");
  CHECK(deltas[0].promptTokens == 5);
  CHECK(deltas[0].completionTokens == 1);
  StepInput second = ranks.next();
  REQUIRE(second.seqs.size() == 1);
  CHECK(second.seqs[0].tokens == std::vector<int32_t>{'x'});
  CHECK(second.seqs[0].startPos == 5);
  CHECK(second.seqs[0].sample);
  CHECK(second.seqs[0].blockTable == first.seqs[0].blockTable);
}

TEST_CASE("every step carries the request's sampling parameters and one seed per request") {
  FakeRanks ranks({});
  GenerateRequest seeded = request("seeded", "a", 3);
  seeded.sampling.temperature = 0.5;
  seeded.sampling.topP = 0.9;
  seeded.sampling.topK = 7;
  seeded.sampling.seed = 42;
  ranks.admit(seeded);
  ranks.admit(request("unseeded", "b", 3));
  std::map<std::string, uint64_t> seeds;
  for (int i = 0; i < 3; ++i) {
    StepInput in = ranks.next();
    REQUIRE(in.seqs.size() == 2);
    const SeqStep* q = find(in, "seeded");
    REQUIRE(q != nullptr);
    CHECK(q->temperature == 0.5);
    CHECK(q->topP == 0.9);
    CHECK(q->topK == 7);
    CHECK(q->seed == 42);
    const SeqStep* u = find(in, "unseeded");
    REQUIRE(u != nullptr);
    if (i > 0) CHECK(u->seed == seeds["unseeded"]);  // derived from the id, the same every step
    seeds["unseeded"] = u->seed;
    ranks.complete(in, ranks.answer(in, always('x')));
  }
}

TEST_CASE("a step takes at most max_num_seqs requests and the others join as running ones finish") {
  FakeRanks ranks({.maxNumSeqs = 2});
  ranks.admit(request("a", "p", 1));
  ranks.admit(request("b", "pp", 3));
  ranks.admit(request("c", "p", 2));
  ranks.admit(request("d", "p", 2));
  StepInput first = ranks.next();
  CHECK(idsOf(first) == std::vector<std::string>{"a", "b"});
  CHECK(ranks.stats().running == 2);
  CHECK(ranks.stats().waiting == 2);
  ranks.complete(first, ranks.answer(first, always('x')));
  CHECK(ranks.outcome("a").finish == FinishReason::Length);
  // a's place goes to c at this boundary; b keeps decoding.
  StepInput second = ranks.next();
  CHECK(idsOf(second) == std::vector<std::string>{"b", "c"});
  CHECK(find(second, "b")->startPos == 2);  // its prompt and its first token
  CHECK(find(second, "c")->startPos == 0);
  ranks.complete(second, ranks.answer(second, always('x')));
  StepInput third = ranks.next();
  CHECK(idsOf(third) == std::vector<std::string>{"b", "c"});
  ranks.complete(third, ranks.answer(third, always('x')));
  // b (3 tokens) and c (2) are done: d runs alone.
  StepInput fourth = ranks.next();
  CHECK(idsOf(fourth) == std::vector<std::string>{"d"});
  ranks.complete(fourth, ranks.answer(fourth, always('x')));
  ranks.runToEnd(always('x'));
  for (const char* id : {"a", "b", "c", "d"}) CHECK(ranks.outcome(id).finish == FinishReason::Length);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("a request admitted between steps joins the running batch at the next step") {
  FakeRanks ranks({});
  ranks.admit(request("early", "abc", 5));
  StepInput first = ranks.next();
  ranks.complete(first, ranks.answer(first, always('x')));
  ranks.admit(request("late", "de", 5));
  StepInput second = ranks.next();
  CHECK(idsOf(second) == std::vector<std::string>{"early", "late"});
  CHECK(find(second, "late")->tokens == bytesOf("de"));
  CHECK(find(second, "early")->tokens == std::vector<int32_t>{'x'});
  ranks.complete(second, ranks.answer(second, always('x')));
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("early").text == "xxxxx");
  CHECK(ranks.outcome("late").text == "xxxxx");
}

TEST_CASE("nextStep with nothing waiting or running is an empty step that completes to no deltas") {
  FakeRanks ranks({});
  StepInput in = ranks.next();
  CHECK(in.seqs.empty());
  CHECK(ranks.complete(in, ranks.answer(in, always('x'))).empty());
}

TEST_CASE("a prompt longer than max_num_batched_tokens is prefilled in chunks and sampled after the last") {
  FakeRanks ranks({.maxNumSeqs = 2, .maxNumBatchedTokens = 8});
  std::string prompt = "abcdefghijklmnopqrst";  // 20 tokens: chunks of 8, 8, 4
  ranks.admit(request("long", prompt, 3));
  struct Chunk {
    uint32_t startPos;
    size_t tokens;
    bool sample;
    size_t blocks;
  };
  std::vector<Chunk> want = {{0, 8, false, 2}, {8, 8, false, 4}, {16, 4, true, 5}};
  std::vector<int32_t> blocksSoFar;
  for (const Chunk& c : want) {
    CAPTURE(c.startPos);
    StepInput in = ranks.next();
    REQUIRE(in.seqs.size() == 1);
    const SeqStep& q = in.seqs[0];
    CHECK(q.startPos == c.startPos);
    CHECK(q.tokens == bytesOf(prompt.substr(c.startPos, c.tokens)));
    CHECK(q.sample == c.sample);
    CHECK(q.blockTable.size() == c.blocks);
    // The table grows; blocks already written keep their place.
    CHECK(std::equal(blocksSoFar.begin(), blocksSoFar.end(), q.blockTable.begin()));
    blocksSoFar = q.blockTable;
    auto deltas = ranks.complete(in, ranks.answer(in, always('x')));
    if (!c.sample) {
      for (const TokenDelta& d : deltas) CHECK(d.text.empty());
    }
  }
  CHECK(ranks.outcome("long").text == "x");
  StepInput decode = ranks.next();
  REQUIRE(decode.seqs.size() == 1);
  CHECK(decode.seqs[0].startPos == 20);
  CHECK(decode.seqs[0].tokens == std::vector<int32_t>{'x'});
  ranks.complete(decode, ranks.answer(decode, always('x')));
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("long").text == "xxx");
  CHECK(ranks.outcome("long").finish == FinishReason::Length);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("a decoding request keeps its token in a step while another's prompt is chunked") {
  FakeRanks ranks({.maxNumSeqs = 2, .maxNumBatchedTokens = 8});
  ranks.admit(request("short", "ab", 6));
  StepInput first = ranks.next();
  ranks.complete(first, ranks.answer(first, always('x')));
  ranks.admit(request("long", "abcdefghijklmnopqrst", 2));
  StepInput second = ranks.next();
  REQUIRE(idsOf(second) == std::vector<std::string>{"short", "long"});
  CHECK(find(second, "short")->tokens.size() == 1);
  CHECK(find(second, "long")->tokens.size() == 7);  // what the budget leaves
  CHECK_FALSE(find(second, "long")->sample);
  ranks.complete(second, ranks.answer(second, always('x')));
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("short").text == "xxxxxx");
  CHECK(ranks.outcome("long").text == "xx");
}

// ---------------------------------------------------------------------------------------------
// Blocks

TEST_CASE("a busy mix of requests under block and token pressure keeps every invariant and ends with every block free") {
  // 16 blocks of 4 tokens for up to 6 sequences of up to 32 tokens: preemption is certain.
  FakeRanks ranks({.blocks = 16, .blockSize = 4, .maxModelLen = 32, .maxNumSeqs = 6,
                   .maxNumBatchedTokens = 12});
  std::map<std::string, int64_t> maxTokens;
  for (int i = 0; i < 14; ++i) {
    std::string id = "r" + std::to_string(i);
    std::string prompt(size_t(1 + (i * 7) % 17), char('a' + i));
    maxTokens[id] = 1 + (i * 5) % (32 - int64_t(prompt.size()));
    ranks.admit(request(id, prompt, maxTokens[id]));
  }
  ranks.runToEnd(byPosition());
  CHECK(ranks.stats().preemptions > 0);
  for (const auto& [id, n] : maxTokens) {
    CAPTURE(id);
    CHECK(ranks.outcome(id).finish == FinishReason::Length);
    CHECK(int64_t(ranks.outcome(id).text.size()) == n);
    CHECK(ranks.outcome(id).completionTokens == n);
  }
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK(ranks.stats().running == 0);
  CHECK(ranks.stats().waiting == 0);
}

TEST_CASE("every block returns to the free list when requests end by length, EOS and stop string") {
  FakeRanks ranks({});
  ranks.admit(request("length", "abcdefghi", 3));
  ranks.admit(request("eos", "abcdefghi", 10));
  ranks.admit(request("stop", "abcdefghi", 10, {"yz"}));
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  ranks.runToEnd(scripted({{"length", {'a', 'b', 'c'}},
                           {"eos", {'a', 'b', kByteEndOfText}},
                           {"stop", {'a', 'y', 'z'}}}));
  CHECK(ranks.outcome("length").finish == FinishReason::Length);
  CHECK(ranks.outcome("eos").finish == FinishReason::Stop);
  CHECK(ranks.outcome("stop").finish == FinishReason::Stop);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK(ranks.scheduler().inFlight() == 0);
}

TEST_CASE("aborting a waiting request removes it before it ever runs") {
  FakeRanks ranks({.maxNumSeqs = 1});
  ranks.admit(request("running", "abc", 3));
  ranks.admit(request("waiting", "def", 3));
  StepInput first = ranks.next();
  CHECK(idsOf(first) == std::vector<std::string>{"running"});
  TokenDelta final;
  REQUIRE(ranks.abort("waiting", &final));
  CHECK(final.requestId == "waiting");
  CHECK(final.finish == FinishReason::Abort);
  CHECK(final.completionTokens == 0);
  CHECK(final.promptTokens == 3);
  CHECK(ranks.stats().waiting == 0);
  ranks.complete(first, ranks.answer(first, always('x')));
  while (ranks.scheduler().inFlight() > 0) {
    StepInput in = ranks.next();
    REQUIRE(!in.seqs.empty());
    CHECK(find(in, "waiting") == nullptr);
    ranks.complete(in, ranks.answer(in, always('x')));
  }
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK_FALSE(ranks.abort("waiting", nullptr));
}

TEST_CASE("aborting a running request frees its blocks and reports the tokens generated so far") {
  FakeRanks ranks({});
  ranks.admit(request("a", "abcdefgh", 20));
  ranks.admit(request("b", "abcdefgh", 20));
  for (int i = 0; i < 3; ++i) ranks.step(always('x'));
  int32_t freeBefore = ranks.stats().freeBlocks;
  TokenDelta final;
  REQUIRE(ranks.abort("a", &final));
  CHECK(final.finish == FinishReason::Abort);
  CHECK(final.completionTokens == 3);
  CHECK(final.promptTokens == 8);
  CHECK(ranks.stats().freeBlocks == freeBefore + 3);  // 11 positions written: 3 blocks of 4
  CHECK(ranks.stats().running == 1);
  StepInput in = ranks.next();
  CHECK(idsOf(in) == std::vector<std::string>{"b"});
  ranks.complete(in, ranks.answer(in, always('x')));
  CHECK_FALSE(ranks.abort("a", nullptr));
  REQUIRE(ranks.abort("b", nullptr));
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK(ranks.scheduler().inFlight() == 0);
}

TEST_CASE("a request aborted between nextStep and complete gets no delta and its blocks are freed") {
  FakeRanks ranks({});
  ranks.admit(request("gone", "abcdefgh", 5));
  ranks.admit(request("kept", "abcdefgh", 5));
  ranks.step(always('x'));
  StepInput in = ranks.next();
  REQUIRE(in.seqs.size() == 2);
  TokenDelta final;
  REQUIRE(ranks.abort("gone", &final));
  CHECK(final.completionTokens == 1);
  auto deltas = ranks.complete(in, ranks.answer(in, always('y')));
  REQUIRE(deltas.size() == 1);
  CHECK(deltas[0].requestId == "kept");
  CHECK(deltas[0].text == "y");
  CHECK(ranks.outcome("gone").text == "x");
  CHECK(ranks.outcome("gone").finish == FinishReason::Abort);
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("kept").text == "xyxxx");
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("an id reused after an abort while its step runs is a new request that step does not touch") {
  // The scheduler may refuse the id until the step completes (a caller error), or take it as a
  // new request; it must not hand the aborted request's token, or its KV position, to it.
  FakeRanks ranks({});
  CpuScheduler& s = ranks.scheduler();
  ranks.admit(request("r", "abcdefgh", 5));
  StepInput in = ranks.next();
  std::vector<StepOutput> outs = ranks.answer(in, always('q'));
  REQUIRE(s.abort("r", nullptr));
  bool admitted = true;
  try {
    s.admit(request("r", "xy", 5));
  } catch (const RequestRejected&) {
    FAIL("a reused id is no reason to reject the request");
  } catch (const std::invalid_argument&) {
    admitted = false;
  }
  std::vector<TokenDelta> deltas = s.complete(outs);
  CHECK_MESSAGE(deltas.empty(), "the aborted request's token went to the new one: ",
                deltas.empty() ? "" : deltas[0].text);
  if (!admitted) s.admit(request("r", "xy", 5));
  StepInput next;
  CHECK_NOTHROW(next = s.nextStep());
  REQUIRE(next.seqs.size() == 1);
  CHECK(next.seqs[0].startPos == 0);
  CHECK(next.seqs[0].tokens == bytesOf("xy"));
}

// ---------------------------------------------------------------------------------------------
// Preemption

TEST_CASE("when blocks run out the newest running request is preempted and later recomputed from position 0") {
  // 4 blocks of 4 tokens: two sequences of 4 + 8 tokens cannot both hold their 3 blocks.
  Limits tight{.blocks = 4, .blockSize = 4, .maxModelLen = 16, .maxNumSeqs = 2,
               .maxNumBatchedTokens = 16};
  FakeRanks ranks(tight);
  ranks.admit(request("A", "abcd", 8));
  ranks.admit(request("B", "wxyz", 8));
  // Both decode while they fit in 2 blocks each (8 positions); A's 9th position needs a third.
  StepInput in;
  for (int i = 0; i < 20 && ranks.stats().preemptions == 0; ++i) {
    in = ranks.next();
    if (ranks.stats().preemptions == 0) ranks.complete(in, ranks.answer(in, byPosition()));
  }
  REQUIRE(ranks.stats().preemptions == 1);
  // The step that preempted runs only A, which now holds 3 blocks; B holds none and waits.
  CHECK(idsOf(in) == std::vector<std::string>{"A"});
  CHECK(in.seqs[0].blockTable.size() == 3);
  CHECK(ranks.stats().freeBlocks == 1);
  CHECK(ranks.stats().running == 1);
  CHECK(ranks.stats().waiting == 1);
  size_t bSampled = ranks.sampledCount("B");
  CHECK(bSampled == 5);  // steps 1..5: 9 positions written, 3 blocks needed for the next
  std::vector<int32_t> bSoFar = ranks.sequence("B");
  ranks.complete(in, ranks.answer(in, byPosition()));
  // B comes back, once A is done, as one prefill of its prompt and everything it generated.
  bool recomputed = false;
  for (int i = 0; i < 40 && ranks.scheduler().inFlight() > 0; ++i) {
    StepInput next = ranks.next();
    if (const SeqStep* b = find(next, "B"); b != nullptr && !recomputed) {
      recomputed = true;
      CHECK(b->startPos == 0);
      CHECK(b->tokens == bSoFar);
      CHECK(b->sample);
      CHECK(b->blockTable.size() == 3);
      CHECK(ranks.sampledCount("B") == bSampled);  // nothing was generated while it waited
    }
    ranks.complete(next, ranks.answer(next, byPosition()));
  }
  CHECK(recomputed);
  CHECK(ranks.scheduler().inFlight() == 0);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("a preempted request's text is delivered exactly once, as if it had never been preempted") {
  auto run = [](const Limits& limits, uint64_t* preemptions) {
    FakeRanks ranks(limits);
    ranks.admit(request("A", "abcd", 8));
    ranks.admit(request("B", "wxyz", 8));
    ranks.admit(request("C", "pq", 10));
    ranks.runToEnd(byPosition());
    *preemptions = ranks.stats().preemptions;
    CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
    std::map<std::string, Outcome> out;
    for (const char* id : {"A", "B", "C"}) out[id] = ranks.outcome(id);
    return out;
  };
  uint64_t tightPreemptions = 0;
  uint64_t roomyPreemptions = 0;
  auto tight = run({.blocks = 4, .blockSize = 4, .maxModelLen = 16, .maxNumSeqs = 3,
                    .maxNumBatchedTokens = 16},
                   &tightPreemptions);
  auto roomy = run({.blocks = 64, .blockSize = 4, .maxModelLen = 16, .maxNumSeqs = 3,
                    .maxNumBatchedTokens = 16},
                   &roomyPreemptions);
  CHECK(tightPreemptions > 0);
  CHECK(roomyPreemptions == 0);
  for (const char* id : {"A", "B", "C"}) {
    CAPTURE(id);
    CHECK(tight[id].text == roomy[id].text);
    CHECK(tight[id].completionTokens == roomy[id].completionTokens);
    CHECK(tight[id].finish == FinishReason::Length);
  }
  // byPosition: positions 4..11 for A, 2..11 for C (odd first letters: upper case).
  CHECK(tight["A"].text == "EFGHIJKL");
  CHECK(tight["C"].text == "CDEFGHIJKL");
}

// ---------------------------------------------------------------------------------------------
// Finish reasons and text

TEST_CASE("max_tokens ends a request with finish length after exactly max_tokens tokens") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 5));
  int steps = ranks.runToEnd(always('q'));
  CHECK(steps == 5);
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  CHECK(ranks.outcome("r").text == "qqqqq");
  CHECK(ranks.outcome("r").completionTokens == 5);
  CHECK(ranks.outcome("r").promptTokens == 2);
}

TEST_CASE("an EOS token ends a request with finish stop and adds no text") {
  for (int32_t eos : {kByteEndOfText, kByteImEnd}) {
    CAPTURE(eos);
    FakeRanks ranks({});
    ranks.admit(request("r", "hi", 10));
    ranks.runToEnd(scripted({{"r", {'o', 'k', eos}}}));
    CHECK(ranks.outcome("r").finish == FinishReason::Stop);
    CHECK(ranks.outcome("r").text == "ok");
    CHECK(ranks.outcome("r").deltas.back().empty());
    CHECK(ranks.sampledCount("r") == 3);
    CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  }
}

TEST_CASE("a special token that is not an end of turn is sampled as no text and does not stop") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 3));
  ranks.runToEnd(scripted({{"r", {'a', kBytePad, 'b'}}}));
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  CHECK(ranks.outcome("r").text == "ab");
}

TEST_CASE("a stop string split across two steps is never sent and the text ends before it") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 10, {"END"}));
  ranks.runToEnd(scripted({{"r", {'o', 'k', 'E', 'N', 'D', 'z'}}}));
  const Outcome& o = ranks.outcome("r");
  CHECK(o.finish == FinishReason::Stop);
  CHECK(o.text == "ok");
  CHECK(o.completionTokens == 5);
  for (const std::string& d : o.deltas) CHECK(d.find('E') == std::string::npos);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("text held back as a possible stop string is sent once it cannot be one") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 6, {"END"}));
  std::vector<int32_t> script = {'E', 'N', 'x', 'E', 'N', 'y'};
  ranks.runToEnd(scripted({{"r", script}}));
  const Outcome& o = ranks.outcome("r");
  CHECK(o.finish == FinishReason::Length);
  CHECK(o.text == "ENxENy");
  REQUIRE(o.deltas.size() == 6);
  CHECK(o.deltas[0].empty());  // "E" might start "END"
  CHECK(o.deltas[1].empty());  // "EN" too
  CHECK(o.deltas[2] == "ENx");
}

TEST_CASE("text held back as a possible stop string is sent when max_tokens ends the request") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 3, {"END"}));
  ranks.runToEnd(scripted({{"r", {'o', 'E', 'N'}}}));
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  CHECK(ranks.outcome("r").text == "oEN");
}

TEST_CASE("a multi-byte UTF-8 character split across two sampled tokens is delivered whole") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 6));
  // "é" is C3 A9, "€" is E2 82 AC.
  ranks.runToEnd(scripted({{"r", {0xC3, 0xA9, 'x', 0xE2, 0x82, 0xAC}}}));
  const Outcome& o = ranks.outcome("r");
  CHECK(o.text == "\xC3\xA9x\xE2\x82\xAC");
  REQUIRE(o.deltas.size() == 6);
  CHECK(o.deltas[0].empty());
  CHECK(o.deltas[1] == "\xC3\xA9");
  CHECK(o.deltas[4].empty());
  CHECK(o.deltas[5] == "\xE2\x82\xAC");
  // FakeRanks::record checked that no delta cut a character.
}

TEST_CASE("a stop string made of a multi-byte character matches across the tokens that spell it") {
  FakeRanks ranks({});
  ranks.admit(request("r", "hi", 10, {"\xC3\xA9"}));
  ranks.runToEnd(scripted({{"r", {'a', 0xC3, 0xA9, 'b'}}}));
  CHECK(ranks.outcome("r").finish == FinishReason::Stop);
  CHECK(ranks.outcome("r").text == "a");
}

// ---------------------------------------------------------------------------------------------
// Rejection

TEST_CASE("a request longer than the context is rejected with the context length and the token counts") {
  FakeRanks ranks({.maxModelLen = 64});
  std::string msg;
  try {
    ranks.admit(request("r", "0123456789", 60));
    FAIL("admitted");
  } catch (const RequestRejected& e) {
    msg = e.what();
  }
  CHECK(msg.find("maximum context length is 64 tokens") != std::string::npos);
  CHECK(msg.find("requested 70 tokens") != std::string::npos);
  CHECK(msg.find("10 in the prompt") != std::string::npos);
  CHECK(msg.find("60 for the completion") != std::string::npos);
  CHECK(ranks.scheduler().inFlight() == 0);
  // Nothing of it stayed: its id can be used again.
  ranks.admit(request("r", "0123456789", 54));  // exactly the context
  CHECK(ranks.scheduler().inFlight() == 1);
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").text.size() == 54);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("an empty prompt is rejected") {
  FakeRanks ranks({});
  CHECK_THROWS_AS(ranks.admit(request("r", "", 4)), RequestRejected);
  CHECK(messageOf([&] { ranks.admit(request("r", "", 4)); }).find("empty") != std::string::npos);
  CHECK(ranks.scheduler().inFlight() == 0);
}

TEST_CASE("a duplicate request id is a caller error, not a rejection") {
  FakeRanks ranks({});
  ranks.admit(request("r", "abc", 4));
  bool invalid = false;
  bool rejected = false;
  try {
    ranks.scheduler().admit(request("r", "def", 4));
  } catch (const RequestRejected&) {
    rejected = true;
  } catch (const std::invalid_argument& e) {
    invalid = true;
    CHECK(std::string(e.what()).find("duplicate") != std::string::npos);
  }
  CHECK(invalid);
  CHECK_FALSE(rejected);
  CHECK(ranks.scheduler().inFlight() == 1);
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").text == "xxxx");
}

// ---------------------------------------------------------------------------------------------
// Ranks

TEST_CASE("complete throws when two ranks sampled different tokens") {
  FakeRanks ranks({}, 2);
  ranks.admit(request("r", "abc", 4));
  StepInput in = ranks.next();
  std::vector<StepOutput> outs = ranks.answer(in, always('x'));
  REQUIRE(outs.size() == 2);
  outs[1].tokens[0] = 'y';
  std::string msg = messageOf([&] { ranks.scheduler().complete(outs); });
  CHECK(msg.find("disagree") != std::string::npos);
  CHECK_THROWS_AS(ranks.scheduler().complete(outs), std::runtime_error);
}

TEST_CASE("complete throws when a rank answers another step or with the wrong number of tokens") {
  FakeRanks ranks({}, 2);
  ranks.admit(request("r", "abc", 4));
  StepInput in = ranks.next();
  std::vector<StepOutput> stale = ranks.answer(in, always('x'));
  stale[1].step = in.step - 1;
  CHECK_THROWS_AS(ranks.scheduler().complete(stale), std::runtime_error);
  std::vector<StepOutput> tooFew = ranks.answer(in, always('x'));
  tooFew[0].tokens.clear();
  tooFew[1].tokens.clear();
  CHECK_THROWS_AS(ranks.scheduler().complete(tooFew), std::runtime_error);
  CHECK_THROWS_AS(ranks.scheduler().complete({}), std::runtime_error);
}

TEST_CASE("complete throws when a rank sampled a token outside the vocabulary") {
  FakeRanks ranks({});
  ranks.admit(request("r", "abc", 4));
  StepInput in = ranks.next();
  std::vector<StepOutput> outs = ranks.answer(in, always('x'));
  outs[0].tokens[0] = int32_t(kByteVocabSize);
  CHECK(messageOf([&] { ranks.scheduler().complete(outs); }).find("outside the vocabulary") !=
        std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Plan

TEST_CASE("planCpuEngine sizes the cache in whole blocks of the per-rank budget") {
  Limits l{.blocks = 20, .blockSize = 4, .maxModelLen = 64};
  CpuOptions o = optionsFor(l);
  o.kvCacheBytes += 100;  // less than a block more
  CpuPlan plan = planCpuEngine(o);
  CHECK(plan.numBlocks == 20);
  CHECK(plan.maxModelLen == 64);
  auto scheduler = makeCpuScheduler(o, plan);
  CHECK(scheduler->stats().totalBlocks == 20);
  CHECK(scheduler->stats().freeBlocks == 20);
  CHECK(scheduler->maxModelLen() == 64);
  CHECK(scheduler->chatFormat() == "chatml");  // the presets speak ChatML
  // Two ranks hold half of the (4) KV heads each: twice the blocks in the same budget.
  o.tensorParallelSize = 2;
  CHECK(planCpuEngine(o).numBlocks == 40);
  o.maxModelLen = 0;  // the model's own context length
  o.kvCacheBytes = int64_t(1) << 30;
  CHECK(planCpuEngine(o).maxModelLen == 2048);
}

TEST_CASE("planCpuEngine refuses a tensor-parallel size that does not divide the heads") {
  CpuOptions o = optionsFor({});
  o.tensorParallelSize = 3;
  std::string msg = messageOf([&] { planCpuEngine(o); });
  CHECK(msg.find("--tensor-parallel-size 3") != std::string::npos);
  CHECK(msg.find("attention heads (4)") != std::string::npos);
  CHECK_THROWS_AS(planCpuEngine(o), std::invalid_argument);
}

TEST_CASE("planCpuEngine refuses a token budget below max_num_seqs") {
  CpuOptions o = optionsFor({.maxNumSeqs = 16, .maxNumBatchedTokens = 8});
  std::string msg = messageOf([&] { planCpuEngine(o); });
  CHECK(msg.find("--max-num-batched-tokens (8)") != std::string::npos);
  CHECK(msg.find("--max-num-seqs (16)") != std::string::npos);
  CHECK_THROWS_AS(planCpuEngine(o), std::invalid_argument);
}

TEST_CASE("planCpuEngine refuses a KV cache smaller than one context-length sequence") {
  // 64 tokens need 16 blocks of 4; give 15.
  CpuOptions o = optionsFor({.blocks = 15, .blockSize = 4, .maxModelLen = 64});
  std::string msg = messageOf([&] { planCpuEngine(o); });
  CHECK(msg.find("holds 60 tokens") != std::string::npos);
  CHECK(msg.find("context length 64") != std::string::npos);
  CHECK(msg.find("--kv-cache-memory") != std::string::npos);
  CHECK_THROWS_AS(planCpuEngine(o), std::invalid_argument);
  o = optionsFor({.blocks = 16, .blockSize = 4, .maxModelLen = 64});
  CHECK(planCpuEngine(o).numBlocks == 16);
}

TEST_CASE("planCpuEngine refuses an unknown model and lists the presets") {
  CpuOptions o = optionsFor({});
  o.model = "no-such-model-here";
  std::string msg = messageOf([&] { planCpuEngine(o); });
  CHECK(msg.find("no-such-model-here") != std::string::npos);
  CHECK(msg.find("vsup-tiny-25m") != std::string::npos);
  CHECK(msg.find("vsup-tiny-4m") != std::string::npos);
  CHECK_THROWS_AS(planCpuEngine(o), std::runtime_error);
}

}  // namespace vsup::engine
