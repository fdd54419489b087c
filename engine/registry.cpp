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
      {"cuda", false, "a Llama-architecture model on an NVIDIA GPU"},
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
#ifdef VSUP_HAVE_NVCC
      throw std::invalid_argument("--engine 'cuda': the CUDA engine is not available in this "
                                  "build of vsup yet (accepted: " + accepted + ")");
#else
      throw std::invalid_argument(
          "--engine 'cuda': this vsup was built without it, because nvcc was not found when "
          "vsup was configured; install the CUDA toolkit at /usr/local/cuda and run `meson "
          "setup` again (accepted now: " + accepted + ")");
#endif
    }
    throw std::invalid_argument("--engine '" + name + "': not built into this vsup (accepted: " +
                                accepted + ")");
  }
  throw std::invalid_argument("--engine '" + name + "': no such engine (accepted: " + accepted +
                              ")");
}

std::variant<CpuConfig, SimConfig, CudaConfig> backendConfigFor(const std::string& name,
                                                               const CpuConfig& cpu,
                                                               const SimConfig& sim) {
  requireEngineBuilt(name);
  if (name == "sim") return sim;
  if (name == "cuda") return CudaConfig{};
  return cpu;
}

EngineConfig makeEngineConfig(const std::string& engine, CommonConfig common,
                              const std::string& kvCacheMemory, const char* sizeField,
                              const CpuConfig& cpu, const SimConfig& sim) {
  requireEngineBuilt(engine);
  if (!kvCacheMemory.empty()) common.kvCacheBytes = parseByteSize(kvCacheMemory, sizeField);
  EngineConfig config;
  config.common = std::move(common);
  config.backend = backendConfigFor(engine, cpu, sim);
  validate(config);
  return config;
}

}  // namespace vsup::engine
