// The engine registry: the one place that knows which backends exist (--engine), which of them
// this build has, and how each one plans, tokenizes and makes its per-rank model runner.
// Nothing outside this file compares engine names.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "engine/config.h"
#include "engine/core/model_runner.h"
#include "engine/core/scheduler.h"
#include "engine/kv_cache.h"
#include "engine/prompt.h"
#include "engine/tokenizer.h"

namespace vsup::engine {

class CrossNodeCollective;  // engine/cross_node_collective.h

// Every engine vsup knows, built or not. Light: in libvsup too (vsup::LLM checks names with it).
struct EngineInfo {
  const char* name;     // the --engine value
  bool built;           // this build has it
  const char* summary;  // one line for --help
};
const std::vector<EngineInfo>& knownEngines();
// Throws std::invalid_argument unless `name` is an engine this build has: an unknown name lists
// the accepted ones; a known one that was not built says how to get it.
void requireEngineBuilt(const std::string& name);

// The backend part of an EngineConfig for --engine `name`, taking the flags of that backend
// only (a CPU engine's config never carries sim settings; the CUDA engine takes the CPU
// engine's --load-format and --seed). `dtype` (--dtype): auto (bfloat16 on cuda, float32
// elsewhere), bfloat16 (cuda only) or float32. Throws as requireEngineBuilt(), and
// std::invalid_argument for a dtype the engine does not compute in.
std::variant<CpuConfig, SimConfig, CudaConfig> backendConfigFor(const std::string& name,
                                                               const CpuConfig& cpu,
                                                               const SimConfig& sim,
                                                               const std::string& dtype = "auto");

// The one way user input becomes an EngineConfig (`vsup run`'s flags, vsup::LLM's LLMConfig):
// the engine must be known and built, `kvCacheMemory` is parsed as a size (empty: keep
// common.kvCacheBytes; `sizeField` names it in the error), only the chosen backend's settings
// are kept, and the result is validated. Throws std::invalid_argument naming the field.
EngineConfig makeEngineConfig(const std::string& engine, CommonConfig common,
                              const std::string& kvCacheMemory, const char* sizeField,
                              const CpuConfig& cpu, const SimConfig& sim,
                              const std::string& dtype = "auto");

// What engine-core needs to run an engine, derived from (and so validating) its config.
struct EnginePlan {
  core::SchedulerConfig scheduler;
  ChatFormat chatFormat = ChatFormat::Plain;  // the format engine-core renders chats in
  std::string chatFormatNote;     // why, when the model's own template was not usable
  std::string summary;            // the log line engine-core writes once started
  // The ranks of a node all-reduce through a region of ranksPerNode() ranks that the node's
  // supervisor of ranks creates (engine-core; across nodes, each node's agent too).
  bool sharedCollective = false;
  // Across nodes: the ranks also all-reduce with their peers on other nodes, so engine-core
  // connects them (Worker.joinCollective) before the first step. The sim engine's ranks share
  // nothing.
  bool crossNodeCollective = false;
  // Each rank's KV cache as bytes, for a backend whose cache can be transferred to a peer
  // instance (--kv-connector vsup); unset for one whose cannot (the sim engine).
  std::optional<KvCacheLayout> kvLayout;
  uint32_t modelKvHeads = 0;  // the model's KV heads (a rank holds kvLayout->kvHeads of them)
  std::string modelId;        // what a peer instance must be serving too: the --model name
};

// The fds a rank's runner is given, borrowed for makeRunner(): the runner maps them and keeps
// only the mappings, so the caller closes them once makeRunner returns (or throws). -1: none.
struct RankFds {
  int collective = -1;  // the region of EnginePlan::sharedCollective
  int kvCache = -1;     // the rank's KV cache region (kv_cache.h), when engine-core made one
  // Across nodes (nnodes > 1): the address this rank listens on for its peers on other nodes,
  // and where makeRunner() leaves the rank's cross-node collective (owned by the runner) for
  // the caller to connect once engine-core has handed it every rank's address.
  std::string nodeAddress;
  CrossNodeCollective** crossNode = nullptr;
};

// One backend. Methods are const and thread-safe; plan() and makeRunner() may read files.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Throws std::invalid_argument / std::runtime_error with a message for the user (no such
  // model, a TP size that does not divide the heads, a KV budget below one sequence).
  virtual EnginePlan plan(const EngineConfig& config) const = 0;
  virtual std::shared_ptr<const Tokenizer> tokenizer(const EngineConfig& config) const = 0;
  // This rank's runner: loads its shard (weights, KV cache), in the regions of `fds`. Runs on
  // the rank's compute thread.
  virtual std::unique_ptr<ModelRunner> makeRunner(const EngineConfig& config, uint32_t rank,
                                                  RankFds fds) const = 0;
  // What engine-core adds to the configuration its ranks start with, once, before they are
  // spawned (the CUDA engine at TP > 1: the NCCL unique id). Throws std::runtime_error.
  virtual void prepareRanks(EngineConfig& /*rankConfig*/) const {}
};

// The backend of `config` (engineName(config)). Throws as requireEngineBuilt(). Heavy: linked
// only into the vsup executable (the CPU backend brings OpenBLAS, which a host process must
// not load).
const Backend& backendFor(const EngineConfig& config);

// Everything about `config` that can be known before any process starts, checked where the
// user's flags are parsed so that each of these is a usage error, found at once: the backend's
// plan() (the model, its config.json and tokenizer, TP against the heads, the KV budget against
// one sequence), --max-model-len against the model's context length, and for a backend that
// allocates its memory (the CPU engine) the checkpoint against its config.json (every tensor the
// ranks will read present, with its shape and a supported dtype; the safetensors headers only,
// no weight is read) and the weights and KV cache of all ranks against this machine's memory.
// What is left to the ranks is reading the weights themselves. Returns the plan. Throws
// std::invalid_argument / std::runtime_error naming the flag, the file or the field. Heavy, as
// backendFor().
EnginePlan preflight(const EngineConfig& config);

}  // namespace vsup::engine
