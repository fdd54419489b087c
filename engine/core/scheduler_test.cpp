// The core scheduler driven alone: the tests play the ranks. Each step is checked the way a
// runner would rely on it (its tokens continue the sequence from startPos, its block table covers
// them and shares no block with another sequence or a hold), and each test then checks what the
// scheduler promises engine-core (deltas, finish reasons, holds, every block free at the end).
// Prompts are tokenized with the byte tokenizer: token ids are the prompt's bytes.
#include "engine/core/scheduler.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace vsup::engine::core {
namespace {

struct Limits {
  int32_t blocks = 64;  // KV blocks in the cache
  int32_t blockSize = 4;
  int64_t maxModelLen = 64;
  uint32_t maxNumSeqs = 8;
  uint32_t maxNumBatchedTokens = 256;
  int64_t kvHoldMs = 0;
  bool unboundedContext = false;
  int64_t defaultSeed = -1;  // -1: none (derived from the id)
};

SchedulerConfig configFor(const Limits& l) {
  SchedulerConfig c;
  c.maxNumSeqs = l.maxNumSeqs;
  c.maxNumBatchedTokens = l.maxNumBatchedTokens;
  c.maxModelLen = l.maxModelLen;
  c.numBlocks = l.blocks;
  c.blockSize = l.blockSize;
  c.eosTokenIds = {kByteEndOfText};  // as the presets' config.json says
  c.vocabSize = int32_t(kByteVocabSize);
  c.kvHoldMs = l.kvHoldMs;
  c.unboundedContext = l.unboundedContext;
  if (l.defaultSeed >= 0) c.defaultSeed = uint64_t(l.defaultSeed);
  return c;
}

std::shared_ptr<const Tokenizer> byteTokenizer() {
  static const std::shared_ptr<const Tokenizer> t = makeByteTokenizer();
  return t;
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

TokenizedRequest tokenized(GenerateRequest r) {
  TokenizedRequest t;
  t.promptTokens = byteTokenizer()->encode(r.prompt, true);
  t.request = std::move(r);
  return t;
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
// ranks sampled. When it goes, it aborts what is still in flight and releases the holds, and
// checks that every block is then free: no test leaks one.
class FakeRanks {
 public:
  explicit FakeRanks(const Limits& limits, uint32_t ranks = 1)
      : limits_(limits), scheduler_(configFor(limits), byteTokenizer()), ranks_(ranks) {}

  ~FakeRanks() {
    std::vector<std::string> open;
    for (const auto& [id, seq] : sequence_) open.push_back(id);
    for (const std::string& id : open) scheduler_.abort(id, nullptr);
    for (const auto& [id, blocks] : held_) scheduler_.releaseHold(id);
    scheduler_.blocks().checkInvariants();
    CHECK_MESSAGE(scheduler_.inFlight() == 0, "requests in flight that the test never admitted");
    CHECK_MESSAGE(scheduler_.stats().holds == 0, "holds that were never reported");
    CHECK_MESSAGE(scheduler_.stats().freeBlocks == scheduler_.stats().totalBlocks,
                  "blocks leaked");
  }

  Scheduler& scheduler() { return scheduler_; }
  SchedulerStats stats() const { return scheduler_.stats(); }

  // Admits a request the test expects to be accepted.
  void admit(GenerateRequest r) {
    std::optional<Rejection> rejected = tryAdmit(std::move(r));
    REQUIRE_MESSAGE(!rejected, "rejected: ", rejected ? rejected->message : "");
  }

  std::optional<Rejection> tryAdmit(GenerateRequest r) {
    std::string id = r.id;
    std::vector<int32_t> prompt = bytesOf(r.prompt);
    std::optional<Rejection> rejected = scheduler_.admit(tokenized(std::move(r)));
    if (!rejected) {
      sequence_[id] = prompt;
      sampled_[id] = 0;
      outcomes_.erase(id);  // an id may come back once its request has ended
    }
    return rejected;
  }

  bool abort(const std::string& id, TokenDelta* final) {
    bool known = scheduler_.abort(id, final);
    if (known) {
      sequence_.erase(id);
      if (final != nullptr) record(*final);
    }
    return known;
  }

  // nextStep(), checked.
  StepInput next() {
    StepInput in = scheduler_.nextStep();
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

  // complete(), recording every delta, every hold and what each sequence now holds.
  std::vector<TokenDelta> complete(const StepInput& in, const std::vector<StepOutput>& outs) {
    StepResult result = scheduler_.complete(outs);
    std::set<std::string> inStep;
    for (size_t i = 0; i < in.seqs.size(); ++i) {
      const SeqStep& q = in.seqs[i];
      inStep.insert(q.id);
      if (!q.sample || sequence_.count(q.id) == 0) continue;  // a chunk, or aborted meanwhile
      sampled_[q.id]++;
      int32_t token = outs[0].tokens[i];
      if (token != kByteEndOfText && token != kByteImEnd) sequence_[q.id].push_back(token);
    }
    std::set<std::string> finished;
    for (const TokenDelta& d : result.deltas) {
      CHECK_MESSAGE(inStep.count(d.requestId) == 1, "a delta for a request not in the step");
      if (d.finish != FinishReason::None) finished.insert(d.requestId);
      record(d);
    }
    for (const KvTransfer& t : result.held) {
      CHECK_MESSAGE(finished.count(t.requestId) == 1, "a hold for a request that did not finish");
      CHECK_MESSAGE(held_.count(t.requestId) == 0, "a second hold for ", t.requestId);
      CHECK(!t.blocks.empty());
      CHECK(scheduler_.blocks().heldBlocks(t.requestId) == t.blocks);
      held_[t.requestId] = t.blocks;
    }
    scheduler_.blocks().checkInvariants();
    return result.deltas;
  }

  std::vector<TokenDelta> step(const Picker& pick) {
    StepInput in = next();
    return complete(in, answer(in, pick));
  }

  // Steps until nothing is in flight (bounded); returns the number of steps.
  int runToEnd(const Picker& pick, int maxSteps = 2000) {
    int steps = 0;
    while (scheduler_.inFlight() > 0 && steps < maxSteps) {
      step(pick);
      ++steps;
    }
    REQUIRE_MESSAGE(scheduler_.inFlight() == 0, "requests still in flight after ", maxSteps,
                    " steps");
    return steps;
  }

  // Releases a hold the test saw reported.
  bool releaseHold(const std::string& id) {
    bool known = scheduler_.releaseHold(id);
    if (known) held_.erase(id);
    return known;
  }

  const Outcome& outcome(const std::string& id) { return outcomes_[id]; }
  size_t sampledCount(const std::string& id) const {
    auto it = sampled_.find(id);
    return it == sampled_.end() ? 0 : it->second;
  }
  const std::vector<int32_t>& sequence(const std::string& id) { return sequence_[id]; }
  // The holds reported and not released by the test (expired ones included).
  const std::map<std::string, std::vector<int32_t>>& held() const { return held_; }
  void forgetHold(const std::string& id) { held_.erase(id); }
  // A request that ended outside complete() (a failed load returns its final delta itself).
  void forgetRequest(const std::string& id) { sequence_.erase(id); }

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

  // What a runner relies on for every step.
  void check(const StepInput& in) {
    SchedulerStats st = scheduler_.stats();
    CHECK(in.seqs.size() <= limits_.maxNumSeqs);
    size_t tokens = 0;
    std::set<int32_t> used;
    for (const auto& [id, blocks] : held_) {
      for (int32_t b : scheduler_.blocks().heldBlocks(id)) used.insert(b);
    }
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
      // The block table covers every position written so far, with blocks of the cache that
      // no other sequence and no hold has.
      CHECK(q.blockTable.size() * size_t(limits_.blockSize) >= q.startPos + q.tokens.size());
      for (int32_t b : q.blockTable) {
        CHECK(b >= 0);
        CHECK(b < st.totalBlocks);
        CHECK_MESSAGE(used.insert(b).second, "block ", b, " used twice (", q.id, ")");
      }
      tokens += q.tokens.size();
    }
    CHECK(tokens <= limits_.maxNumBatchedTokens);
    CHECK(size_t(st.freeBlocks) + used.size() <= size_t(st.totalBlocks));
  }

  Limits limits_;
  Scheduler scheduler_;
  uint32_t ranks_;
  std::map<std::string, std::vector<int32_t>> sequence_;  // the prompt, then non-EOS samples
  std::map<std::string, size_t> sampled_;
  std::map<std::string, Outcome> outcomes_;
  std::map<std::string, std::vector<int32_t>> held_;
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
  for (const auto& entry : maxTokens) {
    const std::string& id = entry.first;  // not a structured binding: CAPTURE takes it by lambda
    const auto n = entry.second;
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
  // The aborted request's token, and its KV position, must not go to the new one.
  FakeRanks ranks({});
  Scheduler& s = ranks.scheduler();
  ranks.admit(request("r", "abcdefgh", 5));
  StepInput in = ranks.next();
  std::vector<StepOutput> outs = ranks.answer(in, always('q'));
  REQUIRE(ranks.abort("r", nullptr));
  std::optional<Rejection> rejected;
  CHECK_NOTHROW(rejected = s.admit(tokenized(request("r", "xy", 5))));
  CHECK_FALSE(rejected);
  StepResult result = s.complete(outs);
  CHECK_MESSAGE(result.deltas.empty(), "the aborted request's token went to the new one: ",
                result.deltas.empty() ? "" : result.deltas[0].text);
  StepInput next = s.nextStep();
  REQUIRE(next.seqs.size() == 1);
  CHECK(next.seqs[0].startPos == 0);
  CHECK(next.seqs[0].tokens == bytesOf("xy"));
  CHECK(s.abort("r", nullptr));
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
  std::optional<Rejection> rejected = ranks.tryAdmit(request("r", "0123456789", 60));
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::ContextLengthExceeded);
  CHECK(std::string(nameOf(rejected->code)) == "context_length_exceeded");
  CHECK(rejected->message ==
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens (10 "
        "in the prompt, 60 for the completion). Please reduce the prompt or max_tokens.");
  CHECK(ranks.scheduler().inFlight() == 0);
  // Nothing of it stayed: its id can be used again.
  ranks.admit(request("r", "0123456789", 54));  // exactly the context
  CHECK(ranks.scheduler().inFlight() == 1);
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").text.size() == 54);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("a max_tokens ceiling (a chat without max_tokens) is lowered to what the context leaves") {
  FakeRanks ranks({.maxModelLen = 64});
  GenerateRequest ceiling = request("r", "0123456789", 4096);
  ceiling.sampling.maxTokensToContext = true;
  ranks.admit(ceiling);
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").text.size() == 54);
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  // Without the flag the same request is refused, as before.
  std::optional<Rejection> rejected = ranks.tryAdmit(request("s", "0123456789", 4096));
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::ContextLengthExceeded);
  // A prompt that fills the context is refused even with a ceiling.
  GenerateRequest full = request("t", std::string(64, 'p'), 4096);
  full.sampling.maxTokensToContext = true;
  rejected = ranks.tryAdmit(full);
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::ContextLengthExceeded);
}

TEST_CASE("with no context length configured a request is bounded by the whole cache") {
  // 4 blocks of 4 tokens: 16 positions in all.
  FakeRanks ranks({.blocks = 4, .blockSize = 4, .maxModelLen = 0});
  CHECK(ranks.scheduler().maxModelLen() == 0);
  std::optional<Rejection> rejected = ranks.tryAdmit(request("r", "0123456789", 7));
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::ContextLengthExceeded);
  CHECK(rejected->message.find("maximum context length is 16 tokens") != std::string::npos);
  CHECK(rejected->message.find("requested 17 tokens") != std::string::npos);
  ranks.admit(request("r", "0123456789", 6));
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  CHECK(ranks.outcome("r").text == "xxxxxx");
}

TEST_CASE("with an unbounded context any max_tokens is accepted and the request ends with length when the cache is full") {
  // 4 blocks of 4 tokens: 16 positions; a 10-token prompt leaves room for 6 generated tokens.
  FakeRanks ranks({.blocks = 4, .blockSize = 4, .maxModelLen = 0, .unboundedContext = true});
  ranks.admit(request("r", "0123456789", 1000000000));
  ranks.runToEnd(always('x'));
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  CHECK(ranks.outcome("r").text == "xxxxxx");
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  // A prompt that leaves no room for one token is still refused.
  std::optional<Rejection> rejected = ranks.tryAdmit(request("big", "0123456789abcdef", 1));
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::ContextLengthExceeded);
}

