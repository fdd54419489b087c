// Causal attention of a run of consecutive prompt tokens of one sequence over the paged KV
// cache: the prefill half of the CPU engine's attention (decode, one query per sequence, stays
// kernels::pagedAttention). Computed as matrix products, block by block, so a long prompt costs
// what its matrix products cost rather than one query at a time.
//
// How: for each kv head, its K and V rows for positions [0, startPos + count) are gathered from
// the cache's blocks (through the block table) into two contiguous tiles. The query heads that
// share that kv head are then taken a block of query tokens at a time (a tile of about
// kQueryRows rows: every head of the group for each token of the block, pre-multiplied by the
// scale), and for each block of kKvBlock positions at or before the query block's last position:
// S = Q·Kᵀ (sgemm), the causal mask on the block that crosses the diagonal, an online softmax
// (running max and sum per row, the accumulator rescaled when the max grows), and O += P·V
// (sgemm). KV blocks wholly after a query block's last position are never computed. The matrix
// products run on OpenBLAS with as many threads as it was given (engine/blas.h); the softmax,
// gathers and masks are this thread's own, vectorized loops.
//
// Memory: the scratch grows to the largest call seen and is kept (a call of a size seen before
// allocates nothing): 2 × (startPos + count) × headDim floats for the K/V tiles plus about
// kQueryRows × (kKvBlock + 2 × headDim) floats for the query tile, scores and accumulator.
//
// Thread rules: a PrefillAttention object is one rank's scratch space; use it from one thread
// at a time. The matrix products may use OpenBLAS's own threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cpu_kernels.h"

namespace vsup::engine {

class PrefillAttention {
 public:
  // Rows of one query tile (query tokens × the query heads of one kv head), and positions of
  // one KV block: the M and N of S = Q·Kᵀ.
  static constexpr int kQueryRows = 128;
  static constexpr int kKvBlock = 512;

  // Attention of `count` query tokens at positions [startPos, startPos + count) of one
  // sequence, each over positions [0, its own position] (causal), reading K/V through
  // `blockTable` (the K/V of all `count` tokens already written to the cache). Query row t
  // (t < count) starts at q + t * qStride and holds [numHeads][headDim] floats; output row t at
  // out + t * outStride, the same shape. Grouped-query attention as kernels::pagedAttention:
  // query head h reads kv head h / (numHeads / numKvHeads). The result equals calling
  // kernels::pagedAttention for each token with contextLen = position + 1, to float rounding.
  // count 0 does nothing. Throws std::invalid_argument for a negative startPos or count, a
  // headDim, blockSize or numKvHeads under 1, or numHeads not a positive multiple of
  // numKvHeads. q and out must not overlap.
  void run(float* out, int64_t outStride, const float* q, int64_t qStride, const float* kCache,
           const float* vCache, const kernels::PagedLayout& layout, const int32_t* blockTable,
           int startPos, int count, int numHeads, float scale);

  // Floats of scratch held now (for tests: a repeated call of the same size must not grow it).
  size_t scratchFloats() const { return scratch_.capacity() + 2 * rowSum_.capacity(); }

 private:
  std::vector<float> scratch_;  // K tile, V tile, Q tile, scores, accumulator, running max
  std::vector<double> rowSum_;  // running softmax denominators, one per query-tile row
};

}  // namespace vsup::engine
