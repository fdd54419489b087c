// The heavy half of the registry: the backends themselves (the CPU one brings OpenBLAS).
#include <stdexcept>
#include <type_traits>
#include <variant>

#include "engine/cpu_engine.h"
#include "engine/registry.h"
#include "engine/sim_engine.h"

namespace vsup::engine {

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
          // requireEngineBuilt() refused it: an engine that is not built has no backend.
          throw std::logic_error("no backend for an engine that is not built");
        }
      },
      config.backend);
}

}  // namespace vsup::engine
