#include "engine/cuda_backend.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "engine/collective.h"
#include "engine/cpu_engine.h"
#include "engine/cuda/cuda_shard.h"
#include "engine/shard_weights.h"
#include "engine/weights.h"
#include "kernels/cpu_kernels.h"

// Where the build put the module and where an install puts it (engine/meson.build).
#ifndef VSUP_CUDA_MODULE_BUILT
#define VSUP_CUDA_MODULE_BUILT ""
#endif
#ifndef VSUP_CUDA_MODULE_INSTALLED
#define VSUP_CUDA_MODULE_INSTALLED ""
#endif
#ifndef VSUP_INSTALLED_BINDIR
#define VSUP_INSTALLED_BINDIR ""
#endif
#ifndef VSUP_CUDA_LIBDIR
#define VSUP_CUDA_LIBDIR "/usr/local/cuda/lib64"
#endif

namespace vsup::engine {
namespace {

const CudaConfig& cudaConfigOf(const EngineConfig& config) {
  const auto* cuda = std::get_if<CudaConfig>(&config.backend);
  if (cuda == nullptr) throw std::invalid_argument("the cuda backend needs a cuda configuration");
  return *cuda;
}

int64_t elementBytes(const CudaConfig& cuda) { return cuda.dtype == "float32" ? 4 : 2; }

// The installed module for an installed vsup (this process's executable in the install's
// bindir), the build's otherwise.
std::string modulePath() {
  if (const char* env = std::getenv("VSUP_CUDA_MODULE"); env != nullptr && *env != '\0') return env;
  char exe[4096];
  ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  std::string dir = n > 0 ? std::string(exe, size_t(n)) : std::string();
  dir = dir.substr(0, dir.find_last_of('/'));
  return dir == VSUP_INSTALLED_BINDIR ? VSUP_CUDA_MODULE_INSTALLED : VSUP_CUDA_MODULE_BUILT;
}

// The module, loaded once per process and never unloaded (CUDA's own threads may outlive any
// one engine). VSUP_CUDA_MODULE overrides where it is looked for.

cuda::MakeShardFn moduleFactory() {
  static cuda::MakeShardFn factory = nullptr;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string path = modulePath();
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      error = "the CUDA engine's module cannot be loaded (" + path + "): " + ::dlerror();
      return;
    }
    factory = reinterpret_cast<cuda::MakeShardFn>(::dlsym(handle, cuda::kMakeShardSymbol));
    if (factory == nullptr) error = path + " lacks " + cuda::kMakeShardSymbol;
  });
  if (factory == nullptr) throw std::runtime_error(error);
  return factory;
}

// ncclGetUniqueId in engine-core: a bootstrap address, which needs no GPU, from libnccl.so.2
// loaded for the call and kept (its bootstrap root thread serves the ranks' rendezvous).
std::string ncclUniqueId() {
  struct Id {
    char bytes[kNcclUniqueIdBytes];
  };
  using GetIdFn = int (*)(Id*);
  using ErrorFn = const char* (*)(int);
  void* handle = nullptr;
  std::string tried;
  for (std::string name : {std::string("libnccl.so.2"), std::string(VSUP_CUDA_LIBDIR) + "/libnccl.so.2"}) {
    handle = ::dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) break;
    tried += std::string(tried.empty() ? "" : "; ") + ::dlerror();
  }
  if (handle == nullptr) {
    throw std::runtime_error("--engine cuda at --tensor-parallel-size > 1 needs NCCL: " + tried);
  }
  auto getId = reinterpret_cast<GetIdFn>(::dlsym(handle, "ncclGetUniqueId"));
  auto text = reinterpret_cast<ErrorFn>(::dlsym(handle, "ncclGetErrorString"));
  if (getId == nullptr) throw std::runtime_error("libnccl.so.2 lacks ncclGetUniqueId");
  Id id{};
  if (int r = getId(&id); r != 0) {
    throw std::runtime_error(std::string("ncclGetUniqueId: ") +
                             (text != nullptr ? text(r) : std::to_string(r).c_str()));
  }
  return std::string(id.bytes, sizeof id.bytes);
}

