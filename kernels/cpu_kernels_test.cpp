#include "kernels/cpu_kernels.h"
#include "kernels/kernel_test_util.h"

#include <doctest/doctest.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace vsup::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

using testing::randomVector;

// max_i |actual_i - expected_i| / max(|expected_i|, floor): elementwise relative error, with
// `floor` as the scale below which an absolute error is what counts.
double maxRelError(const std::vector<float>& actual, const std::vector<double>& expected,
                   double floor) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0.0;
  for (size_t i = 0; i < actual.size(); ++i)
    worst =
        std::max(worst, std::abs(actual[i] - expected[i]) / std::max(std::abs(expected[i]), floor));
  return worst;
}

double maxAbs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// This thread's CPU time in seconds: timings taken on a shared machine count only our own time.
double threadSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// ---- rmsNorm, addInPlace, siluMul --------------------------------------------------------------

std::vector<double> naiveRmsNorm(const std::vector<float>& x, const std::vector<float>& w,
                                 float eps) {
  double ss = 0.0;
  for (float v : x) ss += static_cast<double>(v) * v;
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * inv * w[i];
  return out;
}

TEST_CASE("rmsNorm matches a double-precision reference, into a separate buffer and in place") {
  for (int n : {1, 7, 64, 4096, 5003}) {
    CAPTURE(n);
    const std::vector<float> x = randomVector(static_cast<size_t>(n), 1, -3.0f, 3.0f);
    const std::vector<float> w = randomVector(static_cast<size_t>(n), 2, 0.5f, 1.5f);
    const std::vector<double> expected = naiveRmsNorm(x, w, 1e-5f);
    std::vector<float> out(static_cast<size_t>(n));
    rmsNorm(out.data(), x.data(), w.data(), n, 1e-5f);
    CHECK(maxRelError(out, expected, 1e-30) <= 1e-5);
    std::vector<float> inPlace = x;
    rmsNorm(inPlace.data(), inPlace.data(), w.data(), n, 1e-5f);
    CHECK(inPlace == out);
  }
}

TEST_CASE("rmsNorm of a zero vector is zero, held finite by eps") {
  std::vector<float> x(32, 0.0f);
  std::vector<float> w(32, 1.0f);
  rmsNorm(x.data(), x.data(), w.data(), 32, 1e-6f);
  for (float v : x) CHECK(v == 0.0f);
}

TEST_CASE("addInPlace adds elementwise") {
  std::vector<float> out = randomVector(1001, 3);
  const std::vector<float> a = randomVector(1001, 4);
  std::vector<float> expected(out.size());
  for (size_t i = 0; i < out.size(); ++i) expected[i] = out[i] + a[i];
  addInPlace(out.data(), a.data(), 1001);
  CHECK(out == expected);
}

double naiveSilu(double g) { return g / (1.0 + std::exp(-g)); }

TEST_CASE("siluMul matches a double-precision reference, also when out is gate or up") {
  const int n = 3001;
  const std::vector<float> gate = randomVector(n, 5, -12.0f, 12.0f);
  const std::vector<float> up = randomVector(n, 6, -2.0f, 2.0f);
  std::vector<double> expected(n);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = naiveSilu(gate[i]) * up[i];
  std::vector<float> out(n);
  siluMul(out.data(), gate.data(), up.data(), n);
  CHECK(maxRelError(out, expected, 1e-30) <= 1e-5);
  std::vector<float> aliasGate = gate;
  siluMul(aliasGate.data(), aliasGate.data(), up.data(), n);
  CHECK(aliasGate == out);
  std::vector<float> aliasUp = up;
  siluMul(aliasUp.data(), gate.data(), aliasUp.data(), n);
  CHECK(aliasUp == out);
}

