// A request's generated text as it streams out, step by step: stop strings are found even when
// split across steps and are never sent, and a tail that could still become a stop string is
// held back until it cannot. On valid UTF-8 input every cut falls on a character boundary (a
// stop string starts with a lead byte, which in valid UTF-8 text always starts a character).
#pragma once

#include <string>
#include <vector>

namespace vsup::engine {

class StopTextStream {
 public:
  explicit StopTextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Appends generated text. Returns true when a stop string matched: the text now ends just
  // before the earliest match, and nothing more may be appended.
  bool append(const std::string& piece);
  // The text that may be sent now and was not sent before; with `final`, everything left.
  std::string take(bool final);
  const std::string& text() const { return text_; }

 private:
  std::vector<std::string> stops_;
  std::string text_;
  size_t sent_ = 0;
};

}  // namespace vsup::engine
