// exp(x) in float without libm and without a branch, so that it vectorizes: Cephes' expf range
// reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n assembled in the
// exponent bits. Relative error under 2.5e-7 for x in [-87, 88.37] (kernels/cpu_kernels_test.cpp
// checks it against double exp over that whole range).
//
// One body for a scalar and for GCC vector types: the kernels call it on float lane by lane in
// loops the compiler vectorizes, prefill attention on 16-float vectors. The caller clamps x to
// [kExpLo, kExpHi] first and handles the low edge itself (below kExpLo the true value is under
// 1.7e-38: the callers return 0 there, so no denormal is ever produced); kExpHi rounds to n = 128,
// whose exponent bits are those of +inf, so the high edge needs nothing; a NaN passes through.
#pragma once

#include <bit>
#include <cstdint>

namespace vsup::kernels {

inline constexpr float kExpLo = -87.0f;
inline constexpr float kExpHi = 88.5f;

// Always inlined into its caller, so the warning that a vector signature's ABI depends on AVX-512
// does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// F is float or a GCC vector of floats, I the integer type of the same shape (int32_t, or a
// vector of int32_t); xc is already clamped to [kExpLo, kExpHi].
template <typename F, typename I>
[[gnu::always_inline]] inline F expClamped(F xc) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split in two so n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const F t = xc * kLog2e + kRound;
  const F n = t - kRound;
  F r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * (r * r) + r + 1.0f;
  // n is in [-126, 128]: 2^n is a normal float, or +inf for 128.
  const I e = std::bit_cast<I>(t) - std::bit_cast<int32_t>(kRound);
  return y * std::bit_cast<F>((e + 127) << 23);
}

#pragma GCC diagnostic pop

}  // namespace vsup::kernels