class CudaRunner final : public ModelRunner {
 public:
  CudaRunner(const EngineConfig& config, const LlamaPlan& plan, uint32_t rank,
             std::unique_ptr<Collective> collective)
      : rank_(rank), collective_(std::move(collective)), vocab_(int(plan.model.config.vocabSize)) {
    const CudaConfig& cuda = cudaConfigOf(config);
    const uint32_t tp = config.common.tensorParallelSize;
    cuda::ShardSpec spec;
    spec.model = plan.model.config;
    spec.shard = rankShard(spec.model, rank, tp);
    spec.rank = rank;
    spec.tp = tp;
    spec.localRanks = config.common.ranksPerNode();
    spec.localRank = rank % spec.localRanks;
    spec.numBlocks = plan.numBlocks;
    spec.blockSize = config.common.blockSize;
    spec.maxPositions = plan.maxModelLen;
    spec.bf16 = cuda.dtype != "float32";
    spec.ncclUniqueId = cuda.ncclUniqueId;
    // At TP > 1 a step's device work is waited on within the collective timeout (a stopped
    // peer shows only as a step that does not end; a dead one is seen at once by its pidfd).
    // One rank has no peer to wait for: its bound is the step timeout engine-core keeps anyway.
    spec.collectiveTimeoutMs = tp > 1 ? config.common.collectiveTimeoutMs
                                      : int64_t(config.common.stepTimeoutMs);
    spec.cancel = &cancel_;
    Collective* peers = collective_.get();
    spec.deadPeer = [peers] { return peers->deadPeer(); };
    std::unique_ptr<WeightSource> weights =
        plan.model.dummyWeights ? makeDummyWeights(cuda.weightSeed)
                                : openSafetensors(plan.model.directory);
    shard_ = makeCudaShard(spec, *weights);
  }

  StepOutput execute(const StepInput& input) override {
    StepOutput out;
    out.step = input.step;
    out.rank = rank_;
    if (input.seqs.empty()) return out;
    std::vector<cuda::SeqInput> batch;  // greedy rows: the argmax comes from the GPU
    for (const SeqStep& q : input.seqs) batch.push_back(shardSeqOf(q));
    shard_->forward(batch, logits_, argmax_);
    size_t row = 0, sampledRow = 0;
    for (const SeqStep& q : input.seqs) {
      if (!q.sample) {
        out.tokens.push_back(-1);
        continue;
      }
      if (argmax_[row] >= 0) {
        out.tokens.push_back(argmax_[row]);
      } else {
        uint64_t position = q.startPos + q.tokens.size();
        out.tokens.push_back(kernels::sampleToken(&logits_[sampledRow * size_t(vocab_)], vocab_,
                                                  samplingOf(q), position, scratch_));
        ++sampledRow;
      }
      ++row;
    }
    return out;
  }

  void cancel() override {
    cancel_.store(true, std::memory_order_release);
    collective_->cancel();
  }

 private:
  uint32_t rank_;
  std::atomic<bool> cancel_{false};
  std::unique_ptr<Collective> collective_;  // the peers' pids (deadPeer); NCCL moves the data
  int vocab_;
  std::unique_ptr<cuda::Shard> shard_;      // after collective_: destroyed first
  std::vector<float> logits_;
  std::vector<int32_t> argmax_;
  std::vector<float> scratch_;
};

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  EnginePlan plan(const EngineConfig& config) const override {
    const CudaConfig& cuda = cudaConfigOf(config);
    LlamaPlan llama = planLlamaEngine(config, cuda.loadFormat, elementBytes(cuda));
    EnginePlan plan = llamaEnginePlan(config, llama);
    plan.summary += ", " + cuda.dtype + " on the GPU";
    // No kvLayout: the cache is in GPU memory, which the KV connector cannot read (yet).
    return plan;
  }

  std::shared_ptr<const Tokenizer> tokenizer(const EngineConfig& config) const override {
    return loadTokenizer(resolveModel(config.common.model, cudaConfigOf(config).loadFormat));
  }

  void prepareRanks(EngineConfig& rankConfig) const override {
    if (rankConfig.common.tensorParallelSize <= 1) return;
    std::get<CudaConfig>(rankConfig.backend).ncclUniqueId = ncclUniqueId();
  }

  std::unique_ptr<ModelRunner> makeRunner(const EngineConfig& config, uint32_t rank,
                                          RankFds fds) const override {
    const CudaConfig& cuda = cudaConfigOf(config);
    LlamaPlan plan = planLlamaEngine(config, cuda.loadFormat, elementBytes(cuda), false);
    return std::make_unique<CudaRunner>(config, plan, rank, joinRankCollective(config, rank, fds));
  }
};

}  // namespace

std::unique_ptr<cuda::Shard> makeCudaShard(const cuda::ShardSpec& spec,
                                           const WeightSource& weights) {
  std::unique_ptr<cuda::Shard> shard(moduleFactory()(spec));
  const LlamaConfig& c = spec.model;
  shard->loadGlobals(loadEmbedding(c, weights), loadLmHeadShard(c, spec.shard, weights),
                     loadFinalNorm(c, weights));
  for (int64_t i = 0; i < c.numLayers; ++i) {
    shard->loadLayer(i, loadShardLayer(c, spec.shard, weights, i));
  }
  return shard;
}

const Backend& cudaBackend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace vsup::engine
