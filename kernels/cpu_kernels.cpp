#include "kernels/cpu_kernels.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/exp_approx.h"

// How these loops vectorize without -ffast-math: GCC will not reorder a floating-point reduction
// (`s += a[i] * b[i]`), so every reduction here keeps an explicit array of independent lanes
// (`acc[j] += ...`, j < kLanes) that the vectorizer maps onto one or more vector registers, and
// sums the lanes in a fixed tree at the end. Results are therefore deterministic for a given
// binary and CPU; the clones below differ only where GCC contracts a multiply-add into an FMA
// (the x86-64-v3/v4 clones; the default one has no FMA), in the last bits.
//
// The hot entry points are built three times (target_clones) and the dynamic loader picks one per
// process from the CPU it runs on; their helpers are always_inline so each clone gets its own.
// Defining VSUP_KERNEL_CLONES empty on the command line builds one plain version instead (to
// test a single code path with -march=...); other architectures and compilers get that too.
#ifndef VSUP_KERNEL_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VSUP_KERNEL_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VSUP_KERNEL_CLONES
#endif
#endif
#define VSUP_INLINE [[gnu::always_inline]] inline

namespace vsup::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;  // independent accumulators per reduction: one zmm, two ymm, four xmm

// c ? a : b on bit masks. GCC turns a ?: on floats into a branch and threads it through the
// arithmetic that follows, and under -ftrapping-math it will then not if-convert that arithmetic
// back for a vector loop (only AVX-512's masking rescues it); this form stays a select.
VSUP_INLINE float selectFloat(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) |
                              (std::bit_cast<uint32_t>(b) & ~mask));
}

// exp(x) for float (kernels/exp_approx.h). Outside [-87, 88.37]: x < -87 gives 0, x >= 88.38
// gives +inf (the true value overflows float from 88.72), NaN gives NaN. The edges are folded in
// without a branch: the clamp is a select and the low side is a multiply by 0.
VSUP_INLINE float expApprox(float x) {
  const float xc = selectFloat(x < kExpLo, kExpLo, selectFloat(x > kExpHi, kExpHi, x));
  // 0 below the range (and for -inf); a NaN x stays NaN through y (the clamp passes it on).
  const float keep = static_cast<float>(x >= kExpLo);
  return expClamped<float, int32_t>(xc) * keep;
}

// Sums kLanes lanes in a fixed tree (the same order in every clone). Written with GCC's generic
// vectors because plain code for the same tree comes out as ~30 scalar shuffles and adds, which
// made the attention scores a fifth slower; these lower to whatever vector width the clone has.
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
VSUP_INLINE float sumLanes(const float* acc) {
  static_assert(kLanes == 16);
  Vec16 v;
  std::memcpy(&v, acc, sizeof v);
  const Vec8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 h4 =
      __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  const Vec4 h2 = h4 + __builtin_shufflevector(h4, h4, 2, 3, 0, 1);
  return h2[0] + h2[1];
}

VSUP_INLINE float dot(const float* __restrict a, const float* __restrict b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  // The tail has its own accumulator: indexing acc by a runtime lane would pin it in memory.
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return sumLanes(acc) + tail;
}

// y += w * x.
VSUP_INLINE void axpy(float* __restrict y, float w, const float* __restrict x, int n) {
  for (int i = 0; i < n; ++i) y[i] += w * x[i];
}

VSUP_INLINE void scaleRow(float* __restrict y, float w, int n) {
  for (int i = 0; i < n; ++i) y[i] *= w;
}

// x[i] = exp(x[i] - shift), returning the sum of the results.
VSUP_INLINE float expShiftSum(float* __restrict x, float shift, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float e = expApprox(x[i + j] - shift);
      x[i + j] = e;
      acc[j] += e;
    }
  float tail = 0.0f;
  for (; i < n; ++i) {
    x[i] = expApprox(x[i] - shift);
    tail += x[i];
  }
  return sumLanes(acc) + tail;
}

}  // namespace