// Also the accuracy check of the kernels' exp: silu's relative error is bounded by exp's.
TEST_CASE("siluMul is accurate to 1e-6 across the whole range of its exp, and finite beyond it") {
  std::vector<float> gate;
  for (double g = -87.0; g <= 87.0; g += 0.00073) gate.push_back(static_cast<float>(g));
  for (float g :
       {0.0f, -0.0f, 1e-30f, -1e-30f, 88.5f, 100.0f, 1e4f, 3e38f, -88.5f, -100.0f, -1e4f, -3e38f})
    gate.push_back(g);
  const std::vector<float> up(gate.size(), 1.0f);
  std::vector<float> out(gate.size());
  siluMul(out.data(), gate.data(), up.data(), static_cast<int>(gate.size()));
  double worst = 0.0;
  for (size_t i = 0; i < gate.size(); ++i) {
    CAPTURE(gate[i]);
    REQUIRE(std::isfinite(out[i]));
    const double expected = naiveSilu(gate[i]);
    // Below -87 the result is a tiny negative number or zero, both within 1e-35 of the truth.
    if (gate[i] < -87.0f)
      CHECK(std::abs(out[i] - expected) <= 1e-35);
    else
      worst = std::max(worst, std::abs(out[i] - expected) / std::max(std::abs(expected), 1e-37));
  }
  MESSAGE("siluMul worst relative error over [-87, 87]: " << worst);
  CHECK(worst <= 1e-6);
}

// ---- RoPE --------------------------------------------------------------------------------------

TEST_CASE("RoPE at position 0 is the identity") {
  const RopeTable rope(64, 10000.0f, 16);
  std::vector<float> x = randomVector(4 * 64, 7);
  const std::vector<float> before = x;
  rope.apply(x.data(), 4, 0);
  CHECK(x == before);
}

TEST_CASE("RoPE rotates each (j, j + half) pair by position * theta^(-2j/headDim)") {
  const int headDim = 128;
  const int half = headDim / 2;
  const float theta = 500000.0f;
  const RopeTable rope(headDim, theta, 8192);
  CHECK(rope.headDim() == headDim);
  CHECK(rope.maxPositions() == 8192);
  for (int pos : {1, 7, 1000, 8191}) {
    CAPTURE(pos);
    const int heads = 3;
    std::vector<float> x =
        randomVector(static_cast<size_t>(heads * headDim), 8 + static_cast<uint32_t>(pos));
    std::vector<double> expected(x.size());
    std::vector<double> scale(x.size());
    for (int h = 0; h < heads; ++h)
      for (int j = 0; j < half; ++j) {
        const double angle = pos * std::pow(static_cast<double>(theta), -2.0 * j / headDim);
        const double x0 = x[static_cast<size_t>(h * headDim + j)];
        const double x1 = x[static_cast<size_t>(h * headDim + j + half)];
        expected[static_cast<size_t>(h * headDim + j)] =
            x0 * std::cos(angle) - x1 * std::sin(angle);
        expected[static_cast<size_t>(h * headDim + j + half)] =
            x1 * std::cos(angle) + x0 * std::sin(angle);
        scale[static_cast<size_t>(h * headDim + j)] = std::abs(x0) + std::abs(x1);
        scale[static_cast<size_t>(h * headDim + j + half)] = std::abs(x0) + std::abs(x1);
      }
    rope.apply(x.data(), heads, pos);
    // Relative to |x0| + |x1|: a rotation can cancel one output down to nothing.
    double worst = 0.0;
    for (size_t i = 0; i < x.size(); ++i)
      worst = std::max(worst, std::abs(x[i] - expected[i]) / scale[i]);
    CHECK(worst <= 1e-6);
  }
}

TEST_CASE("RoPE by a quarter turn maps (1, 0) to (0, 1)") {
  // headDim 2: one pair with inv_freq 1, so position p rotates by p radians; the table rounds
  // cos/sin to float, so compare against those.
  const RopeTable rope(2, 10000.0f, 4);
  float x[2] = {1.0f, 0.0f};
  rope.apply(x, 1, 1);
  CHECK(x[0] == doctest::Approx(std::cos(1.0)).epsilon(1e-7));
  CHECK(x[1] == doctest::Approx(std::sin(1.0)).epsilon(1e-7));
}

