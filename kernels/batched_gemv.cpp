#include "kernels/batched_gemv.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Three builds of the same templates, chosen at run time (see the header). Each vector type is
// a GCC vector of W floats; the target attribute of the function a tile is inlined into decides
// which registers it lands in (zmm, ymm, xmm), so W is chosen per build to fit the register
// file: AVX-512 has 32 registers of 16 floats, AVX2 16 of 8, SSE2 16 of 4.
#ifndef VSUP_KERNEL_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VSUP_GEMV_WIDE 1
#endif
#endif
#define VSUP_INLINE [[gnu::always_inline]] inline

namespace vsup::kernels {
namespace {

template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};

// Lane i of the vector that level s of the reduction makes from vectors a and b (s: the size of
// each source's segment before the level; `hi`: the upper halves of the segments, else the
// lower). a holds sources' segments A_0..A_{m-1}, b B_0..B_{m-1} (m = W / s); the result holds
// A_0'..A_{m-1}', B_0'..B_{m-1}', each of s / 2 lanes, where X' = X.lo + X.hi once the halves
// are added.
constexpr int halfLane(int W, int s, bool hi, int i) {
  const int half = s / 2, m = W / s;
  const int seg = i / half, off = i % half;
  const int src = seg < m ? 0 : 1, j = seg % m;
  return src * W + j * s + off + (hi ? half : 0);
}

template <int W, int S, bool Hi, typename V, size_t... I>
VSUP_INLINE void halves(V& out, const V& a, const V& b, std::index_sequence<I...>) {
  out = __builtin_shufflevector(a, b, halfLane(W, S, Hi, int(I))...);
}

// Sums the W lanes of each of the N vectors v[0..N) (N a multiple of W), in place: afterwards
// v[f] holds the sums of sources f*W .. f*W + W - 1, one per lane. Each source's lanes are
// added in the same tree as x[i] += x[i + h] for h = W/2, W/4, .., 1 would, whatever N and
// whatever the other sources: the result of a source depends on its own lanes only.
template <int W, int S, int N, typename V>
VSUP_INLINE void reduceLevel(V (&v)[N]) {
  if constexpr (S > 1) {
    constexpr int vectors = N * S / W;  // each holding W / S sources' segments of S lanes
    for (int p = 0; p < vectors / 2; ++p) {
      V lo, hi;
      halves<W, S, false>(lo, v[2 * p], v[2 * p + 1], std::make_index_sequence<W>{});
      halves<W, S, true>(hi, v[2 * p], v[2 * p + 1], std::make_index_sequence<W>{});
      v[p] = lo + hi;
    }
    reduceLevel<W, S / 2, N>(v);
  }
}

// y[t * ldy + r] = Σ_k x[t * ldx + k] · w[r * in + k] for r < R, t < TT: one tile. The k loop
// runs over whole vectors, then the tail zero-padded into one more vector (0 · 0 adds nothing),
// the same for every tile.
template <int W, int R, int TT, bool Prefetch = false>
VSUP_INLINE void tile(float* y, int64_t ldy, const float* x, int64_t ldx, const float* w,
                      int64_t in) {
  using V = typename VecOf<W>::type;
  // Sources r * TT + t, padded with zero vectors to a multiple of W for the reduction.
  constexpr int kSources = R * TT;
  constexpr int kPadded = (kSources + W - 1) / W * W;
  V acc[kPadded];
  for (int i = 0; i < kPadded; ++i) acc[i] = V{};
  const int64_t full = in - in % W;
  for (int64_t k = 0; k < full; k += W) {
    V wv[R];
    for (int r = 0; r < R; ++r) std::memcpy(&wv[r], w + r * in + k, sizeof(V));
    if constexpr (Prefetch) {
      // The next block's rows, at the same column (prefetch of a line past the matrix is
      // harmless: it never faults).
      if (k % 16 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * in + k);
      }
    }
    for (int t = 0; t < TT; ++t) {
      V xv;
      std::memcpy(&xv, x + t * ldx + k, sizeof(V));
      for (int r = 0; r < R; ++r) acc[r * TT + t] += wv[r] * xv;
    }
  }
  if (full < in) {
    const size_t rest = size_t(in - full) * sizeof(float);
    V wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = V{};
      std::memcpy(&wv[r], w + r * in + full, rest);
    }
    for (int t = 0; t < TT; ++t) {
      V xv{};
      std::memcpy(&xv, x + t * ldx + full, rest);
      for (int r = 0; r < R; ++r) acc[r * TT + t] += wv[r] * xv;
    }
  }
  reduceLevel<W, W, kPadded>(acc);
  float sums[kPadded];
  std::memcpy(sums, acc, sizeof(float) * kSources);
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) y[t * ldy + r] = sums[r * TT + t];
  }
}