VSUP_KERNEL_CLONES
void rmsNorm(float* out, const float* x, const float* weight, int n, float eps) {
  // The mean square is accumulated in double: it costs nothing next to the matrix products and
  // keeps the norm as exact as the reference's.
  double acc[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(x[i + j]) * x[i + j];
  double tail = 0.0;
  for (; i < n; ++i) tail += static_cast<double>(x[i]) * x[i];
  const double sum =
      ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
  const float inv = static_cast<float>(1.0 / std::sqrt(sum / n + static_cast<double>(eps)));
  // ivdep: out may be x (the contract allows exactly that), which is no loop-carried dependence;
  // without it GCC's overlap check would send the in-place call down the scalar path.
#pragma GCC ivdep
  for (int k = 0; k < n; ++k) out[k] = x[k] * inv * weight[k];
}

VSUP_KERNEL_CLONES
void addInPlace(float* out, const float* a, int n) {
#pragma GCC ivdep
  for (int i = 0; i < n; ++i) out[i] += a[i];
}

VSUP_KERNEL_CLONES
void siluMul(float* out, const float* gate, const float* up, int n) {
  // ivdep: out may be gate or up (same index only), as for rmsNorm.
#pragma GCC ivdep
  for (int i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + expApprox(-g)) * up[i];
  }
}

RopeTable::RopeTable(int headDim, float theta, int maxPositions)
    : headDim_(headDim), maxPositions_(maxPositions) {
  if (headDim <= 0 || headDim % 2 != 0 || maxPositions < 0 || !(theta > 0.0f))
    throw std::invalid_argument(
        "RopeTable: headDim must be even and positive, theta positive, "
        "maxPositions non-negative (headDim " +
        std::to_string(headDim) + ", theta " + std::to_string(theta) + ", maxPositions " +
        std::to_string(maxPositions) + ")");
  const int half = headDim / 2;
  std::vector<double> invFreq(static_cast<size_t>(half));
  for (int j = 0; j < half; ++j)
    invFreq[static_cast<size_t>(j)] = std::pow(static_cast<double>(theta), -2.0 * j / headDim);
  const size_t size = static_cast<size_t>(maxPositions) * static_cast<size_t>(half);
  cos_.resize(size);
  sin_.resize(size);
  for (int p = 0; p < maxPositions; ++p)
    for (int j = 0; j < half; ++j) {
      const double angle = p * invFreq[static_cast<size_t>(j)];
      const size_t at = static_cast<size_t>(p) * static_cast<size_t>(half) + static_cast<size_t>(j);
      cos_[at] = static_cast<float>(std::cos(angle));
      sin_[at] = static_cast<float>(std::sin(angle));
    }
}

void RopeTable::apply(float* heads, int numHeads, int pos) const {
  if (pos < 0 || pos >= maxPositions_)
    throw std::out_of_range("RopeTable::apply: position " + std::to_string(pos) +
                            " outside the table's [0, " + std::to_string(maxPositions_) + ")");
  const int half = headDim_ / 2;
  const float* __restrict c = cos_.data() + static_cast<size_t>(pos) * static_cast<size_t>(half);
  const float* __restrict s = sin_.data() + static_cast<size_t>(pos) * static_cast<size_t>(half);
  for (int h = 0; h < numHeads; ++h) {
    // The two halves of one head never overlap, which is what the restrict promises.
    float* __restrict lo = heads + static_cast<size_t>(h) * static_cast<size_t>(headDim_);
    float* __restrict hi = lo + half;
    for (int j = 0; j < half; ++j) {
      const float x0 = lo[j];
      const float x1 = hi[j];
      lo[j] = x0 * c[j] - x1 * s[j];
      hi[j] = x1 * c[j] + x0 * s[j];
    }
  }
}

void writeKv(float* kCache, float* vCache, const PagedLayout& layout, const int32_t* blockTable,
             int pos, const float* k, const float* v) {
  const size_t row = static_cast<size_t>(layout.numKvHeads) * static_cast<size_t>(layout.headDim);
  const size_t slot = static_cast<size_t>(blockTable[pos / layout.blockSize]) *
                          static_cast<size_t>(layout.blockSize) +
                      static_cast<size_t>(pos % layout.blockSize);
  std::memcpy(kCache + slot * row, k, row * sizeof(float));
  std::memcpy(vCache + slot * row, v, row * sizeof(float));
}

namespace {

constexpr int kChunk = 64;     // positions per online-softmax step
constexpr int kMaxHeads = 64;  // query heads attended in one pass over the context

// Where position p's row (all kv heads) starts in a cache laid out as PagedLayout says, walked
// one position at a time (no division per position).
class PagedCursor {
 public:
  PagedCursor(const int32_t* blockTable, int blockSize, size_t rowFloats, int pos)
      : blockTable_(blockTable),
        blockSize_(blockSize),
        row_(rowFloats),
        block_(pos / blockSize),
        slot_(pos % blockSize) {}
  size_t offset() const {
    const size_t slot = static_cast<size_t>(blockTable_[block_]) * static_cast<size_t>(blockSize_) +
                        static_cast<size_t>(slot_);
    return slot * row_;
  }
  void next() {
    if (++slot_ == blockSize_) {
      slot_ = 0;
      ++block_;
    }
  }

