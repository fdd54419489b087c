// UTF-8 helpers shared by the tokenizers and the incremental decoder: classifying, decoding and
// encoding characters, and cutting a byte stream at character boundaries.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace vsup::engine::utf8 {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8Kind { Valid, Invalid, Incomplete };

struct Utf8Step {
  size_t length;  // Valid: the character's length; Invalid: the maximal ill-formed subpart (the
                  // bytes one U+FFFD replaces); Incomplete: the bytes left, a valid prefix.
  Utf8Kind kind;
};

// Classifies the bytes at s[i] (i < s.size()) per Unicode's well-formed UTF-8 table, which
// excludes overlongs, surrogates and code points above U+10FFFF.
Utf8Step utf8Step(std::string_view s, size_t i);
bool isValidUtf8(std::string_view s);
// The code point of the valid character of `length` bytes at s[i].
char32_t decodeChar(std::string_view s, size_t i, size_t length);
void appendUtf8(std::string& out, char32_t cp);
// The Unicode White_Space property.
bool isWhiteSpace(char32_t c);
// Start of the character that ends at s[end - 1], for valid UTF-8; for invalid bytes, end - 1.
size_t previousCharStart(std::string_view s, size_t end);
// Removes from `pending` the longest prefix that can be output now, returning it as valid UTF-8.
// Ill-formed bytes become U+FFFD; a trailing incomplete character stays unless `final`.
std::string takeValidPrefix(std::string& pending, bool final);

}  // namespace vsup::engine::utf8