// The last T % TT tokens: the tile of exactly that many.
template <int W, int R, int TT>
VSUP_INLINE void tailTile(int64_t n, float* y, int64_t ldy, const float* x, int64_t ldx,
                          const float* w, int64_t in) {
  if constexpr (TT > 0) {
    if (n == TT) {
      tile<W, R, TT>(y, ldy, x, ldx, w, in);
    } else {
      tailTile<W, R, TT - 1>(n, y, ldy, x, ldx, w, in);
    }
  }
}

// Rows [r0, r1): blocks of R rows (then single rows), each against every token tile while it
// is in L1.
template <int W, int R, int TT>
VSUP_INLINE void gemvRows(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                          const float* w, int64_t in, int64_t r0, int64_t r1) {
  int64_t o = r0;
  for (; o + R <= r1; o += R) {
    int64_t t = 0;
    // The first tile also prefetches the next block's rows, so that they arrive while the
    // other tiles compute.
    if (t + TT <= T) {
      tile<W, R, TT, true>(y + o, ldy, x, ldx, w + o * in, in);
      t += TT;
    }
    for (; t + TT <= T; t += TT) tile<W, R, TT>(y + t * ldy + o, ldy, x + t * ldx, ldx, w + o * in, in);
    if (t < T) tailTile<W, R, TT - 1>(T - t, y + t * ldy + o, ldy, x + t * ldx, ldx, w + o * in, in);
  }
  for (; o < r1; ++o) {
    int64_t t = 0;
    for (; t + TT <= T; t += TT) tile<W, 1, TT>(y + t * ldy + o, ldy, x + t * ldx, ldx, w + o * in, in);
    if (t < T) tailTile<W, 1, TT - 1>(T - t, y + t * ldy + o, ldy, x + t * ldx, ldx, w + o * in, in);
  }
}

// Tiles: AVX-512 4 rows × 6 tokens (24 accumulators + 4 weight vectors + 1 input of 32
// registers); AVX2 and SSE2 4 × 2 (8 + 4 + 1 of 16).
#ifdef VSUP_GEMV_WIDE
__attribute__((target("arch=x86-64-v4"))) void gemvAvx512(float* y, int64_t ldy, const float* x,
                                                          int64_t ldx, int64_t T, const float* w,
                                                          int64_t in, int64_t r0, int64_t r1) {
  gemvRows<16, 4, 6>(y, ldy, x, ldx, T, w, in, r0, r1);
}

__attribute__((target("arch=x86-64-v3"))) void gemvAvx2(float* y, int64_t ldy, const float* x,
                                                        int64_t ldx, int64_t T, const float* w,
                                                        int64_t in, int64_t r0, int64_t r1) {
  gemvRows<8, 4, 2>(y, ldy, x, ldx, T, w, in, r0, r1);
}
#endif

void gemvBaseline(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T, const float* w,
                  int64_t in, int64_t r0, int64_t r1) {
  gemvRows<4, 4, 2>(y, ldy, x, ldx, T, w, in, r0, r1);
}

std::vector<GemvIsa> detectIsas() {
  std::vector<GemvIsa> isas{GemvIsa::kBaseline};
#ifdef VSUP_GEMV_WIDE
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) isas.push_back(GemvIsa::kAvx2);
  if (__builtin_cpu_supports("x86-64-v4")) isas.push_back(GemvIsa::kAvx512);
#endif
  return isas;
}

void checkArgs(int64_t ldy, int64_t ldx, int64_t T, int64_t in, int64_t r0, int64_t r1) {
  if (T < 0 || in < 0 || r0 < 0 || r1 < r0 || ldx < in || ldy < r1) {
    throw std::invalid_argument("batchedGemvRows: bad shape (T " + std::to_string(T) + ", in " +
                                std::to_string(in) + ", rows " + std::to_string(r0) + ".." +
                                std::to_string(r1) + ", ldx " + std::to_string(ldx) + ", ldy " +
                                std::to_string(ldy) + "): needs T, in >= 0, 0 <= rowBegin <= "
                                "rowEnd <= ldy and ldx >= in");
  }
}

void pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// How long an idle worker spins before it sleeps: longer than the gap between two products of
// a step (norms, attention, an all-reduce: microseconds to a few tens), shorter than a wait for
// the next step usually is.
constexpr auto kSpin = std::chrono::microseconds(100);
// The caller's wait for chunks that workers took, spinning first (a chunk takes microseconds).
constexpr auto kCallerSpin = std::chrono::microseconds(50);

}  // namespace

const std::vector<GemvIsa>& gemvIsas() {
  static const std::vector<GemvIsa> isas = detectIsas();
  return isas;
}

const char* gemvIsaName(GemvIsa isa) {
  switch (isa) {
    case GemvIsa::kBaseline: return "baseline";
    case GemvIsa::kAvx2: return "avx2";
    case GemvIsa::kAvx512: return "avx512";
  }
  return "?";
}

