// The engine's flags of `vsup run` (named like `vllm serve`'s), and their one conversion into a
// validated engine::EngineConfig. engine-core and the ranks never parse these: they get the
// EngineConfig in Node.start.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/config.h"

namespace vsup::workers {

// What the user typed, before it becomes an EngineConfig.
struct EngineFlags {
  std::string engine = "cpu";  // --engine
  // The model: --model NAME, or the positional MODEL (as `vllm serve MODEL`); both may be given
  // only if they agree. Neither: common.model's default (engine::kDefaultModelName).
  std::optional<std::string> model;
  std::optional<std::string> modelArg;
  std::string kvCacheMemory = "256MiB";
  engine::CommonConfig common;
  engine::CpuConfig cpu;
  engine::SimConfig sim;
  std::string dtype = "auto";  // --dtype
};

// Adds the positional MODEL and --engine, --model, --tensor-parallel-size, --max-num-seqs, --load-format, --seed,
// --max-num-batched-tokens, --max-model-len, --kv-cache-memory, --block-size, --dtype,
// --collective-timeout-ms, --sim-token-ms, --kv-connector, --kv-role, --kv-host, --kv-port,
// --kv-transport, --kv-lease-s, --kv-transfer-timeout, --kv-load-failure, --sim-kv-transfer-ms and
// --kv-shutdown-timeout, each with its help text and default. Returns them.
std::vector<CLI::Option*> addEngineFlags(CLI::App& app, EngineFlags& flags);

// A CLI11 check for a number in [lo, hi] that is finite (CLI::Range lets "nan" through: it
// compares false with everything), e.g. a number of seconds. `unit` ("seconds") ends the
// message: "must be 0..86400 seconds, got nan".
CLI::Validator finiteRange(double lo, double hi, const std::string& unit);

// The flags as one EngineConfig: the chosen backend's part only, sizes parsed, ranges and
// relations checked (engine::validate) and the engine known and built. Throws
// std::invalid_argument with a message naming the flag (MODEL and --model naming two different
// models: both).
engine::EngineConfig toEngineConfig(const EngineFlags& flags);

}  // namespace vsup::workers
