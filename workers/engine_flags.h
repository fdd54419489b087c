// The engine's flags, shared by `vsup run` (which takes them from the user), engine-core and
// every worker (which get them passed down), so the three can never disagree on what they mean.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/cpu_engine.h"

namespace vsup::workers {

struct EngineFlags {
  std::string engine = "cpu";  // cpu or sim
  uint64_t simTokenMs = 20;    // sim: the cost of one step
  engine::CpuOptions cpu;      // cpu (tensorParallelSize is set by the caller)
  std::string kvCacheMemory = "256MiB";
};

// Adds --engine, --model, --load-format, --seed, --max-num-batched-tokens, --max-model-len,
// --kv-cache-memory, --block-size, --collective-timeout-ms, --sim-token-ms. With forUsers,
// each has its help text and default shown.
std::vector<CLI::Option*> addEngineFlags(CLI::App& app, EngineFlags& flags, bool forUsers);
// The same flags as argv, to pass to engine-core and the workers.
std::vector<std::string> engineFlagsArgv(const EngineFlags& flags);
// Fills flags.cpu.kvCacheBytes from flags.kvCacheMemory. Throws std::invalid_argument.
void resolveEngineFlags(EngineFlags& flags);

// "256MiB", "1GiB", "512MB", "1.5GB", "1048576" → bytes. nullopt when malformed.
std::optional<int64_t> parseByteSize(const std::string& text);

}  // namespace vsup::workers
