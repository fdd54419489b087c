// The engine's configuration as one typed value: a part every backend shares and a part for
// the chosen backend only. It is validated once, where the user's flags are parsed (`vsup run`,
// vsup::LLM), and then carried to engine-core and to every rank as a Cap'n Proto struct in
// Node.start (workers/engine_codec.h), never as argv: a rank sees only its own backend's part.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>

namespace vsup::engine {

// The built-in preset `vsup run` serves with no --model.
inline constexpr const char* kDefaultModelName = "vsup-tiny-25m";

struct CpuConfig {
  std::string loadFormat = "auto";  // auto, dummy, safetensors
  uint64_t weightSeed = 0;          // dummy weights
};

struct SimConfig {
  uint64_t tokenMs = 20;  // the simulated cost of one step
};

// The CUDA engine: the same models and weight sources as the CPU engine, computing in `dtype`
// (the weights, the KV cache and the matrix products' inputs; accumulation and the residual
// stream are fp32 either way).
inline constexpr size_t kNcclUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES

struct CudaConfig {
  std::string loadFormat = "auto";  // auto, dummy, safetensors
  uint64_t weightSeed = 0;          // dummy weights
  std::string dtype = "bfloat16";   // bfloat16, float32
  // Set by engine-core for its ranks when TP > 1 (ncclGetUniqueId): the 128 bytes every rank
  // joins the same NCCL communicator with. Empty in the user's configuration.
  std::string ncclUniqueId;
};

// The KV connector (KV transfer to a peer instance).
struct KvConfig {
  std::string connector = "none";  // none, sim, vsup
  uint64_t simTransferMs = 200;    // sim: how long each transfer takes
  double shutdownTimeoutS = 10;    // how long a rank (its KV agent) may defer its shutdown
  // vsup (docs/architecture.md, "KV transfer"):
  std::string role = "both";          // prefill, decode, both
  std::string host = "127.0.0.1";     // where the agents listen; remote_host in answers
  uint16_t port = 14579;              // rank R's agent listens on port + R
  std::string transport = "auto";     // auto (shm on the same host, else tcp), shm, tcp
  double leaseS = 30;                 // a finished prefill's blocks wait this long for a pull
  double transferTimeoutS = 10;       // a decode request waits this long for its blocks
  std::string loadFailure = "fail";   // fail, recompute: what a failed pull does to the request
};

struct CommonConfig {
  std::string model = kDefaultModelName;  // a preset, a model directory, or (sim) any name
  uint32_t tensorParallelSize = 1;
  uint32_t maxNumSeqs = 256;
  uint32_t maxNumBatchedTokens = 2048;
  int64_t maxModelLen = 0;                    // 0: the model's own
  int64_t kvCacheBytes = int64_t(256) << 20;  // per rank
  int32_t blockSize = 16;
  int64_t collectiveTimeoutMs = 10000;
  uint64_t stepTimeoutMs = 30000;  // engine-core fails the engine when a step takes longer
  KvConfig kv;
  // Tensor parallelism across nodes (machines): tensorParallelSize ranks in nnodes nodes of
  // tensorParallelSize / nnodes ranks each, numbered node by node. Node 0 (the leader) runs
  // engine-core, which listens on masterAddr:masterPort for the other nodes' `vsup run
  // --headless` roots (docs/architecture.md, "Across nodes").
  uint32_t nnodes = 1;
  std::string masterAddr;  // an address or host name of the leader; needed when nnodes > 1
  uint16_t masterPort = 29500;
  uint32_t ranksPerNode() const { return tensorParallelSize / (nnodes == 0 ? 1 : nnodes); }
};

struct EngineConfig {
  CommonConfig common;
  std::variant<CpuConfig, SimConfig, CudaConfig> backend = CpuConfig{};
};

// The largest size parseByteSize() accepts: 1 PiB. Whether a size fits this machine is the
// backend's question (a CPU engine's KV cache must fit in memory; the sim engine allocates none).
inline constexpr int64_t kMaxByteSize = int64_t(1) << 50;

// "256MiB", "1GiB", "2TiB", "512MB", "1.5GB", "1048576" → bytes (--kv-cache-memory): a positive
// number, then B (or nothing), KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of
// 1000), spelt as here, a space before the unit allowed. Throws std::invalid_argument naming
// `field` and the text: malformed or an unknown unit (listing the units), not more than 0 bytes
// (nan, 0, negative), or more than kMaxByteSize.
int64_t parseByteSize(const std::string& text, const std::string& field);

// "cpu", "sim" or "cuda": the name of `config.backend`'s alternative (the --engine value).
const char* engineName(const EngineConfig& config);

// How long a finished request's KV blocks stay held for the KV connector
// (core::SchedulerConfig::kvHoldMs): 0 without a connector; else long enough for a transfer to
// finish even while its rank defers shutdown for it, after which the blocks are reused anyway.
int64_t kvHoldMs(const KvConfig& kv);

// Checks the ranges and the relations between fields that need no model (e.g.
// --max-num-batched-tokens >= --max-num-seqs). Throws std::invalid_argument with a message
// naming the flag, the value and what is accepted.
void validate(const EngineConfig& config);

}  // namespace vsup::engine
