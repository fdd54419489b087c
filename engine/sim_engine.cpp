// The simulated engine: deterministic text from a real step loop.
//
// Token `position` of a request is a pure function of (prompt hash, seed, position), so every
// rank computes the same token and the output is reproducible run after run. The cost of a
// step is SimOptions::tokenMs, paid by every rank (the worker process waits it out).
#include <algorithm>
#include <array>
#include <deque>
#include <map>
#include <stdexcept>

#include "engine/engine.h"
#include "engine/text_stream.h"

namespace vsup::engine {
namespace {

constexpr std::array<const char*, 32> kWords = {
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and",
    " then", " runs", " far", " away", " from", " home", " while", " birds", " sing", " in",
    " tall", " green", " trees", " under", " bright", " blue", " skies", ",", ".", " it",
    " was", " good"};

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Sequence {
  GenerateRequest request;
  uint64_t promptHash = 0;
  uint64_t seed = 0;
  int64_t promptTokens = 0;
  int64_t generated = 0;
  StopTextStream text{{}};
};

class SimScheduler final : public Scheduler {
 public:
  explicit SimScheduler(SimOptions options) : options_(options) {}

  void admit(GenerateRequest request) override {
    if (byId_.count(request.id) != 0) {
      throw std::invalid_argument("duplicate request id " + request.id);
    }
    Sequence s;
    s.promptHash = simPromptHash(request.prompt);
    s.seed = request.sampling.seed.value_or(0);
    s.promptTokens = simPromptTokens(request.prompt);
    s.text = StopTextStream(request.sampling.stop);
    std::string id = request.id;
    s.request = std::move(request);
    byId_[id] = std::move(s);
    waiting_.push_back(id);
  }

  bool abort(const std::string& id, TokenDelta* final) override {
    auto it = byId_.find(id);
    if (it == byId_.end()) return false;
    if (final != nullptr) {
      final->requestId = id;
      final->promptTokens = it->second.promptTokens;
      final->completionTokens = it->second.generated;
      final->finish = FinishReason::Abort;
    }
    byId_.erase(it);
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
    running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
    return true;
  }

  StepInput nextStep() override {
    // Continuous batching: admit waiting requests at the step boundary, up to the batch limit.
    while (!waiting_.empty() && running_.size() < options_.maxNumSeqs) {
      running_.push_back(waiting_.front());
      waiting_.pop_front();
    }
    StepInput in;
    in.step = ++step_;
    for (const std::string& id : running_) {
      const Sequence& s = byId_.at(id);
      SeqStep q;
      q.id = id;
      q.promptHash = s.promptHash;
      q.position = uint32_t(s.generated);
      q.seed = s.seed;
      q.temperature = s.request.sampling.temperature;
      in.seqs.push_back(std::move(q));
    }
    current_ = in;
    return in;
  }

  std::vector<TokenDelta> complete(const std::vector<StepOutput>& ranks) override {
    checkRankOutputs(current_, ranks);
    std::vector<TokenDelta> out;
    for (size_t i = 0; i < current_.seqs.size(); ++i) {
      auto it = byId_.find(current_.seqs[i].id);
      if (it == byId_.end()) continue;  // aborted while the step ran
      Sequence& s = it->second;
      s.generated++;
      TokenDelta d;
      d.requestId = s.request.id;
      d.promptTokens = s.promptTokens;
      d.completionTokens = s.generated;
      if (s.text.append(simDetokenize(ranks[0].tokens[i]))) {
        d.finish = FinishReason::Stop;
      } else if (s.generated >= s.request.sampling.maxTokens) {
        d.finish = FinishReason::Length;
      }
      d.text = s.text.take(d.finish != FinishReason::None);
      out.push_back(std::move(d));
      if (out.back().finish != FinishReason::None) {
        running_.erase(std::remove(running_.begin(), running_.end(), s.request.id),
                       running_.end());
        byId_.erase(it);
      }
    }
    return out;
  }

  size_t inFlight() const override { return byId_.size(); }

 private:
  SimOptions options_;
  uint64_t step_ = 0;
  std::map<std::string, Sequence> byId_;
  std::deque<std::string> waiting_;
  std::vector<std::string> running_;
  StepInput current_;
};

class SimWorker final : public WorkerEngine {
 public:
  SimWorker(SimOptions options, uint32_t rank) : options_(options), rank_(rank) {}

  StepOutput execute(const StepInput& input) override {
    StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    for (const SeqStep& s : input.seqs) {
      uint64_t seed = s.temperature == 0 ? 0 : s.seed;  // greedy: the seed plays no part
      uint64_t h = mix(s.promptHash ^ mix(seed) ^ mix(s.position + 1));
      out.tokens.push_back(int32_t(h % kWords.size()));
    }
    return out;
  }

  uint64_t simulatedCostMs(const StepInput& input) const override {
    return input.seqs.empty() ? 0 : options_.tokenMs;
  }

 private:
  SimOptions options_;
  uint32_t rank_;
};

}  // namespace

std::string simDetokenize(int32_t token) {
  if (token < 0 || size_t(token) >= kWords.size()) return "?";
  return kWords[size_t(token)];
}

uint64_t simPromptHash(const std::string& prompt) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : prompt) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

int64_t simPromptTokens(const std::string& prompt) {
  int64_t words = 0;
  bool inWord = false;
  for (unsigned char c : prompt) {
    bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    if (!space && !inWord) ++words;
    inWord = !space;
  }
  return std::max<int64_t>(words, 1);
}

std::unique_ptr<Scheduler> makeSimScheduler(SimOptions options) {
  return std::make_unique<SimScheduler>(options);
}

std::unique_ptr<WorkerEngine> makeSimWorker(SimOptions options, uint32_t rank) {
  return std::make_unique<SimWorker>(options, rank);
}

}  // namespace vsup::engine
