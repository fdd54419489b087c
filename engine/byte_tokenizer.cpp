// The byte tokenizer of the built-in presets and the incremental decoder: the light part of the
// tokenizers (no PCRE2, no JSON), which the backend-agnostic scheduler needs in every process.
#include <array>
#include <string_view>

#include "engine/tokenizer.h"
#include "engine/utf8.h"

namespace vsup::engine {
namespace {

// ---------------------------------------------------------------------------------------------
// The byte tokenizer

constexpr std::array<std::string_view, 4> kByteSpecials = {"<|endoftext|>", "<|im_start|>",
                                                           "<|im_end|>", "<|pad|>"};

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool /*addSpecial: no BOS*/) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    size_t i = 0;
    while (i < text.size()) {
      if (text[i] == '<') {
        bool matched = false;
        for (size_t k = 0; k < kByteSpecials.size(); ++k) {
          if (text.substr(i).starts_with(kByteSpecials[k])) {
            ids.push_back(kByteEndOfText + static_cast<int32_t>(k));
            i += kByteSpecials[k].size();
            matched = true;
            break;
          }
        }
        if (matched) continue;
      }
      ids.push_back(static_cast<unsigned char>(text[i]));
      ++i;
    }
    return ids;
  }
  std::string tokenBytes(int32_t id) const override {
    if (id >= 0 && id < 256) return std::string(1, static_cast<char>(id));
    if (isSpecial(id)) return std::string(kByteSpecials[static_cast<size_t>(id - kByteEndOfText)]);
    return {};
  }
  bool isSpecial(int32_t id) const override {
    return id >= kByteEndOfText && id < static_cast<int32_t>(kByteVocabSize);
  }
  std::optional<int32_t> tokenId(std::string_view content) const override {
    if (content.size() == 1) return static_cast<unsigned char>(content[0]);
    for (size_t k = 0; k < kByteSpecials.size(); ++k) {
      if (content == kByteSpecials[k]) return kByteEndOfText + static_cast<int32_t>(k);
    }
    return std::nullopt;
  }
  size_t vocabSize() const override { return kByteVocabSize; }
};

}  // namespace

std::unique_ptr<Tokenizer> makeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

std::string IncrementalDecoder::push(int32_t id) {
  if (tokenizer_.isSpecial(id)) return {};
  pending_ += tokenizer_.tokenBytes(id);
  return utf8::takeValidPrefix(pending_, /*final=*/false);
}

std::string IncrementalDecoder::flush() { return utf8::takeValidPrefix(pending_, /*final=*/true); }

}  // namespace vsup::engine
