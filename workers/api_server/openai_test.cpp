#include "workers/api_server/openai.h"

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <variant>

namespace vsup::api {
namespace {

using json = nlohmann::json;
using engine::FinishReason;

Limits testLimits() {
  Limits limits;
  limits.servedModel = "m";
  limits.maxTokensLimit = 100;
  limits.defaultMaxTokens = 16;
  return limits;
}

CompletionCall parseOk(std::string_view body, bool chat = false) {
  auto result = parseCompletionRequest(body, chat, testLimits());
  if (const auto* error = std::get_if<ApiError>(&result)) {
    FAIL("expected success for ", body, ", got ", error->status, " ", error->message);
  }
  return std::get<CompletionCall>(std::move(result));
}

ApiError parseError(std::string_view body, bool chat = false) {
  auto result = parseCompletionRequest(body, chat, testLimits());
  if (std::holds_alternative<CompletionCall>(result)) FAIL("expected an error for ", body);
  return std::get<ApiError>(std::move(result));
}

// A completions body: {"model":"m","prompt":"hi"} plus `extra`.
std::string completionBody(const json& extra = json::object()) {
  json body = {{"model", "m"}, {"prompt", "hi"}};
  body.update(extra);
  return body.dump();
}

std::string chatBody(const json& extra = json::object()) {
  json body = {{"model", "m"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
  body.update(extra);
  return body.dump();
}

// ---------------------------------------------------------------------------------------------
// Parsing: happy paths

TEST_CASE("a minimal completions body gets every default") {
  const CompletionCall call = parseOk(R"({"model":"m","prompt":"hi"})");
  CHECK_FALSE(call.chat);
  CHECK(call.model == "m");
  REQUIRE(call.prompts.size() == 1);
  CHECK(call.prompts[0] == "hi");
  CHECK(call.sampling.maxTokens == 16);
  CHECK(call.sampling.temperature == 1.0);
  CHECK(call.sampling.topP == 1.0);
  CHECK_FALSE(call.sampling.seed.has_value());
  CHECK(call.sampling.stop.empty());
  CHECK_FALSE(call.stream);
  CHECK_FALSE(call.includeUsage);
  CHECK_FALSE(call.echo);
}

TEST_CASE("the default max_tokens comes from the limits") {
  Limits limits = testLimits();
  limits.defaultMaxTokens = 42;
  auto result = parseCompletionRequest(R"({"model":"m","prompt":"hi"})", false, limits);
  REQUIRE(std::holds_alternative<CompletionCall>(result));
  CHECK(std::get<CompletionCall>(result).sampling.maxTokens == 42);
}

TEST_CASE("every supported completions field is parsed into native types") {
  const CompletionCall call = parseOk(completionBody({{"max_tokens", 100},
                                                      {"temperature", 0},
                                                      {"top_p", 0.5},
                                                      {"seed", 7},
                                                      {"stop", {"\n", "END"}},
                                                      {"n", 1},
                                                      {"stream", true},
                                                      {"stream_options", {{"include_usage", true}}},
                                                      {"user", "alice"}}));
  CHECK(call.sampling.maxTokens == 100);
  CHECK(call.sampling.temperature == 0.0);
  CHECK(call.sampling.topP == 0.5);
  REQUIRE(call.sampling.seed.has_value());
  CHECK(*call.sampling.seed == 7);
  CHECK(call.sampling.stop == std::vector<std::string>{"\n", "END"});
  CHECK(call.stream);
  CHECK(call.includeUsage);
}

TEST_CASE("range ends are accepted") {
  CHECK(parseOk(completionBody({{"max_tokens", 1}})).sampling.maxTokens == 1);
  CHECK(parseOk(completionBody({{"temperature", 2}})).sampling.temperature == 2.0);
  CHECK(parseOk(completionBody({{"temperature", 1.5}})).sampling.temperature == 1.5);
  CHECK(parseOk(completionBody({{"top_p", 1}})).sampling.topP == 1.0);
  CHECK(*parseOk(completionBody({{"seed", 0}})).sampling.seed == 0);
  CHECK(*parseOk(R"({"model":"m","prompt":"hi","seed":18446744073709551615})").sampling.seed ==
        18446744073709551615ull);
  CHECK(parseOk(R"({"model":"m","prompt":"hi","max_tokens":5.0})").sampling.maxTokens == 5);
}

TEST_CASE("a single stop string becomes a one-element stop list") {
  CHECK(parseOk(completionBody({{"stop", "###"}})).sampling.stop ==
        std::vector<std::string>{"###"});
  CHECK(parseOk(completionBody({{"stop", json::array()}})).sampling.stop.empty());
  CHECK(parseOk(completionBody({{"stop", {"a", "b", "c", "d"}}})).sampling.stop.size() == 4);
}

TEST_CASE("a prompt list gives one prompt per choice, in order") {
  const CompletionCall call = parseOk(completionBody({{"prompt", {"one", "two", "three"}}}));
  CHECK(call.prompts == std::vector<std::string>{"one", "two", "three"});
  json sixtyFour = json::array();
  for (int i = 0; i < 64; ++i) sixtyFour.push_back("p" + std::to_string(i));
  CHECK(parseOk(completionBody({{"prompt", sixtyFour}})).prompts.size() == 64);
}

TEST_CASE("null means the default for every optional field") {
  const CompletionCall call = parseOk(
      R"({"model":"m","prompt":"hi","max_tokens":null,"temperature":null,"top_p":null,
          "seed":null,"stop":null,"n":null,"stream":null,"stream_options":null,"user":null,
          "logprobs":null,"best_of":null,"echo":null,"suffix":null,"tools":null})");
  CHECK(call.sampling.maxTokens == 16);
  CHECK(call.sampling.temperature == 1.0);
  CHECK(call.sampling.topP == 1.0);
  CHECK_FALSE(call.sampling.seed.has_value());
  CHECK(call.sampling.stop.empty());
  CHECK_FALSE(call.stream);
}

TEST_CASE("unsupported fields are accepted at their default values") {
  const CompletionCall call = parseOk(completionBody({{"logprobs", false},
                                                      {"top_logprobs", 0},
                                                      {"best_of", 1},
                                                      {"echo", false},
                                                      {"suffix", ""},
                                                      {"tools", json::array()},
                                                      {"presence_penalty", 0},
                                                      {"frequency_penalty", 0.0},
                                                      {"logit_bias", json::object()}}));
  CHECK_FALSE(call.echo);
}

TEST_CASE("unknown fields are ignored") {
  const CompletionCall call = parseOk(
      completionBody({{"metadata", {{"a", 1}}}, {"store", false}, {"x-vendor", {1, 2, 3}}}));
  CHECK(call.prompts[0] == "hi");
}

TEST_CASE("stream without stream_options does not include usage") {
  const CompletionCall call = parseOk(completionBody({{"stream", true}}));
  CHECK(call.stream);
  CHECK_FALSE(call.includeUsage);
  CHECK_FALSE(
      parseOk(completionBody({{"stream", true}, {"stream_options", json::object()}})).includeUsage);
  CHECK_FALSE(
      parseOk(completionBody({{"stream", true}, {"stream_options", {{"include_usage", false}}}}))
          .includeUsage);
}

TEST_CASE("chat messages are kept in order for the engine, with one empty prompt slot") {
  const CompletionCall call = parseOk(
      R"({"model":"m","messages":[{"role":"system","content":"Be brief."},
          {"role":"user","content":"hi"},{"role":"assistant","content":"hello"},
          {"role":"user","content":"again"}]})",
      true);
  CHECK(call.chat);
  REQUIRE(call.prompts.size() == 1);
  CHECK(call.prompts[0].empty());
  CHECK(call.messages == std::vector<engine::ChatMessage>{{"system", "Be brief."},
                                                          {"user", "hi"},
                                                          {"assistant", "hello"},
                                                          {"user", "again"}});
  CHECK(parseOk(completionBody()).messages.empty());
}

