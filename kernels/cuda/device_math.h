// The per-element math of the CUDA engine's kernels, as __host__ __device__ functions: the
// kernels in cuda_kernels.cu call them on the GPU, and device_math_test.cpp calls the very same
// functions on the CPU against kernels/cpu_kernels.cpp, so that the two engines agree by
// construction (the same exp approximation in SiLU, the norm's mean square in double, the same
// rotary tables, the same argmax order) and a host compiler checks it without a GPU.
//
// Plain C++ outside nvcc: VSUP_HD is empty and bf16 values are their raw 16 bits.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VSUP_HD __host__ __device__ __forceinline__
#else
#define VSUP_HD inline
#endif

namespace vsup::kernels::cuda {

VSUP_HD uint32_t floatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

VSUP_HD float bitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

VSUP_HD float infinity() { return bitsFloat(0x7f800000u); }

// bfloat16 as its raw bits: the top half of a float. Round to nearest, ties to even; a NaN stays
// a (quiet) NaN with its sign; infinities and zeros keep theirs.
VSUP_HD uint16_t floatToBf16(float f) {
  const uint32_t u = floatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN
  const uint32_t lsb = (u >> 16) & 1u;
  return uint16_t((u + 0x7fffu + lsb) >> 16);
}

VSUP_HD float bf16ToFloat(uint16_t b) { return bitsFloat(uint32_t(b) << 16); }

// exp(x) as the CPU kernels compute it (kernels/exp_approx.h: Cephes' range reduction and
// degree-6 polynomial, 2^n in the exponent bits), including the edges: below -87 it is 0, from
// 88.38 +inf, NaN stays NaN.
VSUP_HD float expApprox(float x) {
  constexpr float kLo = -87.0f, kHi = 88.5f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float keep = x >= kLo ? 1.0f : 0.0f;  // NaN compares false: NaN * 0 is NaN anyway
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t e = int32_t(floatBits(t)) - int32_t(floatBits(kRound));
  const float scaled = y * bitsFloat(uint32_t((e + 127) << 23));
  return x != x ? x : scaled * keep;
}

// SwiGLU's activation: silu(gate) * up, silu(g) = g / (1 + exp(-g)).
VSUP_HD float siluMul(float gate, float up) { return gate / (1.0f + expApprox(-gate)) * up; }

// RMSNorm's scale from the row's sum of squares (accumulated in double, as on the CPU).
VSUP_HD float rmsInverse(double sumSquares, int n, float eps) {
  return float(1.0 / sqrt(sumSquares / n + double(eps)));
}

// The rotary angle of position `pos` and pair `j` of a head of `headDim` (the Hugging Face
// "rotate half" convention, theta^(-2j/headDim)), in double: the CPU RopeTable's formula, which
// the CUDA engine's table is filled with too.
VSUP_HD double ropeAngle(int pos, int j, int headDim, double theta) {
  return double(pos) * pow(theta, -2.0 * j / headDim);
}

// One rotary pair: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
VSUP_HD void ropeRotate(float& x0, float& x1, float c, float s) {
  const float a = x0, b = x1;
  x0 = a * c - b * s;
  x1 = b * c + a * s;
}

// The argmax order of greedy sampling (kernels::sampleToken at temperature 0): the largest
// logit, NaN counting as -inf, the lowest index winning a tie.
VSUP_HD float argmaxKey(float logit) { return logit == logit ? logit : -infinity(); }
VSUP_HD bool argmaxBetter(float key, int index, float bestKey, int bestIndex) {
  return key > bestKey || (key == bestKey && index < bestIndex);
}

// Online softmax over a stream of scores (FlashAttention's recurrence), the running state of
// one query head: m the largest score so far, l the sum of exp(score - m). Each new score
// rescales the accumulated output by `rescale` and adds the value row with `weight`.
struct SoftmaxState {
  float m;  // start at -infinity()
  float l;  // start at 0
};
VSUP_HD SoftmaxState softmaxStart() { return {-infinity(), 0.0f}; }
struct SoftmaxStep {
  float rescale;  // multiply the output accumulated so far by this
  float weight;   // add this times the new value row
};
VSUP_HD SoftmaxStep softmaxPush(SoftmaxState& s, float score) {
  const float m = score > s.m ? score : s.m;
  if (m == -infinity()) return {1.0f, 0.0f};  // nothing but -inf yet: no weight
  const float rescale = expApprox(s.m - m);
  const float weight = expApprox(score - m);
  s.l = s.l * rescale + weight;
  s.m = m;
  return {rescale, weight};
}
// Merges state `b` into `a` (two parts of one context): returns the factors for a's output and
// b's output, whose weighted sum is the merged (unnormalized) output.
struct SoftmaxMerge {
  float scaleA, scaleB;
};
VSUP_HD SoftmaxMerge softmaxMerge(SoftmaxState& a, const SoftmaxState& b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -infinity()) return {0.0f, 0.0f};  // both empty
  const float sa = expApprox(a.m - m), sb = expApprox(b.m - m);
  a.l = a.l * sa + b.l * sb;
  a.m = m;
  return {sa, sb};
}

}  // namespace vsup::kernels::cuda
