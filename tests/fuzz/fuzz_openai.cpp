// Fuzz target: the OpenAI request decoder and everything rendered from what it accepts.
//
// Input: one selector byte, then the request body.
//   selector bit 0: 0 = POST /v1/completions, 1 = POST /v1/chat/completions
//   (selector >> 1) % 3: the chat format whose rendering of an accepted chat stands in for the
//                        generated text: 0 plain, 1 chatml, 2 llama3
// So a readable seed starts with '0' (completions), '1' (chat, plain), '3' (chat, chatml) or
// '5' (chat, llama3).
//
// Properties checked (workers/api_server/openai.h): parseCompletionRequest never throws; a call
// it returns keeps every documented range (a chat: at least one message of a known role and one
// empty prompt slot); an error names a 4xx status; engine::renderChat of a chat's messages ends
// with the assistant's cue in every format (engine/prompt.h); and everything rendered from
// either (error body, completion, stream chunks, usage chunk) is valid JSON, whatever bytes the
// client sent.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "engine/prompt.h"
#include "tests/fuzz/fuzz_check.h"
#include "workers/api_server/openai.h"

namespace {

using namespace vsup::api;

using vsup::engine::ChatFormat;

constexpr ChatFormat kFormats[] = {ChatFormat::Plain, ChatFormat::ChatMl, ChatFormat::Llama3};

std::string_view assistantCue(ChatFormat format) {
  switch (format) {
    case ChatFormat::ChatMl: return "<|im_start|>assistant\n";
    case ChatFormat::Llama3: return "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::Plain: break;
  }
  return "<|assistant|>\n";
}

void checkJson(const std::string& text, const char* what) {
  FUZZ_CHECK(nlohmann::json::accept(text), std::string(what) + " is not valid JSON: " + text);
  FUZZ_CHECK(text.find('\n') == std::string::npos, std::string(what) + " is not one line");
}

void checkCall(const CompletionCall& call, bool chat, const Limits& limits) {
  FUZZ_CHECK(call.chat == chat);
  FUZZ_CHECK(call.model == limits.servedModel);
  FUZZ_CHECK(!call.prompts.empty() && call.prompts.size() <= kMaxPrompts);
  if (chat) {
    FUZZ_CHECK(call.prompts.size() == 1 && call.prompts[0].empty());
    FUZZ_CHECK(!call.messages.empty());
    for (const auto& m : call.messages) {
      FUZZ_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", m.role);
    }
    for (ChatFormat format : kFormats) {
      const std::string rendered = vsup::engine::renderChat(call.messages, format);
      FUZZ_CHECK(rendered.ends_with(assistantCue(format)), vsup::engine::nameOf(format));
    }
  } else {
    FUZZ_CHECK(call.messages.empty());
  }
  const auto& s = call.sampling;
  FUZZ_CHECK(s.maxTokens >= 1 && s.maxTokens <= limits.maxTokensLimit);
  FUZZ_CHECK(s.temperature >= 0.0 && s.temperature <= 2.0);
  FUZZ_CHECK(s.topP > 0.0 && s.topP <= 1.0);
  FUZZ_CHECK(s.topK >= -1);  // -1 and 0: off (engine/types.h)
  FUZZ_CHECK(s.stop.size() <= 4);
  for (const auto& stop : s.stop) FUZZ_CHECK(!stop.empty());
  FUZZ_CHECK(!call.echo);
  FUZZ_CHECK(!call.includeUsage || call.stream);
}

// What the API server renders for an accepted call, with the prompts (a chat: its messages
// rendered in `format`) standing in for generated text: they are arbitrary client bytes, so this
// also covers the U+FFFD replacement.
void renderAll(const CompletionCall& call, ChatFormat format) {
  CompletionResult result;
  result.chat = call.chat;
  result.id = call.chat ? "chatcmpl-fuzz" : "cmpl-fuzz";
  result.created = 1700000000;
  result.model = call.model;
  std::vector<std::string> texts = call.prompts;
  if (call.chat) texts[0] = vsup::engine::renderChat(call.messages, format);
  for (size_t i = 0; i < texts.size(); ++i) {
    result.choices.push_back({int(i), texts[i], vsup::engine::FinishReason::Length});
    const Choice delta{int(i), texts[i], vsup::engine::FinishReason::None};
    checkJson(renderStreamChunk(call.chat, result.id, result.created, call.model, delta, i == 0),
              "a stream chunk");
  }
  result.usage = {int64_t(texts[0].size()), call.sampling.maxTokens};
  checkJson(renderCompletion(result), "a completion");
  checkJson(renderUsageChunk(call.chat, result.id, result.created, call.model, result.usage),
            "a usage chunk");
  const std::string event = sseEvent(renderModels(call.model, result.created));
  FUZZ_CHECK(event.starts_with("data: ") && event.ends_with("\n\n"));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool chat = (data[0] & 1) != 0;
  Limits limits;
  limits.servedModel = "vsup-sim";
  const ChatFormat format = kFormats[(data[0] >> 1) % 3];
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);

  auto parsed = parseCompletionRequest(body, chat, limits);
  if (const auto* error = std::get_if<ApiError>(&parsed)) {
    FUZZ_CHECK(error->status >= 400 && error->status < 500, error->message);
    FUZZ_CHECK(!error->message.empty());
    checkJson(renderError(*error), "an error body");
    return 0;
  }
  const auto& call = std::get<CompletionCall>(parsed);
  checkCall(call, chat, limits);
  renderAll(call, format);
  return 0;
}