void batchedGemvRows(GemvIsa isa, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                     const float* w, int64_t in, int64_t rowBegin, int64_t rowEnd) {
  checkArgs(ldy, ldx, T, in, rowBegin, rowEnd);
  if (std::find(gemvIsas().begin(), gemvIsas().end(), isa) == gemvIsas().end()) {
    throw std::invalid_argument(std::string("batchedGemvRows: this CPU cannot run the ") +
                                gemvIsaName(isa) + " build");
  }
  if (T == 0 || rowEnd == rowBegin) return;
  switch (isa) {
#ifdef VSUP_GEMV_WIDE
    case GemvIsa::kAvx512: gemvAvx512(y, ldy, x, ldx, T, w, in, rowBegin, rowEnd); return;
    case GemvIsa::kAvx2: gemvAvx2(y, ldy, x, ldx, T, w, in, rowBegin, rowEnd); return;
#endif
    default: gemvBaseline(y, ldy, x, ldx, T, w, in, rowBegin, rowEnd); return;
  }
}

void batchedGemvRows(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                     const float* w, int64_t in, int64_t rowBegin, int64_t rowEnd) {
  static const GemvIsa best = gemvIsas().back();
  batchedGemvRows(best, y, ldy, x, ldx, T, w, in, rowBegin, rowEnd);
}

// --- BatchedGemv ----------------------------------------------------------------------------

BatchedGemv::BatchedGemv(int threads) {
  if (threads < 1 || threads > 1024) {
    throw std::invalid_argument("BatchedGemv: threads must be 1..1024, got " +
                                std::to_string(threads));
  }
  workers_.reserve(size_t(threads - 1));
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { workerLoop(); });
}

BatchedGemv::~BatchedGemv() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void BatchedGemv::run(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                      const float* w, int64_t out, int64_t in) {
  checkArgs(ldy, ldx, T, in, 0, out);
  if (T == 0 || out == 0) return;
  const int64_t n = threads();
  // A few chunks per thread, whole row blocks, none tiny.
  constexpr int64_t kBlock = 4, kMinChunk = 16, kChunksPerThread = 4;
  int64_t chunkRows = (out + n * kChunksPerThread - 1) / (n * kChunksPerThread);
  chunkRows = std::max(kMinChunk, (chunkRows + kBlock - 1) / kBlock * kBlock);
  const int64_t chunks = (out + chunkRows - 1) / chunkRows;
  if (n == 1 || chunks < 2) {
    batchedGemvRows(y, ldy, x, ldx, T, w, in, 0, out);
    return;
  }
  // chunks <= kChunksPerThread × threads, well inside the ticket's 16 bits.
  job_ = Job{y, ldy, x, ldx, T, w, out, in, chunkRows, chunks};
  done_.store(0, std::memory_order_relaxed);
  const uint32_t g = generation_.load(std::memory_order_relaxed) + 1;
  ticket_.store(uint64_t(g) << 32 | uint64_t(job_.chunks) << 16, std::memory_order_release);
  generation_.store(g, std::memory_order_release);
  generation_.notify_all();
  work(g);
  // The chunks the workers claimed.
  int64_t finished = done_.load(std::memory_order_acquire);
  const auto until = std::chrono::steady_clock::now() + kCallerSpin;
  while (finished != job_.chunks && std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 16; ++i) pause();
    finished = done_.load(std::memory_order_acquire);
  }
  while (finished != job_.chunks) {
    done_.wait(finished, std::memory_order_acquire);
    finished = done_.load(std::memory_order_acquire);
  }
}

void BatchedGemv::work(uint32_t g) {
  uint64_t t = ticket_.load(std::memory_order_acquire);
  for (;;) {
    if (uint32_t(t >> 32) != g) return;
    const uint64_t total = (t >> 16) & 0xffff, next = t & 0xffff;
    if (next >= total) return;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
      continue;
    }
    // Claimed: job_ is this call's until every chunk, this one included, is done.
    const Job& j = job_;
    const int64_t r0 = int64_t(next) * j.chunkRows, r1 = std::min(j.out, r0 + j.chunkRows);
    batchedGemvRows(j.y, j.ldy, j.x, j.ldx, j.T, j.w, j.in, r0, r1);
    const int64_t chunks = j.chunks;
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) done_.notify_all();
    t = ticket_.load(std::memory_order_acquire);
  }
}

void BatchedGemv::workerLoop() {
  uint32_t seen = 0;
  for (;;) {
    uint32_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (g == seen && std::chrono::steady_clock::now() < until) {
        for (int i = 0; i < 16; ++i) pause();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;
    work(g);
  }
}

}  // namespace vsup::kernels
