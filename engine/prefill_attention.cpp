#include "engine/prefill_attention.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "engine/blas.h"
#include "kernels/exp_approx.h"

// The softmax loops are built three times (target_clones, as kernels/cpu_kernels.cpp does) and
// the dynamic loader picks one for the CPU; under ASan or TSan one plain build (their runtimes
// are not up when the clones' resolvers run).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define VSUP_PREFILL_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VSUP_PREFILL_CLONES
#endif
#define VSUP_INLINE [[gnu::always_inline]] inline

// The helpers below take and return GCC vectors; they are always inlined into one clone, so the
// warning that such a signature's ABI depends on AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace vsup::engine {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Vec16i __attribute__((vector_size(64)));

VSUP_INLINE Vec16 load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
VSUP_INLINE void store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }
VSUP_INLINE Vec16 splat(float x) { return Vec16{} + x; }

// exp(x), 16 lanes at once (kernels/exp_approx.h, the body the kernels' scalar expApprox uses):
// below -87 (and -inf) gives 0, at or above 88.38 +inf, NaN stays NaN.
VSUP_INLINE Vec16 expVec(Vec16 x) {
  const Vec16 lo = splat(kernels::kExpLo);
  const Vec16 hi = splat(kernels::kExpHi);
  Vec16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const Vec16 scaled = kernels::expClamped<Vec16, Vec16i>(xc);
  const Vec16i keep = x >= lo;  // all ones or zero per lane
  return std::bit_cast<Vec16>(std::bit_cast<Vec16i>(scaled) & keep);
}

