// PrefillAttention (blocked, causal attention as matrix products) against the per-token
// reference, kernels::pagedAttention, over paged caches whose block tables are scrambled and
// whose unused slots hold NaN (so a read outside a sequence's positions shows in the result).
#include "engine/prefill_attention.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

using namespace vsup;

namespace {

// One sequence's K/V in a paged cache of twice the blocks it needs, its blocks in a shuffled
// order; every slot it does not own, and every slot past its context, holds NaN.
struct Case {
  kernels::PagedLayout layout;
  int numHeads = 0;
  int startPos = 0;
  int count = 0;
  int64_t qStride = 0;
  std::vector<int32_t> table;
  std::vector<float> k, v, q;
  float scale = 0;

  Case(int headDim, int numKvHeads, int ratio, int startPos_, int count_, uint32_t seed,
       bool scrambled = true)
      : layout{16, numKvHeads, headDim},
        numHeads(numKvHeads * ratio),
        startPos(startPos_),
        count(count_) {
    const int context = startPos + count;
    const int blocks = (context + layout.blockSize - 1) / layout.blockSize;
    const int poolBlocks = 2 * blocks + 1;
    std::mt19937 rng(seed);
    std::vector<int32_t> pool(static_cast<size_t>(poolBlocks));
    for (int b = 0; b < poolBlocks; ++b) pool[size_t(b)] = b;
    if (scrambled) std::shuffle(pool.begin(), pool.end(), rng);
    table.assign(pool.begin(), pool.begin() + blocks);
    const size_t row = size_t(numKvHeads) * size_t(headDim);
    const size_t cacheFloats = size_t(poolBlocks) * size_t(layout.blockSize) * row;
    k.assign(cacheFloats, NAN);
    v.assign(cacheFloats, NAN);
    std::normal_distribution<float> dist;
    std::vector<float> kRow(row), vRow(row);
    for (int p = 0; p < context; ++p) {
      for (auto& x : kRow) x = dist(rng);
      for (auto& x : vRow) x = dist(rng);
      kernels::writeKv(k.data(), v.data(), layout, table.data(), p, kRow.data(), vRow.data());
    }
    qStride = int64_t(numHeads) * headDim + 8;  // query rows further apart than one row's data
    q.resize(size_t(count) * size_t(qStride));
    for (auto& x : q) x = dist(rng);
    scale = 1.0f / std::sqrt(float(headDim));
  }

  int64_t rowFloats() const { return int64_t(numHeads) * layout.headDim; }

  std::vector<float> reference() const {
    std::vector<float> want(size_t(count) * size_t(rowFloats()));
    std::vector<float> scratch(size_t(startPos + count));
    for (int t = 0; t < count; ++t) {
      kernels::pagedAttention(&want[size_t(t) * size_t(rowFloats())], &q[size_t(t) * size_t(qStride)],
                              k.data(), v.data(), layout, table.data(), startPos + t + 1, numHeads,
                              scale, scratch.data());
    }
    return want;
  }

