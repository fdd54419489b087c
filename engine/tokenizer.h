// Tokenizers: text ↔ token ids, for engine-core (which tokenizes prompts and detokenizes
// generated tokens; the workers see only ids).
//
// Two implementations behind one interface:
//  - byte-level BPE loaded from a Hugging Face `tokenizer.json` (the GPT-2 / Llama-3 / SmolLM
//    family: model.type "BPE" with vocab + merges, added/special tokens, the ByteLevel
//    pre-tokenizer or a Sequence of Split(regex) + ByteLevel, the ByteLevel decoder, and a
//    TemplateProcessing post-processor for BOS). The pre-tokenizer's Unicode regex runs on PCRE2.
//  - a byte tokenizer for the built-in preset: ids 0..255 are the bytes, then four special
//    tokens (kByteEndOfText, kByteImStart, kByteImEnd, kBytePad).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace vsup::engine {

// Interface. Immutable after construction: safe to use from several threads.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Encodes `text`. Special and added tokens written literally in the text ("<|im_start|>")
  // become their ids. With addSpecial, the post-processor's template is applied (e.g. a BOS
  // token prepended). Never throws for any input, including invalid UTF-8.
  virtual std::vector<int32_t> encode(std::string_view text, bool addSpecial = true) const = 0;
  // The raw bytes a token stands for (byte-level decoding undone; may be a partial UTF-8
  // character). Special tokens return their content ("<|im_end|>"). Out of range: "".
  virtual std::string tokenBytes(int32_t id) const = 0;
  virtual bool isSpecial(int32_t id) const = 0;
  // The id of a token given its exact content (special, added or ordinary), if any.
  virtual std::optional<int32_t> tokenId(std::string_view content) const = 0;
  virtual size_t vocabSize() const = 0;  // highest id + 1
};

constexpr int32_t kByteEndOfText = 256;  // "<|endoftext|>"
constexpr int32_t kByteImStart = 257;    // "<|im_start|>"
constexpr int32_t kByteImEnd = 258;      // "<|im_end|>"
constexpr int32_t kBytePad = 259;        // "<|pad|>"
constexpr size_t kByteVocabSize = 260;

std::unique_ptr<Tokenizer> makeByteTokenizer();

// Loads `path` (a tokenizer.json). Throws std::runtime_error naming the file and what is wrong
// or unsupported (e.g. "tokenizer.json: model.type \"Unigram\" is not supported (BPE only)").
std::unique_ptr<Tokenizer> loadHfTokenizer(const std::string& path);

// Turns a stream of token ids into a stream of text that is always valid UTF-8 and never splits
// a character across two push() results: bytes of an incomplete character are held back until
// it completes. Invalid sequences become U+FFFD. Special tokens produce no text.
// Borrows the tokenizer, which must outlive it.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  std::string push(int32_t id);  // the text completed by this token (may be "")
  std::string flush();           // end of stream: whatever is held back, U+FFFD for a partial char
 private:
  const Tokenizer& tokenizer_;
  std::string pending_;  // bytes of an incomplete UTF-8 character
};

}  // namespace vsup::engine
