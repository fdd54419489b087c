// Causal attention of a run of consecutive prompt tokens of one sequence over the paged KV
// cache: the prefill half of the CPU engine's attention (decode, one query per sequence, stays
// kernels::pagedAttention). Computed as matrix products, block by block, so a long prompt costs
// what its matrix products cost rather than one query at a time.
//
// Thread rules: a PrefillAttention object is one rank's scratch space; use it from one thread
// at a time. The matrix products may use OpenBLAS's own threads.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu_kernels.h"

namespace vsup::engine {

class PrefillAttention {
 public:
  // Attention of `count` query tokens at positions [startPos, startPos + count) of one
  // sequence, each over positions [0, its own position] (causal), reading K/V through
  // `blockTable` (the K/V of all `count` tokens already written to the cache). Query row t
  // (t < count) starts at q + t * qStride and holds [numHeads][headDim] floats; output row t at
  // out + t * outStride, the same shape. Grouped-query attention as kernels::pagedAttention:
  // query head h reads kv head h / (numHeads / numKvHeads). The result equals calling
  // kernels::pagedAttention for each token with contextLen = position + 1, to float rounding.
  void run(float* out, int64_t outStride, const float* q, int64_t qStride, const float* kCache,
           const float* vCache, const kernels::PagedLayout& layout, const int32_t* blockTable,
           int startPos, int count, int numHeads, float scale);

 private:
  std::vector<float> scratch_;
};

}  // namespace vsup::engine
