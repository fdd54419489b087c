#include "engine/cpu_engine.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

#include "engine/blas.h"
#include "engine/collective.h"
#include "engine/cross_node_collective.h"
#include "engine/llama_model.h"
#include "engine/weights.h"
#include "kernels/cpu_kernels.h"

namespace vsup::engine {
namespace {

const CpuConfig& cpuConfigOf(const EngineConfig& config) {
  const auto* cpu = std::get_if<CpuConfig>(&config.backend);
  if (cpu == nullptr) throw std::invalid_argument("the cpu backend needs a cpu configuration");
  return *cpu;
}

LlamaPlan planCpuEngine(const EngineConfig& config, bool needTokenizer = true) {
  return planLlamaEngine(config, cpuConfigOf(config).loadFormat, 4, needTokenizer);
}

class CpuRunner final : public ModelRunner {
 public:
  CpuRunner(const EngineConfig& config, const LlamaPlan& plan, uint32_t rank,
            std::unique_ptr<Collective> collective, int kvCacheFd)
      : rank_(rank), collective_(std::move(collective)) {
    const uint32_t tp = config.common.tensorParallelSize;
    // The machine's cores, shared between the ranks: more BLAS threads than that would only
    // make the ranks preempt one another between collectives.
    // The shard's own threads (the batched gemv of decode steps) are the same share: OpenBLAS's
    // (prompts) and the shard's take turns, never run at once.
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const int threads = int(std::max(1u, cores / tp));
    blas::setThreads(threads);
    std::unique_ptr<WeightSource> weights =
        plan.model.dummyWeights ? makeDummyWeights(cpuConfigOf(config).weightSeed)
                                : openSafetensors(plan.model.directory);
    KvCacheShape cache;
    cache.numBlocks = plan.numBlocks;
    cache.blockSize = config.common.blockSize;
    cache.regionFd = kvCacheFd;
    shard_ = std::make_unique<LlamaShard>(plan.model.config, rank, tp, *weights, cache,
                                          *collective_, threads);
  }

  std::vector<std::string> warnings() const override {
    if (rank_ != 0) return {};  // one rank says it for the tree: they share the machine
    std::string advice = blas::coreTypeAdvice();
    if (advice.empty()) return {};
    return {advice};
  }

  StepOutput execute(const StepInput& input) override {
    StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    if (input.seqs.empty()) return out;
    std::vector<LlamaShard::Seq> batch;
    for (const SeqStep& q : input.seqs) batch.push_back(shardSeqOf(q));
    shard_->forward(batch, logits_);
    const int vocab = int(shard_->config().vocabSize);
    size_t row = 0;
    for (const SeqStep& q : input.seqs) {
      if (!q.sample) {
        out.tokens.push_back(-1);
        continue;
      }
      uint64_t position = q.startPos + q.tokens.size();
      out.tokens.push_back(kernels::sampleToken(&logits_[row * size_t(vocab)], vocab,
                                                samplingOf(q), position, scratch_));
      ++row;
    }
    return out;
  }

  void cancel() override { collective_->cancel(); }

 private:
  uint32_t rank_;
  std::unique_ptr<Collective> collective_;
  std::unique_ptr<LlamaShard> shard_;
  std::vector<float> logits_;
  std::vector<float> scratch_;
};

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  EnginePlan plan(const EngineConfig& config) const override {
    LlamaPlan cpu = planCpuEngine(config);
    const CommonConfig& o = config.common;
    EnginePlan plan = llamaEnginePlan(config, cpu);
    plan.kvLayout = kvCacheLayout(cpu.model.config, o.tensorParallelSize, o.blockSize,
                                  cpu.numBlocks);
    return plan;
  }

  std::shared_ptr<const Tokenizer> tokenizer(const EngineConfig& config) const override {
    return loadTokenizer(resolveModel(config.common.model, cpuConfigOf(config).loadFormat));
  }

  std::unique_ptr<ModelRunner> makeRunner(const EngineConfig& config, uint32_t rank,
                                          RankFds fds) const override {
    // A rank computes on token ids only: it needs no tokenizer.json.
    LlamaPlan plan = planCpuEngine(config, /*needTokenizer=*/false);
    return std::make_unique<CpuRunner>(config, plan, rank, joinRankCollective(config, rank, fds),
                                       fds.kvCache);
  }
};

}  // namespace