TEST_CASE("chat content given as text parts is joined with newlines") {
  const CompletionCall call = parseOk(
      R"({"model":"m","messages":[{"role":"user","content":[
          {"type":"text","text":"first"},{"type":"text","text":"second"}]}]})",
      true);
  CHECK(call.messages == std::vector<engine::ChatMessage>{{"user", "first\nsecond"}});
}

TEST_CASE("the developer role is taken as system and a message name is ignored") {
  const CompletionCall call = parseOk(
      R"({"model":"m","messages":[{"role":"developer","content":"rules"},
          {"role":"user","name":"bob","content":"hi"}]})",
      true);
  CHECK(call.messages ==
        std::vector<engine::ChatMessage>{{"system", "rules"}, {"user", "hi"}});
}

TEST_CASE("chat takes max_tokens and max_completion_tokens, and the latter wins") {
  CHECK(parseOk(chatBody({{"max_tokens", 7}}), true).sampling.maxTokens == 7);
  CHECK(parseOk(chatBody({{"max_completion_tokens", 9}}), true).sampling.maxTokens == 9);
  CHECK(parseOk(chatBody({{"max_tokens", 7}, {"max_completion_tokens", 9}}), true)
            .sampling.maxTokens == 9);
  // null is absent: a chat's default (the ceiling, maxTokensLimit in testLimits()).
  CHECK(parseOk(chatBody({{"max_completion_tokens", nullptr}}), true).sampling.maxTokens == 100);
  CHECK(parseOk(chatBody({{"logprobs", false}, {"tools", json::array()}}), true).chat);
}

TEST_CASE("without max_tokens a chat may use the rest of the context, a completion gets 16") {
  const CompletionCall chat = parseOk(chatBody(), true);
  CHECK_FALSE(chat.maxTokensGiven);
  CHECK(chat.sampling.maxTokens == 100);  // the ceiling: maxTokensLimit
  CHECK(parseOk(chatBody({{"max_tokens", nullptr}}), true).sampling.maxTokens == 100);
  CHECK(parseOk(chatBody({{"max_tokens", 7}}), true).maxTokensGiven);
  CHECK(parseOk(chatBody({{"max_completion_tokens", 9}}), true).maxTokensGiven);

  const CompletionCall completion = parseOk(completionBody());
  CHECK_FALSE(completion.maxTokensGiven);
  CHECK(completion.sampling.maxTokens == 16);  // vLLM's legacy completions default
  CHECK(parseOk(completionBody({{"max_tokens", 100}})).maxTokensGiven);

  Limits limits = testLimits();
  limits.defaultChatMaxTokens = 30;  // a lower ceiling, if an operator sets one
  auto lower = parseCompletionRequest(chatBody(), true, limits);
  REQUIRE(std::holds_alternative<CompletionCall>(lower));
  CHECK(std::get<CompletionCall>(lower).sampling.maxTokens == 30);
  limits.defaultChatMaxTokens = 1000;  // never above what a request may ask for
  auto capped = parseCompletionRequest(chatBody(), true, limits);
  REQUIRE(std::holds_alternative<CompletionCall>(capped));
  CHECK(std::get<CompletionCall>(capped).sampling.maxTokens == 100);
}

