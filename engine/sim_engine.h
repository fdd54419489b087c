// The simulated engine (--engine sim): no model, but a real step loop under the same core
// Scheduler as every backend. Its tokenizer maps whitespace-separated words onto a 32-word
// vocabulary; its runner keeps a real paged "KV cache" of one 64-bit hash per token slot, so a
// sampled token depends on the whole sequence and its block table exactly as a model's would:
// output is deterministic, identical on every rank, and unchanged by chunked prefill or by
// preemption and recompute. Each step with sequences costs SimConfig::tokenMs on the rank's
// compute thread.
#pragma once

#include <cstdint>
#include <memory>

#include "engine/core/model_runner.h"
#include "engine/registry.h"
#include "engine/tokenizer.h"

namespace vsup::engine {

constexpr size_t kSimVocabSize = 32;

// Words are separated by ' ', '\t', '\n' and '\r'; word w is token FNV-1a(w) % 32. A prompt of
// no words is one token (0), so every prompt has max(1, words) tokens. Token t decodes to the
// t-th word of the generated vocabulary (" the", " quick", ...). No special tokens.
std::shared_ptr<const Tokenizer> makeSimTokenizer();

// A rank's runner over a cache of numBlocks blocks of blockSize token slots. Throws
// std::runtime_error from execute() for a block table that does not cover a step's positions.
std::unique_ptr<ModelRunner> makeSimRunner(int32_t numBlocks, int32_t blockSize,
                                           uint64_t tokenMs, uint32_t rank);

// The registry's entry for "sim".
const Backend& simBackend();

}  // namespace vsup::engine
