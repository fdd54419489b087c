// A rank's shard of a Llama checkpoint in host fp32, cut by rankShard() and laid out the way
// every backend computes in: q, k and v fused into one [(qHeads + 2 kvHeads) * headDim, hidden]
// matrix, gate and up into one [2 * mlp, hidden], o and down as their column slices. The CPU
// engine keeps these vectors; the CUDA engine uploads them (converted to its dtype) one layer at
// a time and lets them go.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/engine.h"
#include "engine/llama_config.h"
#include "engine/weights.h"
#include "kernels/cpu_kernels.h"

namespace vsup::engine {

struct ShardLayerWeights {
  std::vector<float> inputNorm, postNorm;  // [hidden]
  std::vector<float> qkv;                  // [(qHeads + 2 kvHeads) * headDim, hidden]
  std::vector<float> o;                    // [hidden, qHeads * headDim]
  std::vector<float> gateUp;               // [2 * mlp, hidden]
  std::vector<float> down;                 // [hidden, mlp]
};

// Layer `layer`'s part of rank `shard`. Throws std::runtime_error naming the tensor (missing,
// wrong shape or dtype).
ShardLayerWeights loadShardLayer(const LlamaConfig& config, const RankShard& shard,
                                 const WeightSource& weights, int64_t layer);

// The embedding, whole: [vocab, hidden].
std::vector<float> loadEmbedding(const LlamaConfig& config, const WeightSource& weights);
// The rank's rows of lm_head: [vocabShard, hidden], rows past the vocabulary zero.
std::vector<float> loadLmHeadShard(const LlamaConfig& config, const RankShard& shard,
                                   const WeightSource& weights);
// model.norm.weight: [hidden].
std::vector<float> loadFinalNorm(const LlamaConfig& config, const WeightSource& weights);

// One sequence's part of a step as a shard computes it: `tokens` at positions startPos.. (a
// prompt chunk, or the one token generated last), their KV written through `blockTable`, which
// must cover every position up to startPos + count - 1. Borrows the step's vectors.
struct ShardSeq {
  const int32_t* tokens = nullptr;
  int32_t count = 0;
  int32_t startPos = 0;
  const int32_t* blockTable = nullptr;
  int32_t blockCount = 0;
  bool wantLogits = false;  // the logits of its last token
  bool greedy = false;      // with wantLogits: its token is their argmax (no draw)
};
// A SeqStep as a ShardSeq: its logits wanted when it samples; greedy as kernels::sampleToken
// is without looking at the logits (temperature <= 0, or top-k 1).
ShardSeq shardSeqOf(const SeqStep& step);
// The SeqStep's sampling parameters, for kernels::sampleToken.
kernels::SamplingConfig samplingOf(const SeqStep& step);

// The checks every backend makes of one sequence's part of a step before computing it: some
// tokens, positions inside the context, a block table covering them whose blocks are inside the
// cache, token ids inside the vocabulary. Throws std::invalid_argument saying which.
void checkShardInput(const LlamaConfig& config, int32_t numBlocks, int32_t blockSize,
                     const ShardSeq& seq);

}  // namespace vsup::engine
