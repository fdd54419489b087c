// How a request becomes prompt tokens: a chat's messages rendered in the model's chat format,
// then encoded by the model's tokenizer.
//
// Both halves live here, in engine-core, because the format and the tokenizer belong to the
// model: one place decides how a request becomes tokens, so the rendering can never disagree
// with the tokenizer that reads it (the special tokens a format writes are the ones that
// tokenizer knows). The API server only parses JSON and passes the messages through.
//
// Pure and thread-safe: engine-core runs tokenizePrompt() on its tokenizing thread, off the
// step loop.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/tokenizer.h"
#include "engine/types.h"

namespace vsup::engine {

// How chat messages become one prompt: the model's own format where vsup knows it (ChatML,
// Llama 3), else a plain "role: content" format.
enum class ChatFormat { Plain, ChatMl, Llama3 };
const char* nameOf(ChatFormat format);  // "plain", "chatml", "llama3"
std::optional<ChatFormat> chatFormatFromName(const std::string& name);

// The messages as one prompt, in `format`:
//   ChatMl: "<|im_start|>role\ncontent<|im_end|>\n"... then "<|im_start|>assistant\n"
//   Llama3: "<|begin_of_text|>" + "<|start_header_id|>role<|end_header_id|>\n\ncontent
//           <|eot_id|>"... then "<|start_header_id|>assistant<|end_header_id|>\n\n"
//   Plain:  "<|role|>\n" + content + "\n"... then "<|assistant|>\n", e.g.
//           [{system,"Be brief."},{user,"hi"}] renders as
//           "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
// Content is not escaped: a message that itself contains a turn marker reads like one to the
// model (as with the Jinja templates these stand for).
std::string renderChat(const std::vector<ChatMessage>& messages, ChatFormat format);

// The request's prompt tokens: a chat (non-empty `messages`) rendered in `format` and encoded,
// else `prompt` encoded; both with the tokenizer's special tokens added (e.g. a BOS).
std::vector<int32_t> tokenizePrompt(const GenerateRequest& request, const Tokenizer& tokenizer,
                                    ChatFormat format);

}  // namespace vsup::engine
