// One engine step as plain values (docs/architecture.md, "The engine"): engine-core's
// backend-agnostic core::Scheduler builds a StepInput (continuous batching: requests are
// admitted between steps), every rank executes it (ModelRunner::execute), and the scheduler
// completes the step with the ranks' outputs, producing one TokenDelta per running request.
// A step is all-or-nothing: every rank takes part, so a dead or stuck rank fails or stalls it,
// and shutdown always happens at a step boundary.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/types.h"

namespace vsup::engine {

// A finished request whose KV blocks a rank must send to a peer instance (the KV connector):
// engine-core keeps the blocks held (core::KvBlockManager) until every rank says it is done.
struct KvTransfer {
  std::string requestId;
  std::vector<int32_t> blocks;
};

// What one rank needs to compute one sequence's part of a step.
struct SeqStep {
  std::string id;
  uint64_t seed = 0;
  double temperature = 1.0;  // 0: greedy
  double topP = 1.0;
  int32_t topK = 0;  // <= 0: off
  // This step's tokens of the sequence (a prompt chunk, a recompute after preemption, or the one
  // token generated last) at positions startPos.., their KV written through blockTable; with
  // `sample`, the rank samples the token at startPos + tokens.size().
  std::vector<int32_t> tokens;
  uint32_t startPos = 0;
  std::vector<int32_t> blockTable;
  bool sample = true;
};

struct StepInput {
  uint64_t step = 0;
  std::vector<SeqStep> seqs;
  // Requests finished earlier whose KV blocks each rank must now send (the KV connector's
  // scheduler side chose them). A step may carry only these (seqs empty).
  std::vector<KvTransfer> kvTransfers;
  // Set on engine-core's final step when it shuts down: the one absolute instant (monotonic ns)
  // at which every rank gives up on its pending KV transfers. 0: not shutting down.
  int64_t kvGiveUpAtNs = 0;
};

struct StepOutput {
  uint64_t step = 0;
  uint32_t rank = 0;
  std::vector<int32_t> tokens;  // one per StepInput::seqs entry, same order; -1: not sampled
  std::vector<std::string> kvDone;  // transfers this rank finished since its last answer
};

// Throws std::runtime_error unless every rank answered `step` with one token per sequence and
// all ranks sampled the same tokens (ranks that disagree: a broken collective).
void checkRankOutputs(const StepInput& step, const std::vector<StepOutput>& ranks);

}  // namespace vsup::engine
