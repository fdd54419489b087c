#include "engine/prefill_attention.h"

#include <cstddef>

namespace vsup::engine {

void PrefillAttention::run(float* out, int64_t outStride, const float* q, int64_t qStride,
                           const float* kCache, const float* vCache,
                           const kernels::PagedLayout& layout, const int32_t* blockTable,
                           int startPos, int count, int numHeads, float scale) {
  // One query at a time (the reference the blocked version must match).
  if (scratch_.size() < size_t(startPos + count)) scratch_.resize(size_t(startPos + count));
  for (int t = 0; t < count; ++t) {
    kernels::pagedAttention(out + t * outStride, q + t * qStride, kCache, vCache, layout,
                            blockTable, startPos + t + 1, numHeads, scale, scratch_.data());
  }
}

}  // namespace vsup::engine