VSUP_INLINE float maxLanes(Vec16 v) {
  float m = v[0];
  for (int j = 1; j < kLanes; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

VSUP_INLINE float sumLanes(Vec16 v) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// The online-softmax step for one KV block of a query tile. `s` holds the tile's scores
// ([rows][ldS], the block's `n` columns of each row filled), row r belonging to the token at
// position firstPos + r / group; column j is position k0 + j. Masks the positions after each
// row's own (a row with none left gets zeros), folds each row's block max into runMax (scaling
// that row of the accumulator `o` ([rows][d]) by exp(old - new) unless this is the first block),
// replaces the scores by their weights exp(s - max) (zeros past column n, up to the next
// multiple of 16) and adds their sum to rowSum.
VSUP_PREFILL_CLONES void softmaxBlock(float* s, int ldS, int rows, int n, int group, int firstPos,
                                      int k0, bool first, float* runMax, double* rowSum,
                                      float* o, int d) {
  const int nPad = (n + kLanes - 1) / kLanes * kLanes;
  for (int r = 0; r < rows; ++r) {
    float* row = s + static_cast<size_t>(r) * static_cast<size_t>(ldS);
    const int pos = firstPos + r / group;
    const int valid = std::clamp(pos - k0 + 1, 0, n);
    if (valid == 0) {  // the whole block is after this row's position
      std::fill(row, row + nPad, 0.0f);
      continue;
    }
    for (int j = valid; j < nPad; ++j) row[j] = -kInf;
    Vec16 mv = splat(-kInf);
    for (int j = 0; j < nPad; j += kLanes) {
      const Vec16 x = load(row + j);
      mv = x > mv ? x : mv;
    }
    const float blockMax = maxLanes(mv);
    const float newMax = std::max(runMax[r], blockMax);
    if (!first && newMax != runMax[r]) {
      const float corr = std::exp(runMax[r] - newMax);
      float* orow = o + static_cast<size_t>(r) * static_cast<size_t>(d);
      for (int i = 0; i < d; ++i) orow[i] *= corr;
      rowSum[r] *= corr;
    }
    runMax[r] = newMax;
    const Vec16 m = splat(newMax);
    Vec16 sv{};
    for (int j = 0; j < nPad; j += kLanes) {
      const Vec16 w = expVec(load(row + j) - m);
      store(row + j, w);
      sv += w;
    }
    rowSum[r] += sumLanes(sv);
  }
}

// out row of token t0 + r / group, head (firstHead + r % group) = o[r] / rowSum[r].
VSUP_PREFILL_CLONES void writeRows(float* out, int64_t outStride, const float* o,
                                   const double* rowSum, int rows, int group, int t0,
                                   int firstHead, int d) {
  for (int r = 0; r < rows; ++r) {
    const int t = t0 + r / group;
    const int h = firstHead + r % group;
    float* dst = out + t * outStride + static_cast<int64_t>(h) * d;
    const float* src = o + static_cast<size_t>(r) * static_cast<size_t>(d);
    const float inv = static_cast<float>(1.0 / rowSum[r]);
    for (int i = 0; i < d; ++i) dst[i] = src[i] * inv;
  }
}

[[noreturn]] void badArgument(const std::string& what) {
  throw std::invalid_argument("PrefillAttention::run: " + what);
}

}  // namespace

void PrefillAttention::run(float* out, int64_t outStride, const float* q, int64_t qStride,
                           const float* kCache, const float* vCache,
                           const kernels::PagedLayout& layout, const int32_t* blockTable,
                           int startPos, int count, int numHeads, float scale) {
  const int d = layout.headDim;
  const int numKv = layout.numKvHeads;
  const int bs = layout.blockSize;
  if (startPos < 0 || count < 0) {
    badArgument("startPos " + std::to_string(startPos) + " and count " + std::to_string(count) +
                " must be >= 0");
  }
  if (d < 1 || bs < 1 || numKv < 1) {
    badArgument("headDim " + std::to_string(d) + ", blockSize " + std::to_string(bs) +
                " and numKvHeads " + std::to_string(numKv) + " must be >= 1");
  }
  if (numHeads < numKv || numHeads % numKv != 0) {
    badArgument("numHeads " + std::to_string(numHeads) + " must be a positive multiple of numKvHeads " +
                std::to_string(numKv));
  }
  if (count == 0) return;

  const int group = numHeads / numKv;
  const int context = startPos + count;
  const int tileTokens = std::max(1, kQueryRows / group);
  const int tileRows = tileTokens * group;
  const size_t hd = static_cast<size_t>(d);
  const size_t tileFloats = static_cast<size_t>(context) * hd;
  // Scratch: K tile, V tile ([context][d] each), Q tile and accumulator ([tileRows][d] each),
  // scores ([tileRows][kKvBlock]), running max ([tileRows]).
  const size_t rowsFloats = static_cast<size_t>(tileRows);
  const size_t need = 2 * tileFloats + 2 * rowsFloats * hd + rowsFloats * kKvBlock + rowsFloats;
  if (scratch_.size() < need) scratch_.resize(need);
  if (rowSum_.size() < rowsFloats) rowSum_.resize(rowsFloats);
  float* kTile = scratch_.data();
  float* vTile = kTile + tileFloats;
  float* qTile = vTile + tileFloats;
  float* acc = qTile + rowsFloats * hd;
  float* scores = acc + rowsFloats * hd;
  float* runMax = scores + rowsFloats * kKvBlock;
  double* rowSum = rowSum_.data();

  const size_t cacheRow = static_cast<size_t>(numKv) * hd;  // floats per position in the cache
  for (int g = 0; g < numKv; ++g) {
    // This kv head's K and V for every position the tokens attend to, contiguous.
    for (int p0 = 0; p0 < context; p0 += bs) {
      const size_t slot0 = static_cast<size_t>(blockTable[p0 / bs]) * static_cast<size_t>(bs);
      const int n = std::min(bs, context - p0);
      for (int i = 0; i < n; ++i) {
        const size_t from = (slot0 + static_cast<size_t>(i)) * cacheRow + static_cast<size_t>(g) * hd;
        const size_t to = static_cast<size_t>(p0 + i) * hd;
        std::memcpy(kTile + to, kCache + from, hd * sizeof(float));
        std::memcpy(vTile + to, vCache + from, hd * sizeof(float));
      }
    }
    for (int t0 = 0; t0 < count; t0 += tileTokens) {
      const int tokens = std::min(tileTokens, count - t0);
      const int rows = tokens * group;
      // Q tile: row r is token t0 + r / group, head g * group + r % group, times the scale.
      for (int r = 0; r < rows; ++r) {
        const float* src = q + int64_t(t0 + r / group) * qStride +
                           int64_t(g * group + r % group) * int64_t(d);
        float* dst = qTile + static_cast<size_t>(r) * hd;
        for (int i = 0; i < d; ++i) dst[i] = src[i] * scale;
      }
      std::fill(runMax, runMax + rows, -kInf);
      std::fill(rowSum, rowSum + rows, 0.0);
      const int firstPos = startPos + t0;
      const int end = firstPos + tokens;  // one past the tile's last position
      for (int k0 = 0; k0 < end; k0 += kKvBlock) {
        const int n = std::min(kKvBlock, end - k0);
        const bool first = k0 == 0;
        blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d, 1.0f, qTile, d,
                    kTile + static_cast<size_t>(k0) * hd, d, 0.0f, scores, kKvBlock);
        softmaxBlock(scores, kKvBlock, rows, n, group, firstPos, k0, first, runMax, rowSum, acc, d);
        blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, n, 1.0f, scores, kKvBlock,
                    vTile + static_cast<size_t>(k0) * hd, d, first ? 0.0f : 1.0f, acc, d);
      }
      writeRows(out, outStride, acc, rowSum, rows, group, t0, g * group, d);
    }
  }
}

}  // namespace vsup::engine
