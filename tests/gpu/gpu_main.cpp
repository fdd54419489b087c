// The entry point of the GPU suite's doctest programs: without a usable GPU they skip, loudly,
// with meson's skip status (77) and the reason, so that a machine without one (CI) reports
// SKIP, not a pass.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char** argv) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    std::fprintf(stderr,
                 "SKIPPED: this GPU test needs an NVIDIA GPU, and there is none here (%s). "
                 "Run tests/gpu/run.sh on a machine with one.\n",
                 e != cudaSuccess ? cudaGetErrorString(e) : "no device");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