TEST_CASE("RopeTable refuses an odd head size and a position outside its table") {
  CHECK_THROWS_AS(RopeTable(63, 10000.0f, 8), std::invalid_argument);
  const RopeTable rope(4, 10000.0f, 8);
  float x[4] = {};
  CHECK_THROWS_AS(rope.apply(x, 1, 8), std::out_of_range);
  CHECK_THROWS_AS(rope.apply(x, 1, -1), std::out_of_range);
}

// ---- Paged attention ---------------------------------------------------------------------------

// A sequence's K and V laid out contiguously as [contextLen][numKvHeads][headDim], copied into a
// paged cache through a shuffled block table with spare blocks in between.
struct PagedSequence {
  PagedLayout layout;
  int contextLen = 0;
  std::vector<float> k, v;  // contiguous
  std::vector<float> kCache, vCache;
  std::vector<int32_t> blockTable;

  PagedSequence(const PagedLayout& l, int context, uint32_t seed) : layout(l), contextLen(context) {
    const size_t row = static_cast<size_t>(l.numKvHeads * l.headDim);
    k = randomVector(static_cast<size_t>(context) * row, seed, -2.0f, 2.0f);
    v = randomVector(static_cast<size_t>(context) * row, seed + 1000, -2.0f, 2.0f);
    const int blocksUsed = (context + l.blockSize - 1) / l.blockSize;
    const int numBlocks = 2 * blocksUsed + 3;
    std::vector<int32_t> ids(static_cast<size_t>(numBlocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
    blockTable.assign(ids.begin(), ids.begin() + blocksUsed);
    // NaN everywhere the sequence does not write: reading a wrong slot poisons the result.
    const size_t cacheFloats =
        static_cast<size_t>(numBlocks) * static_cast<size_t>(l.blockSize) * row;
    kCache.assign(cacheFloats, std::numeric_limits<float>::quiet_NaN());
    vCache.assign(cacheFloats, std::numeric_limits<float>::quiet_NaN());
    for (int p = 0; p < context; ++p)
      writeKv(kCache.data(), vCache.data(), l, blockTable.data(), p,
              k.data() + static_cast<size_t>(p) * row, v.data() + static_cast<size_t>(p) * row);
  }
};

std::vector<double> naiveAttention(const PagedSequence& s, const std::vector<float>& q,
                                   int numHeads, double scale) {
  const int d = s.layout.headDim;
  const int nkv = s.layout.numKvHeads;
  const int group = numHeads / nkv;
  std::vector<double> out(static_cast<size_t>(numHeads * d), 0.0);
  for (int h = 0; h < numHeads; ++h) {
    const int kvh = h / group;
    std::vector<double> scores(static_cast<size_t>(s.contextLen));
    for (int p = 0; p < s.contextLen; ++p) {
      double dot = 0.0;
      for (int i = 0; i < d; ++i)
        dot += static_cast<double>(q[static_cast<size_t>(h * d + i)]) *
               s.k[static_cast<size_t>((p * nkv + kvh) * d + i)];
      scores[static_cast<size_t>(p)] = dot * scale;
    }
    const double mx = *std::max_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (double& x : scores) sum += (x = std::exp(x - mx));
    for (int p = 0; p < s.contextLen; ++p)
      for (int i = 0; i < d; ++i)
        out[static_cast<size_t>(h * d + i)] += scores[static_cast<size_t>(p)] / sum *
                                               s.v[static_cast<size_t>((p * nkv + kvh) * d + i)];
  }
  return out;
}

TEST_CASE("pagedAttention through a scrambled block table matches naive contiguous attention") {
  for (int headDim : {64, 128})
    for (int blockSize : {4, 16})
      for (int ratio : {1, 2, 4})
        for (int contextLen : {1, 5, 17, 64}) {
          CAPTURE(headDim);
          CAPTURE(blockSize);
          CAPTURE(ratio);
          CAPTURE(contextLen);
          const int numKvHeads = 2;
          const int numHeads = numKvHeads * ratio;
          const PagedLayout layout{blockSize, numKvHeads, headDim};
          const PagedSequence seq(
              layout, contextLen,
              static_cast<uint32_t>(blockSize * 1000 + ratio * 100 + contextLen));
          // q scaled up so the softmax is far from uniform.
          const std::vector<float> q =
              randomVector(static_cast<size_t>(numHeads * headDim), 99, -3.0f, 3.0f);
          const float scale = 1.0f / std::sqrt(static_cast<float>(headDim));
          std::vector<float> out(q.size());
          std::vector<float> scratch(static_cast<size_t>(contextLen));
          pagedAttention(out.data(), q.data(), seq.kCache.data(), seq.vCache.data(), layout,
                         seq.blockTable.data(), contextLen, numHeads, scale, scratch.data());
          const std::vector<double> expected = naiveAttention(seq, q, numHeads, scale);
          // Relative to the output's magnitude: an element can cancel to near zero.
          CHECK(maxRelError(out, expected, maxAbs(expected)) <= 1e-5);
        }
}

TEST_CASE("pagedAttention over many online-softmax chunks and head batches stays exact") {
  // 600 positions span several chunks of the online softmax; 80 query heads (20 per kv head) take
  // two passes, the split falling inside a group; headDim 72 is neither specialized size and
  // exercises the dot product's tail.
  const PagedLayout layout{16, 4, 72};
  const int numHeads = 80;
  const int contextLen = 600;
  const PagedSequence seq(layout, contextLen, 4242);
  std::vector<float> q =
      randomVector(static_cast<size_t>(numHeads * layout.headDim), 77, -3.0f, 3.0f);
  // Head 0 aligned with a late position's key: its running max moves between chunks.
  for (int i = 0; i < layout.headDim; ++i)
    q[static_cast<size_t>(i)] = seq.k[static_cast<size_t>((550 * 4) * 72 + i)] * 2.0f;
  const float scale = 1.0f / std::sqrt(72.0f);
  std::vector<float> out(q.size());
  std::vector<float> scratch(static_cast<size_t>(contextLen));
  pagedAttention(out.data(), q.data(), seq.kCache.data(), seq.vCache.data(), layout,
                 seq.blockTable.data(), contextLen, numHeads, scale, scratch.data());
  const std::vector<double> expected = naiveAttention(seq, q, numHeads, scale);
  CHECK(maxRelError(out, expected, maxAbs(expected)) <= 1e-5);
}

TEST_CASE("pagedAttention over an empty context writes zeros") {
  const PagedLayout layout{16, 1, 64};
  std::vector<float> out(128, 1.0f);
  const std::vector<float> q(128, 1.0f);
  const int32_t blockTable[1] = {0};
  pagedAttention(out.data(), q.data(), nullptr, nullptr, layout, blockTable, 0, 2, 0.125f, nullptr);
  for (float v : out) CHECK(v == 0.0f);
}

TEST_CASE(
    "pagedAttention throughput over a 2048-token context (32 heads, 8 kv heads, headDim 64)") {
  const PagedLayout layout{16, 8, 64};
  const int numHeads = 32;
  const int contextLen = 2048;
  const PagedSequence seq(layout, contextLen, 5);
  const std::vector<float> q = randomVector(static_cast<size_t>(numHeads * layout.headDim), 6);
  std::vector<float> out(q.size());
  std::vector<float> scratch(static_cast<size_t>(contextLen));
  const float scale = 0.125f;
  auto once = [&] {
    pagedAttention(out.data(), q.data(), seq.kCache.data(), seq.vCache.data(), layout,
                   seq.blockTable.data(), contextLen, numHeads, scale, scratch.data());
  };
  once();
  const int iterations = 200;
  const double start = threadSeconds();
  for (int i = 0; i < iterations; ++i) once();
  const double seconds = threadSeconds() - start;
  const double bytes = 2.0 * contextLen * layout.numKvHeads * layout.headDim * sizeof(float);
  MESSAGE("pagedAttention: " << seconds / iterations * 1e6 << " us per call, "
                             << bytes * iterations / seconds / 1e9
                             << " GB/s of K+V (8 MiB, cache-warm; thread CPU time)");
  CHECK(std::isfinite(out[0]));
}

// ---- Sampling ----------------------------------------------------------------------------------

int32_t sample(const std::vector<float>& logits, const SamplingConfig& config, uint64_t position) {
  std::vector<float> scratch;
  return sampleToken(logits.data(), static_cast<int>(logits.size()), config, position, scratch);
}

SamplingConfig config(float temperature, int topK = 0, float topP = 1.0f, uint64_t seed = 0) {
  SamplingConfig c;
  c.temperature = temperature;
  c.topK = topK;
  c.topP = topP;
  c.seed = seed;
  return c;
}

int32_t argmax(const std::vector<float>& logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// The distribution the contract describes, in double: softmax(logits / T) restricted to the top
// k, then to the smallest prefix reaching topP, renormalized; order is (logit desc, index asc).
std::vector<double> expectedDistribution(const std::vector<float>& logits,
                                         const SamplingConfig& c) {
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return logits[static_cast<size_t>(a)] > logits[static_cast<size_t>(b)];
  });
  size_t keep = order.size();
  if (c.topK > 0) keep = std::min(keep, static_cast<size_t>(c.topK));
  const double mx = logits[static_cast<size_t>(order[0])];
  std::vector<double> w(keep);
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i)
    total += (w[i] = std::exp((logits[static_cast<size_t>(order[i])] - mx) / c.temperature));
  if (c.topP < 1.0f) {
    double cum = 0.0;
    size_t m = 0;
    while (m < keep) {
      cum += w[m++];
      if (cum >= c.topP * total) break;
    }
    keep = m;
    total = cum;
  }
  std::vector<double> p(logits.size(), 0.0);
  for (size_t i = 0; i < keep; ++i) p[static_cast<size_t>(order[i])] = w[i] / total;
  return p;
}

