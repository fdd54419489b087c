#include "engine/tokenizer.h"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <thread>

namespace vsup::engine {
namespace {

using nlohmann::json;

// A temp dir for this test's fixtures, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "tokenizer_test.XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string write(const std::string& name, const std::string& content) const {
    const std::string file = (path_ / name).string();
    std::ofstream(file, std::ios::binary) << content;
    return file;
  }
  std::string path(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// GPT-2's bytes_to_unicode, written again here so that the test checks the implementation's.
std::string byteChar(unsigned char b) {
  const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  unsigned cp = b;
  if (!printable) {
    cp = 256;
    for (unsigned other = 0; other < b; ++other) {
      const bool p =
          (other >= '!' && other <= '~') || (other >= 0xA1 && other <= 0xAC) || other >= 0xAE;
      if (!p) ++cp;
    }
  }
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// The byte-level form of raw bytes: " the" -> "Ġthe".
std::string bl(std::string_view raw) {
  std::string out;
  for (char c : raw) out += byteChar(static_cast<unsigned char>(c));
  return out;
}

bool validUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    unsigned cp = 0;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      n = 1;
      cp = b & 0x1F;
    } else if ((b & 0xF0) == 0xE0) {
      n = 2;
      cp = b & 0x0F;
    } else if ((b & 0xF8) == 0xF0) {
      n = 3;
      cp = b & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    const unsigned minimum[] = {0, 0x80, 0x800, 0x10000};
    if (cp < minimum[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

std::string decodeAll(const Tokenizer& t, const std::vector<int32_t>& ids) {
  std::string out;
  for (int32_t id : ids) out += t.tokenBytes(id);
  return out;
}

std::string errorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(no exception)";
}

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// A GPT-2-style tokenizer.json: the 256 byte-level characters (id = byte), then one token per
// merge, in rank order, then the added tokens. The encodings expected below were worked out by
// hand; Hugging Face tokenizers 0.23 gives the same tokens for every one of them.
struct Fixture {
  std::vector<std::pair<std::string, std::string>> merges = {
      {"Ġ", "t"},    // 0
      {"h", "e"},    // 1
      {"Ġt", "he"},  // 2: " the" -> "Ġthe"
      {"i", "n"},    // 3
      {"Ġ", "a"},    // 4
      {"e", "r"},    // 5
      {"o", "w"},    // 6: "ow" outranks "lo", so "low" is lo|w greedily but l|ow by rank
      {"l", "o"},    // 7
      {"l", "ow"},   // 8
      {"a", "a"},    // 9
      {"3", "4"},    // 10
      {bl("\xF0"), bl("\x9F")},  // 11: the first half of 🙂 (F0 9F 99 82)
      {bl("\x99"), bl("\x82")},  // 12: its second half
      {"(", "t"},                // 13
      {"a", "-"},                // 14
      {"-", "b"},                // 15
  };
  std::vector<std::string> extraVocab;  // tokens with no merge producing them
  bool mergesAsArrays = false;
  bool ignoreMerges = false;
  json preTokenizer = {{"type", "ByteLevel"},
                       {"add_prefix_space", false},
                       {"trim_offsets", true},
                       {"use_regex", true}};
  json postProcessor = {{"type", "ByteLevel"},
                        {"add_prefix_space", true},
                        {"trim_offsets", false},
                        {"use_regex", true}};
  json normalizer = nullptr;
  std::string modelType = "BPE";
  std::vector<std::string> addedSpecial = {"<|endoftext|>", "<|im_start|>"};

  int32_t firstAddedId() const {
    return static_cast<int32_t>(256 + merges.size() + extraVocab.size());
  }

  json build() const {
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[byteChar(static_cast<unsigned char>(b))] = b;
    int32_t next = 256;
    json mergeList = json::array();
    for (const auto& [a, b] : merges) {
      vocab[a + b] = next++;
      if (mergesAsArrays) {
        mergeList.push_back(json::array({a, b}));
      } else {
        mergeList.push_back(a + " " + b);
      }
    }
    for (const std::string& token : extraVocab) vocab[token] = next++;
    json added = json::array();
    for (const std::string& content : addedSpecial) {
      added.push_back({{"id", next++},
                       {"content", content},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
    }
    return {
        {"version", "1.0"},
        {"truncation", nullptr},
        {"padding", nullptr},
        {"added_tokens", added},
        {"normalizer", normalizer},
        {"pre_tokenizer", preTokenizer},
        {"post_processor", postProcessor},
        {"decoder",
         {{"type", "ByteLevel"},
          {"add_prefix_space", true},
          {"trim_offsets", true},
          {"use_regex", true}}},
        {"model",
         {{"type", modelType},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"ignore_merges", ignoreMerges},
          {"vocab", vocab},
          {"merges", mergeList}}},
    };
  }

  std::unique_ptr<Tokenizer> load(const TempDir& dir,
                                  const std::string& name = "tokenizer.json") const {
    return loadHfTokenizer(dir.write(name, build().dump(2)));
  }
};

// Ids of the given byte-level token strings, looked up by content.
std::vector<int32_t> ids(const Tokenizer& t, std::initializer_list<std::string> tokens) {
  std::vector<int32_t> out;
  for (const std::string& token : tokens) {
    const auto id = t.tokenId(token);
    REQUIRE_MESSAGE(id.has_value(), "no token " << token);
    out.push_back(*id);
  }
  return out;
}

const std::vector<std::string> kRoundTripTexts = {
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé",
    "日本語のテキスト",
    "emoji 🙂🙃 and 👩‍👩‍👧 family",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows",
    "digits 0123456789 1,234.56 3.14159",
    "mixed 中文 English 123 🙂 ...!!! ???",
    "it's they're we've I'm you'll he'd",
    " \n \n\t  \n",
};

// ---------------------------------------------------------------------------------------------

TEST_CASE("the byte tokenizer round-trips arbitrary bytes and multi-byte UTF-8") {
  auto t = makeByteTokenizer();
  CHECK(t->vocabSize() == 260);
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  for (const std::string& text : {all, std::string("é 日本 🙂"), std::string("")}) {
    const auto encoded = t->encode(text);
    CHECK(encoded.size() == text.size());
    CHECK(decodeAll(*t, encoded) == text);
  }
  CHECK(t->encode("A") == std::vector<int32_t>{65});
  CHECK(t->tokenBytes(-1).empty());
  CHECK(t->tokenBytes(260).empty());
  CHECK(t->tokenId("A") == 65);
  CHECK(!t->tokenId("AB").has_value());
}

TEST_CASE("the byte tokenizer turns its four special tokens in the text into ids 256 to 259") {
  auto t = makeByteTokenizer();
  const auto encoded = t->encode("<|im_start|>hi<|im_end|><|endoftext|><|pad|><|nope|>");
  const std::vector<int32_t> head = {kByteImStart, 'h', 'i', kByteImEnd, kByteEndOfText, kBytePad};
  REQUIRE(encoded.size() == head.size() + std::string("<|nope|>").size());
  CHECK(std::vector<int32_t>(encoded.begin(), encoded.begin() + 6) == head);
  CHECK(encoded[6] == '<');
  for (int32_t id = 0; id < 260; ++id) CHECK(t->isSpecial(id) == (id >= 256));
  CHECK(t->tokenBytes(kByteImEnd) == "<|im_end|>");
  CHECK(t->tokenId("<|pad|>") == kBytePad);
  // addSpecial adds nothing: the byte tokenizer has no BOS.
  CHECK(t->encode("x", true) == t->encode("x", false));
}

TEST_CASE("a GPT-2-style tokenizer.json encodes by merge rank, not greedily left to right") {
  TempDir dir;
  auto t = Fixture().load(dir);
  CHECK(t->encode(" the") == ids(*t, {"Ġthe"}));
  CHECK(t->encode("the") == ids(*t, {"t", "he"}));
  // By rank "o w" (6) comes before "l o" (7), then "l ow" (8): one token. Greedy: lo|w.
  CHECK(t->encode("low") == ids(*t, {"low"}));
  CHECK(t->encode(" low") == ids(*t, {"Ġ", "low"}));
  CHECK(t->encode("lo") == ids(*t, {"lo"}));
  // Equal ranks merge leftmost first.
  CHECK(t->encode("aaa") == ids(*t, {"aa", "a"}));
  CHECK(t->encode("aaaa") == ids(*t, {"aa", "aa"}));
  // The GPT-2 regex keeps runs of digits together, so "3 4" can merge.
  CHECK(t->encode("12345") == ids(*t, {"1", "2", "34", "5"}));
  // Pre-tokens never merge across: "(" and "the" are separate pieces under the GPT-2 regex.
  CHECK(t->encode("(the") == ids(*t, {"(", "t", "he"}));
  CHECK(t->encode(" the the") == ids(*t, {"Ġthe", "Ġthe"}));
  CHECK(t->vocabSize() == static_cast<size_t>(Fixture().firstAddedId() + 2));
  CHECK(t->tokenId("Ġthe") == 258);
  CHECK(t->tokenBytes(258) == " the");
  CHECK(!t->isSpecial(258));
  CHECK(t->tokenBytes(-5).empty());
  CHECK(t->tokenBytes(100000).empty());
}

TEST_CASE("a BPE tokenizer.json round-trips ASCII, multi-byte UTF-8, whitespace and digits") {
  TempDir dir;
  auto t = Fixture().load(dir);
  for (const std::string& text : kRoundTripTexts) {
    CAPTURE(text);
    CHECK(decodeAll(*t, t->encode(text)) == text);
  }
  // The emoji's halves merge into two tokens.
  CHECK(t->encode("🙂") == ids(*t, {bl("\xF0\x9F"), bl("\x99\x82")}));
}

TEST_CASE("special tokens are recognised anywhere in the text, and round-trip") {
  TempDir dir;
  Fixture f;
  auto t = f.load(dir);
  const int32_t eot = f.firstAddedId();
  const int32_t imStart = eot + 1;
  CHECK(t->tokenId("<|endoftext|>") == eot);
  CHECK(t->isSpecial(eot));
  CHECK(t->isSpecial(imStart));
  CHECK(t->tokenBytes(eot) == "<|endoftext|>");

  std::vector<int32_t> expected = ids(*t, {"h", "i"});
  expected.push_back(eot);
  for (int32_t id : ids(*t, {"t", "he", "r", "e"})) expected.push_back(id);
  CHECK(t->encode("hi<|endoftext|>there") == expected);

  const std::string chat = "<|im_start|>user\n the low<|endoftext|><|endoftext|> 日本<|im_start|";
  const auto encoded = t->encode(chat);
  CHECK(encoded.front() == imStart);
  CHECK(std::count(encoded.begin(), encoded.end(), eot) == 2);
  CHECK(decodeAll(*t, encoded) == chat);
}

TEST_CASE("merges may be written as \"a b\" strings or as [a, b] arrays") {
  TempDir dir;
  Fixture strings;
  Fixture arrays;
  arrays.mergesAsArrays = true;
  auto a = strings.load(dir, "strings.json");
  auto b = arrays.load(dir, "arrays.json");
  for (const std::string& text : kRoundTripTexts) {
    CAPTURE(text);
    CHECK(a->encode(text) == b->encode(text));
  }
  CHECK(b->encode("low") == ids(*b, {"low"}));
}

TEST_CASE("with ignore_merges a pre-token that is in the vocab is emitted whole") {
  TempDir dir;
  Fixture f;
  f.extraVocab = {"xyz", "Ġwxyz"};
  auto merging = f.load(dir, "merging.json");
  CHECK(merging->encode("xyz") == ids(*merging, {"x", "y", "z"}));
  f.ignoreMerges = true;
  auto ignoring = f.load(dir, "ignoring.json");
  CHECK(ignoring->encode("xyz") == ids(*ignoring, {"xyz"}));
  CHECK(ignoring->encode(" wxyz xyz") == ids(*ignoring, {"Ġwxyz", "Ġ", "x", "y", "z"}));
  CHECK(ignoring->encode(" the") == ids(*ignoring, {"Ġthe"}));
}

TEST_CASE("a TemplateProcessing post-processor prepends BOS only with addSpecial") {
  TempDir dir;
  Fixture f;
  f.addedSpecial.push_back("<|begin_of_text|>");
  const int32_t bos = f.firstAddedId() + 2;
  const json special = {
      {"<|begin_of_text|>",
       {{"id", "<|begin_of_text|>"}, {"ids", {bos}}, {"tokens", {"<|begin_of_text|>"}}}}};
  const json templateProcessing = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair",
       {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
      {"special_tokens", special}};

  SUBCASE("alone") { f.postProcessor = templateProcessing; }
  SUBCASE("in a Sequence after ByteLevel, as Llama-3 has it") {
    f.postProcessor = {{"type", "Sequence"},
                       {"processors",
                        {{{"type", "ByteLevel"},
                          {"add_prefix_space", true},
                          {"trim_offsets", false},
                          {"use_regex", true}},
                         templateProcessing}}};
  }
  auto t = f.load(dir);
  std::vector<int32_t> withBos = {bos};
  for (int32_t id : ids(*t, {"Ġthe"})) withBos.push_back(id);
  CHECK(t->encode(" the", true) == withBos);
  CHECK(t->encode(" the", false) == ids(*t, {"Ġthe"}));
  CHECK(t->encode("", true) == std::vector<int32_t>{bos});
  CHECK(t->isSpecial(bos));
}

// Llama-3's pre-tokenizer regex, as in its tokenizer.json.
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

TEST_CASE("a Split + ByteLevel Sequence pre-tokenizer with a Llama-3-like regex splits its way") {
  TempDir dir;
  Fixture f;
  f.preTokenizer = {{"type", "Sequence"},
                    {"pretokenizers",
                     {{{"type", "Split"},
                       {"pattern", {{"Regex", std::string(kLlama3Pattern)}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"},
                       {"add_prefix_space", false},
                       {"trim_offsets", true},
                       {"use_regex", false}}}}};
  auto t = f.load(dir);
  // Digits go in threes: "123" "45", so "3 4" cannot merge (GPT-2's regex gives 1 2 34 5).
  CHECK(t->encode("12345") == ids(*t, {"1", "2", "3", "4", "5"}));
  CHECK(t->encode("1234") == ids(*t, {"1", "2", "3", "4"}));
  // A punctuation character joins the letters after it: "(the" is one piece.
  CHECK(t->encode("(the") == ids(*t, {"(t", "he"}));
  CHECK(t->encode(" the") == ids(*t, {"Ġthe"}));
  for (const std::string& text : kRoundTripTexts) {
    CAPTURE(text);
    CHECK(decodeAll(*t, t->encode(text)) == text);
  }
}

TEST_CASE("a Digits pre-tokenizer with individual_digits splits every digit") {
  TempDir dir;
  Fixture f;
  f.preTokenizer = {{"type", "Sequence"},
                    {"pretokenizers",
                     {{{"type", "Digits"}, {"individual_digits", true}},
                      {{"type", "ByteLevel"},
                       {"add_prefix_space", false},
                       {"trim_offsets", true},
                       {"use_regex", true}}}}};
  auto t = f.load(dir);
  CHECK(t->encode("1234") == ids(*t, {"1", "2", "3", "4"}));
  CHECK(t->encode(" the") == ids(*t, {"Ġthe"}));
  f.preTokenizer["pretokenizers"][0]["individual_digits"] = false;
  auto runs = f.load(dir, "runs.json");
  CHECK(runs->encode("1234") == ids(*runs, {"1", "2", "34"}));
}

TEST_CASE("Split behaviors decide which side a delimiter joins") {
  TempDir dir;
  struct Case {
    const char* behavior;
    bool invert;
    std::initializer_list<std::string> expected;
  };
  const Case cases[] = {
      {"Isolated", false, {"a", "-", "b"}},
      {"MergedWithPrevious", false, {"a-", "b"}},
      {"MergedWithNext", false, {"a", "-b"}},
      {"Removed", false, {"a", "b"}},
      {"Removed", true, {"-"}},
      {"Contiguous", false, {"a", "-", "b"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.behavior);
    CAPTURE(c.invert);
    Fixture f;
    f.preTokenizer = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"String", "-"}}},
           {"behavior", c.behavior},
           {"invert", c.invert}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    auto t = f.load(dir, std::string(c.behavior) + (c.invert ? "-inverted" : "") + ".json");
    CHECK(t->encode("a-b") == ids(*t, c.expected));
  }
}

TEST_CASE("add_prefix_space adds a space to each text segment that lacks one") {
  TempDir dir;
  Fixture f;
  f.preTokenizer["add_prefix_space"] = true;
  auto t = f.load(dir);
  CHECK(t->encode("the") == ids(*t, {"Ġthe"}));
  CHECK(t->encode(" the") == ids(*t, {"Ġthe"}));
  std::vector<int32_t> expected = {f.firstAddedId()};
  for (int32_t id : ids(*t, {"Ġthe"})) expected.push_back(id);
  CHECK(t->encode("<|endoftext|>the") == expected);
}

TEST_CASE("encoding invalid UTF-8 and very long pieces neither crashes nor loses bytes") {
  TempDir dir;
  auto t = Fixture().load(dir);
  const std::vector<std::string> texts = {
      "\xFF\xFE abc \xC3",        "ab\xE6\x97 \xED\xA0\x80 end\xF0\x9F\x99",
      "\x80\x80\x80 the\xC0\xAF", std::string(1 << 20, ' ') + "x",
      std::string(200000, 'a'),   std::string(100000, '!') + "\xFF" + std::string(100000, '\n'),
  };
  for (const std::string& text : texts) {
    CHECK(decodeAll(*t, t->encode(text)) == text);
  }
  CHECK(t->encode(std::string(200000, 'a')).size() == 100000);  // all "aa"

  std::mt19937 rng(42);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int round = 0; round < 200; ++round) {
    std::string text(static_cast<size_t>(byte(rng)), '\0');
    for (char& c : text)
      c = static_cast<char>(byte(rng) < 200 ? "the low 12\n\xC3\xA9"[byte(rng) % 14] : byte(rng));
    CHECK(decodeAll(*t, t->encode(text)) == text);
  }
}

TEST_CASE("one tokenizer encodes the same from several threads at once") {
  TempDir dir;
  auto t = Fixture().load(dir);
  std::string text;
  for (const std::string& s : kRoundTripTexts) text += s;
  const auto expected = t->encode(text);
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 50; ++k) {
        if (t->encode(text) != expected) ++mismatches;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(mismatches == 0);
}

// ---------------------------------------------------------------------------------------------
// Streaming

// Pushes `tokens`, checking that every piece is valid UTF-8; returns the concatenation.
std::string stream(const Tokenizer& t, const std::vector<int32_t>& tokens) {
  IncrementalDecoder decoder(t);
  std::string out;
  for (int32_t id : tokens) {
    const std::string piece = decoder.push(id);
    CHECK(validUtf8(piece));
    out += piece;
  }
  const std::string tail = decoder.flush();
  CHECK(validUtf8(tail));
  return out + tail;
}

TEST_CASE("the incremental decoder holds back an emoji split across 2, 3 or 4 tokens") {
  TempDir dir;
  auto hf = Fixture().load(dir);
  auto bytes = makeByteTokenizer();
  const std::string emoji = "\xF0\x9F\x99\x82";  // 🙂

  // Four byte tokens: nothing comes out until the fourth.
  IncrementalDecoder four(*bytes);
  CHECK(four.push(0xF0).empty());
  CHECK(four.push(0x9F).empty());
  CHECK(four.push(0x99).empty());
  CHECK(four.push(0x82) == emoji);
  CHECK(four.flush().empty());

  // Two tokens (the fixture merges each half), and three.
  const std::vector<int32_t> two = ids(*hf, {bl("\xF0\x9F"), bl("\x99\x82")});
  CHECK(hf->encode(emoji) == two);
  IncrementalDecoder twoDecoder(*hf);
  CHECK(twoDecoder.push(two[0]).empty());
  CHECK(twoDecoder.push(two[1]) == emoji);
  const std::vector<int32_t> three = ids(*hf, {bl("\xF0\x9F"), bl("\x99"), bl("\x82")});
  CHECK(stream(*hf, three) == emoji);

  const std::string text = "a🙂b 日本語 🙃🙂 é<|endoftext|>z";
  const auto encoded = hf->encode(text);
  // Special tokens produce no text.
  CHECK(stream(*hf, encoded) == "a🙂b 日本語 🙃🙂 éz");
  CHECK(stream(*bytes, bytes->encode("a🙂b 日本語")) == "a🙂b 日本語");
}

TEST_CASE("the incremental decoder replaces invalid bytes with U+FFFD and stays valid UTF-8") {
  auto t = makeByteTokenizer();
  const std::string fffd = "\xEF\xBF\xBD";
  IncrementalDecoder d(*t);
  CHECK(d.push(0xFF) == fffd);
  CHECK(d.push('a') == "a");
  // A lead byte then an ASCII byte: the lead byte can never complete.
  CHECK(d.push(0xE6).empty());
  CHECK(d.push(0x97).empty());
  CHECK(d.push('b') == fffd + "b");
  // A truncated character at the end of the stream.
  CHECK(d.push(0xF0).empty());
  CHECK(d.flush() == fffd);
  CHECK(d.flush().empty());
  // Surrogates and overlongs are never valid.
  CHECK(stream(*t, {0xED, 0xA0, 0x80}) == fffd + fffd + fffd);
  CHECK(stream(*t, {0xC0, 0xAF}) == fffd + fffd);

  std::mt19937 rng(7);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int round = 0; round < 200; ++round) {
    std::vector<int32_t> tokens(static_cast<size_t>(byte(rng) % 40));
    for (int32_t& id : tokens) id = byte(rng) < 128 ? 0x80 + byte(rng) % 0x80 : byte(rng);
    CHECK(validUtf8(stream(*t, tokens)));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_CASE("loading a missing or malformed tokenizer.json fails with the path and the problem") {
  TempDir dir;
  const std::string missing = dir.path("nope.json");
  std::string message = errorOf([&] { loadHfTokenizer(missing); });
  CHECK(contains(message, missing));
  CHECK(contains(message, "cannot open"));

  const std::string bad = dir.write("bad.json", "{\"model\": {\"type\": \"BPE\",");
  message = errorOf([&] { loadHfTokenizer(bad); });
  CHECK(contains(message, bad));
  CHECK(contains(message, "invalid JSON"));

  Fixture unigram;
  unigram.modelType = "Unigram";
  message = errorOf([&] { unigram.load(dir, "unigram.json"); });
  CHECK(contains(message, dir.path("unigram.json")));
  CHECK(contains(message, "model.type \"Unigram\" is not supported (BPE only)"));

  Fixture metaspace;
  metaspace.preTokenizer = {{"type", "Metaspace"}, {"replacement", "▁"}};
  message = errorOf([&] { metaspace.load(dir, "metaspace.json"); });
  CHECK(contains(message, dir.path("metaspace.json")));
  CHECK(contains(message, "pre_tokenizer type \"Metaspace\" is not supported"));

  Fixture unknownMerge;
  unknownMerge.merges.push_back({"Ġ", "zz"});
  message = errorOf([&] { unknownMerge.load(dir, "merge.json"); });
  CHECK(contains(message, dir.path("merge.json")));
  CHECK(contains(message, "model.merges[16]"));
  CHECK(contains(message, "\"zz\" is not in model.vocab"));

  json noVocab = Fixture().build();
  noVocab["model"].erase("vocab");
  const std::string noVocabPath = dir.write("novocab.json", noVocab.dump());
  message = errorOf([&] { loadHfTokenizer(noVocabPath); });
  CHECK(contains(message, noVocabPath));
  CHECK(contains(message, "model.vocab must be an object"));

  Fixture nfc;
  nfc.normalizer = {{"type", "NFC"}};
  message = errorOf([&] { nfc.load(dir, "nfc.json"); });
  CHECK(contains(message, "normalizer type \"NFC\" is not supported"));

  Fixture roberta;
  roberta.postProcessor = {{"type", "SomethingNew"}};
  message = errorOf([&] { roberta.load(dir, "post.json"); });
  CHECK(contains(message, "post_processor type \"SomethingNew\" is not supported"));

  Fixture badRegex;
  badRegex.preTokenizer = {{"type", "Sequence"},
                           {"pretokenizers",
                            {{{"type", "Split"},
                              {"pattern", {{"Regex", "(unclosed"}}},
                              {"behavior", "Isolated"},
                              {"invert", false}},
                             {{"type", "ByteLevel"}, {"use_regex", false}}}}};
  message = errorOf([&] { badRegex.load(dir, "regex.json"); });
  CHECK(contains(message, "pre_tokenizer.pretokenizers[0]"));
  CHECK(contains(message, "(unclosed"));
}

}  // namespace
}  // namespace vsup::engine
