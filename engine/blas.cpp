#include "engine/blas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>

namespace vsup::engine::blas {
namespace {

using SgemmFn = decltype(&cblas_sgemm);
using SgemvFn = decltype(&cblas_sgemv);
using ThreadsFn = decltype(&openblas_set_num_threads);
using NameFn = char* (*)();

struct Library {
  SgemmFn sgemm = nullptr;
  SgemvFn sgemv = nullptr;
  ThreadsFn setThreads = nullptr;
  NameFn coreName = nullptr;  // optional: not every OpenBLAS build exports it
};

// Loaded once and never unloaded (its threads may still run at exit).
const Library& library() {
  static Library lib;
  static std::once_flag once;
  static std::string error;
  std::call_once(once, []() {
    void* handle = nullptr;
    for (const char* name : {"libopenblas.so.0", "libopenblas.so"}) {
      handle = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (handle != nullptr) break;
    }
    if (handle == nullptr) {
      error = std::string("cannot load OpenBLAS (libopenblas.so.0): ") + ::dlerror() +
              " (apt-get install libopenblas0)";
      return;
    }
    lib.sgemm = reinterpret_cast<SgemmFn>(::dlsym(handle, "cblas_sgemm"));
    lib.sgemv = reinterpret_cast<SgemvFn>(::dlsym(handle, "cblas_sgemv"));
    lib.setThreads = reinterpret_cast<ThreadsFn>(::dlsym(handle, "openblas_set_num_threads"));
    lib.coreName = reinterpret_cast<NameFn>(::dlsym(handle, "openblas_get_corename"));
    if (lib.sgemm == nullptr || lib.sgemv == nullptr || lib.setThreads == nullptr) {
      error = "libopenblas.so.0 lacks cblas_sgemm, cblas_sgemv or openblas_set_num_threads";
      lib = Library{};
    }
  });
  if (lib.sgemm == nullptr) throw std::runtime_error(error);
  return lib;
}

}  // namespace

void sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint m, blasint n,
           blasint k, float alpha, const float* a, blasint lda, const float* b, blasint ldb,
           float beta, float* c, blasint ldc) {
  library().sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void sgemv(CBLAS_ORDER order, CBLAS_TRANSPOSE ta, blasint m, blasint n, float alpha,
           const float* a, blasint lda, const float* x, blasint incx, float beta, float* y,
           blasint incy) {
  library().sgemv(order, ta, m, n, alpha, a, lda, x, incx, beta, y, incy);
}

void setThreads(int threads) { library().setThreads(threads); }

std::string coreName() {
  const Library& lib = library();
  const char* name = lib.coreName != nullptr ? lib.coreName() : nullptr;
  return name != nullptr ? std::string(name) : std::string();
}

std::string betterCoreType(const std::string& core, kernels::GemvIsa best) {
  // OpenBLAS's x86-64 cores whose sgemm kernels use neither AVX2 nor FMA (its generic fallback,
  // Prescott, included).
  static const std::set<std::string> kOld = {
      "Prescott", "Core2",   "Penryn",    "Dunnington", "Nehalem",   "Atom",
      "Sandybridge", "Opteron", "Opteron_SSE3", "Barcelona", "Bobcat", "Bulldozer",
      "Piledriver", "Steamroller", "Excavator", "Katmai", "Coppermine", "Northwood"};
  if (kOld.count(core) == 0) return "";
  switch (best) {
    case kernels::GemvIsa::kAvx512: return "SkylakeX";
    case kernels::GemvIsa::kAvx2: return "Haswell";
    default: return "";
  }
}

std::string coreTypeAdvice() {
  if (::getenv("OPENBLAS_CORETYPE") != nullptr) return "";
  const std::string core = coreName();
  const std::string better = betterCoreType(core, kernels::gemvIsas().back());
  if (better.empty()) return "";
  return "OpenBLAS runs its " + core + " kernels on this CPU, which has " +
         (better == "SkylakeX" ? "AVX-512" : "AVX2 and FMA") +
         ": its matrix products (prompts) run at about half the speed they could; start vsup "
         "with OPENBLAS_CORETYPE=" + better + " in its environment (every rank inherits it)";
}

}  // namespace vsup::engine::blas
