// How loud the fuzz targets are: vsup's own logger is off unless VSUP_FUZZ_LOG names a level,
// and the targets' traces are off unless VSUP_FUZZ_TRACE is set.
#pragma once

#include <cstdlib>

#include "base/log.h"

namespace vsup::fuzz {

// vsup logs protocol errors and refused connections; at millions of inputs that is noise and
// time. VSUP_FUZZ_LOG=debug (or any level) turns it back on to study one input.
inline void quietLogs() {
  const char* level = std::getenv("VSUP_FUZZ_LOG");
  vsup::setLogLevel(level != nullptr && *level != '\0' ? level : "off");
}

// VSUP_FUZZ_TRACE=1: targets print what each input led to (the answer, the error), to study a
// seed or a reproducer with <target>_replay.
inline bool tracing() {
  static const bool on = [] {
    const char* v = std::getenv("VSUP_FUZZ_TRACE");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

}  // namespace vsup::fuzz
