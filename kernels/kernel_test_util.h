// What the kernel tests share (CPU kernels, the CUDA kernels' host math, the CUDA kernels on a
// GPU): seeded inputs and one error measure. Tests only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace vsup::kernels::testing {

// n floats uniform in [lo, hi), the same for the same seed.
inline std::vector<float> randomVector(size_t n, uint32_t seed, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// max_i |a_i - b_i| / max(|b_i|, floor): elementwise relative error against b, with `floor` the
// scale below which an absolute error is what counts.
inline float maxRelativeError(const std::vector<float>& a, const std::vector<float>& b,
                              float floor) {
  float worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::max(std::fabs(b[i]), floor));
  }
  return a.size() == b.size() ? worst : INFINITY;
}

}  // namespace vsup::kernels::testing