// Draws `draws` tokens at consecutive positions and checks the counts against the expected
// distribution: zero where the probability is zero, each count within 4.5 standard deviations,
// and Pearson's chi-square over the support below dof + 5 sqrt(2 dof) (p < 1e-3 by chance).
void checkEmpirical(const std::vector<float>& logits, const SamplingConfig& c, int draws) {
  const std::vector<double> p = expectedDistribution(logits, c);
  std::vector<int> counts(logits.size(), 0);
  std::vector<float> scratch;
  for (int i = 0; i < draws; ++i) {
    const int32_t t = sampleToken(logits.data(), static_cast<int>(logits.size()), c,
                                  static_cast<uint64_t>(i), scratch);
    REQUIRE(t >= 0);
    REQUIRE(t < static_cast<int32_t>(logits.size()));
    ++counts[static_cast<size_t>(t)];
  }
  double chiSquare = 0.0;
  int support = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    CAPTURE(i);
    CAPTURE(p[i]);
    const double mean = draws * p[i];
    const double sigma = std::sqrt(draws * p[i] * (1.0 - p[i]));
    if (p[i] == 0.0) {
      CHECK(counts[i] == 0);
      continue;
    }
    CHECK(std::abs(counts[i] - mean) <= 4.5 * sigma + 1.0);
    chiSquare += (counts[i] - mean) * (counts[i] - mean) / mean;
    ++support;
  }
  const double dof = std::max(support - 1, 1);
  CHECK(chiSquare <= dof + 5.0 * std::sqrt(2.0 * dof));
}

