#include "workers/engine_flags.h"

#include <cmath>
#include <stdexcept>

namespace vsup::workers {

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

std::vector<CLI::Option*> addEngineFlags(CLI::App& app, EngineFlags& f, bool forUsers) {
  std::vector<CLI::Option*> added;
  auto opt = [&](CLI::Option* o) {
    if (forUsers) o->capture_default_str();
    added.push_back(o);
    return o;
  };
  opt(app.add_option("--engine", f.engine,
                     "cpu (a real Llama-architecture model on OpenBLAS) or sim (simulated tokens)"))
      ->check(CLI::IsMember({"cpu", "sim"}));
  opt(app.add_option("--model", f.cpu.model,
                     "a built-in preset (vsup-tiny-25m, vsup-tiny-4m) or a Hugging Face model "
                     "directory (config.json, tokenizer.json, *.safetensors); also the served "
                     "model name"));
  opt(app.add_option("--load-format", f.cpu.loadFormat,
                     "auto (safetensors for a directory, dummy for a preset), dummy (seeded "
                     "weights) or safetensors"))
      ->check(CLI::IsMember({"auto", "dummy", "safetensors"}));
  opt(app.add_option("--seed", f.cpu.weightSeed, "seed of the dummy weights"));
  opt(app.add_option("--max-num-batched-tokens", f.cpu.maxNumBatchedTokens,
                     "tokens computed per step at most (longer prompts are prefilled in chunks)"))
      ->check(CLI::Range(1u, 1u << 20));
  opt(app.add_option("--max-model-len", f.cpu.maxModelLen,
                     "context length (prompt + completion); 0: the model's own"))
      ->check(CLI::Range(int64_t(0), int64_t(1) << 24));
  opt(app.add_option("--kv-cache-memory", f.kvCacheMemory,
                     "KV cache per worker, e.g. 256MiB, 2GiB"));
  opt(app.add_option("--block-size", f.cpu.blockSize, "tokens per KV cache block"))
      ->check(CLI::Range(1, 1024));
  opt(app.add_option("--collective-timeout-ms", f.cpu.collectiveTimeoutMs,
                     "a rank gives up waiting for its peers in an all-reduce after this long"))
      ->check(CLI::Range(int64_t(100), int64_t(3600000)));
  opt(app.add_option("--sim-token-ms", f.simTokenMs, "sim engine: milliseconds per step"))
      ->check(CLI::Range(uint64_t(0), uint64_t(600000)));
  return added;
}

std::vector<std::string> engineFlagsArgv(const EngineFlags& f) {
  return {"--engine", f.engine,
          "--model", f.cpu.model,
          "--load-format", f.cpu.loadFormat,
          "--seed", std::to_string(f.cpu.weightSeed),
          "--max-num-batched-tokens", std::to_string(f.cpu.maxNumBatchedTokens),
          "--max-model-len", std::to_string(f.cpu.maxModelLen),
          "--kv-cache-memory", f.kvCacheMemory,
          "--block-size", std::to_string(f.cpu.blockSize),
          "--collective-timeout-ms", std::to_string(f.cpu.collectiveTimeoutMs),
          "--sim-token-ms", std::to_string(f.simTokenMs)};
}

void resolveEngineFlags(EngineFlags& f) {
  auto bytes = parseByteSize(f.kvCacheMemory);
  if (!bytes) {
    throw std::invalid_argument("--kv-cache-memory \"" + f.kvCacheMemory +
                                "\" is not a size (e.g. 268435456, 256MiB, 2GiB, 500MB)");
  }
  f.cpu.kvCacheBytes = *bytes;
}

}  // namespace vsup::workers
