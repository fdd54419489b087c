// The pluggable engine (DESIGN.md section 4, "Engine plug-in"): a scheduler side that runs in
// engine-core and a worker side that runs in each tensor-parallel rank. Plain values only; the
// processes in workers/ carry them over the control plane.
//
// One step: engine-core's Scheduler builds a StepInput (continuous batching: requests are
// admitted between steps), every rank executes it (WorkerEngine::execute), and the scheduler
// completes the step with the ranks' outputs, producing one TokenDelta per running request.
// A step is all-or-nothing: every rank takes part, so a dead or stuck rank fails or stalls it,
// and shutdown always happens at a step boundary.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/types.h"

namespace vsup::engine {

// What one rank needs to compute one sequence's part of a step.
struct SeqStep {
  std::string id;
  uint64_t seed = 0;
  double temperature = 1.0;  // 0: greedy
  double topP = 1.0;
  int32_t topK = 0;  // <= 0: off
  // The sim engine: token `position` (0 = first generated) is a function of (promptHash, seed).
  uint64_t promptHash = 0;
  uint32_t position = 0;
  // Real engines: this step's tokens of the sequence (a prompt chunk, a recompute after
  // preemption, or the one token generated last) at positions startPos.., their KV written
  // through blockTable; with `sample`, the rank samples the token at startPos + tokens.size().
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
  std::vector<std::string> kvTransfers;
  // Set on engine-core's final step when it shuts down: the one absolute instant (monotonic ns)
  // at which every rank gives up on its pending KV transfers. 0: not shutting down.
  int64_t kvGiveUpAtNs = 0;
};

struct StepOutput {
  uint64_t step = 0;
  uint32_t rank = 0;
  std::vector<int32_t> tokens;  // one per StepInput::seqs entry, same order; -1: not sampled
};

// Throws std::runtime_error unless every rank answered `step` with one token per sequence and
// all ranks sampled the same tokens (ranks that disagree: a broken collective).
void checkRankOutputs(const StepInput& step, const std::vector<StepOutput>& ranks);

// A request the engine can never serve as asked (e.g. longer than the context): the API
// server answers 400 with this message.
class RequestRejected : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Worker side: one rank's part of a step. Called on the rank's compute thread; may block.
class WorkerEngine {
 public:
  virtual ~WorkerEngine() = default;
  virtual StepOutput execute(const StepInput& input) = 0;
  // Makes a running or later execute() fail at once instead of waiting for peer ranks (this
  // rank is being torn down). Thread-safe: called from the rank's loop thread.
  virtual void cancel() {}
  // Cost of the step this rank just computed, for engines that simulate it (sim); 0 otherwise.
  virtual uint64_t simulatedCostMs(const StepInput& input) const = 0;
};

// Scheduler side, in engine-core. Single-threaded (engine-core's loop thread).
class Scheduler {
 public:
  virtual ~Scheduler() = default;
  // Queues a request; it joins the batch at the next step boundary. Throws RequestRejected for
  // a request it can never serve (too long for the context, empty prompt) and
  // std::invalid_argument for a broken caller contract (duplicate id).
  virtual void admit(GenerateRequest request) = 0;
  // Removes a request; returns its final delta (finish = Abort, text so far already sent).
  // False if unknown (already finished).
  virtual bool abort(const std::string& id, TokenDelta* final) = 0;
  // The next step, or an empty step (seqs empty) when nothing is waiting or running.
  virtual StepInput nextStep() = 0;
  // Applies the outputs of every rank for the step nextStep() returned. Returns a delta for each
  // request in the step that produced a token (none for a prompt chunk or a request aborted
  // meanwhile); finished requests are removed (their deltas carry a finish reason). Throws std::runtime_error when the
  // ranks disagree (a broken collective).
  virtual std::vector<TokenDelta> complete(const std::vector<StepOutput>& ranks) = 0;
  virtual size_t inFlight() const = 0;  // waiting + running
  // What the API servers need to know about the model: its context length (0: unbounded) and
  // how to write chat prompts ("plain", "chatml", "llama3").
  virtual int64_t maxModelLen() const { return 0; }
  virtual std::string chatFormat() const { return "plain"; }
};

struct SimOptions {
  uint32_t maxNumSeqs = 256;  // running batch size limit; the rest wait
  uint64_t tokenMs = 20;      // simulated cost of one step (one token for every running request)
};

std::unique_ptr<Scheduler> makeSimScheduler(SimOptions options);
std::unique_ptr<WorkerEngine> makeSimWorker(SimOptions options, uint32_t rank);

// The sim engine's vocabulary: token t decodes to kSimWords[t].
std::string simDetokenize(int32_t token);
uint64_t simPromptHash(const std::string& prompt);
int64_t simPromptTokens(const std::string& prompt);

}  // namespace vsup::engine
