#include "engine/prompt.h"

namespace vsup::engine {

const char* nameOf(ChatFormat format) {
  switch (format) {
    case ChatFormat::Plain: return "plain";
    case ChatFormat::ChatMl: return "chatml";
    case ChatFormat::Llama3: return "llama3";
  }
  return "plain";
}

std::optional<ChatFormat> chatFormatFromName(const std::string& name) {
  if (name == "plain") return ChatFormat::Plain;
  if (name == "chatml") return ChatFormat::ChatMl;
  if (name == "llama3") return ChatFormat::Llama3;
  return std::nullopt;
}

std::string renderChat(const std::vector<ChatMessage>& messages, ChatFormat format) {
  std::string out;
  switch (format) {
    case ChatFormat::ChatMl:
      for (const ChatMessage& message : messages) {
        out += "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n";
      }
      return out + "<|im_start|>assistant\n";
    case ChatFormat::Llama3:
      out = "<|begin_of_text|>";
      for (const ChatMessage& message : messages) {
        out += "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" + message.content +
               "<|eot_id|>";
      }
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::Plain:
      break;
  }
  for (const ChatMessage& message : messages) {
    out += "<|";
    out += message.role;
    out += "|>\n";
    out += message.content;
    out += '\n';
  }
  out += "<|assistant|>\n";
  return out;
}

std::vector<int32_t> tokenizePrompt(const GenerateRequest& request, const Tokenizer& tokenizer,
                                    ChatFormat format) {
  if (request.messages.empty()) return tokenizer.encode(request.prompt, true);
  return tokenizer.encode(renderChat(request.messages, format), true);
}

}  // namespace vsup::engine
