#include "engine/tokenizer.h"

#include "engine/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace vsup::engine {
namespace {

using nlohmann::json;

using namespace utf8;  // shared with the byte tokenizer and the incremental decoder

// ---------------------------------------------------------------------------------------------
// GPT-2's bytes_to_unicode: byte-level BPE works on a string of printable characters, one per
// byte; printable bytes stand for themselves and the others are shifted to U+0100 and up.

struct ByteLevelAlphabet {
  std::array<std::string, 256> charOf;  // UTF-8 of the character standing for each byte
  std::array<int16_t, 324> byteOf;      // code point (< 324) -> byte, -1 for none
};

const ByteLevelAlphabet& byteLevelAlphabet() {
  static const ByteLevelAlphabet alphabet = [] {
    ByteLevelAlphabet a;
    a.byteOf.fill(-1);
    char32_t shifted = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : shifted++;
      appendUtf8(a.charOf[static_cast<size_t>(b)], cp);
      a.byteOf[cp] = static_cast<int16_t>(b);
    }
    return a;
  }();
  return alphabet;
}

std::string toByteLevel(std::string_view raw) {
  const ByteLevelAlphabet& a = byteLevelAlphabet();
  std::string out;
  out.reserve(raw.size() * 2);
  for (char c : raw) out += a.charOf[static_cast<unsigned char>(c)];
  return out;
}

// The bytes a vocab token stands for, as HF's ByteLevel decoder computes them: every character
// mapped back to its byte, or the token's own UTF-8 if any character is outside the alphabet.
std::string fromByteLevel(std::string_view token) {
  const ByteLevelAlphabet& a = byteLevelAlphabet();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    const Utf8Step step = utf8Step(token, i);
    if (step.kind != Utf8Kind::Valid) return std::string(token);
    const char32_t cp = decodeChar(token, i, step.length);
    if (cp >= a.byteOf.size() || a.byteOf[cp] < 0) return std::string(token);
    out += static_cast<char>(a.byteOf[cp]);
    i += step.length;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// PCRE2

// Per-thread match state: a match data block and a JIT stack larger than the 32 KiB default, so
// that long runs (a megabyte of spaces) match instead of failing with JITSTACKLIMIT.
struct PcreScratch {
  pcre2_match_data* data = pcre2_match_data_create(16, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  PcreScratch() {
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~PcreScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  PcreScratch(const PcreScratch&) = delete;
  PcreScratch& operator=(const PcreScratch&) = delete;
};

PcreScratch& pcreScratch() {
  thread_local PcreScratch scratch;
  return scratch;
}

struct PcreCodeFree {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
using PcreCode = std::unique_ptr<pcre2_code, PcreCodeFree>;

// A compiled pattern. Immutable after construction; matching uses per-thread scratch.
class Regex {
 public:
  // `where` prefixes error messages ("tokenizer.json: pre_tokenizer.pretokenizers[0]").
  Regex(std::string_view pattern, const std::string& where)
      // With PCRE2_UCP, \s, \d, \w and POSIX classes follow Unicode properties, as in the
      // Oniguruma regexes HF runs (\s includes U+0085 and U+00A0 in both).
      : strict_(compile(pattern, PCRE2_UTF | PCRE2_UCP, where)),
        tolerant_(compile(pattern, PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, where)) {}

  // Calls onSegment(start, end, isMatch) for consecutive segments that cover `subject`: the
  // matches and the gaps between them, as HF's Pattern::find_matches. `validUtf8` says that the
  // subject was checked; otherwise invalid bytes never match and end up in the gaps, so no byte
  // is ever lost. A match that fails (resource limits) leaves the rest as one gap.
  template <class OnSegment>
  void segments(std::string_view subject, bool validUtf8, OnSegment&& onSegment) const {
    const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
    const size_t n = subject.size();
    pcre2_code* code = validUtf8 ? strict_.get() : tolerant_.get();
    const uint32_t options = validUtf8 ? PCRE2_NO_UTF_CHECK : 0;
    PcreScratch& scratch = pcreScratch();
    size_t done = 0;  // end of the last segment emitted
    size_t from = 0;  // where the next search starts
    bool matched = false;
    while (from <= n) {
      int rc = pcre2_match(code, data, n, from, options, scratch.data, scratch.context);
      if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) {
        // The JIT stack ran out (or another limit): the interpreter keeps its frames on the heap.
        rc =
            pcre2_match(code, data, n, from, options | PCRE2_NO_JIT, scratch.data, scratch.context);
      }
      if (rc < 0) break;
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
      // \K can report a start before `from` or an end before the start: clamp, never go back.
      const size_t start = std::clamp<size_t>(ovector[0], done, n);
      const size_t end = std::clamp<size_t>(ovector[1], start, n);
      if (start == end && matched && start == done) {
        // An empty match right after the previous match is skipped and the search moves one
        // character on, as the onig crate's find_iter does (and so never loops).
        if (start >= n) break;
        from = start + utf8Step(subject, start).length;
        continue;
      }
      if (start > done) onSegment(done, start, false);
      onSegment(start, end, true);
      done = end;
      from = end;
      matched = true;
    }
    if (done < n) onSegment(done, n, false);
  }

 private:
  static PcreCode compile(std::string_view pattern, uint32_t options, const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    PcreCode code(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                options, &error, &offset, nullptr));
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      throw std::runtime_error(
          where + ": regex \"" + std::string(pattern) +
          "\" does not compile: " + reinterpret_cast<const char*>(message.data()) + " (at offset " +
          std::to_string(offset) + ")");
    }
    // JIT is an optimization only: without it (no JIT support) the interpreter runs.
    pcre2_jit_compile(code.get(), PCRE2_JIT_COMPLETE);
    return code;
  }

  PcreCode strict_;
  PcreCode tolerant_;
};


// ---------------------------------------------------------------------------------------------
// tokenizer.json

// Ids beyond this are taken for a corrupt file rather than allocated for.
constexpr int64_t kMaxTokenId = int64_t{1} << 24;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// Reads a tokenizer.json, attaching the file name to every complaint.
class JsonReader {
 public:
  explicit JsonReader(const std::string& path) : path_(path) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(path_ + ": " + what);
  }
  const std::string& path() const { return path_; }

  // The member `key` of `object`, or nullptr if it is absent or null.
  static const json* member(const json& object, const char* key) {
    if (!object.is_object()) return nullptr;
    const auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json* value, const std::string& name) const {
    if (value == nullptr || !value->is_object()) fail(name + " must be an object");
    return *value;
  }
  const json& array(const json* value, const std::string& name) const {
    if (value == nullptr || !value->is_array()) fail(name + " must be an array");
    return *value;
  }
  std::string string(const json* value, const std::string& name) const {
    if (value == nullptr || !value->is_string()) fail(name + " must be a string");
    return value->get<std::string>();
  }
  bool boolean(const json* value, const std::string& name, bool fallback) const {
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) fail(name + " must be true or false");
    return value->get<bool>();
  }
  static std::optional<int32_t> asTokenId(const json& value) {
    if (!value.is_number_integer()) return std::nullopt;
    const auto id = value.get<int64_t>();
    if (id < 0 || id >= kMaxTokenId) return std::nullopt;
    return static_cast<int32_t>(id);
  }
  int32_t tokenIdValue(const json& value, const std::string& name) const {
    if (const auto id = asTokenId(value)) return *id;
    fail(name + " must be a token id (an integer from 0 to " + std::to_string(kMaxTokenId - 1) +
         "), not " + value.dump());
  }
  std::string type(const json& component, const std::string& name) const {
    return string(member(component, "type"), name + ".type");
  }

 private:
  std::string path_;
};