TEST_CASE("an unseeded request draws with the configured default seed, the same for every id") {
  FakeRanks ranks({.defaultSeed = 0});
  ranks.admit(request("a", "p", 2));
  ranks.admit(request("b", "p", 2));
  StepInput in = ranks.next();
  REQUIRE(in.seqs.size() == 2);
  CHECK(in.seqs[0].seed == 0);
  CHECK(in.seqs[1].seed == 0);
  ranks.runToEnd(always('x'));
}

TEST_CASE("a context length above what the cache holds is bounded by the cache") {
  FakeRanks ranks({.blocks = 4, .blockSize = 4, .maxModelLen = 64});
  std::optional<Rejection> rejected = ranks.tryAdmit(request("r", "0123456789", 7));
  REQUIRE(rejected);
  CHECK(rejected->message.find("maximum context length is 16 tokens") != std::string::npos);
}

TEST_CASE("an empty prompt is rejected as empty") {
  FakeRanks ranks({});
  std::optional<Rejection> rejected = ranks.tryAdmit(request("r", "", 4));
  REQUIRE(rejected);
  CHECK(rejected->code == RejectCode::EmptyPrompt);
  CHECK(std::string(nameOf(rejected->code)) == "empty_prompt");
  CHECK(rejected->message.find("empty") != std::string::npos);
  CHECK(ranks.scheduler().inFlight() == 0);
  CHECK(ranks.stats().waiting == 0);
}

