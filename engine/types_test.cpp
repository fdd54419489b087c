// Tests for engine/types.h: checkSampling, the range check the API server and vsup::LLM share.
// The messages are the API server's (workers/api_server/openai_test.cpp has the same ones for
// the same values sent as JSON).
#include "engine/types.h"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

namespace {

using vsup::engine::checkSampling;
using vsup::engine::SamplingLimits;
using vsup::engine::SamplingParams;

struct Bad {
  const char* what;
  SamplingParams params;
  SamplingLimits limits;
  std::string field;
  std::string message;
};

SamplingParams with(void (*set)(SamplingParams&)) {
  SamplingParams p;
  set(p);
  return p;
}

}  // namespace

TEST_CASE("checkSampling accepts every value in the documented ranges") {
  CHECK_FALSE(checkSampling(SamplingParams{}).has_value());
  SamplingParams edges;
  edges.maxTokens = 100;
  edges.temperature = 0.0;
  edges.topP = 1.0;
  edges.topK = -1;
  edges.seed = std::numeric_limits<uint64_t>::max();
  edges.stop = {"a", "b", "c", "d"};
  CHECK_FALSE(checkSampling(edges, SamplingLimits{100}).has_value());
  edges.temperature = 2.0;
  edges.topP = 1e-9;
  edges.topK = 1 << 30;
  CHECK_FALSE(checkSampling(edges, SamplingLimits{100}).has_value());
  edges.maxTokens = 1'000'000'000;  // no limit: only the context bounds it
  CHECK_FALSE(checkSampling(edges).has_value());
}

TEST_CASE("checkSampling names the field, says what is accepted and quotes the value") {
  const Bad cases[] = {
      {"max_tokens 0", with([](SamplingParams& p) { p.maxTokens = 0; }), {100}, "max_tokens",
       "'max_tokens' must be an integer between 1 and 100, got 0"},
      {"max_tokens above the limit", with([](SamplingParams& p) { p.maxTokens = 101; }), {100},
       "max_tokens", "'max_tokens' must be an integer between 1 and 100, got 101"},
      {"max_completion_tokens -1", with([](SamplingParams& p) { p.maxTokens = -1; }),
       {100, "max_completion_tokens"}, "max_completion_tokens",
       "'max_completion_tokens' must be an integer between 1 and 100, got -1"},
      {"max_tokens 0 without a limit", with([](SamplingParams& p) { p.maxTokens = 0; }), {},
       "max_tokens", "'max_tokens' must be an integer >= 1, got 0"},
      {"temperature 2.01", with([](SamplingParams& p) { p.temperature = 2.01; }), {},
       "temperature", "'temperature' must be a number between 0 and 2, got 2.01"},
      {"temperature -0.1", with([](SamplingParams& p) { p.temperature = -0.1; }), {},
       "temperature", "'temperature' must be a number between 0 and 2, got -0.1"},
      {"top_p 0", with([](SamplingParams& p) { p.topP = 0; }), {}, "top_p",
       "'top_p' must be a number greater than 0 and at most 1, got 0"},
      {"top_p 1.5", with([](SamplingParams& p) { p.topP = 1.5; }), {}, "top_p",
       "'top_p' must be a number greater than 0 and at most 1, got 1.5"},
      {"top_k -2", with([](SamplingParams& p) { p.topK = -2; }), {}, "top_k",
       "'top_k' must be an integer >= -1 (-1 or 0: off), got -2"},
      {"top_k 2^30 + 1", with([](SamplingParams& p) { p.topK = (1 << 30) + 1; }), {}, "top_k",
       "'top_k' must be an integer >= -1 (-1 or 0: off), got 1073741825"},
      {"five stop strings", with([](SamplingParams& p) { p.stop = {"a", "b", "c", "d", "e"}; }),
       {}, "stop",
       "'stop' must be a non-empty string or an array of at most 4 non-empty strings, got an "
       "array of 5 items"},
      {"an empty stop string", with([](SamplingParams& p) { p.stop = {"a", ""}; }), {},
       "stop[1]", "'stop[1]' must be a non-empty string, got \"\""},
  };
  for (const Bad& c : cases) {
    CAPTURE(c.what);
    auto e = checkSampling(c.params, c.limits);
    REQUIRE(e.has_value());
    CHECK(e->field == c.field);
    CHECK(e->message == c.message);
  }
}

TEST_CASE("checkSampling refuses what JSON cannot carry but C++ can: NaN and infinities") {
  SamplingParams p;
  p.temperature = std::numeric_limits<double>::quiet_NaN();
  auto e = checkSampling(p);
  REQUIRE(e.has_value());
  CHECK(e->message == "'temperature' must be a number between 0 and 2, got nan");
  p.temperature = 1.0;
  p.topP = std::numeric_limits<double>::infinity();
  e = checkSampling(p);
  REQUIRE(e.has_value());
  CHECK(e->message == "'top_p' must be a number greater than 0 and at most 1, got inf");
  p.topP = std::nan("");
  CHECK(checkSampling(p).has_value());
}

TEST_CASE("checkSampling reports the first field in the API server's order") {
  SamplingParams p;
  p.maxTokens = 0;
  p.temperature = 9;
  p.stop = {""};
  CHECK(checkSampling(p)->field == "max_tokens");
  p.maxTokens = 1;
  CHECK(checkSampling(p)->field == "temperature");
  p.temperature = 1;
  CHECK(checkSampling(p)->field == "stop[0]");
}
