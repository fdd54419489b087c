// The CPU engine (--engine cpu): a real Llama-architecture transformer behind the same
// Scheduler / WorkerEngine interface as the sim engine.
//
// Scheduler side (engine-core): tokenizes prompts, owns the paged KV cache's block tables and
// free list, batches continuously under --max-num-seqs and --max-num-batched-tokens (prompts
// longer than the token budget are prefilled in chunks), preempts by recompute when blocks run
// out, and detokenizes incrementally (stop strings, EOS, max_tokens).
// Worker side (each rank): this rank's LlamaShard; executes the step's tokens through the model
// and samples every sequence's next token from the (identical on every rank) logits.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/collective.h"
#include "engine/engine.h"
#include "engine/llama_config.h"
#include "engine/tokenizer.h"

namespace vsup::engine {

struct CpuOptions {
  std::string model = kDefaultModel;  // a preset or a Hugging Face model directory
  std::string loadFormat = "auto";    // auto, dummy, safetensors
  uint64_t weightSeed = 0;            // dummy weights
  uint32_t tensorParallelSize = 1;
  uint32_t maxNumSeqs = 256;
  uint32_t maxNumBatchedTokens = 2048;
  int64_t maxModelLen = 0;                      // 0: the model's context length
  int64_t kvCacheBytes = int64_t(256) << 20;    // per rank
  int32_t blockSize = 16;
  int64_t collectiveTimeoutMs = 10000;
};

// What both sides derive from the options: checked once, identically, by engine-core and by
// every worker. Throws std::runtime_error / std::invalid_argument with a message for the user
// (bad model, TP that does not divide the heads, a KV budget that cannot hold one full-length
// sequence, a token budget below --max-num-seqs).
struct CpuPlan {
  ModelSource model;
  int64_t maxModelLen = 0;
  int32_t numBlocks = 0;
};
CpuPlan planCpuEngine(const CpuOptions& options);

// Scheduler internals visible to tests.
struct CpuSchedulerStats {
  int32_t totalBlocks = 0;
  int32_t freeBlocks = 0;
  size_t waiting = 0;
  size_t running = 0;
  uint64_t preemptions = 0;
};

class CpuScheduler : public Scheduler {
 public:
  virtual CpuSchedulerStats stats() const = 0;
};

// `tokenizer` null: the plan's own (the preset's byte tokenizer or the directory's).
std::unique_ptr<CpuScheduler> makeCpuScheduler(const CpuOptions& options, const CpuPlan& plan,
                                               std::unique_ptr<Tokenizer> tokenizer = nullptr);
std::unique_ptr<Tokenizer> loadTokenizer(const ModelSource& model);

// Loads this rank's shard (weights, KV cache). Takes the collective.
std::unique_ptr<WorkerEngine> makeCpuWorker(const CpuOptions& options, const CpuPlan& plan,
                                            uint32_t rank, std::unique_ptr<Collective> collective);

}  // namespace vsup::engine
