// OpenBLAS, loaded at run time, only by the processes that compute (the ranks, the tools and
// benchmarks). The vsup executable is one binary for every process of the tree; linked
// normally, OpenBLAS's constructor would start its thread pool in the root, the API servers and
// every guard too. Loading it on first use keeps those processes single-purpose and small.
#pragma once

#include <cblas.h>

namespace vsup::engine::blas {

// Throws std::runtime_error naming the library when it cannot be loaded. Thread-safe.
void sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
           blasint k, float alpha, const float* a, blasint lda, const float* b, blasint ldb,
           float beta, float* c, blasint ldc);
void sgemv(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, blasint m, blasint n, float alpha,
           const float* a, blasint lda, const float* x, blasint incx, float beta, float* y,
           blasint incy);
void setThreads(int threads);

}  // namespace vsup::engine::blas