TEST_CASE("response_format is refused like tools, except the default {\"type\":\"text\"}") {
  for (bool chat : {true, false}) {
    CAPTURE(chat);
    auto body = [&](const json& format) {
      return chat ? chatBody({{"response_format", format}})
                  : completionBody({{"response_format", format}});
    };
    CHECK(parseOk(body({{"type", "text"}}), chat).chat == chat);
    CHECK(parseOk(body(nullptr), chat).chat == chat);
    for (const json& format :
         {json{{"type", "json_object"}},
          json{{"type", "json_schema"}, {"json_schema", {{"name", "x"}, {"schema", json::object()}}}},
          json::object(), json("text"), json{{"type", 5}}}) {
      CAPTURE(format.dump());
      const ApiError error = parseError(body(format), chat);
      const ApiError tools =
          parseError(chat ? chatBody({{"tools", {{{"type", "function"}}}}})
                          : completionBody({{"tools", {{{"type", "function"}}}}}),
                     chat);
      CHECK(error.status == tools.status);
      CHECK(error.type == tools.type);
      CHECK(error.code == tools.code);
      CHECK(error.code == "unsupported_parameter");
      CHECK(error.message == "'response_format' is not supported");
      CHECK(error.param == "response_format");
    }
  }
}

TEST_CASE("completions ignore max_completion_tokens and messages, chat ignores prompt") {
  CHECK(parseOk(completionBody({{"max_completion_tokens", 1000}})).sampling.maxTokens == 16);
  CHECK(parseOk(chatBody({{"prompt", 5}}), true).prompts.size() == 1);
}

// ---------------------------------------------------------------------------------------------
// Parsing: errors

struct ErrorCase {
  std::string body;
  bool chat;
  int status;
  std::string message;
  std::string param;
};

TEST_CASE("each invalid field is a 400 that names the field and what was expected") {
  const ErrorCase cases[] = {
      {R"({"prompt":"hi"})", false, 400, "'model' is required (served models: `m`)", "model"},
      {R"({"model":5,"prompt":"hi"})", false, 400, "'model' must be a string, got 5", "model"},
      {R"({"model":"m"})", false, 400, "'prompt' is required", "prompt"},
      {R"({"model":"m","prompt":5})", false, 400,
       "'prompt' must be a string or a non-empty array of strings, got 5", "prompt"},
      {R"({"model":"m","prompt":[]})", false, 400,
       "'prompt' must be a string or a non-empty array of strings, got an empty array", "prompt"},
      {R"({"model":"m","prompt":[1,2,3]})", false, 400, "token-id prompts are not supported",
       "prompt"},
      {R"({"model":"m","prompt":[[1,2],[3]]})", false, 400, "token-id prompts are not supported",
       "prompt"},
      {R"({"model":"m","prompt":["a",null]})", false, 400, "'prompt[1]' must be a string, got null",
       "prompt[1]"},
      {R"({"model":"m","messages":[]})", true, 400,
       "'messages' must be a non-empty array of messages, got an empty array", "messages"},
      {R"({"model":"m"})", true, 400, "'messages' is required", "messages"},
      {R"({"model":"m","messages":"hi"})", true, 400,
       "'messages' must be a non-empty array of messages, got \"hi\"", "messages"},
      {R"({"model":"m","messages":["hi"]})", true, 400,
       "'messages[0]' must be an object with 'role' and 'content', got \"hi\"", "messages[0]"},
      {R"({"model":"m","messages":[{"content":"hi"}]})", true, 400,
       "'messages[0].role' is required", "messages[0].role"},
      {R"({"model":"m","messages":[{"role":"user","content":"a"},{"role":"tool","content":"x"}]})",
       true, 400,
       "'messages[1].role' must be one of \"system\", \"user\", \"assistant\", got \"tool\"",
       "messages[1].role"},
      {R"({"model":"m","messages":[{"role":"user"}]})", true, 400,
       "'messages[0].content' is required", "messages[0].content"},
      {R"({"model":"m","messages":[{"role":"user","content":7}]})", true, 400,
       "'messages[0].content' must be a string or an array of text parts, got 7",
       "messages[0].content"},
      {R"({"model":"m","messages":[{"role":"user",
            "content":[{"type":"image_url","image_url":{}}]}]})",
       true, 400,
       "'messages[0].content[0].type' must be \"text\" (only text content is supported), got "
       "\"image_url\"",
       "messages[0].content[0].type"},
      {R"({"model":"m","messages":[{"role":"user","content":[{"type":"text","text":1}]}]})", true,
       400, "'messages[0].content[0].text' must be a string, got 1", "messages[0].content[0].text"},
      {completionBody({{"max_tokens", 0}}), false, 400,
       "'max_tokens' must be an integer between 1 and 100, got 0", "max_tokens"},
      {completionBody({{"max_tokens", 101}}), false, 400,
       "'max_tokens' must be an integer between 1 and 100, got 101", "max_tokens"},
      {completionBody({{"max_tokens", "5"}}), false, 400,
       "'max_tokens' must be an integer between 1 and 100, got \"5\"", "max_tokens"},
      {completionBody({{"max_tokens", 2.5}}), false, 400,
       "'max_tokens' must be an integer between 1 and 100, got 2.5", "max_tokens"},
      {R"({"model":"m","prompt":"hi","max_tokens":99999999999999999999})", false, 400,
       "'max_tokens' must be an integer between 1 and 100, got 1e+20", "max_tokens"},
      {chatBody({{"max_completion_tokens", -1}}), true, 400,
       "'max_completion_tokens' must be an integer between 1 and 100, got -1",
       "max_completion_tokens"},
      {completionBody({{"temperature", "hot"}}), false, 400,
       "'temperature' must be a number between 0 and 2, got \"hot\"", "temperature"},
      {completionBody({{"temperature", 2.01}}), false, 400,
       "'temperature' must be a number between 0 and 2, got 2.01", "temperature"},
      {completionBody({{"temperature", -0.1}}), false, 400,
       "'temperature' must be a number between 0 and 2, got -0.1", "temperature"},
      {completionBody({{"temperature", true}}), false, 400,
       "'temperature' must be a number between 0 and 2, got true", "temperature"},
      {completionBody({{"top_p", 0}}), false, 400,
       "'top_p' must be a number greater than 0 and at most 1, got 0", "top_p"},
      {completionBody({{"top_p", 1.5}}), false, 400,
       "'top_p' must be a number greater than 0 and at most 1, got 1.5", "top_p"},
      {completionBody({{"seed", -1}}), false, 400, "'seed' must be a non-negative integer, got -1",
       "seed"},
      {completionBody({{"seed", "7"}}), false, 400,
       "'seed' must be a non-negative integer, got \"7\"", "seed"},
      {completionBody({{"stop", ""}}), false, 400,
       "'stop' must be a non-empty string or an array of at most 4 non-empty strings, got \"\"",
       "stop"},
      {completionBody({{"stop", {"a", "b", "c", "d", "e"}}}), false, 400,
       "'stop' must be a non-empty string or an array of at most 4 non-empty strings, got an "
       "array of 5 items",
       "stop"},
      {completionBody({{"stop", {"a", ""}}}), false, 400,
       "'stop[1]' must be a non-empty string, got \"\"", "stop[1]"},
      {completionBody({{"stop", 3}}), false, 400,
       "'stop' must be a non-empty string or an array of at most 4 non-empty strings, got 3",
       "stop"},
      {completionBody({{"n", 2}}), false, 400, "n > 1 is not supported", "n"},
      {completionBody({{"n", 0}}), false, 400, "'n' must be at least 1, got 0", "n"},
      {completionBody({{"n", "one"}}), false, 400, "'n' must be an integer, got \"one\"", "n"},
      {completionBody({{"stream", "yes"}}), false, 400, "'stream' must be a boolean, got \"yes\"",
       "stream"},
      {completionBody({{"stream_options", {{"include_usage", true}}}}), false, 400,
       "'stream_options' is only allowed when 'stream' is true", "stream_options"},
      {completionBody({{"stream", false}, {"stream_options", {{"include_usage", true}}}}), false,
       400, "'stream_options' is only allowed when 'stream' is true", "stream_options"},
      {completionBody({{"stream", true}, {"stream_options", true}}), false, 400,
       "'stream_options' must be an object, got true", "stream_options"},
      {completionBody({{"stream", true}, {"stream_options", {{"include_usage", 1}}}}), false, 400,
       "'stream_options.include_usage' must be a boolean, got 1", "stream_options.include_usage"},
      {completionBody({{"user", 5}}), false, 400, "'user' must be a string, got 5", "user"},
      {completionBody({{"logprobs", 5}}), false, 400, "'logprobs' is not supported", "logprobs"},
      {completionBody({{"logprobs", 0}}), false, 400, "'logprobs' is not supported", "logprobs"},
      {chatBody({{"logprobs", true}}), true, 400, "'logprobs' is not supported", "logprobs"},
      {chatBody({{"top_logprobs", 3}}), true, 400, "'top_logprobs' is not supported",
       "top_logprobs"},
      {completionBody({{"best_of", 3}}), false, 400, "'best_of' is not supported", "best_of"},
      {completionBody({{"echo", true}}), false, 400, "'echo' is not supported", "echo"},
      {completionBody({{"suffix", "end"}}), false, 400, "'suffix' is not supported", "suffix"},
      {chatBody({{"tools", {{{"type", "function"}, {"function", {{"name", "f"}}}}}}}), true, 400,
       "'tools' is not supported", "tools"},
      {chatBody({{"functions", {{{"name", "f"}}}}}), true, 400, "'functions' is not supported",
       "functions"},
      {completionBody({{"presence_penalty", 0.5}}), false, 400,
       "'presence_penalty' is not supported", "presence_penalty"},
      {completionBody({{"frequency_penalty", -1}}), false, 400,
       "'frequency_penalty' is not supported", "frequency_penalty"},
      {completionBody({{"logit_bias", {{"50256", -100}}}}), false, 400,
       "'logit_bias' is not supported", "logit_bias"},
  };
  for (const ErrorCase& c : cases) {
    CAPTURE(c.body);
    const ApiError error = parseError(c.body, c.chat);
    CHECK(error.status == c.status);
    CHECK(error.type == "invalid_request_error");
    CHECK(error.message == c.message);
    CHECK(error.param == c.param);
    CHECK_FALSE(error.code.empty());
  }
}