std::string jsonQuoted(std::string_view s) { return json(std::string(s)).dump(); }

// ---------------------------------------------------------------------------------------------
// Added tokens: matched literally in the input before anything else, leftmost-longest, as HF's
// aho-corasick matcher does.

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool singleWord = false;
  bool lstrip = false;
  bool rstrip = false;
};

class AddedTokenMatcher {
 public:
  void add(const AddedToken& token) {
    if (nodes_.empty()) nodes_.emplace_back();
    size_t node = 0;
    for (char c : token.content) {
      const auto byte = static_cast<unsigned char>(c);
      auto& edges = nodes_[node].edges;
      auto it = std::lower_bound(edges.begin(), edges.end(), byte,
                                 [](const Edge& e, unsigned char b) { return e.byte < b; });
      if (it != edges.end() && it->byte == byte) {
        node = it->child;
        continue;
      }
      const auto child = static_cast<uint32_t>(nodes_.size());
      edges.insert(it, Edge{byte, child});
      nodes_.emplace_back();  // may move the nodes: `edges` is not used after this
      node = child;
    }
    nodes_[node].token = static_cast<int32_t>(tokens_.size());
    tokens_.push_back(token);
    canStart_[static_cast<unsigned char>(token.content[0])] = true;
    needsWordRegex_ = needsWordRegex_ || token.singleWord;
  }
  bool needsWordRegex() const { return needsWordRegex_; }

  // Splits `text` into gaps (onText) and added tokens (onToken), in order, per HF's
  // AddedVocabulary::find_matches. `word` tells whether a character is a word character, for
  // single_word tokens.
  template <class OnText, class OnToken, class IsWord>
  void split(std::string_view text, OnText&& onText, OnToken&& onToken, IsWord&& word) const {
    if (tokens_.empty()) {
      if (!text.empty()) onText(text);
      return;
    }
    size_t done = 0;
    size_t i = 0;
    while (i < text.size()) {
      if (!canStart_[static_cast<unsigned char>(text[i])]) {
        ++i;
        continue;
      }
      const auto [token, length] = longestAt(text, i);
      if (token == nullptr) {
        ++i;
        continue;
      }
      size_t start = i;
      size_t stop = i + length;
      i = stop;
      if (token->singleWord) {
        const bool wordBefore = start > 0 && word(text.substr(0, start), /*atEnd=*/true);
        const bool wordAfter = stop < text.size() && word(text.substr(stop), /*atEnd=*/false);
        if (wordBefore || wordAfter) continue;
      }
      if (token->lstrip) {
        while (start > done) {
          const size_t prev = previousCharStart(text, start);
          const Utf8Step step = utf8Step(text, prev);
          if (step.kind != Utf8Kind::Valid || !isWhiteSpace(decodeChar(text, prev, step.length))) {
            break;
          }
          start = prev;
        }
      }
      if (token->rstrip) {
        while (stop < text.size()) {
          const Utf8Step step = utf8Step(text, stop);
          if (step.kind != Utf8Kind::Valid || !isWhiteSpace(decodeChar(text, stop, step.length))) {
            break;
          }
          stop += step.length;
        }
        i = stop;
      }
      if (start > done) onText(text.substr(done, start - done));
      onToken(*token);
      done = stop;
    }
    if (done < text.size()) onText(text.substr(done));
  }

