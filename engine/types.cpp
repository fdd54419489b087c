#include "engine/types.h"

#include <stdexcept>
#include <string>

#include "engine/engine.h"

namespace vsup::engine {

const char* nameOf(FinishReason reason) {
  switch (reason) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
  }
  return "";
}

const char* nameOf(RejectCode code) {
  switch (code) {
    case RejectCode::None: return "";
    case RejectCode::ContextLengthExceeded: return "context_length_exceeded";
    case RejectCode::EmptyPrompt: return "empty_prompt";
  }
  return "";
}

void checkRankOutputs(const StepInput& step, const std::vector<StepOutput>& ranks) {
  if (ranks.empty()) throw std::runtime_error("step completed with no rank outputs");
  for (const StepOutput& r : ranks) {
    if (r.step != step.step || r.tokens.size() != step.seqs.size()) {
      throw std::runtime_error("rank " + std::to_string(r.rank) + " answered step " +
                               std::to_string(r.step) + " with " +
                               std::to_string(r.tokens.size()) + " tokens; expected step " +
                               std::to_string(step.step) + " with " +
                               std::to_string(step.seqs.size()));
    }
    if (r.tokens != ranks[0].tokens) {
      throw std::runtime_error("ranks 0 and " + std::to_string(r.rank) + " disagree on step " +
                               std::to_string(r.step));
    }
  }
}

}  // namespace vsup::engine
