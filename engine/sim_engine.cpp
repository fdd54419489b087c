#include "engine/sim_engine.h"

#include <memory>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>

namespace vsup::engine {
namespace {

constexpr std::array<const char*, kSimVocabSize> kWords = {
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and",
    " then", " runs", " far", " away", " from", " home", " while", " birds", " sing", " in",
    " tall", " green", " trees", " under", " bright", " blue", " skies", ",", ".", " it",
    " was", " good"};

// Bytes of KV per token slot: one hash.
constexpr int64_t kSlotBytes = sizeof(uint64_t);
// The most token slots a rank keeps, whatever --kv-cache-memory says: the sim needs no more to
// serve any test or demo, and a large budget should not cost real memory.
constexpr int64_t kMaxSlots = int64_t(1) << 20;
// The hash "before" position 0.
constexpr uint64_t kStartHash = 0x243f6a8885a308d3ULL;

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

bool isSpace(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

class SimTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool /*addSpecial: none*/) const override {
    std::vector<int32_t> ids;
    size_t i = 0;
    while (i < text.size()) {
      while (i < text.size() && isSpace(text[i])) ++i;
      size_t start = i;
      while (i < text.size() && !isSpace(text[i])) ++i;
      if (i > start) ids.push_back(int32_t(fnv1a(text.substr(start, i - start)) % kSimVocabSize));
    }
    if (ids.empty()) ids.push_back(0);  // every request has a prompt token to prefill
    return ids;
  }
  std::string tokenBytes(int32_t id) const override {
    if (id < 0 || size_t(id) >= kWords.size()) return {};
    return kWords[size_t(id)];
  }
  bool isSpecial(int32_t) const override { return false; }
  std::optional<int32_t> tokenId(std::string_view content) const override {
    for (size_t t = 0; t < kWords.size(); ++t) {
      if (content == kWords[t]) return int32_t(t);
    }
    return std::nullopt;
  }
  size_t vocabSize() const override { return kSimVocabSize; }
};

class SimRunner final : public ModelRunner {
 public:
  SimRunner(int32_t numBlocks, int32_t blockSize, uint64_t tokenMs, uint32_t rank)
      : numBlocks_(numBlocks), blockSize_(blockSize), tokenMs_(tokenMs), rank_(rank),
        // Not value-initialised: a slot is always written (through its block table) before
        // it is read, and an untouched page costs nothing, so a rank starts at once.
        cache_(new uint64_t[size_t(std::max(numBlocks, 0)) * size_t(std::max(blockSize, 0))]) {
    if (numBlocks <= 0 || blockSize <= 0) {
      throw std::invalid_argument("sim KV cache of " + std::to_string(numBlocks) + " blocks of " +
                                  std::to_string(blockSize) + " tokens");
    }
  }

  StepOutput execute(const StepInput& input) override {
    throwIfCancelled();
    StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    for (const SeqStep& q : input.seqs) {
      int64_t first = q.startPos;
      int64_t end = first + int64_t(q.tokens.size());
      uint64_t h = first == 0 ? kStartHash : cache_[slot(q, first - 1)];
      for (int64_t p = first; p < end; ++p) {
        h = mix(h ^ mix(uint64_t(q.tokens[size_t(p - first)]) + 1));
        cache_[slot(q, p)] = h;
      }
      if (!q.sample) {
        out.tokens.push_back(-1);
        continue;
      }
      uint64_t seed = q.temperature == 0 ? 0 : q.seed;  // greedy: the seed plays no part
      out.tokens.push_back(int32_t(mix(h ^ mix(seed) ^ mix(uint64_t(end))) % kSimVocabSize));
    }
    if (!input.seqs.empty() && tokenMs_ > 0) {
      // The step's simulated compute time, spent here as a real engine's would be, so that
      // engine-core's step timing and a rank's teardown see what they would see with a model.
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait_for(lock, std::chrono::milliseconds(tokenMs_), [this] { return cancelled_; });
    }
    throwIfCancelled();
    return out;
  }