TEST_CASE("a duplicate request id is a caller error, not a rejection") {
  FakeRanks ranks({});
  ranks.admit(request("r", "abc", 4));
  std::string msg = messageOf([&] { (void)ranks.scheduler().admit(tokenized(request("r", "def", 4))); });
  CHECK(msg.find("duplicate") != std::string::npos);
  CHECK_THROWS_AS((void)ranks.scheduler().admit(tokenized(request("r", "def", 4))),
                  std::invalid_argument);
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
// KV holds

TEST_CASE("with a hold lease a request that ends by length keeps its blocks held until released") {
  FakeRanks ranks({.kvHoldMs = 60000});
  ranks.admit(request("r", "abcdefgh", 3));  // 8 + 3 positions: 3 blocks of 4
  StepInput last;
  while (ranks.scheduler().inFlight() > 0) {
    last = ranks.next();
    ranks.complete(last, ranks.answer(last, always('x')));
  }
  CHECK(ranks.outcome("r").finish == FinishReason::Length);
  REQUIRE(ranks.held().count("r") == 1);
  // The last step's table (10 positions: 3 blocks) is what stays held.
  CHECK(ranks.held().at("r") == last.seqs[0].blockTable);
  CHECK(ranks.stats().holds == 1);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks - 3);
  for (int32_t b : ranks.held().at("r")) CHECK(ranks.scheduler().blocks().refCount(b) == 1);
  CHECK(ranks.releaseHold("r"));
  CHECK(ranks.stats().holds == 0);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK_FALSE(ranks.releaseHold("r"));
}