LlamaPlan planLlamaEngine(const EngineConfig& config, const std::string& loadFormat,
                          int64_t kvElementBytes, bool needTokenizer) {
  const CommonConfig& o = config.common;
  validate(config);
  LlamaPlan plan;
  plan.model = resolveModel(o.model, loadFormat, needTokenizer);
  const LlamaConfig& c = plan.model.config;
  c.checkTensorParallel(o.tensorParallelSize);
  plan.maxModelLen = c.maxPositions;
  if (o.maxModelLen > 0) plan.maxModelLen = std::min(plan.maxModelLen, o.maxModelLen);
  plan.numBlocks =
      kvBlocksFor(c, o.tensorParallelSize, o.blockSize, o.kvCacheBytes, kvElementBytes);
  int64_t tokens = int64_t(plan.numBlocks) * o.blockSize;
  if (tokens < plan.maxModelLen) {
    int64_t need = (plan.maxModelLen + o.blockSize - 1) / o.blockSize *
                   kvBytesPerBlock(c, o.tensorParallelSize, o.blockSize, kvElementBytes);
    throw std::invalid_argument(
        "--kv-cache-memory " + std::to_string(o.kvCacheBytes) + " bytes holds " +
        std::to_string(tokens) + " tokens per rank, less than one sequence of the context length " +
        std::to_string(plan.maxModelLen) + " (needs " + std::to_string(need) +
        " bytes): raise --kv-cache-memory or lower --max-model-len");
  }
  return plan;
}

std::unique_ptr<Collective> joinRankCollective(const EngineConfig& config, uint32_t rank,
                                               RankFds fds) {
  const CommonConfig& o = config.common;
  const uint32_t perNode = o.ranksPerNode();
  std::unique_ptr<Collective> local =
      perNode == 1 ? makeSingleRankCollective()
                   : joinSharedCollective(fds.collective, rank % perNode, perNode,
                                          o.collectiveTimeoutMs);
  if (o.nnodes == 1) return local;
  if (fds.crossNode == nullptr || fds.nodeAddress.empty()) {
    throw std::invalid_argument("rank " + std::to_string(rank) + ": --nnodes " +
                                std::to_string(o.nnodes) +
                                " needs the node's address and a place for the cross-node "
                                "collective (RankFds)");
  }
  CrossNodeJoin join;
  join.rank = rank;
  join.ranks = o.tensorParallelSize;
  join.ranksPerNode = perNode;
  join.listenAddress = fds.nodeAddress;
  join.timeoutMs = o.collectiveTimeoutMs;
  std::unique_ptr<CrossNodeCollective> c = listenCrossNode(join, std::move(local));
  *fds.crossNode = c.get();
  return c;
}

EnginePlan llamaEnginePlan(const EngineConfig& config, const LlamaPlan& llama) {
  const CommonConfig& o = config.common;
  const LlamaConfig& c = llama.model.config;
  EnginePlan plan;
  plan.scheduler.maxNumSeqs = o.maxNumSeqs;
  plan.scheduler.maxNumBatchedTokens = o.maxNumBatchedTokens;
  plan.scheduler.maxModelLen = llama.maxModelLen;
  plan.scheduler.numBlocks = llama.numBlocks;
  plan.scheduler.blockSize = o.blockSize;
  plan.scheduler.eosTokenIds = c.eosTokenIds;
  plan.scheduler.vocabSize = int32_t(c.vocabSize);
  plan.scheduler.kvHoldMs = kvHoldMs(o.kv);
  plan.chatFormat = llama.model.chatFormat;
  plan.chatFormatNote = llama.model.chatFormatNote;
  plan.summary = "model " + llama.model.name + " (" + std::to_string(c.parameterCount()) +
                 " parameters, weights " + (llama.model.dummyWeights ? "dummy" : "safetensors") +
                 "), context " + std::to_string(llama.maxModelLen) + " tokens, KV cache " +
                 std::to_string(llama.numBlocks) + " blocks of " + std::to_string(o.blockSize) +
                 " tokens per rank";
  plan.sharedCollective = o.ranksPerNode() > 1;
  plan.crossNodeCollective = o.nnodes > 1;
  plan.modelKvHeads = uint32_t(c.numKvHeads);
  plan.modelId = llama.model.name;
  return plan;
}

const Backend& cpuBackend() {
  static const CpuBackend backend;
  return backend;
}

std::unique_ptr<Tokenizer> loadTokenizer(const ModelSource& model) {
  if (model.tokenizerPath.empty()) return makeByteTokenizer();
  return loadHfTokenizer(model.tokenizerPath);
}

}  // namespace vsup::engine