 private:
  struct Edge {
    unsigned char byte;
    uint32_t child;
  };
  struct Node {
    std::vector<Edge> edges;  // sorted by byte
    int32_t token = -1;       // index into tokens_ of the token ending here
  };

  std::pair<const AddedToken*, size_t> longestAt(std::string_view text, size_t i) const {
    const AddedToken* best = nullptr;
    size_t bestLength = 0;
    size_t node = 0;
    for (size_t k = i; k < text.size(); ++k) {
      const auto byte = static_cast<unsigned char>(text[k]);
      const auto& edges = nodes_[node].edges;
      const auto it = std::lower_bound(edges.begin(), edges.end(), byte,
                                       [](const Edge& e, unsigned char b) { return e.byte < b; });
      if (it == edges.end() || it->byte != byte) break;
      node = it->child;
      if (nodes_[node].token >= 0) {
        best = &tokens_[static_cast<size_t>(nodes_[node].token)];
        bestLength = k + 1 - i;
      }
    }
    return {best, bestLength};
  }

  std::vector<Node> nodes_;
  std::vector<AddedToken> tokens_;
  std::array<bool, 256> canStart_{};
  bool needsWordRegex_ = false;
};

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer steps

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Turns the (start, end, isMatch) segments of a split into pieces per an HF split behavior
// (normalizer.rs, NormalizedString::split), streaming: at most one piece is held back.
template <class Emit>
class SegmentMerger {
 public:
  SegmentMerger(SplitBehavior behavior, bool invert, Emit& emit)
      : behavior_(behavior), invert_(invert), emit_(emit) {}

  void add(size_t start, size_t end, bool isMatch) {
    if (invert_) isMatch = !isMatch;
    switch (behavior_) {
      case SplitBehavior::Isolated:
        emit_(start, end);
        return;
      case SplitBehavior::Removed:
        if (!isMatch) emit_(start, end);
        return;
      case SplitBehavior::Contiguous:
        if (held_ && isMatch == previousMatch_) {
          heldEnd_ = end;
        } else {
          hold(start, end);
        }
        break;
      case SplitBehavior::MergedWithPrevious:
        if (held_ && isMatch && !previousMatch_) {
          heldEnd_ = end;
        } else {
          hold(start, end);
        }
        break;
      case SplitBehavior::MergedWithNext:
        if (held_ && previousMatch_ && !isMatch) {
          heldEnd_ = end;  // the held match joins this gap
          flushHeld();
        } else {
          hold(start, end);
        }
        break;
    }
    previousMatch_ = isMatch;
  }
  void finish() { flushHeld(); }

 private:
  void hold(size_t start, size_t end) {
    flushHeld();
    held_ = true;
    heldStart_ = start;
    heldEnd_ = end;
  }
  void flushHeld() {
    if (held_) emit_(heldStart_, heldEnd_);
    held_ = false;
  }

  SplitBehavior behavior_;
  bool invert_;
  Emit& emit_;
  bool held_ = false;
  bool previousMatch_ = false;
  size_t heldStart_ = 0;
  size_t heldEnd_ = 0;
};

struct PreTokenizerStep {
  bool byteLevel = false;  // ByteLevel: prefix space, its regex; later steps see the mapped form
  bool addPrefixSpace = false;
  std::unique_ptr<Regex> regex;  // null: no splitting (ByteLevel with use_regex false)
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool onByteLevelForm = false;  // after the ByteLevel step: the regex sees the mapped characters
};

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// What the post-processor adds around the encoded sequence (with addSpecial).
struct TemplatePiece {
  bool isSequence = false;       // the encoded text itself
  std::vector<int32_t> special;  // otherwise: these ids
};