TEST_CASE("a prompt list longer than 64 is refused") {
  json many = json::array();
  for (int i = 0; i < 65; ++i) many.push_back("p");
  const ApiError error = parseError(completionBody({{"prompt", many}}));
  CHECK(error.status == 400);
  CHECK(error.message ==
        "'prompt' must be an array of at most 64 strings, got an array of 65 items");
  CHECK(error.param == "prompt");
}

TEST_CASE("an unknown model is a 404 in the OpenAI wording") {
  const ApiError error = parseError(R"({"model":"gpt-4","prompt":"hi"})");
  CHECK(error.status == 404);
  CHECK(error.type == "invalid_request_error");
  CHECK(error.message == "The model `gpt-4` does not exist. Served models: `m`.");
  CHECK(error.code == "model_not_found");
  CHECK(error.param == "model");
  CHECK(parseError(R"({"model":"gpt-4","messages":[]})", true).status == 404);
}

TEST_CASE("invalid JSON is a 400 that says where parsing failed") {
  const ApiError error = parseError(R"({"model":"m",)");
  CHECK(error.status == 400);
  CHECK(error.type == "invalid_request_error");
  CHECK(error.message.rfind("invalid JSON: ", 0) == 0);
  CHECK(error.message.find("line 1, column") != std::string::npos);
  CHECK(error.message.find("json.exception") == std::string::npos);
  CHECK(error.param.empty());
  CHECK(parseError("").message.rfind("invalid JSON: ", 0) == 0);
  CHECK(parseError(R"({"model":"m","prompt":"hi"} trailing)").message.rfind("invalid JSON: ", 0) ==
        0);
  // A number too large for a double is reported the same way, not thrown.
  const ApiError overflow = parseError(R"({"model":"m","prompt":"hi","temperature":1e400})");
  CHECK(overflow.status == 400);
  CHECK(overflow.message == "invalid JSON: number overflow parsing '1e400'");
  // So is a lone surrogate escape.
  CHECK(parseError(R"({"model":"m","prompt":"\ud800"})").message.rfind("invalid JSON: ", 0) == 0);
  // Invalid UTF-8 inside a string is not JSON either.
  CHECK(parseError("{\"model\":\"m\",\"prompt\":\"\xff\"}").message.rfind("invalid JSON: ", 0) ==
        0);
}

