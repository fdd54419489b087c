#include "engine/cpu_engine.h"

#include <algorithm>
#include <thread>
#include <deque>
#include <map>
#include <set>
#include <stdexcept>

#include "engine/blas.h"
#include "engine/llama_model.h"
#include "engine/text_stream.h"
#include "engine/weights.h"
#include "kernels/cpu_kernels.h"

namespace vsup::engine {
namespace {

uint64_t hashId(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

struct Sequence {
  GenerateRequest request;
  std::vector<int32_t> tokens;  // the prompt, then every generated token
  int32_t promptLen = 0;
  int32_t computed = 0;  // tokens whose KV is in the cache
  std::vector<int32_t> blocks;
  uint64_t seed = 0;
  int64_t generated = 0;  // sampled tokens, EOS included
  std::unique_ptr<IncrementalDecoder> decoder;
  StopTextStream text{{}};
  bool running = false;
  uint64_t serial = 0;  // which admission this is: an id may come back after an abort
};

class CpuSchedulerImpl final : public CpuScheduler {
 public:
  CpuSchedulerImpl(const CpuOptions& options, const CpuPlan& plan,
                   std::unique_ptr<Tokenizer> tokenizer)
      : options_(options), plan_(plan), tokenizer_(std::move(tokenizer)) {
    for (int32_t b = plan.numBlocks - 1; b >= 0; --b) free_.push_back(b);
    for (int32_t id : plan.model.config.eosTokenIds) eos_.insert(id);
    // The chat format's end-of-turn token ends a reply too.
    for (const char* end : {"<|im_end|>", "<|eot_id|>", "<|endoftext|>"}) {
      if (auto id = tokenizer_->tokenId(end); id && tokenizer_->isSpecial(*id)) eos_.insert(*id);
    }
  }

  void admit(GenerateRequest request) override {
    if (byId_.count(request.id) != 0) {
      throw std::invalid_argument("duplicate request id " + request.id);
    }
    Sequence s;
    s.tokens = tokenizer_->encode(request.prompt, true);
    s.promptLen = int32_t(s.tokens.size());
    if (s.tokens.empty()) throw RequestRejected("the prompt is empty (it encodes to no tokens)");
    int64_t want = int64_t(s.tokens.size()) + request.sampling.maxTokens;
    if (want > plan_.maxModelLen) {
      throw RequestRejected(
          "This model's maximum context length is " + std::to_string(plan_.maxModelLen) +
          " tokens. However, you requested " + std::to_string(want) + " tokens (" +
          std::to_string(s.tokens.size()) + " in the prompt, " +
          std::to_string(request.sampling.maxTokens) +
          " for the completion). Please reduce the prompt or max_tokens.");
    }
    s.seed = request.sampling.seed.value_or(hashId(request.id));
    s.decoder = std::make_unique<IncrementalDecoder>(*tokenizer_);
    s.text = StopTextStream(request.sampling.stop);
    s.serial = ++admissions_;
    std::string id = request.id;
    s.request = std::move(request);
    byId_.emplace(id, std::move(s));
    waiting_.push_back(id);
  }

  bool abort(const std::string& id, TokenDelta* final) override {
    auto it = byId_.find(id);
    if (it == byId_.end()) return false;
    if (final != nullptr) {
      final->requestId = id;
      final->promptTokens = it->second.promptLen;
      final->completionTokens = it->second.generated;
      final->finish = FinishReason::Abort;
    }
    remove(it);
    return true;
  }

  StepInput nextStep() override {
    StepInput in;
    in.step = ++step_;
    int64_t budget = options_.maxNumBatchedTokens;
    bool preempted = false;
    // Running sequences first, oldest first; when blocks run out, the newest is preempted
    // (its blocks freed, its tokens recomputed when it is scheduled again).
    std::vector<std::string> order = running_;
    for (const std::string& id : order) {
      auto it = byId_.find(id);
      if (it == byId_.end() || !it->second.running) continue;
      Sequence& s = it->second;
      int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.computed, budget);
      if (n <= 0) continue;
      bool scheduled = true;
      while (!reserve(s, s.computed + int32_t(n))) {
        preempted = true;
        std::string victim = running_.back();
        preempt(victim);
        if (victim == id) {
          scheduled = false;
          break;
        }
      }
      if (!scheduled) continue;
      budget -= n;
      in.seqs.push_back(stepFor(s, int32_t(n)));
    }
    // Then new (or preempted) requests, while there is room, unless this step had to preempt.
    while (!preempted && !waiting_.empty() && running_.size() < options_.maxNumSeqs &&
           budget > 0) {
      Sequence& s = byId_.at(waiting_.front());
      int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.computed, budget);
      if (!reserve(s, s.computed + int32_t(n))) break;
      s.running = true;
      running_.push_back(waiting_.front());
      waiting_.pop_front();
      budget -= n;
      in.seqs.push_back(stepFor(s, int32_t(n)));
    }
    current_ = in;
    currentSerials_.clear();
    for (const SeqStep& q : in.seqs) currentSerials_.push_back(byId_.at(q.id).serial);
    return in;
  }

