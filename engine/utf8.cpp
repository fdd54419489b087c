#include "engine/utf8.h"

namespace vsup::engine::utf8 {

// ---------------------------------------------------------------------------------------------
// UTF-8

// Classifies the bytes at s[i] (i < s.size()) per Unicode's well-formed UTF-8 table, which
// excludes overlongs, surrogates and code points above U+10FFFF.
Utf8Step utf8Step(std::string_view s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return {1, Utf8Kind::Valid};
  size_t continuations = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    continuations = 1;
  } else if (b == 0xE0) {
    continuations = 2;
    lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    continuations = 2;
  } else if (b == 0xED) {
    continuations = 2;
    hi = 0x9F;
  } else if (b == 0xF0) {
    continuations = 3;
    lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    continuations = 3;
  } else if (b == 0xF4) {
    continuations = 3;
    hi = 0x8F;
  } else {
    return {1, Utf8Kind::Invalid};
  }
  for (size_t k = 1; k <= continuations; ++k) {
    if (i + k >= s.size()) return {k, Utf8Kind::Incomplete};
    const auto c = static_cast<unsigned char>(s[i + k]);
    if (c < lo || c > hi) return {k, Utf8Kind::Invalid};
    lo = 0x80;
    hi = 0xBF;
  }
  return {continuations + 1, Utf8Kind::Valid};
}

bool isValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII fast path: most text is mostly ASCII.
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = utf8Step(s, i);
    if (step.kind != Utf8Kind::Valid) return false;
    i += step.length;
  }
  return true;
}

// The code point of the valid character of `length` bytes at s[i].
char32_t decodeChar(std::string_view s, size_t i, size_t length) {
  const auto b = [&](size_t k) {
    return static_cast<char32_t>(static_cast<unsigned char>(s[i + k]));
  };
  switch (length) {
    case 1:
      return b(0);
    case 2:
      return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3:
      return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default:
      return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

void appendUtf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The Unicode White_Space property, which is what HF's `\s` (Rust regex) means for the
// lstrip/rstrip of added tokens.
bool isWhiteSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Start of the character that ends at s[end - 1], for valid UTF-8; for invalid bytes, end - 1.
size_t previousCharStart(std::string_view s, size_t end) {
  size_t start = end - 1;
  while (start > 0 && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) {
    --start;
  }
  const Utf8Step step = utf8Step(s, start);
  return step.kind == Utf8Kind::Valid && start + step.length == end ? start : end - 1;
}

// Removes from `pending` the longest prefix that can be output now, returning it as valid UTF-8.
// Ill-formed bytes become U+FFFD; a trailing incomplete character stays unless `final`.
std::string takeValidPrefix(std::string& pending, bool final) {
  std::string out;
  size_t i = 0;
  while (i < pending.size()) {
    const Utf8Step step = utf8Step(pending, i);
    if (step.kind == Utf8Kind::Valid) {
      out.append(pending, i, step.length);
    } else if (step.kind == Utf8Kind::Invalid || final) {
      out += kReplacementChar;
    } else {
      break;  // an incomplete character: the next token may complete it
    }
    i += step.length;
  }
  pending.erase(0, i);
  return out;
}

}  // namespace vsup::engine::utf8