TEST_CASE("a body that is not an object is a 400") {
  for (const char* body : {"[]", "\"hi\"", "42", "null"}) {
    CAPTURE(body);
    const ApiError error = parseError(body);
    CHECK(error.status == 400);
    CHECK(error.message.rfind("request body must be a JSON object, got ", 0) == 0);
  }
}

TEST_CASE("deeply nested JSON is refused before it is parsed") {
  const std::string deep = R"({"model":"m","prompt":"hi","x":)" + std::string(100000, '[') +
                           std::string(100000, ']') + "}";
  const ApiError error = parseError(deep);
  CHECK(error.status == 400);
  CHECK(error.message == "invalid JSON: nested deeper than 32 levels");
  // Brackets inside strings do not count.
  const std::string inString = R"({"model":"m","prompt":")" + std::string(1000, '[') + R"(\"["})";
  CHECK(parseOk(inString).prompts[0] == std::string(1000, '[') + "\"[");
}

TEST_CASE("long values are cut short in error messages") {
  const ApiError error = parseError(completionBody({{"temperature", std::string(1000, 'x')}}));
  CHECK(error.message.size() < 120);
  CHECK(error.message.find("...") != std::string::npos);
  // The cut never splits a UTF-8 character: the message still renders as valid JSON.
  std::string euros;
  for (int i = 0; i < 30; ++i) euros += "\xe2\x82\xac";  // U+20AC, 3 bytes each
  const ApiError euro = parseError(completionBody({{"temperature", euros}}));
  const json parsed = json::parse(renderError(euro));
  CHECK(parsed["error"]["message"].get<std::string>() == euro.message);
}