  std::vector<TokenDelta> complete(const std::vector<StepOutput>& ranks) override {
    checkRankOutputs(current_, ranks);
    std::vector<TokenDelta> out;
    for (size_t i = 0; i < current_.seqs.size(); ++i) {
      const SeqStep& q = current_.seqs[i];
      auto it = byId_.find(q.id);
      // Aborted while the step ran (and perhaps its id admitted again since).
      if (it == byId_.end() || it->second.serial != currentSerials_[i]) continue;
      Sequence& s = it->second;
      s.computed = int32_t(q.startPos + q.tokens.size());
      if (!q.sample) continue;  // a prompt chunk: nothing to say yet
      int32_t token = ranks[0].tokens[i];
      if (token < 0 || token >= plan_.model.config.vocabSize) {
        throw std::runtime_error("rank 0 sampled token " + std::to_string(token) +
                                 " outside the vocabulary");
      }
      s.generated++;
      TokenDelta d;
      d.requestId = s.request.id;
      d.promptTokens = s.promptLen;
      d.completionTokens = s.generated;
      if (eos_.count(token) != 0) {
        s.text.append(s.decoder->flush());
        d.finish = FinishReason::Stop;
      } else {
        s.tokens.push_back(token);
        if (s.text.append(s.decoder->push(token))) {
          d.finish = FinishReason::Stop;
        } else if (s.generated >= s.request.sampling.maxTokens) {
          if (s.text.append(s.decoder->flush())) d.finish = FinishReason::Stop;
          else d.finish = FinishReason::Length;
        }
      }
      d.text = s.text.take(d.finish != FinishReason::None);
      out.push_back(std::move(d));
      if (out.back().finish != FinishReason::None) remove(it);
    }
    current_.seqs.clear();  // applied: completing this step again is a caller error
    currentSerials_.clear();
    return out;
  }

  size_t inFlight() const override { return byId_.size(); }
  int64_t maxModelLen() const override { return plan_.maxModelLen; }
  std::string chatFormat() const override { return nameOf(plan_.model.chatFormat); }

  CpuSchedulerStats stats() const override {
    CpuSchedulerStats st;
    st.totalBlocks = plan_.numBlocks;
    st.freeBlocks = int32_t(free_.size());
    st.waiting = waiting_.size();
    st.running = running_.size();
    st.preemptions = preemptions_;
    return st;
  }

 private:
  // Makes s's block table cover `positions` tokens. False (nothing taken) when the free list is
  // too short.
  bool reserve(Sequence& s, int32_t positions) {
    size_t need = size_t((positions + options_.blockSize - 1) / options_.blockSize);
    if (need <= s.blocks.size()) return true;
    if (need - s.blocks.size() > free_.size()) return false;
    while (s.blocks.size() < need) {
      s.blocks.push_back(free_.back());
      free_.pop_back();
    }
    return true;
  }

  void release(Sequence& s) {
    for (int32_t b : s.blocks) free_.push_back(b);
    s.blocks.clear();
  }

  // Recompute preemption: the sequence keeps its tokens (prompt and output) and goes back to
  // the front of the queue; its KV is rebuilt by a prefill when it runs again.
  void preempt(const std::string& id) {
    Sequence& s = byId_.at(id);
    release(s);
    s.computed = 0;
    s.running = false;
    running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
    waiting_.push_front(id);
    ++preemptions_;
  }

  void remove(std::map<std::string, Sequence>::iterator it) {
    release(it->second);
    const std::string& id = it->first;
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
    running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
    byId_.erase(it);
  }

  SeqStep stepFor(const Sequence& s, int32_t n) const {
    SeqStep q;
    q.id = s.request.id;
    q.seed = s.seed;
    q.temperature = s.request.sampling.temperature;
    q.topP = s.request.sampling.topP;
    q.topK = s.request.sampling.topK;
    q.startPos = uint32_t(s.computed);
    q.tokens.assign(s.tokens.begin() + s.computed, s.tokens.begin() + s.computed + n);
    q.blockTable = s.blocks;
    q.sample = s.computed + n == int32_t(s.tokens.size());
    q.position = uint32_t(s.generated);
    return q;
  }

  CpuOptions options_;
  CpuPlan plan_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::set<int32_t> eos_;
  std::vector<int32_t> free_;  // the free list (a stack: recently freed blocks are reused first)
  std::map<std::string, Sequence> byId_;
  std::deque<std::string> waiting_;
  std::vector<std::string> running_;  // in admission order
  StepInput current_;
  uint64_t step_ = 0;
  uint64_t preemptions_ = 0;
  uint64_t admissions_ = 0;
  std::vector<uint64_t> currentSerials_;
};

class CpuWorkerImpl final : public WorkerEngine {
 public:
  CpuWorkerImpl(const CpuOptions& options, const CpuPlan& plan, uint32_t rank,
         std::unique_ptr<Collective> collective)
      : rank_(rank), collective_(std::move(collective)) {
    // The machine's cores, shared between the ranks: more BLAS threads than that would only
    // make the ranks preempt one another between collectives.
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    blas::setThreads(int(std::max(1u, cores / options.tensorParallelSize)));
    std::unique_ptr<WeightSource> weights =
        plan.model.dummyWeights ? makeDummyWeights(options.weightSeed)
                                : openSafetensors(plan.model.directory);
    KvCacheShape cache;
    cache.numBlocks = plan.numBlocks;
    cache.blockSize = options.blockSize;
    shard_ = std::make_unique<LlamaShard>(plan.model.config, rank, options.tensorParallelSize,
                                          *weights, cache, *collective_);
  }

