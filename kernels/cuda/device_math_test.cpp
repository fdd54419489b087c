// The CUDA kernels' per-element math (device_math.h), compiled for the host, against the CPU
// engine's kernels: what makes the two engines agree, checked on a machine without a GPU.
#include "kernels/cuda/device_math.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu_kernels.h"
#include "kernels/kernel_test_util.h"

namespace vsup::kernels::cuda {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

using testing::maxRelativeError;
using testing::randomVector;

}  // namespace

TEST_CASE("bf16 conversion rounds to nearest even and keeps NaN, infinities and signed zeros") {
  CHECK(floatToBf16(1.0f) == 0x3f80);
  CHECK(floatToBf16(-2.0f) == 0xc000);
  CHECK(floatToBf16(1.0f + 0x1p-8f) == 0x3f80);         // a tie: to the even 0x3f80
  CHECK(floatToBf16(1.0f + 3 * 0x1p-8f) == 0x3f82);     // a tie: to the even 0x3f82
  CHECK(floatToBf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);  // past the tie: up
  CHECK(floatToBf16(kInf) == 0x7f80);
  CHECK(floatToBf16(-kInf) == 0xff80);
  CHECK(floatToBf16(-0.0f) == 0x8000);
  CHECK(std::isnan(bf16ToFloat(floatToBf16(std::nanf("")))));
  CHECK(floatToBf16(3.4e38f) == 0x7f80);  // past bf16's largest finite value: +inf
  // Every bf16 value that is not a NaN survives the round trip through float exactly.
  int exact = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    float f = bf16ToFloat(uint16_t(b));
    if (std::isnan(f)) continue;
    exact += floatToBf16(f) == b;
  }
  CHECK(exact == 0x10000 - 2 * 0x7f);  // 254 NaN encodings
}

TEST_CASE("SwiGLU's activation equals the CPU kernel's, its exp approximation included") {
  std::vector<float> gate = randomVector(4096, 1, -30.0f, 30.0f);
  std::vector<float> up = randomVector(4096, 2);
  gate.push_back(-100.0f);  // exp(100) overflows: silu is -0
  up.push_back(1.0f);
  gate.push_back(100.0f);
  up.push_back(1.0f);
  std::vector<float> cpu(gate.size()), device(gate.size());
  kernels::siluMul(cpu.data(), gate.data(), up.data(), int(gate.size()));
  for (size_t i = 0; i < gate.size(); ++i) device[i] = siluMul(gate[i], up[i]);
  // Equal but for the contraction of multiply-adds into FMAs, which the CPU kernel's clones
  // and the GPU may do differently: a few units in the last place.
  CHECK(maxRelativeError(device, cpu, 1e-6f) < 2e-6f);
  CHECK(device[device.size() - 1] == 100.0f);
  CHECK(std::isnan(expApprox(std::nanf(""))));
  CHECK(expApprox(-90.0f) == 0.0f);
  CHECK(expApprox(89.0f) == kInf);
  CHECK(expApprox(0.0f) == 1.0f);
}

TEST_CASE("RMSNorm with the device's scale equals the CPU kernel") {
  const int n = 512;
  std::vector<float> x = randomVector(n, 3, -4.0f, 4.0f), w = randomVector(n, 4);
  std::vector<float> cpu(n), device(n);
  kernels::rmsNorm(cpu.data(), x.data(), w.data(), n, 1e-5f);
  double sum = 0;
  for (float v : x) sum += double(v) * v;
  const float inv = rmsInverse(sum, n, 1e-5f);
  for (int i = 0; i < n; ++i) device[i] = x[size_t(i)] * inv * w[size_t(i)];
  CHECK(maxRelativeError(device, cpu, 1e-3f) < 1e-6f);
}

TEST_CASE("rotary embedding from the device's angles equals the CPU RopeTable") {
  const int headDim = 64, heads = 3, maxPos = 2048;
  const float theta = 500000.0f;
  kernels::RopeTable table(headDim, theta, maxPos);
  for (int pos : {0, 1, 17, 1000, 2047}) {
    std::vector<float> cpu = randomVector(size_t(headDim * heads), uint32_t(pos + 5));
    std::vector<float> device = cpu;
    table.apply(cpu.data(), heads, pos);
    const int half = headDim / 2;
    for (int h = 0; h < heads; ++h) {
      for (int j = 0; j < half; ++j) {
        const double angle = ropeAngle(pos, j, headDim, theta);
        float* lo = &device[size_t(h * headDim + j)];
        ropeRotate(lo[0], lo[half], float(std::cos(angle)), float(std::sin(angle)));
      }
    }
    CHECK(maxRelativeError(device, cpu, 1e-3f) < 1e-6f);
  }
}