TEST_CASE("no truncation or byte change of a valid body escapes as an exception") {
  const std::string valid =
      R"({"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"h\u00e9"}]}],)"
      R"("max_tokens":5,"temperature":0.5,"top_p":0.9,"seed":1,"stop":["x"],"n":1,)"
      R"("stream":true,"stream_options":{"include_usage":true},"user":"u"})";
  REQUIRE(
      std::holds_alternative<CompletionCall>(parseCompletionRequest(valid, true, testLimits())));
  const auto outcomeRenders = [](std::string_view body) {
    const auto result = parseCompletionRequest(body, true, testLimits());
    if (const auto* error = std::get_if<ApiError>(&result)) {
      CHECK(json::parse(renderError(*error))["error"]["message"].is_string());
    }
  };
  for (size_t cut = 0; cut < valid.size(); ++cut) {
    CHECK_NOTHROW(outcomeRenders(std::string_view(valid).substr(0, cut)));
  }
  for (size_t at = 0; at < valid.size(); ++at) {
    for (const char replacement : {'\0', '"', '[', '}', '9', '-', '\xff', 'e'}) {
      std::string mutated = valid;
      mutated[at] = replacement;
      CHECK_NOTHROW(outcomeRenders(mutated));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bodies the official clients send

TEST_CASE("the bodies the official openai npm client sends are accepted") {
  SUBCASE("completions.create") {
    // openai-node: client.completions.create({ model: 'm', prompt: 'hi', max_tokens: 5 })
    const CompletionCall call = parseOk(R"({"model":"m","prompt":"hi","max_tokens":5})");
    CHECK(call.prompts == std::vector<std::string>{"hi"});
    CHECK(call.sampling.maxTokens == 5);
    CHECK_FALSE(call.stream);
  }
  SUBCASE("chat.completions.create") {
    // client.chat.completions.create({ messages: [{ role: 'user', content: 'hi' }], model: 'm' })
    const CompletionCall call =
        parseOk(R"({"messages":[{"role":"user","content":"hi"}],"model":"m"})", true);
    CHECK(call.messages == std::vector<engine::ChatMessage>{{"user", "hi"}});
    CHECK(call.sampling.maxTokens == 100);  // no max_tokens: the rest of the context, capped
    CHECK_FALSE(call.maxTokensGiven);
  }
  SUBCASE("chat.completions.create with stream and stream_options") {
    const CompletionCall call = parseOk(
        R"({"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say this is a test"}],"model":"m","stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":20,"temperature":0.7})",
        true);
    CHECK(call.stream);
    CHECK(call.includeUsage);
    CHECK(call.sampling.maxTokens == 20);
    CHECK(call.sampling.temperature == doctest::Approx(0.7));
  }
  SUBCASE("completions.create streaming with a stop list and seed") {
    const CompletionCall call = parseOk(
        R"({"model":"m","prompt":"Say this is a test","max_tokens":7,"temperature":0,"stream":true,"stream_options":{"include_usage":true},"stop":["\n"],"seed":42,"n":1})");
    CHECK(call.stream);
    CHECK(call.includeUsage);
    CHECK(call.sampling.stop == std::vector<std::string>{"\n"});
    CHECK(*call.sampling.seed == 42);
  }
  SUBCASE("the python client's chat body with content parts and a user id") {
    const CompletionCall call = parseOk(
        R"({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"model":"m","max_tokens":5,"top_p":1,"user":"u-1","stream":false})",
        true);
    CHECK(call.messages == std::vector<engine::ChatMessage>{{"user", "hi"}});
    CHECK_FALSE(call.stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering

TEST_CASE("errors render in the OpenAI shape with null param and code when empty") {
  const json withParam =
      json::parse(renderError(invalidRequest("bad", "temperature", "invalid_value")));
  CHECK(withParam == json::parse(R"({"error":{"message":"bad","type":"invalid_request_error",
                                     "param":"temperature","code":"invalid_value"}})"));
  const json bare = json::parse(renderError(serverError("boom")));
  CHECK(bare["error"]["message"] == "boom");
  CHECK(bare["error"]["type"] == "server_error");
  CHECK(bare["error"]["param"].is_null());
  CHECK(bare["error"]["code"].is_null());
}

TEST_CASE("each error constructor pairs the right status and type") {
  CHECK(invalidRequest("x").status == 400);
  CHECK(invalidRequest("x").type == "invalid_request_error");
  CHECK(modelNotFound("a").status == 404);
  CHECK(modelNotFound("a").type == "invalid_request_error");
  CHECK(payloadTooLarge(1024).status == 413);
  CHECK(payloadTooLarge(1024).type == "invalid_request_error");
  CHECK(payloadTooLarge(1024).message.find("1024") != std::string::npos);
  CHECK(authenticationFailed().status == 401);
  CHECK(authenticationFailed().type == "authentication_error");
  CHECK(pathNotFound("GET", "/v2/x").status == 404);
  CHECK(pathNotFound("GET", "/v2/x").type == "not_found_error");
  CHECK(pathNotFound("GET", "/v2/x").message == "no route for GET /v2/x");
  CHECK(unavailable("draining").status == 503);
  CHECK(unavailable("draining").type == "unavailable");
  CHECK(serverError("x").status == 500);
  CHECK(serverError("x").type == "server_error");
}

TEST_CASE("a completion response has the official text_completion shape") {
  const CompletionResult result{
      false,
      "cmpl-1",
      1700000000,
      "m",
      {{0, "hello", FinishReason::Length}, {1, "bye", FinishReason::Stop}},
      {3, 5}, {}};
  const json body = json::parse(renderCompletion(result));
  CHECK(body["id"] == "cmpl-1");
  CHECK(body["object"] == "text_completion");
  CHECK(body["created"].is_number_integer());
  CHECK(body["created"] == 1700000000);
  CHECK(body["model"] == "m");
  REQUIRE(body["choices"].is_array());
  REQUIRE(body["choices"].size() == 2);
  const json& first = body["choices"][0];
  CHECK(first.size() == 4);
  CHECK(first["index"] == 0);
  CHECK(first["text"] == "hello");
  CHECK(first.contains("logprobs"));
  CHECK(first["logprobs"].is_null());
  CHECK(first["finish_reason"] == "length");
  CHECK(body["choices"][1]["index"] == 1);
  CHECK(body["choices"][1]["finish_reason"] == "stop");
  CHECK(body["usage"] ==
        json::parse(R"({"prompt_tokens":3,"completion_tokens":5,"total_tokens":8})"));
}

TEST_CASE("a chat response has the official chat.completion shape") {
  const CompletionResult result{
      true, "chatcmpl-1", 1700000000, "m", {{0, "hi there", FinishReason::Stop}}, {4, 2}, {}};
  const json body = json::parse(renderCompletion(result));
  CHECK(body["object"] == "chat.completion");
  CHECK(body["id"] == "chatcmpl-1");
  const json& choice = body["choices"][0];
  CHECK(choice["index"] == 0);
  CHECK(choice["message"] == json::parse(R"({"role":"assistant","content":"hi there"})"));
  CHECK(choice["logprobs"].is_null());
  CHECK(choice["finish_reason"] == "stop");
  CHECK_FALSE(choice.contains("text"));
  CHECK(body["usage"]["total_tokens"] == 6);
}

TEST_CASE("finish reasons render as the engine names, and None as null") {
  const auto finishOf = [](FinishReason finish) {
    const CompletionResult result{false, "c", 0, "m", {{0, "", finish}}, {}, {}};
    return json::parse(renderCompletion(result))["choices"][0]["finish_reason"];
  };
  CHECK(finishOf(FinishReason::None).is_null());
  CHECK(finishOf(FinishReason::Stop) == "stop");
  CHECK(finishOf(FinishReason::Length) == "length");
  CHECK(finishOf(FinishReason::Abort) == "abort");
}

TEST_CASE("completion stream chunks carry text and a null finish reason until the end") {
  const json middle =
      json::parse(renderStreamChunk(false, "cmpl-1", 5, "m", {0, "wor", FinishReason::None}, true));
  CHECK(middle["id"] == "cmpl-1");
  CHECK(middle["object"] == "text_completion");
  CHECK(middle["created"] == 5);
  CHECK(middle["model"] == "m");
  REQUIRE(middle["choices"].size() == 1);
  CHECK(middle["choices"][0]["index"] == 0);
  CHECK(middle["choices"][0]["text"] == "wor");
  CHECK(middle["choices"][0]["logprobs"].is_null());
  CHECK(middle["choices"][0].contains("finish_reason"));
  CHECK(middle["choices"][0]["finish_reason"].is_null());
  CHECK_FALSE(middle.contains("usage"));
  const json last =
      json::parse(renderStreamChunk(false, "cmpl-1", 5, "m", {2, "", FinishReason::Length}, false));
  CHECK(last["choices"][0]["index"] == 2);
  CHECK(last["choices"][0]["text"] == "");
  CHECK(last["choices"][0]["finish_reason"] == "length");
}

TEST_CASE("chat stream chunks send the role first and an empty delta at the end") {
  const json first =
      json::parse(renderStreamChunk(true, "chatcmpl-1", 5, "m", {0, "", FinishReason::None}, true));
  CHECK(first["object"] == "chat.completion.chunk");
  CHECK(first["choices"][0]["delta"] == json::parse(R"({"role":"assistant","content":""})"));
  CHECK(first["choices"][0]["logprobs"].is_null());
  CHECK(first["choices"][0]["finish_reason"].is_null());
  const json middle = json::parse(
      renderStreamChunk(true, "chatcmpl-1", 5, "m", {0, "Hel", FinishReason::None}, false));
  CHECK(middle["choices"][0]["delta"] == json::parse(R"({"content":"Hel"})"));
  const json last = json::parse(
      renderStreamChunk(true, "chatcmpl-1", 5, "m", {0, "", FinishReason::Stop}, false));
  CHECK(last["choices"][0]["delta"] == json::object());
  CHECK(last["choices"][0]["finish_reason"] == "stop");
  const json only = json::parse(
      renderStreamChunk(true, "chatcmpl-1", 5, "m", {0, "all", FinishReason::Stop}, true));
  CHECK(only["choices"][0]["delta"] == json::parse(R"({"role":"assistant","content":"all"})"));
  CHECK(only["choices"][0]["finish_reason"] == "stop");
}

TEST_CASE("the usage chunk has no choices and the token counts") {
  for (const bool chat : {false, true}) {
    CAPTURE(chat);
    const json body = json::parse(renderUsageChunk(chat, "id-1", 9, "m", {10, 20}));
    CHECK(body["id"] == "id-1");
    CHECK(body["object"] == (chat ? "chat.completion.chunk" : "text_completion"));
    CHECK(body["created"] == 9);
    CHECK(body["model"] == "m");
    CHECK(body["choices"] == json::array());
    CHECK(body["usage"] ==
          json::parse(R"({"prompt_tokens":10,"completion_tokens":20,"total_tokens":30})"));
  }
}

TEST_CASE("SSE events are one data line followed by a blank line") {
  CHECK(sseEvent(R"({"a":1})") == "data: {\"a\":1}\n\n");
  CHECK(kSseDone == "data: [DONE]\n\n");
  // Newlines in generated text are escaped, so a chunk never breaks the event framing.
  const std::string chunk =
      renderStreamChunk(true, "c", 0, "m", {0, "line1\nline2\r\n\n", FinishReason::None}, false);
  CHECK(chunk.find('\n') == std::string::npos);
  CHECK(chunk.find('\r') == std::string::npos);
  const std::string event = sseEvent(chunk);
  CHECK(event.rfind("data: ", 0) == 0);
  CHECK(event.size() == chunk.size() + 8);
  CHECK(event.substr(event.size() - 2) == "\n\n");
  CHECK(json::parse(event.substr(6))["choices"][0]["delta"]["content"] == "line1\nline2\r\n\n");
}

TEST_CASE("unicode and control characters survive rendering") {
  std::string text =
      "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x8e\x89 \"quoted\" \\ </script>";
  text += '\0';
  for (char c = 1; c < 0x20; ++c) text += c;
  text += "\x7f end";
  const CompletionResult completion{false, "c", 0, "m", {{0, text, FinishReason::Stop}}, {}, {}};
  CHECK(json::parse(renderCompletion(completion))["choices"][0]["text"] == text);
  const CompletionResult chat{true, "c", 0, "m", {{0, text, FinishReason::Stop}}, {}, {}};
  CHECK(json::parse(renderCompletion(chat))["choices"][0]["message"]["content"] == text);
  CHECK(json::parse(renderStreamChunk(false, "c", 0, "m", {0, text, FinishReason::None},
                                      false))["choices"][0]["text"] == text);
  CHECK(json::parse(renderError(invalidRequest(text)))["error"]["message"] == text);
  // And a prompt with the same characters parses back to the same bytes.
  CHECK(parseOk(completionBody({{"prompt", text}})).prompts[0] == text);
}

TEST_CASE("invalid UTF-8 in generated text is replaced instead of failing") {
  // A token boundary inside a multi-byte character: the first two bytes of U+4E16.
  const std::string split = "ok \xe4\xb8";
  const std::string rendered =
      renderStreamChunk(false, "c", 0, "m", {0, split, FinishReason::None}, false);
  const json body = json::parse(rendered);
  CHECK(body["choices"][0]["text"] == "ok \xef\xbf\xbd");
}

TEST_CASE("the model list has the official shape") {
  const json body = json::parse(renderModels("m", 1700000000));
  CHECK(body == json::parse(
                    R"({"object":"list","data":[{"id":"m","object":"model","created":1700000000,
                        "owned_by":"vsup"}]})"));
}

TEST_CASE("the full model list has one entry per served name, with root and max_model_len") {
  const json body = json::parse(renderModels({"a", "b"}, "/models/llama", 4096, 1700000000));
  CHECK(body == json::parse(R"({"object":"list","data":[
      {"id":"a","object":"model","created":1700000000,"owned_by":"vsup","root":"/models/llama",
       "parent":null,"max_model_len":4096},
      {"id":"b","object":"model","created":1700000000,"owned_by":"vsup","root":"/models/llama",
       "parent":null,"max_model_len":4096}]})"));
  const json unbounded = json::parse(renderModels({"a"}, "r", 0, 1));
  CHECK(unbounded["data"][0]["max_model_len"].is_null());
  // OpenAI's key order first.
  CHECK(renderModels({"a"}, "r", 1, 1).rfind(R"({"object":"list","data":[{"id":"a","object":"model",)",
                                             0) == 0);
}

TEST_CASE("a request may name any served model; the call keeps the name asked for; another is a "
          "404 naming them") {
  Limits limits = testLimits();
  limits.servedModels = {"first", "alias"};
  for (const char* name : {"first", "alias"}) {
    CAPTURE(name);
    auto ok = parseCompletionRequest(json{{"model", name}, {"prompt", "hi"}}.dump(), false, limits);
    REQUIRE(std::holds_alternative<CompletionCall>(ok));
    CHECK(std::get<CompletionCall>(ok).model == name);
  }
  // servedModel alone no longer counts once servedModels is set.
  auto old = parseCompletionRequest(R"({"model":"m","prompt":"hi"})", false, limits);
  REQUIRE(std::holds_alternative<ApiError>(old));
  const ApiError& e = std::get<ApiError>(old);
  CHECK(e.status == 404);
  CHECK(e.code == "model_not_found");
  CHECK(e.param == "model");
  CHECK(e.message == "The model `m` does not exist. Served models: `first`, `alias`.");
  auto missing = parseCompletionRequest(R"({"prompt":"hi"})", false, limits);
  REQUIRE(std::holds_alternative<ApiError>(missing));
  CHECK(std::get<ApiError>(missing).status == 400);
  CHECK(std::get<ApiError>(missing).message ==
        "'model' is required (served models: `first`, `alias`)");
  CHECK(modelNotFound("x").message == "The model `x` does not exist.");
}

TEST_CASE("rendered keys keep the OpenAI order") {
  const std::string text =
      renderCompletion({false, "c", 1, "m", {{0, "x", FinishReason::Stop}}, {1, 1}, {}});
  CHECK(text.rfind(R"({"id":"c","object":"text_completion","created":1,"model":"m","choices":)",
                   0) == 0);
}

}  // namespace