  void cancel() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cancelled_ = true;
    }
    wake_.notify_all();
  }

 private:
  void throwIfCancelled() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cancelled_) throw std::runtime_error("rank " + std::to_string(rank_) + " was cancelled");
  }

  size_t slot(const SeqStep& q, int64_t position) const {
    size_t index = size_t(position / blockSize_);
    if (position < 0 || index >= q.blockTable.size()) {
      throw std::runtime_error("sequence " + q.id + ": position " + std::to_string(position) +
                               " is beyond its block table of " +
                               std::to_string(q.blockTable.size()) + " blocks");
    }
    int32_t block = q.blockTable[index];
    if (block < 0 || block >= numBlocks_) {
      throw std::runtime_error("sequence " + q.id + ": block " + std::to_string(block) +
                               " outside the cache of " + std::to_string(numBlocks_));
    }
    return size_t(block) * size_t(blockSize_) + size_t(position % blockSize_);
  }

  int32_t numBlocks_;
  int32_t blockSize_;
  uint64_t tokenMs_;
  uint32_t rank_;
  std::unique_ptr<uint64_t[]> cache_;  // one hash per token slot
  std::mutex mutex_;
  std::condition_variable wake_;
  bool cancelled_ = false;
};

int32_t simBlocks(const CommonConfig& c) {
  int64_t slots = std::min(c.kvCacheBytes / kSlotBytes, kMaxSlots);
  return int32_t(slots / c.blockSize);
}

class SimBackend final : public Backend {
 public:
  const char* name() const override { return "sim"; }

  EnginePlan plan(const EngineConfig& config) const override {
    validate(config);
    const CommonConfig& c = config.common;
    EnginePlan plan;
    plan.scheduler.maxNumSeqs = c.maxNumSeqs;
    plan.scheduler.maxNumBatchedTokens = c.maxNumBatchedTokens;
    plan.scheduler.maxModelLen = c.maxModelLen;  // 0: bounded by the cache alone
    plan.scheduler.numBlocks = simBlocks(c);
    plan.scheduler.blockSize = c.blockSize;
    plan.scheduler.vocabSize = int32_t(kSimVocabSize);
    plan.scheduler.kvHoldMs = kvHoldMs(c.kv);
    // As the sim always was: no context length unless one is asked for, and an unseeded request
    // draws as seed 0, so the same prompt always gives the same text.
    plan.scheduler.unboundedContext = c.maxModelLen == 0;
    plan.scheduler.defaultSeed = 0;
    if (plan.scheduler.numBlocks <= 0) {
      throw std::invalid_argument("--kv-cache-memory " + std::to_string(c.kvCacheBytes) +
                                  " bytes holds no KV block of " + std::to_string(c.blockSize) +
                                  " tokens (the sim engine keeps " +
                                  std::to_string(kSlotBytes) + " bytes per token)");
    }
    int64_t capacity = int64_t(plan.scheduler.numBlocks) * c.blockSize;
    std::string context = c.maxModelLen > 0
                              ? std::to_string(std::min(c.maxModelLen, capacity)) + " tokens"
                              : "unbounded (a request ends with \"length\" when the cache is full)";
    plan.chatFormat = ChatFormat::Plain;
    plan.summary = "model " + c.model + " (simulated), context " + context + ", KV cache " + std::to_string(plan.scheduler.numBlocks) +
                   " blocks of " + std::to_string(c.blockSize) + " tokens per rank";
    plan.sharedCollective = false;
    return plan;
  }

  std::shared_ptr<const Tokenizer> tokenizer(const EngineConfig&) const override {
    return makeSimTokenizer();
  }

  std::unique_ptr<ModelRunner> makeRunner(const EngineConfig& config, uint32_t rank,
                                          RankFds /*none: ranks never communicate*/)
      const override {
    validate(config);
    const auto* sim = std::get_if<SimConfig>(&config.backend);
    if (sim == nullptr) throw std::invalid_argument("the sim backend needs a sim configuration");
    return makeSimRunner(simBlocks(config.common), config.common.blockSize, sim->tokenMs, rank);
  }
};

}  // namespace

std::shared_ptr<const Tokenizer> makeSimTokenizer() {
  static const std::shared_ptr<const Tokenizer> tokenizer = std::make_shared<SimTokenizer>();
  return tokenizer;
}

std::unique_ptr<ModelRunner> makeSimRunner(int32_t numBlocks, int32_t blockSize,
                                           uint64_t tokenMs, uint32_t rank) {
  return std::make_unique<SimRunner>(numBlocks, blockSize, tokenMs, rank);
}

const Backend& simBackend() {
  static const SimBackend backend;
  return backend;
}

}  // namespace vsup::engine