 private:
  const int32_t* blockTable_;
  int blockSize_;
  size_t row_;
  int block_;
  int slot_;
};

// Prefetches, one position per step(), the part of each row that a walk over [from, end) reads,
// a fixed distance ahead of the walk. Blocks lie wherever the block table puts them, so the
// hardware prefetcher loses the stream at every block boundary; on a cache-cold context (the
// usual case in decode: every layer's cache is read once per token) this took attention from
// about 9 to 12-13 GB/s.
class RowPrefetcher {
 public:
  RowPrefetcher(const float* cache, const int32_t* blockTable, int blockSize, size_t rowFloats,
                size_t firstFloat, size_t floats, int from, int end)
      : base_(reinterpret_cast<const char*>(cache + firstFloat)),
        bytes_(floats * sizeof(float)),
        pos_(std::min(from + distance(rowFloats), end)),
        end_(end),
        at_(blockTable, blockSize, rowFloats, pos_) {}
  void step() {
    if (pos_ >= end_) return;
    const char* rowStart = base_ + at_.offset() * sizeof(float);
    for (size_t b = 0; b < bytes_; b += 64) __builtin_prefetch(rowStart + b);
    ++pos_;
    at_.next();
  }

 private:
  // About 4 KiB ahead, and at least two positions.
  static int distance(size_t rowFloats) {
    return static_cast<int>(std::max<size_t>(2, 1024 / std::max<size_t>(rowFloats, 1)));
  }
  const char* base_;
  size_t bytes_;
  int pos_;
  int end_;
  PagedCursor at_;
};

// Attention of query heads [h0, h1) (at most kMaxHeads) into their rows of `out`. D is the head
// size when known at compile time (the loops then unroll with no tails), 0 for any other, given
// in `dRuntime`.
//
// One pass over the context, position by position, so each K and V row (all kv heads of a
// position, contiguous) is streamed from memory once and then reused from L1 by every query head
// of its group. The softmax is done online (flash-decoding style) in chunks of kChunk positions:
// the chunk's scores for every head go to `scores` ([kMaxHeads][kChunk]), the chunk's max is
// folded into the running max (rescaling what was accumulated so far), and the V rows are then
// accumulated into `out` with the chunk's weights.
template <int D>
VSUP_INLINE void attendHeads(float* out, const float* q, int h0, int h1, int group,
                             const float* kCache, const float* vCache, const PagedLayout& layout,
                             const int32_t* blockTable, int contextLen, float scale, int dRuntime,
                             float* scores) {
  const int d = D > 0 ? D : dRuntime;
  const size_t hd = static_cast<size_t>(d);
  const size_t row = static_cast<size_t>(layout.numKvHeads) * hd;
  const int nh = h1 - h0;
  float runMax[kMaxHeads];
  double runSum[kMaxHeads];
  size_t kvOffset[kMaxHeads];  // where head h0 + h's kv head starts within a row
  for (int h = 0; h < nh; ++h) {
    runMax[h] = -kInf;
    runSum[h] = 0.0;
    kvOffset[h] = static_cast<size_t>((h0 + h) / group) * hd;
  }
  // The kv heads this batch reads, as a span of each row.
  const size_t spanFirst = static_cast<size_t>(h0 / group) * hd;
  const size_t spanFloats = static_cast<size_t>((h1 - 1) / group + 1) * hd - spanFirst;
  for (int c0 = 0; c0 < contextLen; c0 += kChunk) {
    const int n = std::min(kChunk, contextLen - c0);
    float chunkMax[kMaxHeads];
    for (int h = 0; h < nh; ++h) chunkMax[h] = -kInf;
    PagedCursor kAt(blockTable, layout.blockSize, row, c0);
    RowPrefetcher kAhead(kCache, blockTable, layout.blockSize, row, spanFirst, spanFloats, c0,
                         contextLen);
    for (int t = 0; t < n; ++t, kAt.next()) {
      kAhead.step();
      const float* kRow = kCache + kAt.offset();
      for (int h = 0; h < nh; ++h) {
        const float s = dot(q + static_cast<size_t>(h0 + h) * hd, kRow + kvOffset[h], d) * scale;
        scores[h * kChunk + t] = s;
        chunkMax[h] = s > chunkMax[h] ? s : chunkMax[h];
      }
    }
    for (int h = 0; h < nh; ++h) {
      const float newMax = std::max(runMax[h], chunkMax[h]);
      float* o = out + static_cast<size_t>(h0 + h) * hd;
      if (c0 == 0) {
        std::fill(o, o + hd, 0.0f);
      } else if (newMax != runMax[h]) {
        const float corr = expApprox(runMax[h] - newMax);
        scaleRow(o, corr, d);
        runSum[h] *= corr;
      }
      runMax[h] = newMax;
      runSum[h] += expShiftSum(scores + h * kChunk, newMax, n);
    }
    PagedCursor vAt(blockTable, layout.blockSize, row, c0);
    RowPrefetcher vAhead(vCache, blockTable, layout.blockSize, row, spanFirst, spanFloats, c0,
                         contextLen);
    for (int t = 0; t < n; ++t, vAt.next()) {
      vAhead.step();
      const float* vRow = vCache + vAt.offset();
      for (int h = 0; h < nh; ++h) {
        axpy(out + static_cast<size_t>(h0 + h) * hd, scores[h * kChunk + t], vRow + kvOffset[h], d);
      }
    }
  }
  for (int h = 0; h < nh; ++h) {
    const float sum = static_cast<float>(runSum[h]);
    float* o = out + static_cast<size_t>(h0 + h) * hd;
    for (int i = 0; i < d; ++i) o[i] /= sum;
  }
}

}  // namespace