TEST_CASE("kv_transfer_params: a prefill asks for remote decode, a decode names where the blocks are") {
  CompletionCall p = parseOk(
      R"({"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_decode":true,"x":1}})");
  REQUIRE(p.kv.has_value());
  CHECK(p.kv->doRemoteDecode);
  CHECK_FALSE(p.kv->doRemotePrefill);
  CompletionCall d = parseOk(R"({"model":"m","prompt":"hi","kv_transfer_params":{
      "do_remote_prefill":true,"remote_engine_id":"e1","remote_request_id":"cmpl-1-0",
      "remote_block_ids":[3,0,7],"remote_host":"10.0.0.2","remote_port":14579,"tp_size":2}})");
  REQUIRE(d.kv.has_value());
  CHECK(d.kv->remoteBlockIds == std::vector<int32_t>{3, 0, 7});
  CHECK(d.kv->remotePort == 14579);
  CHECK(d.kv->tpSize == 2);
  CHECK(d.kv->remoteHost == "10.0.0.2");
  // Neither flag set, or null: nothing is asked.
  CHECK_FALSE(parseOk(R"({"model":"m","prompt":"hi","kv_transfer_params":{}})").kv.has_value());
  CHECK_FALSE(parseOk(R"({"model":"m","prompt":"hi","kv_transfer_params":null})").kv.has_value());
}

