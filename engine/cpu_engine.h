// The CPU backend (--engine cpu): a real Llama-architecture transformer on OpenBLAS, under the
// backend-agnostic core Scheduler like every backend.
//
// plan(): resolves --model, checks the tensor-parallel size against the heads and sizes the
// paged KV cache from --kv-cache-memory (a budget that cannot hold one full-length sequence is
// refused). tokenizer(): the preset's byte tokenizer or the directory's tokenizer.json.
// makeRunner(): this rank's LlamaShard; executes each step's tokens through the model and
// samples every sequence's next token from the logits, which are identical on every rank.
#pragma once

#include <memory>
#include <string>

#include "engine/collective.h"
#include "engine/llama_config.h"
#include "engine/registry.h"
#include "engine/tokenizer.h"

namespace vsup::engine {

// The registry's entry for "cpu".
const Backend& cpuBackend();

// What plan() and every rank of a Llama-architecture backend (cpu, cuda) derive from the
// configuration, identically: the model, the context served, the KV blocks per rank for a cache
// of `kvElementBytes` per value. Throws std::runtime_error / std::invalid_argument with a message
// for the user (bad model, a TP size that does not divide the heads, a KV budget that cannot
// hold one full-length sequence).
struct LlamaPlan {
  ModelSource model;
  int64_t maxModelLen = 0;
  int32_t numBlocks = 0;
};
LlamaPlan planLlamaEngine(const EngineConfig& config, const std::string& loadFormat,
                          int64_t kvElementBytes, bool needTokenizer = true);
// The EnginePlan both Llama backends share (scheduler limits, chat format, summary, a shared
// collective region at TP > 1); the caller adds what is its own (the CPU engine's KV layout).
EnginePlan llamaEnginePlan(const EngineConfig& config, const LlamaPlan& llama);
// Rank `rank`'s collective: the identity at TP 1, else its place in its node's region
// (EnginePlan::sharedCollective, borrowed from `fds` for the call); across nodes, that inside a
// cross-node collective that listens on fds.nodeAddress and is left in *fds.crossNode to be
// connected (engine/cross_node_collective.h).
std::unique_ptr<Collective> joinRankCollective(const EngineConfig& config, uint32_t rank,
                                               RankFds fds);

// The model's own tokenizer: its tokenizer.json, or the byte tokenizer of a preset.
std::unique_ptr<Tokenizer> loadTokenizer(const ModelSource& model);

}  // namespace vsup::engine