TEST_CASE("greedy sampling is the argmax, the lowest index winning a tie") {
  CHECK(sample({1.0f, 5.0f, 3.0f, 5.0f, 5.0f}, config(0.0f), 0) == 1);
  CHECK(sample({9.0f, 5.0f, 9.0f}, config(0.0f), 17) == 0);
  CHECK(sample({-kInf, std::numeric_limits<float>::quiet_NaN(), -3.0f, -3.0f}, config(0.0f), 0) ==
        2);
  std::vector<float> big = randomVector(256000, 11);
  big[200001] = 5.0f;
  big[100] = 4.0f;
  CHECK(sample(big, config(0.0f), 3) == 200001);
}

TEST_CASE("sampling is a function of (seed, position), and varies with both") {
  const std::vector<float> logits = randomVector(50, 12, -1.0f, 1.0f);
  std::set<int32_t> byPosition, bySeed;
  for (uint64_t pos = 0; pos < 100; ++pos) {
    const int32_t t = sample(logits, config(1.0f, 0, 1.0f, 42), pos);
    CHECK(sample(logits, config(1.0f, 0, 1.0f, 42), pos) == t);
    byPosition.insert(t);
    bySeed.insert(sample(logits, config(1.0f, 0, 1.0f, pos), 7));
  }
  CHECK(byPosition.size() >= 20);
  CHECK(bySeed.size() >= 20);
}