// ---------------------------------------------------------------------------------------------
// The Hugging Face byte-level BPE tokenizer

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const std::string& path, const json& root) : reader_(path) {
    if (!root.is_object()) reader_.fail("the top level must be a JSON object");
    loadModel(root);
    loadAddedTokens(root);
    loadNormalizer(root);
    loadPreTokenizer(root);
    loadPostProcessor(root);
    loadDecoder(root);
    finishTables();
  }

  std::vector<int32_t> encode(std::string_view text, bool addSpecial) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 8);
    // Cuts made below (added tokens, regex matches, a prefix space) fall on character
    // boundaries, so every piece of valid text is valid: check once, match unchecked.
    const bool valid = isValidUtf8(text);
    const auto encodeText = [&](std::string_view segment) {
      const auto bpe = [&](std::string_view piece) { encodePiece(piece, ids); };
      preTokenize(0, segment, valid, bpe);
    };
    const auto pushToken = [&](const AddedToken& token) { ids.push_back(token.id); };
    const auto isWord = [&](std::string_view s, bool atEnd) { return isWordChar(s, atEnd); };
    // HF matches tokens with normalized=false on the raw text first, then the others on the
    // normalized gaps; with no normalizer the second pass still only sees the gaps.
    rawAddedTokens_.split(
        text,
        [&](std::string_view gap) {
          normalizedAddedTokens_.split(gap, encodeText, pushToken, isWord);
        },
        pushToken, isWord);
    if (addSpecial && !postProcessor_.empty()) {
      std::vector<int32_t> wrapped;
      for (const std::vector<TemplatePiece>& pieces : postProcessor_) {
        wrapped.clear();
        for (const TemplatePiece& piece : pieces) {
          const std::vector<int32_t>& add = piece.isSequence ? ids : piece.special;
          wrapped.insert(wrapped.end(), add.begin(), add.end());
        }
        ids.swap(wrapped);
      }
    }
    return ids;
  }

  std::string tokenBytes(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= tokenBytes_.size()) return {};
    return tokenBytes_[static_cast<size_t>(id)];
  }
  bool isSpecial(int32_t id) const override {
    return id >= 0 && static_cast<size_t>(id) < special_.size() &&
           special_[static_cast<size_t>(id)] != 0;
  }
  std::optional<int32_t> tokenId(std::string_view content) const override {
    if (const auto it = addedIds_.find(content); it != addedIds_.end()) return it->second;
    if (const auto it = vocab_.find(content); it != vocab_.end()) return it->second;
    return std::nullopt;
  }
  size_t vocabSize() const override { return tokenBytes_.size(); }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  static uint64_t pairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  const Merge* findMerge(int32_t left, int32_t right) const {
    const auto it = merges_.find(pairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }

  // --- loading -------------------------------------------------------------------------------

  void loadModel(const json& root) {
    const json& model = reader_.object(JsonReader::member(root, "model"), "model");
    // Old files have no model.type; HF then infers BPE from the presence of merges.
    const json* typeField = JsonReader::member(model, "type");
    const std::string type = typeField != nullptr ? reader_.string(typeField, "model.type")
                             : JsonReader::member(model, "merges") != nullptr ? "BPE"
                                                                              : "(none)";
    if (type != "BPE") {
      reader_.fail("model.type " + jsonQuoted(type) + " is not supported (BPE only)");
    }
    if (const json* dropout = JsonReader::member(model, "dropout");
        dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
      reader_.fail("model.dropout " + dropout->dump() + " is not supported (null only)");
    }
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const json* value = JsonReader::member(model, affix);
          value != nullptr && !(value->is_string() && value->get<std::string>().empty())) {
        reader_.fail(std::string("model.") + affix + " " + value->dump() +
                     " is not supported (byte-level BPE uses none)");
      }
    }
    ignoreMerges_ =
        reader_.boolean(JsonReader::member(model, "ignore_merges"), "model.ignore_merges", false);
    fuseUnk_ = reader_.boolean(JsonReader::member(model, "fuse_unk"), "model.fuse_unk", false);
    // byte_fallback only matters for characters outside the vocab: finishTables checks that
    // every byte of the byte-level alphabet has a token (or that unk_token stands in).
    reader_.boolean(JsonReader::member(model, "byte_fallback"), "model.byte_fallback", false);

    const json& vocab = reader_.object(JsonReader::member(model, "vocab"), "model.vocab");
    vocab_.reserve(vocab.size());
    for (const auto& [token, idValue] : vocab.items()) {
      // The error's name is built only on failure: vocabs have 100k+ entries.
      const auto id = JsonReader::asTokenId(idValue);
      if (!id) reader_.tokenIdValue(idValue, "model.vocab[" + jsonQuoted(token) + "]");
      vocab_.emplace(token, *id);
      maxId_ = std::max(maxId_, *id);
    }
    if (const json* unk = JsonReader::member(model, "unk_token")) {
      const std::string unkToken = reader_.string(unk, "model.unk_token");
      if (const auto it = vocab_.find(unkToken); it != vocab_.end()) unkId_ = it->second;
    }

    const json* merges = JsonReader::member(model, "merges");
    if (merges == nullptr) return;
    reader_.array(merges, "model.merges");
    merges_.reserve(merges->size());
    for (size_t rank = 0; rank < merges->size(); ++rank) {
      const json& entry = (*merges)[rank];
      const auto name = [rank] { return "model.merges[" + std::to_string(rank) + "]"; };
      std::string left;
      std::string right;
      if (entry.is_string()) {
        // The older form, "a b": byte-level tokens never contain a space (it is "Ġ").
        const std::string& line = entry.get_ref<const std::string&>();
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          reader_.fail(name() + " " + jsonQuoted(line) +
                       " is not two tokens separated by one space");
        }
        left = line.substr(0, space);
        right = line.substr(space + 1);
      } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() &&
                 entry[1].is_string()) {
        left = entry[0].get<std::string>();
        right = entry[1].get<std::string>();
      } else {
        reader_.fail(name() + " must be \"a b\" or [\"a\", \"b\"], not " + entry.dump());
      }
      const auto idOf = [&](const std::string& token, const char* role) {
        const auto it = vocab_.find(token);
        if (it == vocab_.end()) {
          reader_.fail(name() + " (" + jsonQuoted(left + " " + right) + "): " + role + " " +
                       jsonQuoted(token) + " is not in model.vocab");
        }
        return it->second;
      };
      const int32_t leftId = idOf(left, "token");
      const int32_t rightId = idOf(right, "token");
      const int32_t result = idOf(left + right, "the merged token");
      // A repeated pair takes its last rank, as HF's HashMap collect does.
      merges_.insert_or_assign(pairKey(leftId, rightId), Merge{static_cast<int32_t>(rank), result});
    }
  }

  void loadAddedTokens(const json& root) {
    const json* added = JsonReader::member(root, "added_tokens");
    if (added == nullptr) return;
    reader_.array(added, "added_tokens");
    for (size_t i = 0; i < added->size(); ++i) {
      const json& entry = (*added)[i];
      const std::string name = "added_tokens[" + std::to_string(i) + "]";
      reader_.object(&entry, name);
      AddedToken token;
      const json* idField = JsonReader::member(entry, "id");
      if (idField == nullptr) reader_.fail(name + ".id is missing");
      token.id = reader_.tokenIdValue(*idField, name + ".id");
      token.content = reader_.string(JsonReader::member(entry, "content"), name + ".content");
      if (token.content.empty()) reader_.fail(name + ".content is empty");
      // Like HF, a content seen before keeps its id, and one in the vocab takes the vocab's id
      // whatever the file says (consistent files never differ).
      if (const auto it = addedIds_.find(token.content); it != addedIds_.end()) {
        token.id = it->second;
      } else if (const auto v = vocab_.find(token.content); v != vocab_.end()) {
        token.id = v->second;
      }
      token.special =
          reader_.boolean(JsonReader::member(entry, "special"), name + ".special", false);
      token.singleWord =
          reader_.boolean(JsonReader::member(entry, "single_word"), name + ".single_word", false);
      token.lstrip = reader_.boolean(JsonReader::member(entry, "lstrip"), name + ".lstrip", false);
      token.rstrip = reader_.boolean(JsonReader::member(entry, "rstrip"), name + ".rstrip", false);
      // HF's default: special tokens match the raw text, others the normalized text.
      const bool normalized = reader_.boolean(JsonReader::member(entry, "normalized"),
                                              name + ".normalized", !token.special);
      (normalized ? normalizedAddedTokens_ : rawAddedTokens_).add(token);
      addedIds_.insert_or_assign(token.content, token.id);
      added_.push_back(token);
      maxId_ = std::max(maxId_, token.id);
    }
  }

  void loadNormalizer(const json& root) {
    const json* normalizer = JsonReader::member(root, "normalizer");
    if (normalizer == nullptr) return;
    const std::string type = reader_.type(*normalizer, "normalizer");
    // An empty Sequence changes nothing.
    if (type == "Sequence") {
      const json* list = JsonReader::member(*normalizer, "normalizers");
      if (list != nullptr && list->is_array() && list->empty()) return;
    }
    reader_.fail("normalizer type " + jsonQuoted(type) + " is not supported (only null)");
  }

  void loadPreTokenizer(const json& root) {
    const json* pre = JsonReader::member(root, "pre_tokenizer");
    if (pre == nullptr) {
      reader_.fail(
          "pre_tokenizer is null: only byte-level BPE (with a ByteLevel pre_tokenizer) "
          "is supported");
    }
    addPreTokenizer(*pre, "pre_tokenizer");
    if (!haveByteLevel_) {
      reader_.fail("pre_tokenizer has no ByteLevel step: only byte-level BPE is supported");
    }
  }

  void addPreTokenizer(const json& config, const std::string& name) {
    const std::string type = reader_.type(config, name);
    const std::string where = reader_.path() + ": " + name;
    PreTokenizerStep step;
    step.onByteLevelForm = haveByteLevel_;
    if (type == "Sequence") {
      const json& list =
          reader_.array(JsonReader::member(config, "pretokenizers"), name + ".pretokenizers");
      for (size_t i = 0; i < list.size(); ++i) {
        addPreTokenizer(list[i], name + ".pretokenizers[" + std::to_string(i) + "]");
      }
      return;
    }
    if (type == "ByteLevel") {
      if (haveByteLevel_) reader_.fail(name + ": a second ByteLevel step is not supported");
      step.byteLevel = true;
      step.onByteLevelForm = false;
      step.addPrefixSpace = reader_.boolean(JsonReader::member(config, "add_prefix_space"),
                                            name + ".add_prefix_space", true);
      if (reader_.boolean(JsonReader::member(config, "use_regex"), name + ".use_regex", true)) {
        step.regex = std::make_unique<Regex>(kGpt2Pattern, where);
      }
      haveByteLevel_ = true;
    } else if (type == "Split") {
      const json& pattern =
          reader_.object(JsonReader::member(config, "pattern"), name + ".pattern");
      if (const json* regex = JsonReader::member(pattern, "Regex")) {
        step.regex = std::make_unique<Regex>(reader_.string(regex, name + ".pattern.Regex"), where);
      } else if (const json* literal = JsonReader::member(pattern, "String")) {
        const std::string text = reader_.string(literal, name + ".pattern.String");
        if (text.empty()) return;  // HF: an empty string pattern never splits
        // Escape every ASCII punctuation character; letters, digits and non-ASCII stand as is.
        std::string quotedPattern;
        for (char c : text) {
          const auto b = static_cast<unsigned char>(c);
          if (b < 0x80 && !std::isalnum(b)) quotedPattern += '\\';
          quotedPattern += c;
        }
        step.regex = std::make_unique<Regex>(quotedPattern, where);
      } else {
        reader_.fail(name + ".pattern must be {\"Regex\": ...} or {\"String\": ...}");
      }
      step.behavior = behavior(JsonReader::member(config, "behavior"), name + ".behavior");
      step.invert = reader_.boolean(JsonReader::member(config, "invert"), name + ".invert", false);
    } else if (type == "Digits") {
      // HF splits on char::is_numeric, which is \p{N}: each digit alone, or runs of them.
      const bool individual = reader_.boolean(JsonReader::member(config, "individual_digits"),
                                              name + ".individual_digits", false);
      step.regex = std::make_unique<Regex>(individual ? R"(\p{N})" : R"(\p{N}+)", where);
    } else if (type == "Punctuation") {
      // HF: char::is_ascii_punctuation || Unicode punctuation (P*).
      step.regex = std::make_unique<Regex>(R"([\p{P}$+<=>^`|~])", where);
      step.behavior = behavior(JsonReader::member(config, "behavior"), name + ".behavior");
    } else {
      reader_.fail(name + " type " + jsonQuoted(type) +
                   " is not supported (ByteLevel, Split, Digits, Punctuation or a Sequence of "
                   "them)");
    }
    preTokenizer_.push_back(std::move(step));
  }

  SplitBehavior behavior(const json* value, const std::string& name) const {
    if (value == nullptr) return SplitBehavior::Isolated;
    const std::string b = reader_.string(value, name);
    if (b == "Removed") return SplitBehavior::Removed;
    if (b == "Isolated") return SplitBehavior::Isolated;
    if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
    if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
    if (b == "Contiguous") return SplitBehavior::Contiguous;
    reader_.fail(name + " " + jsonQuoted(b) + " is not a split behavior");
  }

  void loadPostProcessor(const json& root) {
    const json* post = JsonReader::member(root, "post_processor");
    if (post != nullptr) addPostProcessor(*post, "post_processor");
  }

  // Ids of a post-processor's special token given by content.
  int32_t specialIdOf(const std::string& content, const std::string& name) const {
    if (const auto id = tokenId(content)) return *id;
    reader_.fail(name + ": " + jsonQuoted(content) + " is not a token");
  }

  void addPostProcessor(const json& config, const std::string& name) {
    const std::string type = reader_.type(config, name);
    if (type == "ByteLevel") return;  // it only adjusts offsets, which we do not report
    if (type == "Sequence") {
      const json& list =
          reader_.array(JsonReader::member(config, "processors"), name + ".processors");
      for (size_t i = 0; i < list.size(); ++i) {
        addPostProcessor(list[i], name + ".processors[" + std::to_string(i) + "]");
      }
      return;
    }
    std::vector<TemplatePiece> pieces;
    if (type == "TemplateProcessing") {
      const json& single = reader_.array(JsonReader::member(config, "single"), name + ".single");
      const json* specials = JsonReader::member(config, "special_tokens");
      for (size_t i = 0; i < single.size(); ++i) {
        const std::string pieceName = name + ".single[" + std::to_string(i) + "]";
        pieces.push_back(templatePiece(single[i], specials, pieceName));
      }
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
      // single = cls $A sep, each given as [content, id].
      const auto idOf = [&](const char* key) {
        const json* pair = JsonReader::member(config, key);
        const std::string pairName = name + "." + key;
        if (pair == nullptr || !pair->is_array() || pair->size() != 2) {
          reader_.fail(pairName + " must be [token, id]");
        }
        return reader_.tokenIdValue((*pair)[1], pairName + "[1]");
      };
      TemplatePiece cls;
      cls.special = {idOf("cls")};
      TemplatePiece sequence;
      sequence.isSequence = true;
      TemplatePiece sep;
      sep.special = {idOf("sep")};
      pieces = {cls, sequence, sep};
    } else {
      reader_.fail(name + " type " + jsonQuoted(type) +
                   " is not supported (TemplateProcessing, RobertaProcessing, BertProcessing, "
                   "ByteLevel or a Sequence of them)");
    }
    for (const TemplatePiece& piece : pieces) {
      for (int32_t id : piece.special) maxId_ = std::max(maxId_, id);
    }
    postProcessor_.push_back(std::move(pieces));
  }

  TemplatePiece templatePiece(const json& piece, const json* specials,
                              const std::string& name) const {
    TemplatePiece out;
    std::string sequenceId;
    std::string specialName;
    if (piece.is_string()) {
      // The string form: "$A", "$B", "$0" (with an optional ":type_id") or a special token.
      std::string text = piece.get<std::string>();
      if (const size_t colon = text.rfind(':'); colon != std::string::npos && colon > 0) {
        text.resize(colon);
      }
      if (text.starts_with("$")) {
        sequenceId = text.size() == 1 ? "A" : text.substr(1);
      } else {
        specialName = text;
      }
    } else if (const json* sequence = JsonReader::member(piece, "Sequence")) {
      sequenceId = reader_.string(JsonReader::member(*sequence, "id"), name + ".Sequence.id");
    } else if (const json* special = JsonReader::member(piece, "SpecialToken")) {
      specialName = reader_.string(JsonReader::member(*special, "id"), name + ".SpecialToken.id");
    } else {
      reader_.fail(name + " must be {\"Sequence\": ...} or {\"SpecialToken\": ...}, not " +
                   piece.dump());
    }
    if (!specialName.empty()) {
      const json* entry =
          specials != nullptr ? JsonReader::member(*specials, specialName.c_str()) : nullptr;
      if (entry == nullptr) {
        // Hand-written templates may name a token without a special_tokens entry.
        out.special = {specialIdOf(specialName, name)};
      } else {
        const json& ids = reader_.array(JsonReader::member(*entry, "ids"),
                                        name + " (special_tokens." + specialName + ".ids)");
        for (const json& id : ids) out.special.push_back(reader_.tokenIdValue(id, name));
      }
      return out;
    }
    if (sequenceId != "A" && sequenceId != "0") {
      reader_.fail(name + " refers to sequence " + jsonQuoted(sequenceId) +
                   " (a single sequence has only A)");
    }
    out.isSequence = true;
    return out;
  }

  void loadDecoder(const json& root) {
    const json* decoder = JsonReader::member(root, "decoder");
    if (decoder == nullptr) reader_.fail("decoder is null: only ByteLevel is supported");
    checkDecoder(*decoder, "decoder");
  }

  void checkDecoder(const json& config, const std::string& name) {
    const std::string type = reader_.type(config, name);
    if (type == "ByteLevel") return;
    if (type == "Sequence") {
      const json& list = reader_.array(JsonReader::member(config, "decoders"), name + ".decoders");
      for (size_t i = 0; i < list.size(); ++i) {
        checkDecoder(list[i], name + ".decoders[" + std::to_string(i) + "]");
      }
      return;
    }
    reader_.fail(name + " type " + jsonQuoted(type) + " is not supported (ByteLevel only)");
  }

  void finishTables() {
    const auto size = static_cast<size_t>(maxId_) + 1;
    tokenBytes_.assign(size, std::string());
    special_.assign(size, 0);
    for (const auto& [token, id] : vocab_)
      tokenBytes_[static_cast<size_t>(id)] = fromByteLevel(token);
    // An added token stands for its content, as matched in the input, so decoding it gives back
    // exactly the text it came from.
    for (const AddedToken& token : added_) {
      tokenBytes_[static_cast<size_t>(token.id)] = token.content;
      special_[static_cast<size_t>(token.id)] = token.special ? 1 : 0;
    }
    const ByteLevelAlphabet& alphabet = byteLevelAlphabet();
    for (size_t b = 0; b < 256; ++b) {
      const auto it = vocab_.find(alphabet.charOf[b]);
      if (it != vocab_.end()) {
        byteIds_[b] = it->second;
      } else if (unkId_ >= 0) {
        byteIds_[b] = unkId_;
        byteIsUnk_[b] = true;
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(b));
        reader_.fail(std::string("model.vocab has no token for byte ") + hex + " (" +
                     jsonQuoted(alphabet.charOf[b]) +
                     ") and there is no model.unk_token: such input could not be encoded");
      }
    }
    if (ignoreMerges_) {
      rawVocab_.reserve(vocab_.size());
      for (const auto& [token, id] : vocab_) rawVocab_.emplace(fromByteLevel(token), id);
    }
    if (rawAddedTokens_.needsWordRegex() || normalizedAddedTokens_.needsWordRegex()) {
      // Rust's Unicode \w (HF matches single_word with it); PCRE2's \w is only \p{L}|\p{N}|_.
      wordChar_ = std::make_unique<Regex>(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])",
                                          reader_.path() + ": added_tokens");
    }
  }

  // --- encoding ------------------------------------------------------------------------------

  // Runs pre-tokenizer steps [step, end) on `piece` (raw bytes), calling sink(piece) for each
  // resulting pre-token.
  template <class Sink>
  void preTokenize(size_t step, std::string_view piece, bool valid, Sink& sink) const {
    if (piece.empty()) return;
    if (step == preTokenizer_.size()) {
      sink(piece);
      return;
    }
    const PreTokenizerStep& s = preTokenizer_[step];
    std::string prefixed;
    if (s.byteLevel && s.addPrefixSpace && piece[0] != ' ') {
      prefixed.reserve(piece.size() + 1);
      prefixed += ' ';
      prefixed += piece;
      piece = prefixed;
    }
    if (s.regex == nullptr) {
      preTokenize(step + 1, piece, valid, sink);
      return;
    }
    if (!s.onByteLevelForm) {
      const auto emit = [&](size_t start, size_t end) {
        preTokenize(step + 1, piece.substr(start, end - start), valid, sink);
      };
      SegmentMerger merger(s.behavior, s.invert, emit);
      s.regex->segments(piece, valid, [&](size_t start, size_t end, bool isMatch) {
        merger.add(start, end, isMatch);
      });
      merger.finish();
      return;
    }
    // After ByteLevel the regex sees one character per byte: match on that form and map the
    // cuts back to byte offsets (rawOffset[k] is the byte at mapped offset k).
    const std::string mapped = toByteLevel(piece);
    std::vector<uint32_t> rawOffset(mapped.size() + 1, 0);
    {
      const ByteLevelAlphabet& alphabet = byteLevelAlphabet();
      size_t k = 0;
      for (size_t i = 0; i < piece.size(); ++i) {
        rawOffset[k] = static_cast<uint32_t>(i);
        k += alphabet.charOf[static_cast<unsigned char>(piece[i])].size();
      }
      rawOffset[k] = static_cast<uint32_t>(piece.size());
    }
    const auto emit = [&](size_t start, size_t end) {
      const size_t rawStart = rawOffset[start];
      preTokenize(step + 1, piece.substr(rawStart, rawOffset[end] - rawStart), valid, sink);
    };
    SegmentMerger merger(s.behavior, s.invert, emit);
    s.regex->segments(mapped, /*validUtf8=*/true, [&](size_t start, size_t end, bool isMatch) {
      merger.add(start, end, isMatch);
    });
    merger.finish();
  }

  // BPE on one pre-token (raw bytes): start from one symbol per byte and apply the merge of
  // lowest rank (leftmost among equals) until none applies. A heap keeps this O(n log n) in the
  // pre-token's length.
  void encodePiece(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.size() == 1) {
      out.push_back(byteIds_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    if (ignoreMerges_) {
      if (const auto it = rawVocab_.find(piece); it != rawVocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Candidate {
      int32_t rank;
      int32_t pos;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    struct Scratch {
      std::vector<int32_t> id, prev, next;
      std::vector<Candidate> heap;
    };
    thread_local Scratch sc;
    sc.id.clear();
    sc.heap.clear();
    for (size_t i = 0; i < piece.size(); ++i) {
      const auto b = static_cast<unsigned char>(piece[i]);
      // Unknown bytes become unk; fuse_unk folds a run of them into one.
      if (byteIsUnk_[b] && fuseUnk_ && !sc.id.empty() && sc.id.back() == unkId_) continue;
      sc.id.push_back(byteIds_[b]);
    }
    const auto n = static_cast<int32_t>(sc.id.size());
    sc.prev.resize(sc.id.size());
    sc.next.resize(sc.id.size());
    for (int32_t i = 0; i < n; ++i) {
      sc.prev[static_cast<size_t>(i)] = i - 1;
      sc.next[static_cast<size_t>(i)] = i + 1 < n ? i + 1 : -1;
    }
    const auto push = [&](int32_t pos) {
      const auto p = static_cast<size_t>(pos);
      const int32_t right = sc.next[p];
      if (right < 0) return;
      if (const Merge* m = findMerge(sc.id[p], sc.id[static_cast<size_t>(right)])) {
        sc.heap.push_back({m->rank, pos});
        std::push_heap(sc.heap.begin(), sc.heap.end(), std::greater<>());
      }
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    constexpr int32_t kGone = -1;
    while (!sc.heap.empty()) {
      std::pop_heap(sc.heap.begin(), sc.heap.end(), std::greater<>());
      const Candidate c = sc.heap.back();
      sc.heap.pop_back();
      const auto p = static_cast<size_t>(c.pos);
      const int32_t right = sc.next[p];
      if (sc.id[p] == kGone || right < 0) continue;
      const auto r = static_cast<size_t>(right);
      // Stale entries (a neighbour merged since) no longer name this pair's rank.
      const Merge* m = findMerge(sc.id[p], sc.id[r]);
      if (m == nullptr || m->rank != c.rank) continue;
      sc.id[p] = m->result;
      sc.id[r] = kGone;
      sc.next[p] = sc.next[r];
      if (sc.next[r] >= 0) sc.prev[static_cast<size_t>(sc.next[r])] = c.pos;
      if (sc.prev[p] >= 0) push(sc.prev[p]);
      push(c.pos);
    }
    for (int32_t i = 0; i >= 0; i = sc.next[static_cast<size_t>(i)]) {
      out.push_back(sc.id[static_cast<size_t>(i)]);
    }
  }

  // Whether the character at the end (atEnd) or start of `s` is a word character (\w).
  bool isWordChar(std::string_view s, bool atEnd) const {
    if (s.empty() || wordChar_ == nullptr) return false;
    const size_t start = atEnd ? previousCharStart(s, s.size()) : 0;
    const Utf8Step step = utf8Step(s, start);
    if (step.kind != Utf8Kind::Valid) return false;
    bool word = false;
    wordChar_->segments(s.substr(start, step.length), true,
                        [&](size_t, size_t, bool isMatch) { word = word || isMatch; });
    return word;
  }

  JsonReader reader_;
  StringMap vocab_;                             // byte-level form ("Ġthe") -> id
  StringMap rawVocab_;                          // raw bytes (" the") -> id; only with ignore_merges
  std::unordered_map<uint64_t, Merge> merges_;  // pairKey(left, right) -> merge
  bool ignoreMerges_ = false;
  bool fuseUnk_ = false;
  int32_t unkId_ = -1;
  std::array<int32_t, 256> byteIds_{};  // the token of each single byte
  std::array<bool, 256> byteIsUnk_{};
  std::vector<AddedToken> added_;
  StringMap addedIds_;
  AddedTokenMatcher rawAddedTokens_;         // normalized=false: matched on the input
  AddedTokenMatcher normalizedAddedTokens_;  // normalized=true: matched on the gaps after that
  std::unique_ptr<Regex> wordChar_;          // for single_word added tokens
  std::vector<PreTokenizerStep> preTokenizer_;
  bool haveByteLevel_ = false;
  std::vector<std::vector<TemplatePiece>> postProcessor_;  // applied in order with addSpecial
  int32_t maxId_ = -1;
  std::vector<std::string> tokenBytes_;  // id -> bytes
  std::vector<uint8_t> special_;         // id -> special
};

}  // namespace

std::unique_ptr<Tokenizer> loadHfTokenizer(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(path + ": cannot read: " + std::strerror(errno));
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
  try {
    return std::make_unique<HfTokenizer>(path, root);
  } catch (const json::exception& e) {
    // A value of an unexpected type that the reader did not check by name.
    throw std::runtime_error(path + ": " + e.what());
  }
}

}  // namespace vsup::engine