VSUP_KERNEL_CLONES
void pagedAttention(float* out, const float* q, const float* kCache, const float* vCache,
                    const PagedLayout& layout, const int32_t* blockTable, int contextLen,
                    int numHeads, float scale, float* scratch) {
  static_cast<void>(scratch);  // the online softmax needs only its fixed stack buffer
  const int d = layout.headDim;
  const int group = numHeads / layout.numKvHeads;
  if (contextLen <= 0) {
    std::fill(out, out + static_cast<size_t>(numHeads) * static_cast<size_t>(d), 0.0f);
    return;
  }
  alignas(64) float scores[kMaxHeads * kChunk];
  for (int h0 = 0; h0 < numHeads; h0 += kMaxHeads) {
    const int h1 = std::min(numHeads, h0 + kMaxHeads);
    switch (d) {
      case 64:
        attendHeads<64>(out, q, h0, h1, group, kCache, vCache, layout, blockTable, contextLen,
                        scale, d, scores);
        break;
      case 128:
        attendHeads<128>(out, q, h0, h1, group, kCache, vCache, layout, blockTable, contextLen,
                         scale, d, scores);
        break;
      default:
        attendHeads<0>(out, q, h0, h1, group, kCache, vCache, layout, blockTable, contextLen, scale,
                       d, scores);
    }
  }
}

// ---- Sampling ----------------------------------------------------------------------------------
//
// Every selection is by the order (logit descending, index ascending), so each candidate set
// (top-k, the top-p nucleus, and their intersection) is a prefix of that order and is described
// by a threshold logit `cut` plus how many of the logits equal to `cut` (lowest indices first) it
// admits. That lets the whole thing work on plain float values in `scratch`, without sorting
// (logit, index) pairs. NaN logits count as -inf.