TEST_CASE("a tiny temperature, top-k 1 and a tiny top-p each give the argmax") {
  const std::vector<float> logits = randomVector(1000, 13, -5.0f, 5.0f);
  const int32_t best = argmax(logits);
  for (uint64_t pos = 0; pos < 200; ++pos) {
    CAPTURE(pos);
    CHECK(sample(logits, config(1e-4f), pos) == best);
    CHECK(sample(logits, config(1e-30f), pos) == best);
    CHECK(sample(logits, config(0.7f, 1), pos) == best);
    CHECK(sample(logits, config(50.0f, 1), pos) == best);
    CHECK(sample(logits, config(1.0f, 0, 1e-6f), pos) == best);
    CHECK(sample(logits, config(1.0f, 20, 1e-6f), pos) == best);
  }
}

TEST_CASE("at temperature 1 the empirical distribution matches softmax") {
  checkEmpirical({0.0f, 1.0f, 2.0f, -1.0f, 0.5f, 0.5f, -3.0f, 1.5f}, config(1.0f), 100000);
}

TEST_CASE("temperature, top-k and top-p reshape the distribution as the contract says") {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, -1.0f, 0.5f, 0.5f, -3.0f, 1.5f, 1.0f, -0.2f};
  checkEmpirical(logits, config(2.0f), 60000);
  checkEmpirical(logits, config(0.5f), 60000);
  checkEmpirical(logits, config(1.0f, 3), 60000);
  checkEmpirical(logits, config(1.0f, 0, 0.8f), 60000);
  checkEmpirical(logits, config(1.5f, 6, 0.7f), 60000);
  // Ties at the top-k boundary go to the lowest indices: 1 and 8 tie at 1.0, k = 4 keeps 1.
  checkEmpirical(logits, config(1.0f, 4), 60000);
}

TEST_CASE("top-k restricts the support to the k largest logits") {
  const std::vector<float> logits = randomVector(5000, 14, -2.0f, 2.0f);
  std::vector<float> sorted = logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  const float fifth = sorted[4];
  std::set<int32_t> seen;
  std::vector<float> scratch;
  for (uint64_t pos = 0; pos < 2000; ++pos) {
    const int32_t t = sampleToken(logits.data(), 5000, config(1.0f, 5), pos, scratch);
    REQUIRE(logits[static_cast<size_t>(t)] >= fifth);
    seen.insert(t);
  }
  CHECK(seen.size() == 5);
  // A large k (selected in place rather than by heap) restricts the same way.
  for (uint64_t pos = 0; pos < 200; ++pos) {
    const int32_t t = sampleToken(logits.data(), 5000, config(1.0f, 1000), pos, scratch);
    REQUIRE(logits[static_cast<size_t>(t)] >= sorted[999]);
  }
}

TEST_CASE(
    "top-p over equal logits keeps the lowest indices, and a top-p near 1 widens its search") {
  const std::vector<float> flat(10000, 0.25f);
  for (uint64_t pos = 0; pos < 500; ++pos) CHECK(sample(flat, config(1.0f, 0, 0.5f), pos) < 5000);
  // One token at 0 and a thousand at -20: the tail is 2e-6 of the mass, so reaching topP needs
  // tokens beyond the first cutoff of 16.
  std::vector<float> tail(1001, -20.0f);
  tail[500] = 0.0f;
  std::set<int32_t> seen;
  for (uint64_t pos = 0; pos < 300; ++pos) {
    const int32_t t = sample(tail, config(1.0f, 0, 0.9999995f), pos);
    REQUIRE(t >= 0);
    REQUIRE(t <= 1000);
    seen.insert(t);
  }
  CHECK(seen.count(500) == 1);
}

