// The heavy half of the registry: the backends themselves (the CPU one brings OpenBLAS), and
// the checks made before anything starts (preflight()).
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <variant>

#include "engine/cpu_engine.h"
#include "engine/cuda_backend.h"
#include "engine/llama_config.h"
#include "engine/registry.h"
#include "engine/sim_engine.h"
#include "engine/weights.h"

namespace vsup::engine {
namespace {

// This machine's memory (RAM, not swap): what a CPU engine's ranks can hold between them.
int64_t physicalMemoryBytes() {
  long pages = ::sysconf(_SC_PHYS_PAGES);
  long pageSize = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && pageSize > 0 ? int64_t(pages) * int64_t(pageSize) : 0;
}

std::string gib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GiB", double(bytes) / double(int64_t(1) << 30));
  return text;
}

// The checkpoint's headers against config.json: opening parses (and checks) every safetensors
// header; an empty slice of each tensor checks its presence, shape and dtype without touching
// its data.
void checkCheckpoint(const ModelSource& model) {
  if (model.dummyWeights) return;
  std::unique_ptr<WeightSource> checkpoint = openSafetensors(model.directory);
  for (const TensorShape& t : model.config.checkpointTensors()) {
    checkpoint->read(t.name, t.shape, TensorSlice{}, nullptr);
  }
}

// The CPU engine's part of preflight(): the memory every rank will allocate against the
// machine's, then the checkpoint's headers against config.json.
void preflightCpu(const EngineConfig& config, const CpuConfig& cpu) {
  const CommonConfig& c = config.common;
  ModelSource model = resolveModel(c.model, cpu.loadFormat);
  const int64_t memory = physicalMemoryBytes();
  const int64_t tp = c.tensorParallelSize;
  const int64_t kv = c.kvCacheBytes * tp;
  if (memory > 0 && kv > memory) {
    throw std::invalid_argument(
        "--kv-cache-memory " + std::to_string(c.kvCacheBytes) + " bytes per rank (" + gib(kv) +
        " for " + std::to_string(tp) + " rank(s)) is more than this machine's memory (" +
        gib(memory) + "): lower --kv-cache-memory");
  }
  const LlamaConfig& m = model.config;
  const int64_t weights = m.rankWeightBytes(uint32_t(tp)) * tp;
  if (memory > 0 && weights + kv > memory) {  // memory unknown (0): the ranks find out
    std::string source = model.directory.empty() ? "the preset " + model.name
                                                 : model.directory + "/config.json";
    throw std::invalid_argument(
        "--model " + model.name + ": " + source + " (hidden_size " +
        std::to_string(m.hiddenSize) + ", intermediate_size " +
        std::to_string(m.intermediateSize) + ", num_hidden_layers " +
        std::to_string(m.numLayers) + ", vocab_size " + std::to_string(m.vocabSize) +
        ", max_position_embeddings " + std::to_string(m.maxPositions) + ") needs about " +
        gib(weights) + " for its fp32 weights over " + std::to_string(tp) +
        " rank(s), plus " + gib(kv) + " of KV cache: more than this machine's memory (" +
        gib(memory) + ")");
  }
  checkCheckpoint(model);
}

}  // namespace

const Backend& backendFor(const EngineConfig& config) {
  requireEngineBuilt(engineName(config));
  return std::visit(
      [](const auto& b) -> const Backend& {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, CpuConfig>) {
          return cpuBackend();
        } else if constexpr (std::is_same_v<T, SimConfig>) {
          return simBackend();
        } else {
          return cudaBackend();  // requireEngineBuilt() let it through: this build has it
        }
      },
      config.backend);
}

EnginePlan preflight(const EngineConfig& config) {
  EnginePlan plan = backendFor(config).plan(config);
  const CommonConfig& c = config.common;
  if (c.maxModelLen > 0 && !plan.scheduler.unboundedContext &&
      plan.scheduler.maxModelLen < c.maxModelLen) {
    throw std::invalid_argument("--max-model-len " + std::to_string(c.maxModelLen) +
                                " is more than the model's context length (" +
                                std::to_string(plan.scheduler.maxModelLen) +
                                " tokens, its max_position_embeddings): give at most that, or "
                                "0 for the model's own");
  }
  if (c.kv.connector == "vsup" && !plan.kvLayout) {
    throw std::invalid_argument(std::string("--kv-connector vsup needs an engine whose KV cache "
                                            "can be transferred (--engine cpu), not --engine ") +
                                engineName(config));
  }
  if (const auto* cpu = std::get_if<CpuConfig>(&config.backend)) preflightCpu(config, *cpu);
  // The GPU's memory is the ranks' to check (the root loads no CUDA library).
  if (const auto* cuda = std::get_if<CudaConfig>(&config.backend)) {
    checkCheckpoint(resolveModel(c.model, cuda->loadFormat));
  }
  return plan;
}

}  // namespace vsup::engine