namespace {

constexpr int kSampleBlock = 1024;  // tokens per partial sum for the unrestricted draw

VSUP_INLINE float keyOf(float logit) { return logit == logit ? logit : -kInf; }

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A uniform double in [0, 1) from (seed, position) alone: 53 hashed bits.
double uniformDraw(uint64_t seed, uint64_t position) {
  return static_cast<double>(splitmix64(seed ^ splitmix64(position)) >> 11) * 0x1.0p-53;
}

// The largest of kLanes lanes (NaN lanes lose), by the same generic-vector tree as sumLanes.
VSUP_INLINE float maxLanes(const float* lanes) {
  Vec16 v;
  std::memcpy(&v, lanes, sizeof v);
  const Vec8 lo8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec8 hi8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec8 m8 = hi8 > lo8 ? hi8 : lo8;
  const Vec4 lo4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
  const Vec4 hi4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const Vec4 m4 = hi4 > lo4 ? hi4 : lo4;
  const float a = m4[0] > m4[1] ? m4[0] : m4[1];
  const float b = m4[2] > m4[3] ? m4[2] : m4[3];
  return a > b ? a : b;
}

constexpr int kScanBlock = 4 * kLanes;

// Visits, in index order, each i in [0, n) whose key (NaN as -inf) is above `threshold` (strictly
// or not), until `visit(i)` returns true (then returns i) or the end (returns -1). Each block of
// kScanBlock values is first tested as a whole by its max, vertical vector compares and one
// horizontal step, so a threshold that few keys pass costs about one pass over memory.
// `threshold` may be changed by `visit`.
template <bool kStrict, typename Visit>
VSUP_INLINE int scanAbove(const float* x, int n, const float& threshold, Visit visit) {
  auto passes = [&](float key) { return kStrict ? key > threshold : key >= threshold; };
  int i = 0;
  for (; i + kScanBlock <= n; i += kScanBlock) {
    float lanes[kLanes];
    for (int j = 0; j < kLanes; ++j) lanes[j] = -kInf;
    for (int g = 0; g < kScanBlock; g += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] = x[i + g + j] > lanes[j] ? x[i + g + j] : lanes[j];
    if (!passes(maxLanes(lanes))) continue;
    for (int j = 0; j < kScanBlock; ++j)
      if (passes(keyOf(x[i + j])) && visit(i + j)) return i + j;
  }
  for (; i < n; ++i)
    if (passes(keyOf(x[i])) && visit(i)) return i;
  return -1;
}

// The largest key and the lowest index holding it (0 when every logit is NaN).
struct ArgMax {
  float value;
  int32_t index;
};

VSUP_INLINE ArgMax argMax(const float* logits, int vocab) {
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = -kInf;
  int i = 0;
  for (; i + kLanes <= vocab; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = logits[i + j] > lanes[j] ? logits[i + j] : lanes[j];
  float best = -kInf;
  for (int j = 0; j < kLanes; ++j) best = lanes[j] > best ? lanes[j] : best;
  for (; i < vocab; ++i) best = logits[i] > best ? logits[i] : best;
  const int at = scanAbove<false>(logits, vocab, best, [](int) { return true; });
  return {best, at < 0 ? 0 : at};
}

// blockSums[b] = sum of exp((key - maxLogit) / temperature) over block b of kSampleBlock tokens;
// returns their total.
VSUP_INLINE double blockExpSums(const float* logits, int vocab, float maxLogit, float temperature,
                                float* blockSums) {
  double total = 0.0;
  for (int b0 = 0, b = 0; b0 < vocab; b0 += kSampleBlock, ++b) {
    const int n = std::min(kSampleBlock, vocab - b0);
    const float* x = logits + b0;
    float acc[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j)
        acc[j] += expApprox((keyOf(x[i + j]) - maxLogit) / temperature);
    float tail = 0.0f;
    for (; i < n; ++i) tail += expApprox((keyOf(x[i]) - maxLogit) / temperature);
    blockSums[b] = sumLanes(acc) + tail;
    total += blockSums[b];
  }
  return total;
}

// Small k keeps a min-heap of k keys (one compare per token, rare pushes); large k copies all
// the keys and selects in place.
bool topKByHeap(int k, int vocab) { return static_cast<int64_t>(k) * 16 <= vocab; }

// Writes the k largest keys (with multiplicity) to out[0, k), sorted descending; k < vocab. `out`
// holds k floats when topKByHeap, else vocab.
VSUP_INLINE void topKeys(const float* logits, int vocab, int k, float* out) {
  if (topKByHeap(k, vocab)) {
    for (int i = 0; i < k; ++i) out[i] = keyOf(logits[i]);
    std::make_heap(out, out + k, std::greater<float>());
    float floor = out[0];  // the heap's least key: only a larger one gets in
    scanAbove<true>(logits + k, vocab - k, floor, [&](int i) {
      std::pop_heap(out, out + k, std::greater<float>());
      out[k - 1] = logits[k + i];
      std::push_heap(out, out + k, std::greater<float>());
      floor = out[0];
      return false;
    });
  } else {
    for (int i = 0; i < vocab; ++i) out[i] = keyOf(logits[i]);
    std::nth_element(out, out + (k - 1), out + vocab, std::greater<float>());
  }
  std::sort(out, out + k, std::greater<float>());
}

}  // namespace

VSUP_KERNEL_CLONES
int32_t sampleToken(const float* logits, int vocab, const SamplingConfig& config, uint64_t position,
                    std::vector<float>& scratch) {
  if (vocab <= 0) return 0;
  const ArgMax top = argMax(logits, vocab);
  const float temperature = config.temperature;
  // Greedy when asked, when top-k keeps one token, and when the distribution is degenerate: a
  // +inf logit takes all the mass (the lowest such index wins) and all -inf/NaN has none to draw.
  if (!(temperature > 0.0f) || config.topK == 1 || top.value == kInf || top.value == -kInf)
    return top.index;
  const float maxLogit = top.value;
  auto weight = [&](float key) { return expApprox((key - maxLogit) / temperature); };
  const bool topKOn = config.topK > 0 && config.topK < vocab;
  const bool topPOn = config.topP < 1.0f;
  const double u = uniformDraw(config.seed, position);

  // The candidate set as a prefix of the order: keys above `cut`, plus `cutAdmit` keys equal to
  // it; `setMass` is its unnormalized probability. sorted[0, setSize) holds its keys descending.
  const float* sorted = nullptr;
  int setSize = vocab;
  double setMass = 0.0;
  const int blocks = (vocab + kSampleBlock - 1) / kSampleBlock;
  const float* blockSums = nullptr;

  if (topKOn) {
    const int k = config.topK;
    const size_t need = static_cast<size_t>(topKByHeap(k, vocab) ? k : vocab);
    if (scratch.size() < need) scratch.resize(need);
    topKeys(logits, vocab, k, scratch.data());
    sorted = scratch.data();
    setSize = k;
    for (int i = 0; i < k; ++i) setMass += weight(sorted[i]);
  } else {
    // Room for the block sums and, for top-p, the keys collected above a cutoff.
    const size_t need = static_cast<size_t>(blocks) + (topPOn ? static_cast<size_t>(vocab) : 0);
    if (scratch.size() < need) scratch.resize(need);
    setMass = blockExpSums(logits, vocab, maxLogit, temperature, scratch.data());
    blockSums = scratch.data();
    if (topPOn) {
      // The nucleus lies among the tokens within `span` temperature-scaled nats of the max as soon
      // as those carry at least topP of the mass; try a narrow span first (usually a few hundred
      // tokens to sort), widening until it holds. The last try takes every token.
      float* collected = scratch.data() + blocks;
      const double want = static_cast<double>(config.topP) * setMass;
      for (const float span : {16.0f, 32.0f, 64.0f, kInf}) {
        const float cutoff = span == kInf ? -kInf : maxLogit - span * temperature;
        int count = 0;
        double mass = 0.0;
        scanAbove<false>(logits, vocab, cutoff, [&](int i) {
          const float key = keyOf(logits[i]);
          collected[count++] = key;
          mass += weight(key);
          return false;
        });
        if (mass >= want || span == kInf) {
          std::sort(collected, collected + count, std::greater<float>());
          sorted = collected;
          setSize = count;
          break;
        }
      }
    }
  }

  if (topPOn) {
    // The smallest prefix whose mass reaches topP of the current set's (at least one token).
    const double want = static_cast<double>(config.topP) * setMass;
    double cum = 0.0;
    int m = 0;
    while (m < setSize) {
      cum += weight(sorted[m++]);
      if (cum >= want) break;
    }
    setSize = m;
    setMass = cum;
  }

  const double target = u * setMass;
  double cum = 0.0;
  int32_t lastPositive = top.index;
  if (sorted == nullptr) {
    // Every token is a candidate: skip whole blocks by their sums, then walk the block.
    int b = 0;
    while (b + 1 < blocks && cum + blockSums[b] <= target) cum += blockSums[b++];
    for (int i = b * kSampleBlock; i < vocab; ++i) {
      const float w = weight(keyOf(logits[i]));
      if (w > 0.0f) lastPositive = i;
      cum += w;
      if (cum > target) return i;
    }
    return lastPositive;
  }
  const float cut = sorted[setSize - 1];
  int above = setSize - 1;
  while (above > 0 && sorted[above - 1] == cut) --above;
  int cutAdmit = setSize - above;
  const int drawn = scanAbove<false>(logits, vocab, cut, [&](int i) {
    const float key = keyOf(logits[i]);
    if (key == cut) {
      if (cutAdmit == 0) return false;
      --cutAdmit;
    }
    const float w = weight(key);
    if (w > 0.0f) lastPositive = i;
    cum += w;
    return cum > target;
  });
  // Not found only when rounding left the walk's sum a hair below the target.
  return drawn >= 0 ? drawn : lastPositive;
}

}  // namespace vsup::kernels
