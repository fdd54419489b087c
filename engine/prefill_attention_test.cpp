#include "engine/prefill_attention.h"

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

using namespace vsup;

TEST_CASE("prefill attention over a scrambled block table equals per-token paged attention") {
  kernels::PagedLayout layout{16, 2, 32};
  const int numHeads = 4, startPos = 5, count = 37;
  const int context = startPos + count;
  const int blocks = (context + layout.blockSize - 1) / layout.blockSize;
  std::vector<int32_t> table;
  for (int b = 0; b < blocks; ++b) table.push_back(int32_t(blocks - 1 - b) * 2 + 1);
  const int numBlocks = 2 * blocks + 1;
  const size_t cacheFloats =
      size_t(numBlocks) * layout.blockSize * layout.numKvHeads * layout.headDim;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> k(cacheFloats), v(cacheFloats);
  for (auto& x : k) x = dist(rng);
  for (auto& x : v) x = dist(rng);
  const int64_t qStride = numHeads * layout.headDim + 8;  // rows further apart than one query
  std::vector<float> q(size_t(count) * qStride);
  for (auto& x : q) x = dist(rng);
  const float scale = 1.0f / std::sqrt(float(layout.headDim));

  std::vector<float> want(size_t(count) * numHeads * layout.headDim);
  std::vector<float> scratch(static_cast<size_t>(context));
  for (int t = 0; t < count; ++t) {
    kernels::pagedAttention(&want[size_t(t) * numHeads * layout.headDim], &q[size_t(t) * qStride],
                            k.data(), v.data(), layout, table.data(), startPos + t + 1, numHeads,
                            scale, scratch.data());
  }
  std::vector<float> got(want.size(), NAN);
  engine::PrefillAttention attention;
  attention.run(got.data(), numHeads * layout.headDim, q.data(), qStride, k.data(), v.data(),
                layout, table.data(), startPos, count, numHeads, scale);
  for (size_t i = 0; i < want.size(); ++i) {
    REQUIRE(got[i] == doctest::Approx(want[i]).epsilon(1e-4));
  }
}
