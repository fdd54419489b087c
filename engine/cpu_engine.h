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

#include "engine/llama_config.h"
#include "engine/registry.h"
#include "engine/tokenizer.h"

namespace vsup::engine {

// The registry's entry for "cpu".
const Backend& cpuBackend();

// The model's own tokenizer: its tokenizer.json, or the byte tokenizer of a preset.
std::unique_ptr<Tokenizer> loadTokenizer(const ModelSource& model);

}  // namespace vsup::engine