TEST_CASE("sampling never leaves [0, vocab), whatever the logits") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::vector<float>> cases = {
      {3.0f},
      {-kInf},
      {nan},
      {-kInf, -kInf, -kInf},
      {-kInf, 2.0f, -kInf, nan},
      {3e38f, -3e38f, 1.0f},
      {3e38f, 3e38f, -3e38f},
      {kInf, 1.0f, kInf},
      {-3e38f, -3e38f},
      randomVector(777, 15, -1e30f, 1e30f),
  };
  std::vector<float> scratch;
  for (size_t c = 0; c < cases.size(); ++c) {
    CAPTURE(c);
    const std::vector<float>& logits = cases[c];
    for (const SamplingConfig& cfg :
         {config(0.0f), config(1.0f), config(1e-20f), config(1e20f), config(1.0f, 2),
          config(1.0f, 0, 0.5f), config(0.8f, 3, 0.9f), config(1.0f, 100000)}) {
      for (uint64_t pos = 0; pos < 20; ++pos) {
        const int32_t t =
            sampleToken(logits.data(), static_cast<int>(logits.size()), cfg, pos, scratch);
        REQUIRE(t >= 0);
        REQUIRE(t < static_cast<int32_t>(logits.size()));
      }
    }
  }
  // Only the finite logits can be drawn, and a huge one takes everything.
  for (uint64_t pos = 0; pos < 50; ++pos) {
    CHECK(sample({-kInf, 2.0f, -kInf, nan, 2.0f}, config(1.0f), pos) % 3 == 1);
    CHECK(sample({3e38f, -3e38f, 1.0f}, config(1.0f, 0, 0.9f), pos) == 0);
    CHECK(sample({kInf, 1.0f, kInf}, config(1.0f), pos) == 0);
    CHECK(sample({1.0f, kInf, kInf}, config(1.0f, 0, 0.5f), pos) == 1);
  }
}

TEST_CASE("sampling a 256k vocabulary: nucleus membership, and the time it takes") {
  const int vocab = 256000;
  // Logits shaped like a model's: a few strong candidates over a wide low background.
  std::vector<float> logits = randomVector(static_cast<size_t>(vocab), 16, -4.0f, 4.0f);
  std::mt19937 rng(17);
  for (int i = 0; i < 20; ++i)
    logits[rng() % static_cast<uint32_t>(vocab)] = 12.0f + static_cast<float>(i) * 0.3f;
  const SamplingConfig topP = config(0.8f, 0, 0.9f);
  const std::vector<double> p = expectedDistribution(logits, topP);
  std::vector<float> scratch;
  for (uint64_t pos = 0; pos < 300; ++pos) {
    const int32_t t = sampleToken(logits.data(), vocab, topP, pos, scratch);
    REQUIRE(p[static_cast<size_t>(t)] > 0.0);
  }
  for (const SamplingConfig& cfg : {config(0.0f), config(1.0f), config(0.8f, 50),
                                    config(0.8f, 0, 0.9f), config(0.8f, 50, 0.9f)}) {
    const int iterations = 50;
    const double start = threadSeconds();
    int64_t sink = 0;
    for (int i = 0; i < iterations; ++i)
      sink += sampleToken(logits.data(), vocab, cfg, static_cast<uint64_t>(i), scratch);
    const double us = (threadSeconds() - start) / iterations * 1e6;
    MESSAGE("sampleToken over 256k logits (T " << cfg.temperature << ", top-k " << cfg.topK
                                               << ", top-p " << cfg.topP << "): " << us << " us");
    CHECK(sink >= 0);
  }
}

}  // namespace
}  // namespace vsup::kernels
