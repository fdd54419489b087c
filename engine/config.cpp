#include "engine/config.h"

#include <cmath>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace vsup::engine {
namespace {

template <typename T>
void requireRange(const char* flag, T value, T lo, T hi) {
  if (value < lo || value > hi) {
    throw std::invalid_argument(std::string(flag) + " must be " + std::to_string(lo) + ".." +
                                std::to_string(hi) + ", got " + std::to_string(value));
  }
}

}  // namespace

const char* engineName(const EngineConfig& config) {
  return std::visit(
      [](const auto& b) -> const char* {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, CpuConfig>) return "cpu";
        else if constexpr (std::is_same_v<T, SimConfig>) return "sim";
        else return "cuda";
      },
      config.backend);
}

int64_t kvHoldMs(const KvConfig& kv) {
  if (kv.connector == "none") return 0;
  double ms = kv.shutdownTimeoutS * 1000 + double(kv.simTransferMs);
  return std::max<int64_t>(1000, ms > 1e12 ? int64_t(1e12) : int64_t(ms));
}

void validate(const EngineConfig& config) {
  const CommonConfig& c = config.common;
  requireRange<uint32_t>("--tensor-parallel-size", c.tensorParallelSize, 1, 64);
  requireRange<uint32_t>("--max-num-seqs", c.maxNumSeqs, 1, 65536);
  requireRange<uint32_t>("--max-num-batched-tokens", c.maxNumBatchedTokens, 1, 1u << 20);
  if (c.maxNumBatchedTokens < c.maxNumSeqs) {
    throw std::invalid_argument("--max-num-batched-tokens (" +
                                std::to_string(c.maxNumBatchedTokens) +
                                ") must be at least --max-num-seqs (" +
                                std::to_string(c.maxNumSeqs) +
                                "): every running request needs a token per step");
  }
  requireRange<int64_t>("--max-model-len", c.maxModelLen, 0, int64_t(1) << 24);
  requireRange<int32_t>("--block-size", c.blockSize, 1, 1024);
  if (c.kvCacheBytes <= 0) {
    throw std::invalid_argument("--kv-cache-memory must be more than 0 bytes, got " +
                                std::to_string(c.kvCacheBytes));
  }
  requireRange<int64_t>("--collective-timeout-ms", c.collectiveTimeoutMs, 100, 3600000);
  if (c.kv.connector != "none" && c.kv.connector != "sim") {
    throw std::invalid_argument("--kv-connector must be none or sim, got '" + c.kv.connector +
                                "'");
  }
  if (const auto* sim = std::get_if<SimConfig>(&config.backend)) {
    requireRange<uint64_t>("--sim-token-ms", sim->tokenMs, 0, 600000);
  }
}

std::optional<int64_t> parseByteSize(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (!(value > 0) || !std::isfinite(value)) return std::nullopt;
  std::string unit = text.substr(used);
  double scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KiB") scale = 1024.0;
  else if (unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "GiB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "KB") scale = 1e3;
  else if (unit == "MB") scale = 1e6;
  else if (unit == "GB") scale = 1e9;
  else return std::nullopt;
  double bytes = value * scale;
  if (bytes > 1e15) return std::nullopt;
  return int64_t(bytes);
}

}  // namespace vsup::engine
