// The light half of the registry (in libvsup): which engines exist and which this build has.
// backendFor() lives in backends.cpp, with the heavy backends it returns.
#include <optional>
#include <stdexcept>
#include <string>

#include "engine/registry.h"

namespace vsup::engine {

const std::vector<EngineInfo>& knownEngines() {
  static const std::vector<EngineInfo> engines = {
      {"cpu", true, "a real Llama-architecture model on OpenBLAS"},
      {"sim", true, "simulated tokens from a real step loop (no model)"},
#ifdef VSUP_HAVE_CUDA
      {"cuda", true, "a Llama-architecture model on an NVIDIA GPU (cuBLAS, NCCL)"},
#else
      {"cuda", false, "a Llama-architecture model on an NVIDIA GPU (cuBLAS, NCCL)"},
#endif
  };
  return engines;
}

void requireEngineBuilt(const std::string& name) {
  std::string accepted;
  for (const EngineInfo& e : knownEngines()) {
    if (!e.built) continue;
    accepted += (accepted.empty() ? "" : ", ") + std::string(e.name);
  }
  for (const EngineInfo& e : knownEngines()) {
    if (name != e.name) continue;
    if (e.built) return;
    if (name == "cuda") {
      throw std::invalid_argument(
          "--engine 'cuda': this vsup was built without it, because nvcc was not found (or "
          "-Dcuda=disabled was given) when vsup was configured; install the CUDA toolkit at "
          "/usr/local/cuda and run `meson setup` again (accepted now: " + accepted + ")");
    }
    throw std::invalid_argument("--engine '" + name + "': not built into this vsup (accepted: " +
                                accepted + ")");
  }
  throw std::invalid_argument("--engine '" + name + "': no such engine (accepted: " + accepted +
                              ")");
}

std::variant<CpuConfig, SimConfig, CudaConfig> backendConfigFor(const std::string& name,
                                                               const CpuConfig& cpu,
                                                               const SimConfig& sim,
                                                               const std::string& dtype) {
  requireEngineBuilt(name);
  if (name == "cuda") {
    if (dtype != "auto" && dtype != "bfloat16" && dtype != "float32") {
      throw std::invalid_argument("--dtype '" + dtype + "': accepted with --engine cuda: auto " +
                                  "(bfloat16), bfloat16, float32");
    }
    CudaConfig cuda;
    cuda.loadFormat = cpu.loadFormat;
    cuda.weightSeed = cpu.weightSeed;
    cuda.dtype = dtype == "auto" ? "bfloat16" : dtype;
    return cuda;
  }
  if (dtype != "auto" && dtype != "float32") {
    throw std::invalid_argument("--dtype '" + dtype + "': the " + name + " engine computes in " +
                                "float32 (accepted with --engine " + name + ": auto, float32)");
  }
  if (name == "sim") return sim;
  return cpu;
}

EngineConfig makeEngineConfig(const std::string& engine, CommonConfig common,
                              const std::string& kvCacheMemory, const char* sizeField,
                              const CpuConfig& cpu, const SimConfig& sim,
                              const std::string& dtype) {
  requireEngineBuilt(engine);
  if (!kvCacheMemory.empty()) common.kvCacheBytes = parseByteSize(kvCacheMemory, sizeField);
  EngineConfig config;
  config.common = std::move(common);
  config.backend = backendConfigFor(engine, cpu, sim, dtype);
  validate(config);
  return config;
}

}  // namespace vsup::engine