  StepOutput execute(const StepInput& input) override {
    StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    if (input.seqs.empty()) return out;
    std::vector<LlamaShard::Seq> batch;
    for (const SeqStep& q : input.seqs) {
      LlamaShard::Seq s;
      s.tokens = q.tokens.data();
      s.count = int32_t(q.tokens.size());
      s.startPos = int32_t(q.startPos);
      s.blockTable = q.blockTable.data();
      s.blockCount = int32_t(q.blockTable.size());
      s.wantLogits = q.sample;
      batch.push_back(s);
    }
    shard_->forward(batch, logits_);
    const int vocab = int(shard_->config().vocabSize);
    size_t row = 0;
    for (const SeqStep& q : input.seqs) {
      if (!q.sample) {
        out.tokens.push_back(-1);
        continue;
      }
      kernels::SamplingConfig c;
      c.temperature = float(q.temperature);
      c.topK = q.topK;
      c.topP = float(q.topP);
      c.seed = q.seed;
      uint64_t position = q.startPos + q.tokens.size();
      out.tokens.push_back(
          kernels::sampleToken(&logits_[row * size_t(vocab)], vocab, c, position, scratch_));
      ++row;
    }
    return out;
  }

  uint64_t simulatedCostMs(const StepInput&) const override { return 0; }
  void cancel() override { collective_->cancel(); }

 private:
  uint32_t rank_;
  std::unique_ptr<Collective> collective_;
  std::unique_ptr<LlamaShard> shard_;
  std::vector<float> logits_;
  std::vector<float> scratch_;
};

}  // namespace

CpuPlan planCpuEngine(const CpuOptions& options) {
  CpuPlan plan;
  plan.model = resolveModel(options.model, options.loadFormat);
  const LlamaConfig& c = plan.model.config;
  c.checkTensorParallel(options.tensorParallelSize);
  if (options.blockSize <= 0 || options.blockSize > 1024) {
    throw std::invalid_argument("--block-size must be 1..1024, got " +
                                std::to_string(options.blockSize));
  }
  if (options.maxNumBatchedTokens < options.maxNumSeqs) {
    throw std::invalid_argument("--max-num-batched-tokens (" +
                                std::to_string(options.maxNumBatchedTokens) +
                                ") must be at least --max-num-seqs (" +
                                std::to_string(options.maxNumSeqs) +
                                "): every running request needs a token per step");
  }
  plan.maxModelLen = c.maxPositions;
  if (options.maxModelLen > 0) plan.maxModelLen = std::min(plan.maxModelLen, options.maxModelLen);
  plan.numBlocks = kvBlocksFor(c, options.tensorParallelSize, options.blockSize,
                               options.kvCacheBytes);
  int64_t tokens = int64_t(plan.numBlocks) * options.blockSize;
  if (tokens < plan.maxModelLen) {
    int64_t need = (plan.maxModelLen + options.blockSize - 1) / options.blockSize *
                   kvBytesPerBlock(c, options.tensorParallelSize, options.blockSize);
    throw std::invalid_argument(
        "--kv-cache-memory " + std::to_string(options.kvCacheBytes) + " bytes holds " +
        std::to_string(tokens) + " tokens per rank, less than one sequence of the context length " +
        std::to_string(plan.maxModelLen) + " (needs " + std::to_string(need) +
        " bytes): raise --kv-cache-memory or lower --max-model-len");
  }
  return plan;
}

std::unique_ptr<Tokenizer> loadTokenizer(const ModelSource& model) {
  if (model.tokenizerPath.empty()) return makeByteTokenizer();
  return loadHfTokenizer(model.tokenizerPath);
}

std::unique_ptr<CpuScheduler> makeCpuScheduler(const CpuOptions& options, const CpuPlan& plan,
                                               std::unique_ptr<Tokenizer> tokenizer) {
  if (!tokenizer) tokenizer = loadTokenizer(plan.model);
  return std::make_unique<CpuSchedulerImpl>(options, plan, std::move(tokenizer));
}

std::unique_ptr<WorkerEngine> makeCpuWorker(const CpuOptions& options, const CpuPlan& plan,
                                            uint32_t rank, std::unique_ptr<Collective> collective) {
  return std::make_unique<CpuWorkerImpl>(options, plan, rank, std::move(collective));
}

}  // namespace vsup::engine