TEST_CASE("with a hold lease requests that end by EOS or a stop string are held too") {
  FakeRanks ranks({.kvHoldMs = 60000});
  ranks.admit(request("eos", "abcd", 10));
  ranks.admit(request("stop", "abcd", 10, {"yz"}));
  ranks.runToEnd(scripted({{"eos", {'a', kByteEndOfText}}, {"stop", {'a', 'y', 'z'}}}));
  CHECK(ranks.outcome("eos").finish == FinishReason::Stop);
  CHECK(ranks.outcome("stop").finish == FinishReason::Stop);
  CHECK(ranks.held().count("eos") == 1);
  CHECK(ranks.held().count("stop") == 1);
  CHECK(ranks.stats().holds == 2);
  CHECK(ranks.stats().freeBlocks < ranks.stats().totalBlocks);
  CHECK(ranks.releaseHold("eos"));
  CHECK(ranks.releaseHold("stop"));
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("without a hold lease a finished request holds nothing") {
  FakeRanks ranks({.kvHoldMs = 0});
  ranks.admit(request("r", "abcdefgh", 3));
  ranks.runToEnd(always('x'));
  CHECK(ranks.held().empty());
  CHECK(ranks.stats().holds == 0);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("expireHolds frees the holds whose lease has passed and says which") {
  FakeRanks ranks({.kvHoldMs = 60000});
  ranks.admit(request("r", "abcdefgh", 2));
  ranks.runToEnd(always('x'));
  REQUIRE(ranks.held().count("r") == 1);
  CHECK(ranks.scheduler().expireHolds(monoNow()).empty());  // the lease runs a minute
  CHECK(ranks.stats().holds == 1);
  std::vector<std::string> expired =
      ranks.scheduler().expireHolds(monoNow() + 61000 * kNsPerMs);
  CHECK(expired == std::vector<std::string>{"r"});
  ranks.forgetHold("r");
  CHECK(ranks.stats().holds == 0);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
  CHECK_FALSE(ranks.scheduler().releaseHold("r"));
}

TEST_CASE("an aborted request never holds its blocks, running or mid-step") {
  FakeRanks ranks({.kvHoldMs = 60000});
  ranks.admit(request("a", "abcdefgh", 20));
  ranks.admit(request("b", "abcdefgh", 20));
  for (int i = 0; i < 3; ++i) ranks.step(always('x'));
  REQUIRE(ranks.abort("a", nullptr));
  CHECK(ranks.stats().holds == 0);
  StepInput in = ranks.next();
  REQUIRE(ranks.abort("b", nullptr));  // while its step runs
  std::vector<TokenDelta> deltas = ranks.complete(in, ranks.answer(in, always('x')));
  CHECK(deltas.empty());
  CHECK(ranks.held().empty());
  CHECK(ranks.stats().holds == 0);
  CHECK(ranks.stats().freeBlocks == ranks.stats().totalBlocks);
}

TEST_CASE("a preempted request's blocks are freed, not held, and it is held once when it ends") {
  Limits tight{.blocks = 4, .blockSize = 4, .maxModelLen = 16, .maxNumSeqs = 2,
               .maxNumBatchedTokens = 16, .kvHoldMs = 60000};
  FakeRanks ranks(tight);
  ranks.admit(request("A", "abcd", 8));
  ranks.admit(request("B", "wxyz", 8));
  for (int i = 0; i < 20 && ranks.stats().preemptions == 0; ++i) ranks.step(byPosition());
  REQUIRE(ranks.stats().preemptions == 1);
  CHECK(ranks.stats().holds == 0);
  CHECK(ranks.scheduler().blocks().table("B").empty());
  // A ends and is held: B cannot get its blocks back until the hold goes.
  for (int i = 0; i < 20 && ranks.held().count("A") == 0; ++i) ranks.step(byPosition());
  REQUIRE(ranks.held().count("A") == 1);
  CHECK(ranks.outcome("A").finish == FinishReason::Length);
  StepInput blocked = ranks.next();
  CHECK(blocked.seqs.empty());
  ranks.complete(blocked, ranks.answer(blocked, byPosition()));
  CHECK(ranks.releaseHold("A"));
  ranks.runToEnd(byPosition());
  CHECK(ranks.outcome("B").finish == FinishReason::Length);
  CHECK(ranks.outcome("B").completionTokens == 8);
  CHECK(ranks.held().count("B") == 1);
  CHECK(ranks.stats().holds == 1);
  CHECK(ranks.releaseHold("B"));
}

TEST_CASE("a request that ends while an earlier request's hold under its id is pending is freed, not held") {
  FakeRanks ranks({.kvHoldMs = 60000});
  ranks.admit(request("r", "abcdefgh", 2));
  ranks.runToEnd(always('x'));
  REQUIRE(ranks.held().count("r") == 1);
  std::vector<int32_t> first = ranks.held().at("r");
  int32_t freeWithOneHold = ranks.stats().freeBlocks;
  ranks.admit(request("r", "abcdefgh", 2));
  ranks.runToEnd(always('y'));
  CHECK(ranks.outcome("r").text == "yy");
  CHECK(ranks.stats().holds == 1);
  CHECK(ranks.scheduler().blocks().heldBlocks("r") == first);
  CHECK(ranks.stats().freeBlocks == freeWithOneHold);
  CHECK(ranks.releaseHold("r"));
}

}  // namespace vsup::engine::core

// ---------------------------------------------------------------------------------------------
// Disaggregated prefill/decode (KvParams)

namespace vsup::engine::core {
namespace {

GenerateRequest remoteDecode(const std::string& id, const std::string& prompt) {
  GenerateRequest r = request(id, prompt, 50);
  r.kv = KvParams{};
  r.kv->doRemoteDecode = true;
  return r;
}

GenerateRequest remotePrefill(const std::string& id, const std::string& prompt, size_t blocks) {
  GenerateRequest r = request(id, prompt, 3);
  KvParams p;
  p.doRemotePrefill = true;
  p.remoteEngineId = "e";
  p.remoteRequestId = "remote-" + id;
  for (size_t i = 0; i < blocks; ++i) p.remoteBlockIds.push_back(int32_t(100 + i));
  p.remoteHost = "h";
  p.remotePort = 1;
  p.tpSize = 1;
  r.kv = p;
  return r;
}

}  // namespace

TEST_CASE("a remote-decode request computes one token and holds its prompt's blocks, with no expiry") {
  FakeRanks ranks({});
  ranks.admit(remoteDecode("p", "abcdefghij"));  // 10 tokens: 3 blocks of 4
  ranks.runToEnd(byPosition());
  CHECK(ranks.outcome("p").finish == FinishReason::Length);
  CHECK(ranks.outcome("p").completionTokens == 1);  // max_tokens 50 was lowered to 1
  REQUIRE(ranks.held().count("p") == 1);
  CHECK(ranks.held().at("p").size() == 3);
  CHECK(ranks.scheduler().expireHolds(kNoDeadline - 1).empty());  // only its lease's end frees it
  CHECK(ranks.releaseHold("p"));
}

TEST_CASE("a remote-prefill request needs one remote block per block of its prompt") {
  FakeRanks ranks({});
  auto rejected = ranks.tryAdmit(remotePrefill("d", "abcdefghij", 2));
  REQUIRE(rejected.has_value());
  CHECK(rejected->code == RejectCode::KvTransferInvalid);
  CHECK(rejected->message.find("has 2 block(s), but the 10-token prompt fills 3 block(s) of 4") !=
        std::string::npos);
}

TEST_CASE("a loaded request computes only its last prompt token, then generates") {
  FakeRanks ranks({});
  ranks.admit(remotePrefill("d", "abcdefghij", 3));
  ranks.admit(request("local", "xy", 2));
  StepInput first = ranks.next();
  REQUIRE(first.seqs.size() == 1);  // the local one only: "d" waits for its KV
  CHECK(first.seqs[0].id == "local");
  std::vector<KvLoad> loads = ranks.scheduler().takeKvLoads();
  REQUIRE(loads.size() == 1);
  CHECK(loads[0].requestId == "d");
  CHECK(loads[0].remote.remoteRequestId == "remote-d");
  CHECK(loads[0].blocks.size() == 3);
  CHECK(loads[0].blocks == ranks.scheduler().blocks().table("d"));
  CHECK(ranks.stats().loading == 1);
  CHECK(ranks.scheduler().takeKvLoads().empty());  // handed out once
  ranks.complete(first, ranks.answer(first, byPosition()));
  StepInput second = ranks.next();
  for (const SeqStep& q : second.seqs) CHECK(q.id != "d");
  ranks.complete(second, ranks.answer(second, byPosition()));
  ranks.scheduler().kvLoaded(loads[0].token);
  CHECK(ranks.stats().loading == 0);
  StepInput third = ranks.next();
  auto d = std::find_if(third.seqs.begin(), third.seqs.end(), [](const SeqStep& q) { return q.id == "d"; });
  REQUIRE(d != third.seqs.end());
  CHECK(d->startPos == 9);
  CHECK(d->tokens == std::vector<int32_t>{'j'});
  CHECK(d->sample);
  CHECK(d->blockTable == loads[0].blocks);  // computed in the blocks the load filled
  ranks.complete(third, ranks.answer(third, byPosition()));
  ranks.runToEnd(byPosition());
  CHECK(ranks.outcome("d").finish == FinishReason::Length);
  CHECK(ranks.outcome("d").completionTokens == 3);
}

TEST_CASE("a failed load ends the request with its error, or makes it a local prefill") {
  FakeRanks ranks({});
  ranks.admit(remotePrefill("fail", "abcdefgh", 2));
  ranks.admit(remotePrefill("again", "abcdefgh", 2));
  ranks.next();
  std::vector<KvLoad> loads = ranks.scheduler().takeKvLoads();
  REQUIRE(loads.size() == 2);
  auto final = ranks.scheduler().kvLoadFailed(loads[0].token, false, "remote engine restarted");
  REQUIRE(final.has_value());
  CHECK(final->finish == FinishReason::Error);
  CHECK(final->error == "remote engine restarted");
  CHECK(final->requestId == "fail");
  ranks.forgetRequest("fail");
  CHECK_FALSE(ranks.scheduler().kvLoadFailed(loads[1].token, true, "timed out").has_value());
  StepInput in = ranks.next();
  REQUIRE(in.seqs.size() == 1);
  CHECK(in.seqs[0].id == "again");
  CHECK(in.seqs[0].startPos == 0);  // the whole prompt, here
  CHECK(in.seqs[0].tokens.size() == 8);
  ranks.complete(in, ranks.answer(in, byPosition()));
  ranks.runToEnd(byPosition());
  CHECK(ranks.outcome("again").completionTokens == 3);
}

TEST_CASE("an aborted loading request keeps its blocks until its load ends") {
  FakeRanks ranks({.blocks = 8});
  ranks.admit(remotePrefill("d", "abcdefgh", 2));
  ranks.next();
  std::vector<KvLoad> loads = ranks.scheduler().takeKvLoads();
  REQUIRE(loads.size() == 1);
  TokenDelta final;
  REQUIRE(ranks.abort("d", &final));
  CHECK(final.finish == FinishReason::Abort);
  CHECK(ranks.stats().freeBlocks == 6);  // the load may still be writing them
  for (int32_t b : loads[0].blocks) CHECK(ranks.scheduler().blocks().refCount(b) == 1);
  ranks.scheduler().kvLoaded(loads[0].token);
  CHECK(ranks.stats().freeBlocks == 8);
  ranks.scheduler().kvLoaded(loads[0].token);  // a second report changes nothing
  CHECK(ranks.stats().freeBlocks == 8);
}

TEST_CASE("a loading request is never preempted for another's blocks") {
  // 6 blocks of 4: the load takes 2, the local request grows until it needs the rest.
  FakeRanks ranks({.blocks = 6, .maxModelLen = 24});
  ranks.admit(remotePrefill("d", "abcdefgh", 2));
  ranks.next();
  std::vector<KvLoad> loads = ranks.scheduler().takeKvLoads();
  REQUIRE(loads.size() == 1);
  ranks.admit(request("grow", "ab", 20));  // 22 positions: 6 blocks, more than are left
  for (int i = 0; i < 40 && ranks.scheduler().inFlight() > 1; ++i) {
    StepInput in = ranks.next();
    for (const SeqStep& q : in.seqs) CHECK(q.id != "d");
    CHECK(ranks.scheduler().blocks().table("d") == loads[0].blocks);
    ranks.complete(in, ranks.answer(in, byPosition()));
    if (ranks.outcome("grow").finish != FinishReason::None) break;
  }
  CHECK(ranks.scheduler().blocks().table("d") == loads[0].blocks);
  ranks.scheduler().kvLoaded(loads[0].token);
  ranks.runToEnd(byPosition());
  CHECK(ranks.outcome("d").finish == FinishReason::Length);
}

}  // namespace vsup::engine::core
