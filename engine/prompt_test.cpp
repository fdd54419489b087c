#include "engine/prompt.h"

#include <doctest/doctest.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace vsup::engine {
namespace {

const std::vector<ChatMessage> kConversation = {
    {"system", "Be brief."}, {"user", "hi"}, {"assistant", "hello"}, {"user", "again"}};

TEST_CASE("chat formats are named and found by name") {
  for (ChatFormat f : {ChatFormat::Plain, ChatFormat::ChatMl, ChatFormat::Llama3}) {
    REQUIRE(chatFormatFromName(nameOf(f)).has_value());
    CHECK(*chatFormatFromName(nameOf(f)) == f);
  }
  CHECK(std::string(nameOf(ChatFormat::Plain)) == "plain");
  CHECK(std::string(nameOf(ChatFormat::ChatMl)) == "chatml");
  CHECK(std::string(nameOf(ChatFormat::Llama3)) == "llama3");
  CHECK_FALSE(chatFormatFromName("ChatML").has_value());
  CHECK_FALSE(chatFormatFromName("").has_value());
}

TEST_CASE("the plain chat format marks each role and cues the assistant") {
  CHECK(renderChat({}, ChatFormat::Plain) == "<|assistant|>\n");
  CHECK(renderChat({{"system", "Be brief."}, {"user", "hi"}}, ChatFormat::Plain) ==
        "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n");
  CHECK(renderChat(kConversation, ChatFormat::Plain) ==
        "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nagain\n"
        "<|assistant|>\n");
  CHECK(renderChat({{"user", "first\nsecond"}}, ChatFormat::Plain) ==
        "<|user|>\nfirst\nsecond\n<|assistant|>\n");
}

TEST_CASE("ChatML wraps each turn in im_start/im_end and opens the assistant's") {
  CHECK(renderChat({}, ChatFormat::ChatMl) == "<|im_start|>assistant\n");
  CHECK(renderChat(kConversation, ChatFormat::ChatMl) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n");
}

TEST_CASE("Llama 3 begins the text, heads each turn and opens the assistant's") {
  CHECK(renderChat({}, ChatFormat::Llama3) ==
        "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n");
  CHECK(renderChat({{"system", "Be brief."}, {"user", "hi"}}, ChatFormat::Llama3) ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST_CASE("content is not escaped: a turn marker in a message stays as written") {
  CHECK(renderChat({{"user", "<|im_end|>"}}, ChatFormat::ChatMl) ==
        "<|im_start|>user\n<|im_end|><|im_end|>\n<|im_start|>assistant\n");
}

// Records what it was asked to encode, so the tests see the text and addSpecial as passed.
class RecordingTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool addSpecial) const override {
    lastText = std::string(text);
    lastAddSpecial = addSpecial;
    return {int32_t(text.size())};
  }
  std::string tokenBytes(int32_t) const override { return ""; }
  bool isSpecial(int32_t) const override { return false; }
  std::optional<int32_t> tokenId(std::string_view) const override { return std::nullopt; }
  size_t vocabSize() const override { return 0; }

  mutable std::string lastText;
  mutable bool lastAddSpecial = false;
};

TEST_CASE("tokenizePrompt encodes a completion's prompt as it is, with special tokens") {
  RecordingTokenizer tokenizer;
  GenerateRequest r;
  r.prompt = "hi <|im_start|>";
  for (ChatFormat f : {ChatFormat::Plain, ChatFormat::ChatMl, ChatFormat::Llama3}) {
    CAPTURE(nameOf(f));
    tokenizer.lastAddSpecial = false;
    CHECK(tokenizePrompt(r, tokenizer, f) == std::vector<int32_t>{int32_t(r.prompt.size())});
    CHECK(tokenizer.lastText == r.prompt);
    CHECK(tokenizer.lastAddSpecial);
  }
}

TEST_CASE("tokenizePrompt renders a chat in the given format, then encodes it") {
  RecordingTokenizer tokenizer;
  GenerateRequest r;
  r.messages = kConversation;
  for (ChatFormat f : {ChatFormat::Plain, ChatFormat::ChatMl, ChatFormat::Llama3}) {
    CAPTURE(nameOf(f));
    tokenizer.lastAddSpecial = false;
    tokenizePrompt(r, tokenizer, f);
    CHECK(tokenizer.lastText == renderChat(kConversation, f));
    CHECK(tokenizer.lastAddSpecial);
  }
}

TEST_CASE("with the byte tokenizer, each ChatML marker of a chat is one special token") {
  auto tokenizer = makeByteTokenizer();
  GenerateRequest r;
  r.messages = {{"user", "hi"}};
  const std::vector<int32_t> expected = {kByteImStart, 'u', 's', 'e', 'r', '\n', 'h', 'i',
                                         kByteImEnd, '\n', kByteImStart, 'a', 's', 's', 'i',
                                         's', 't', 'a', 'n', 't', '\n'};
  CHECK(tokenizePrompt(r, *tokenizer, ChatFormat::ChatMl) == expected);
}

}  // namespace
}  // namespace vsup::engine
