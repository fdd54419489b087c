// One tensor-parallel rank's shard of a Llama-architecture transformer, with its part of the
// paged KV cache, computing in fp32 on the CPU: the matrix products of up to 32 tokens (decode
// steps) through kernels::BatchedGemv, which reads each weight once per step for the whole
// batch, on threads the shard owns; larger ones (prompts) through OpenBLAS's sgemm; kernels/
// for the rest.
//
// Megatron-style split over `tp` ranks: q/k/v and gate/up are column-parallel (this rank holds
// numHeads/tp query heads, numKvHeads/tp KV heads and intermediateSize/tp MLP columns), o and
// down are row-parallel (partial sums, all-reduced), the input embedding is replicated and the
// output projection (lm_head) is vocab-parallel (each rank computes its slice of the logits,
// then all-gathers). Every rank ends a forward pass with the same full-vocabulary logits.
//
// Thread: one compute thread calls forward(); not thread-safe. The shard's gemv workers (threads
// - 1 of them) live as long as it does and are joined by its destructor.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/collective.h"
#include "engine/kv_cache.h"
#include "engine/llama_config.h"
#include "engine/prefill_attention.h"
#include "engine/shard_weights.h"
#include "engine/weights.h"
#include "kernels/batched_gemv.h"
#include "kernels/cpu_kernels.h"

namespace vsup::engine {

struct KvCacheShape {
  int32_t numBlocks = 0;
  int32_t blockSize = 16;
  int regionFd = -1;  // a KV cache region (kv_cache.h) to compute in, borrowed; -1: private memory
};

// One rank's cache as bytes (kv_cache.h): what LlamaShard computes in.
KvCacheLayout kvCacheLayout(const LlamaConfig& config, uint32_t tp, int32_t blockSize,
                            int32_t numBlocks);

// Bytes of KV cache one block takes on one rank, and how many blocks fit in `budgetBytes`, for
// a cache of `elementBytes` per value (4: the CPU engine's fp32; 2: the CUDA engine's bf16).
int64_t kvBytesPerBlock(const LlamaConfig& config, uint32_t tp, int32_t blockSize,
                        int64_t elementBytes = 4);
int32_t kvBlocksFor(const LlamaConfig& config, uint32_t tp, int32_t blockSize, int64_t budgetBytes,
                    int64_t elementBytes = 4);

class LlamaShard {
 public:
  // Loads this rank's shard from `weights` (throws std::runtime_error naming the tensor) and
  // allocates and touches its KV cache. Borrows `collective`, which must outlive it. `threads`:
  // the threads the matrix products of small batches run on (the calling thread and
  // threads - 1 workers the shard owns; give it the same share of the cores as OpenBLAS).
  LlamaShard(const LlamaConfig& config, uint32_t rank, uint32_t tp, const WeightSource& weights,
             KvCacheShape cache, Collective& collective, int threads = 1);
  ~LlamaShard();
  LlamaShard(const LlamaShard&) = delete;
  LlamaShard& operator=(const LlamaShard&) = delete;

  using Seq = ShardSeq;  // greedy is not the shard's business: it returns every row's logits
  // Runs the batch. `logits` receives vocabSize floats for each Seq with wantLogits, in order.
  // Throws CollectiveError when the ranks cannot complete a collective, and
  // std::invalid_argument for a Seq outside the cache or the context.
  void forward(const std::vector<Seq>& batch, std::vector<float>& logits);

  const LlamaConfig& config() const { return config_; }
  int64_t weightBytes() const;  // this rank's weights, for the benchmark's bandwidth floor

 private:
  using Layer = ShardLayerWeights;

  LlamaConfig config_;
  uint32_t rank_;
  uint32_t tp_;
  Collective& collective_;
  int64_t qHeads_, kvHeads_, mlp_, vocabShard_;
  std::vector<float> embed_;    // [vocab, hidden], replicated
  std::vector<float> lmHead_;   // [vocabShard, hidden]: rows rank*vocabShard.. (zero past vocab)
  std::vector<float> finalNorm_;
  std::vector<Layer> layers_;
  KvCacheShape cache_;
  kernels::PagedLayout layout_;
  KvCacheLayout kvLayout_;
  KvCacheMapping kvMap_;  // [layer][k|v][block][slot][kvHead][headDim]
  float* kv_ = nullptr;   // kvMap_'s floats
  kernels::RopeTable rope_;
  // Scratch, reused between steps.
  std::vector<float> x_, h_, qkvOut_, attn_, proj_, gu_, scores_, lastRows_, shardLogits_, gathered_;
  PrefillAttention prefillAttention_;
  std::unique_ptr<kernels::BatchedGemv> gemv_;  // the matrix products of small batches
};

}  // namespace vsup::engine