TEST_CASE("the device's argmax order is greedy sampling's: NaN as -inf, the lowest index on a tie") {
  std::vector<std::vector<float>> cases = {
      {0.5f, 2.0f, 2.0f, -1.0f},
      {std::nanf(""), -kInf, -3.0f, std::nanf("")},
      {-kInf, -kInf},
      {std::nanf(""), std::nanf("")},
      {1.0f, kInf, 3.0f, kInf},
  };
  for (int i = 0; i < 50; ++i) cases.push_back(randomVector(260, uint32_t(100 + i), -3, 3));
  std::vector<float> scratch;
  for (const auto& logits : cases) {
    // A strided reduction, as a block of threads does it: each lane keeps its best, then the
    // lanes are combined.
    const int lanes = 4;
    float bestKey[lanes];
    int bestIndex[lanes];
    for (int l = 0; l < lanes; ++l) {
      bestKey[l] = -kInf;
      bestIndex[l] = int(logits.size());
      for (size_t i = size_t(l); i < logits.size(); i += lanes) {
        float k = argmaxKey(logits[i]);
        if (argmaxBetter(k, int(i), bestKey[l], bestIndex[l])) {
          bestKey[l] = k;
          bestIndex[l] = int(i);
        }
      }
    }
    for (int l = 1; l < lanes; ++l) {
      if (argmaxBetter(bestKey[l], bestIndex[l], bestKey[0], bestIndex[0])) {
        bestKey[0] = bestKey[l];
        bestIndex[0] = bestIndex[l];
      }
    }
    kernels::SamplingConfig greedy;
    greedy.temperature = 0;
    CHECK(bestIndex[0] == kernels::sampleToken(logits.data(), int(logits.size()), greedy, 0, scratch));
  }
}

TEST_CASE("paged attention by the device's online softmax, split and merged as the kernel's "
          "warps do, equals the CPU kernel") {
  kernels::PagedLayout layout;
  layout.blockSize = 16;
  layout.numKvHeads = 2;
  layout.headDim = 64;
  const int numHeads = 8, numBlocks = 12, group = numHeads / layout.numKvHeads;
  const size_t row = size_t(layout.numKvHeads * layout.headDim);
  std::vector<float> k = randomVector(size_t(numBlocks * layout.blockSize) * row, 7);
  std::vector<float> v = randomVector(k.size(), 8);
  std::vector<int32_t> table = {5, 2, 11, 0, 7, 3};
  const float scale = 1.0f / std::sqrt(float(layout.headDim));
  for (int contextLen : {1, 15, 16, 17, 70, 96}) {
    std::vector<float> q = randomVector(size_t(numHeads * layout.headDim), uint32_t(contextLen));
    std::vector<float> cpu(q.size()), device(q.size(), 0.0f);
    std::vector<float> scratch(static_cast<size_t>(contextLen));
    kernels::pagedAttention(cpu.data(), q.data(), k.data(), v.data(), layout, table.data(),
                            contextLen, numHeads, scale, scratch.data());
    const int warps = 4, d = layout.headDim;
    for (int h = 0; h < numHeads; ++h) {
      const int kvh = h / group;
      SoftmaxState state[warps];
      std::vector<float> acc(size_t(warps * d), 0.0f);
      for (int w = 0; w < warps; ++w) {
        state[w] = softmaxStart();
        for (int p = w; p < contextLen; p += warps) {
          size_t at = (size_t(table[size_t(p / layout.blockSize)]) * layout.blockSize +
                       size_t(p % layout.blockSize)) * row + size_t(kvh * d);
          float dot = 0;
          for (int i = 0; i < d; ++i) dot += q[size_t(h * d + i)] * k[at + size_t(i)];
          SoftmaxStep s = softmaxPush(state[w], dot * scale);
          for (int i = 0; i < d; ++i) {
            float& a = acc[size_t(w * d + i)];
            a = a * s.rescale + s.weight * v[at + size_t(i)];
          }
        }
      }
      for (int w = 1; w < warps; ++w) {
        SoftmaxMerge m = softmaxMerge(state[0], state[w]);
        for (int i = 0; i < d; ++i) {
          acc[size_t(i)] = acc[size_t(i)] * m.scaleA + acc[size_t(w * d + i)] * m.scaleB;
        }
      }
      for (int i = 0; i < d; ++i) device[size_t(h * d + i)] = acc[size_t(i)] / state[0].l;
    }
    // The two sum in different orders (the CPU kernel in chunks of 64 positions): equal to
    // within 1e-6 of outputs that are averages of values in [-1, 1].
    CHECK(maxRelativeError(device, cpu, 0.05f) < 2e-5f);
  }
}

}  // namespace vsup::kernels::cuda
