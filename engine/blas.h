// OpenBLAS, loaded at run time, only by the processes that compute (the ranks, the tools and
// benchmarks). The vsup executable is one binary for every process of the tree; linked
// normally, OpenBLAS's constructor would start its thread pool in the root, the API servers and
// every guard too. Loading it on first use keeps those processes single-purpose and small.
#pragma once

#include <cblas.h>

#include <string>

#include "kernels/batched_gemv.h"

namespace vsup::engine::blas {

// Throws std::runtime_error naming the library when it cannot be loaded. Thread-safe.
void sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
           blasint k, float alpha, const float* a, blasint lda, const float* b, blasint ldb,
           float beta, float* c, blasint ldc);
void sgemv(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, blasint m, blasint n, float alpha,
           const float* a, blasint lda, const float* x, blasint incx, float beta, float* y,
           blasint incy);
void setThreads(int threads);

// The kernels OpenBLAS picked for this CPU (openblas_get_corename: "Haswell", "SkylakeX",
// "Prescott", ...), or "" when the library does not say. Loads the library.
std::string coreName();

// A DYNAMIC_ARCH OpenBLAS picks its kernels from a table of the CPUs it knows and falls back to
// an older core on one it does not (0.3.21 runs its Prescott SSE3 kernels on some AVX-512 Xeons,
// where its sgemm is then about half as fast). When `core` is such a core without AVX2 and FMA
// while the CPU's best instruction set (`best`, the last of kernels::gemvIsas(): x86-64-v3 has
// AVX2 and FMA, v4 adds AVX-512 F, BW, CD, DQ and VL) has them: the OPENBLAS_CORETYPE that uses
// them ("SkylakeX" for v4, "Haswell" for v3). Otherwise "" (the pick is fine, or nothing is
// better).
std::string betterCoreType(const std::string& core, kernels::GemvIsa best);

// betterCoreType for this process's OpenBLAS on this machine, as one sentence to log; "" when
// there is nothing to say, or OPENBLAS_CORETYPE is already set.
std::string coreTypeAdvice();

}  // namespace vsup::engine::blas