TEST_CASE("kv_transfer_params: each bad field is named") {
  ApiError e = parseError(R"({"model":"m","prompt":"hi","kv_transfer_params":[1]})");
  CHECK(e.param == "kv_transfer_params");
  e = parseError(R"({"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_prefill":true,
      "remote_engine_id":"e","remote_request_id":"r","remote_host":"h","tp_size":1,
      "remote_block_ids":[1]}})");
  CHECK(e.param == "kv_transfer_params.remote_port");
  CHECK(e.code == "missing_required_parameter");
  e = parseError(R"({"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_prefill":true,
      "remote_engine_id":"e","remote_request_id":"r","remote_host":"h","tp_size":1,
      "remote_port":70000,"remote_block_ids":[1]}})");
  CHECK(e.param == "kv_transfer_params.remote_port");
  CHECK(e.message.find("from 1 to 65535") != std::string::npos);
  e = parseError(R"({"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_prefill":true,
      "remote_engine_id":"e","remote_request_id":"r","remote_host":"h","tp_size":1,
      "remote_port":5,"remote_block_ids":[1,-2]}})");
  CHECK(e.param == "kv_transfer_params.remote_block_ids[1]");
  e = parseError(
      R"({"model":"m","prompt":["a","b"],"kv_transfer_params":{"do_remote_decode":true}})");
  CHECK(e.param == "prompt");
  e = parseError(R"({"model":"m","prompt":"a","kv_transfer_params":{"do_remote_decode":1}})");
  CHECK(e.param == "kv_transfer_params.do_remote_decode");
  e = parseError(R"({"model":"m","prompt":"a","kv_transfer_params":{"do_remote_decode":true,
      "do_remote_prefill":true}})");
  CHECK(e.param == "kv_transfer_params");
}

TEST_CASE("a prefill's answer carries kv_transfer_params, whole and streamed") {
  engine::KvParams p;
  p.doRemotePrefill = true;
  p.remoteEngineId = "e1";
  p.remoteRequestId = "cmpl-1-0";
  p.remoteBlockIds = {4, 5};
  p.remoteHost = "127.0.0.1";
  p.remotePort = 14579;
  p.tpSize = 1;
  CompletionResult r{false, "c", 1, "m", {{0, "x", FinishReason::Length}}, {3, 1}, p};
  auto body = nlohmann::json::parse(renderCompletion(r));
  CHECK(body["kv_transfer_params"]["remote_block_ids"] == nlohmann::json::array({4, 5}));
  CHECK(body["kv_transfer_params"]["do_remote_prefill"] == true);
  CHECK(body["kv_transfer_params"]["do_remote_decode"] == false);
  CHECK(body["kv_transfer_params"]["remote_port"] == 14579);
  auto chunk = nlohmann::json::parse(renderKvParamsChunk(false, "c", 1, "m", p));
  CHECK(chunk["choices"].empty());
  CHECK(chunk["kv_transfer_params"]["remote_engine_id"] == "e1");
  r.kvTransferParams.reset();
  CHECK_FALSE(nlohmann::json::parse(renderCompletion(r)).contains("kv_transfer_params"));
}

}  // namespace vsup::api
