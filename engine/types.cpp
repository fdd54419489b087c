#include "engine/types.h"

#include <charconv>
#include <cmath>
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
    case RejectCode::KvTransferInvalid: return "invalid_kv_transfer_params";
  }
  return "";
}

namespace {

std::string number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

SamplingError mustBe(const std::string& field, const std::string& expected,
                     const std::string& got) {
  return SamplingError{field, "'" + field + "' must be " + expected + ", got " + got};
}

constexpr int64_t kMaxTopK = int64_t(1) << 30;
constexpr size_t kMaxStops = 4;

}  // namespace

std::optional<SamplingError> checkSampling(const SamplingParams& s, const SamplingLimits& limits) {
  if (s.maxTokens < 1 || (limits.maxTokensLimit > 0 && s.maxTokens > limits.maxTokensLimit)) {
    return mustBe(limits.maxTokensField,
                  limits.maxTokensLimit > 0
                      ? "an integer between 1 and " + std::to_string(limits.maxTokensLimit)
                      : std::string("an integer >= 1"),
                  std::to_string(s.maxTokens));
  }
  if (!(s.temperature >= 0.0 && s.temperature <= 2.0)) {
    return mustBe("temperature", "a number between 0 and 2", number(s.temperature));
  }
  if (!(s.topP > 0.0 && s.topP <= 1.0)) {
    return mustBe("top_p", "a number greater than 0 and at most 1", number(s.topP));
  }
  if (s.topK < -1 || s.topK > kMaxTopK) {
    return mustBe("top_k", "an integer >= -1 (-1 or 0: off)", std::to_string(s.topK));
  }
  if (s.stop.size() > kMaxStops) {
    return mustBe("stop", "a non-empty string or an array of at most 4 non-empty strings",
                  "an array of " + std::to_string(s.stop.size()) + " items");
  }
  for (size_t i = 0; i < s.stop.size(); ++i) {
    if (s.stop[i].empty()) {
      return mustBe("stop[" + std::to_string(i) + "]", "a non-empty string", "\"\"");
    }
  }
  return std::nullopt;
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
