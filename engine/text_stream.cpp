#include "engine/text_stream.h"

#include <algorithm>

namespace vsup::engine {

bool StopTextStream::append(const std::string& piece) {
  size_t from = text_.size();
  text_ += piece;
  size_t cut = std::string::npos;
  for (const std::string& stop : stops_) {
    // A match may start in text that is already held back, never in text already sent.
    size_t start = from > stop.size() ? from - stop.size() : 0;
    start = std::max(start, sent_);
    size_t at = text_.find(stop, start);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut == std::string::npos) return false;
  text_.resize(cut);
  return true;
}

std::string StopTextStream::take(bool final) {
  size_t sendable = text_.size();
  if (!final) {
    for (const std::string& stop : stops_) {
      for (size_t k = std::min(stop.size() - 1, text_.size()); k > 0; --k) {
        if (text_.compare(text_.size() - k, k, stop, 0, k) == 0) {
          sendable = std::min(sendable, text_.size() - k);
          break;
        }
      }
    }
  }
  if (sendable <= sent_) return {};
  std::string out = text_.substr(sent_, sendable - sent_);
  sent_ = sendable;
  return out;
}

}  // namespace vsup::engine
