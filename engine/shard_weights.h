// A rank's shard of a Llama checkpoint in host fp32, cut by rankShard() and laid out the way
// every backend computes in: q, k and v fused into one [(qHeads + 2 kvHeads) * headDim, hidden]
// matrix, gate and up into one [2 * mlp, hidden], o and down as their column slices. The CPU
// engine keeps these vectors; the CUDA engine uploads them (converted to its dtype) one layer at
// a time and lets them go.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/llama_config.h"
#include "engine/weights.h"

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

// The checks every backend makes of one sequence's part of a step before computing it: some
// tokens, positions inside the context, a block table covering them whose blocks are inside the
// cache, token ids inside the vocabulary. Throws std::invalid_argument saying which.
void checkShardInput(const LlamaConfig& config, int32_t numBlocks, int32_t blockSize,
                     const int32_t* tokens, int32_t count, int32_t startPos,
                     const int32_t* blockTable, int32_t blockCount);

}  // namespace vsup::engine
