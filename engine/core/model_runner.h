// What a backend supplies to run in each tensor-parallel rank: execute one step on this rank's
// shard of the model. Everything else (batching, the KV block tables, sampling parameters,
// detokenizing) is the backend-agnostic Scheduler's, in engine-core.
#pragma once

#include <string>
#include <vector>

#include "engine/engine.h"

namespace vsup::engine {

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  // Computes `input` on this rank: writes each sequence's KV through its block table and
  // samples the next token of every sequence with `sample` set. Runs on the rank's compute
  // thread and may block (collectives wait for the peer ranks). Throws on failure (a dead or
  // hung peer, cancel()).
  virtual StepOutput execute(const StepInput& input) = 0;
  // Makes a running or later execute() fail at once instead of waiting for peer ranks (this
  // rank is being torn down). Thread-safe: called from the rank's loop thread.
  virtual void cancel() = 0;
  // What the operator should know about how this runner will run (a slow library path it
  // detected, say), one sentence each; the rank logs them as warnings once it is loaded.
  virtual std::vector<std::string> warnings() const { return {}; }
};

}  // namespace vsup::engine
