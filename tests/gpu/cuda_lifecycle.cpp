// Five vsup::LLM lifetimes with --engine cuda in one host process: create, generate, destroy.
// After each, the GPU's free memory must be back within 64 MiB of what it was before the first
// (cudaMemGetInfo, which this program's own CUDA context reads: the engine's memory is in its
// rank processes, so this is the machine's view). Prints one line; exit 0 / 1, 77 without a GPU.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

#include "workers/public/llm.h"

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "SKIPPED: cuda_lifecycle needs an NVIDIA GPU, and there is none here\n");
    return 77;
  }
  size_t baseline = 0, total = 0, free = 0;
  cudaMemGetInfo(&baseline, &total);
  double worstMiB = 0;
  try {
    for (int i = 0; i < 5; ++i) {
      vsup::LLMConfig config;
      config.engine = "cuda";
      config.kvCacheMemory = "256MiB";
      vsup::LLM llm(config);
      vsup::Sampling params;
      params.maxTokens = 16;
      params.temperature = 0;
      auto out = llm.generate({"hello from the GPU"}, params);
      if (out.empty() || out[0].completionTokens == 0) {
        throw std::runtime_error("no tokens generated");
      }
      // The destructor drains, stops the tree and reaps it.
    }
  } catch (const std::exception& e) {
    std::printf("lifecycle    | FAIL: %s\n", e.what());
    return 1;
  }
  cudaMemGetInfo(&free, &total);
  worstMiB = (double(baseline) - double(free)) / double(1 << 20);
  bool pass = worstMiB <= 64;
  std::printf("lifecycle    | 5 vsup::LLM cycles | free GPU memory %.1f MiB below baseline "
              "(limit 64) | %s\n", worstMiB, pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
