#include "workers/engine_flags.h"

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#include "engine/registry.h"

namespace vsup::workers {

CLI::Validator finiteRange(double lo, double hi, const std::string& unit) {
  std::ostringstream range;
  range << lo << ".." << hi;
  std::string bounds = range.str();
  return CLI::Validator(
      [lo, hi, bounds, unit](std::string& text) -> std::string {
        char* end = nullptr;
        double v = std::strtod(text.c_str(), &end);
        bool number = !text.empty() && end == text.c_str() + text.size();
        if (number && std::isfinite(v) && v >= lo && v <= hi) return "";
        return "must be " + bounds + " " + unit + ", got '" + text + "'";
      },
      "NUMBER in " + bounds);
}

std::vector<CLI::Option*> addEngineFlags(CLI::App& app, EngineFlags& f) {
  std::vector<CLI::Option*> added;
  auto opt = [&](CLI::Option* o) {
    o->capture_default_str();
    added.push_back(o);
    return o;
  };
  std::vector<std::string> names;
  std::string help;
  for (const auto& e : engine::knownEngines()) {
    names.push_back(e.name);
    help += std::string(help.empty() ? "" : "; ") + e.name + ": " + e.summary +
            (e.built ? "" : " (not in this build)");
  }
  // Any known name parses; one this build lacks is refused by toEngineConfig, saying how to
  // get it.
  opt(app.add_option("--engine", f.engine, help))->check(CLI::IsMember(names));
  const char* modelHelp =
      "a built-in preset (vsup-tiny-25m, vsup-tiny-4m) or a Hugging Face model directory "
      "(config.json, tokenizer.json, *.safetensors); any name with --engine sim. Also the served "
      "model name unless --served-model-name is given";
  added.push_back(app.add_option("MODEL", f.modelArg,
                                 std::string("the model, as `vllm serve MODEL`: the same as "
                                             "--model (give one, or both alike)")));
  added.push_back(app.add_option("--model", f.model, modelHelp)->default_str(f.common.model));
  opt(app.add_option("--tensor-parallel-size", f.common.tensorParallelSize,
                     "worker processes (ranks) per engine"))
      ->check(CLI::Range(1u, 64u));
  opt(app.add_option("--nnodes", f.common.nnodes,
                     "nodes (machines) the tensor-parallel ranks span; each runs "
                     "--tensor-parallel-size / --nnodes of them ($LWS_GROUP_SIZE when absent)"))
      ->check(CLI::Range(1u, 64u));
  opt(app.add_option("--master-addr", f.common.masterAddr,
                     "with --nnodes > 1: the leader's address, where its engine listens for the "
                     "other nodes ($LWS_LEADER_ADDRESS when absent)"));
  opt(app.add_option("--master-port", f.common.masterPort,
                     "with --nnodes > 1: the leader's port for the other nodes"))
      ->check(CLI::Range(1, 65535));
  opt(app.add_option("--max-num-seqs", f.common.maxNumSeqs, "requests batched per step"))
      ->check(CLI::Range(1u, 65536u));
  opt(app.add_option("--load-format", f.cpu.loadFormat,
                     "auto (safetensors for a directory, dummy for a preset), dummy (seeded "
                     "weights) or safetensors"))
      ->check(CLI::IsMember({"auto", "dummy", "safetensors"}));
  opt(app.add_option("--dtype", f.dtype,
                     "what the engine computes in: auto (bfloat16 with --engine cuda, float32 "
                     "otherwise), bfloat16 (cuda only) or float32"))
      ->check(CLI::IsMember({"auto", "bfloat16", "float32"}));
  // CLI11 would wrap "-1" around to 2^64 - 1 for an unsigned option.
  opt(app.add_option("--seed", f.cpu.weightSeed, "seed of the dummy weights"))
      ->check(CLI::Validator(
          [](std::string& v) {
            bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
            return digits ? std::string() : "must be a whole number 0 or more, got '" + v + "'";
          },
          "UINT"));
  opt(app.add_option("--max-num-batched-tokens", f.common.maxNumBatchedTokens,
                     "tokens computed per step at most (longer prompts are prefilled in chunks)"))
      ->check(CLI::Range(1u, 1u << 20));
  opt(app.add_option("--max-model-len", f.common.maxModelLen,
                     "context length (prompt + completion); 0: the model's own"))
      ->check(CLI::Range(int64_t(0), int64_t(1) << 24));
  opt(app.add_option("--kv-cache-memory", f.kvCacheMemory,
                     "KV cache per worker, e.g. 256MiB, 2GiB"));
  opt(app.add_option("--block-size", f.common.blockSize, "tokens per KV cache block"))
      ->check(CLI::Range(1, 1024));
  opt(app.add_option("--collective-timeout-ms", f.common.collectiveTimeoutMs,
                     "a rank gives up waiting for its peers in an all-reduce after this long"))
      ->check(CLI::Range(int64_t(100), int64_t(3600000)));
  opt(app.add_option("--sim-token-ms", f.sim.tokenMs, "sim engine: milliseconds per step"))
      ->check(CLI::Range(uint64_t(0), uint64_t(600000)));
  opt(app.add_option("--kv-connector", f.common.kv.connector,
                     "none; vsup (KV transfer between prefill and decode instances); sim (tests)"))
      ->check(CLI::IsMember({"none", "sim", "vsup"}));
  opt(app.add_option("--kv-role", f.common.kv.role,
                     "vsup connector: prefill (answers kv_transfer_params), decode (pulls), both"))
      ->check(CLI::IsMember({"prefill", "decode", "both"}));
  opt(app.add_option("--kv-host", f.common.kv.host,
                     "vsup connector: the address the KV agents listen on and advertise"));
  opt(app.add_option("--kv-port", f.common.kv.port,
                     "vsup connector: rank R's KV agent listens on this port + R"))
      ->check(CLI::Range(1, 65535));
  opt(app.add_option("--kv-transport", f.common.kv.transport,
                     "vsup connector: auto (shared memory on the same host, else TCP), shm, tcp"))
      ->check(CLI::IsMember({"auto", "shm", "tcp"}));
  opt(app.add_option("--kv-lease-s", f.common.kv.leaseS,
                     "vsup connector: seconds a finished prefill's blocks wait to be pulled"))
      ->check(finiteRange(0.1, 3600, "seconds"));
  opt(app.add_option("--kv-transfer-timeout", f.common.kv.transferTimeoutS,
                     "vsup connector: seconds a decode request waits for its blocks"))
      ->check(finiteRange(0.1, 3600, "seconds"));
  opt(app.add_option("--kv-load-failure", f.common.kv.loadFailure,
                     "vsup connector: fail (the request ends with an error) or recompute "
                     "(a local prefill) when its blocks cannot be pulled"))
      ->check(CLI::IsMember({"fail", "recompute"}));
  opt(app.add_option("--sim-kv-transfer-ms", f.common.kv.simTransferMs,
                     "sim KV connector: each finished request's transfer takes this long"))
      ->check(CLI::Range(uint64_t(0), uint64_t(3600000)));
  opt(app.add_option("--kv-shutdown-timeout", f.common.kv.shutdownTimeoutS,
                     "seconds a rank may defer its shutdown for pending KV transfers"))
      ->check(finiteRange(0, 3600, "seconds"));
  return added;
}

engine::EngineConfig toEngineConfig(const EngineFlags& f) {
  engine::CommonConfig common = f.common;
  if (f.model && f.modelArg && *f.model != *f.modelArg) {
    throw std::invalid_argument("MODEL '" + *f.modelArg + "' and --model '" + *f.model +
                                "' name different models: give the model once (either one)");
  }
  if (f.modelArg) {
    common.model = *f.modelArg;
  } else if (f.model) {
    common.model = *f.model;
  }
  if (common.model.empty()) throw std::invalid_argument("--model: the model name is empty");
  return engine::makeEngineConfig(f.engine, common, f.kvCacheMemory, "--kv-cache-memory", f.cpu,
                                  f.sim, f.dtype);
}

}  // namespace vsup::workers