  // Output rows `outStride` floats apart (>= rowFloats()); what lies between rows stays NaN.
  std::vector<float> blocked(engine::PrefillAttention& attention, int64_t outStride) const {
    std::vector<float> got(size_t(count) * size_t(outStride), NAN);
    attention.run(got.data(), outStride, q.data(), qStride, k.data(), v.data(), layout,
                  table.data(), startPos, count, numHeads, scale);
    return got;
  }
};

// Every element of the blocked result equals the reference to float rounding; the gaps between
// output rows are left alone.
void checkAgainstReference(const Case& c, engine::PrefillAttention& attention) {
  const int64_t row = c.rowFloats();
  const int64_t outStride = row + 3;
  const std::vector<float> want = c.reference();
  const std::vector<float> got = c.blocked(attention, outStride);
  int bad = 0;
  for (int t = 0; t < c.count; ++t) {
    for (int64_t i = 0; i < row; ++i) {
      const float w = want[size_t(t * row + i)];
      const float g = got[size_t(t * outStride + i)];
      if (!(std::fabs(g - w) <= 1e-5f + 1e-4f * std::fabs(w)) && bad++ < 5) {
        FAIL_CHECK("token " << t << " (position " << c.startPos + t << ") float " << i << ": got "
                            << g << ", want " << w);
      }
    }
    for (int64_t i = row; i < outStride; ++i) {
      if (!std::isnan(got[size_t(t * outStride + i)]) && bad++ < 5) {
        FAIL_CHECK("token " << t << " wrote past its row, at float " << i);
      }
    }
  }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("prefill attention equals per-token paged attention across shapes") {
  engine::PrefillAttention attention;  // one object for every case: the scratch is reused
  uint32_t seed = 1;
  for (int headDim : {64, 128, 33}) {
    for (int ratio : {1, 2, 4}) {
      for (int startPos : {0, 37}) {
        for (int count : {1, 2, 15, 16, 17, 300}) {  // blockSize - 1, blockSize, blockSize + 1
          CAPTURE(headDim);
          CAPTURE(ratio);
          CAPTURE(startPos);
          CAPTURE(count);
          checkAgainstReference(Case(headDim, 2, ratio, startPos, count, seed++), attention);
        }
      }
    }
  }
}

TEST_CASE("prefill attention over several query tiles and KV blocks, continued after a prefix") {
  // 700 tokens after 300: query tiles of kQueryRows rows and KV blocks of kKvBlock positions,
  // with the diagonal falling inside blocks, and a prefix that is several KV blocks long.
  static_assert(engine::PrefillAttention::kKvBlock < 700);
  engine::PrefillAttention attention;
  for (int ratio : {1, 2, 4}) {
    CAPTURE(ratio);
    checkAgainstReference(Case(64, 2, ratio, 300, 700, 11u + uint32_t(ratio)), attention);
  }
  checkAgainstReference(Case(64, 1, 8, 0, 260, 5), attention);       // one kv head, 8 query heads
  checkAgainstReference(Case(64, 4, 2, 0, 512, 6, false), attention);  // the table in order
  checkAgainstReference(Case(64, 2, 2, 1000, 3, 7), attention);        // a short chunk, long prefix
}

TEST_CASE("prefill attention is causal: a later token's K/V never reaches an earlier one") {
  // Two runs that differ only in the K and V of position `changed` (its V made large, so that
  // any weight leaking onto it would move the result): every token before it must come out
  // bit-for-bit the same, and the tokens from it on must differ (so the change is seen at all).
  // Its scores stay moderate (no weight underflows to 0) and its value is far from the others'.
  for (int changedToken : {1, 63, 64, 200, 299}) {
    CAPTURE(changedToken);
    Case c(64, 2, 2, 20, 300, 21);
    engine::PrefillAttention attention;
    const int64_t row = c.rowFloats();
    const std::vector<float> before = c.blocked(attention, row);
    const int changed = c.startPos + changedToken;
    const size_t kvRow = size_t(c.layout.numKvHeads) * size_t(c.layout.headDim);
    const int32_t* table = c.table.data();
    const size_t slot = size_t(table[changed / c.layout.blockSize]) * size_t(c.layout.blockSize) +
                        size_t(changed % c.layout.blockSize);
    for (size_t i = 0; i < kvRow; ++i) {
      c.k[slot * kvRow + i] = 3.0f;
      c.v[slot * kvRow + i] = 1000.0f;
    }
    const std::vector<float> after = c.blocked(attention, row);
    for (int t = 0; t < c.count; ++t) {
      const bool same = std::memcmp(&before[size_t(t * row)], &after[size_t(t * row)],
                                    size_t(row) * sizeof(float)) == 0;
      if (t < changedToken) {
        REQUIRE_MESSAGE(same, "token " << t << " saw position " << changed << ", after it");
      } else {
        REQUIRE_MESSAGE(!same, "token " << t << " did not see position " << changed);
      }
    }
    checkAgainstReference(c, attention);
  }
}

TEST_CASE("prefill attention keeps its scratch between calls of a size it has seen") {
  engine::PrefillAttention attention;
  Case big(64, 2, 2, 100, 400, 31);
  Case small(64, 2, 2, 0, 50, 32);
  (void)big.blocked(attention, big.rowFloats());
  const size_t held = attention.scratchFloats();
  CHECK(held > 0);
  (void)big.blocked(attention, big.rowFloats());
  (void)small.blocked(attention, small.rowFloats());
  CHECK(attention.scratchFloats() == held);
}

TEST_CASE("prefill attention: no tokens is a no-op, bad shapes are refused") {
  engine::PrefillAttention attention;
  Case c(64, 2, 2, 0, 4, 41);
  float out = 7.0f;
  attention.run(&out, c.rowFloats(), c.q.data(), c.qStride, c.k.data(), c.v.data(), c.layout,
                c.table.data(), 4, 0, c.numHeads, c.scale);
  CHECK(out == 7.0f);
  std::vector<float> got(size_t(c.count * c.rowFloats()));
  auto runWith = [&](kernels::PagedLayout layout, int startPos, int count, int numHeads) {
    attention.run(got.data(), c.rowFloats(), c.q.data(), c.qStride, c.k.data(), c.v.data(),
                  layout, c.table.data(), startPos, count, numHeads, c.scale);
  };
  CHECK_THROWS_WITH_AS(runWith(c.layout, -1, 4, 4), doctest::Contains("startPos -1"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(runWith(c.layout, 0, -2, 4), doctest::Contains("count -2"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(runWith(c.layout, 0, 4, 3), doctest::Contains("numHeads 3"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(runWith(c.layout, 0, 4, 0), doctest::Contains("numHeads 0"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(runWith(kernels::PagedLayout{0, 2, 64}, 0, 4, 4),
                       doctest::Contains("blockSize 0"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(runWith(kernels::PagedLayout{16, 2, 0}, 0, 4, 4),
                       doctest::Contains("headDim 0"), std::invalid_argument);
}
