// Time as vsup uses it: CLOCK_MONOTONIC nanoseconds, which is one clock for every process on the
// host, so an absolute deadline can cross a process boundary unchanged (docs/architecture.md, "Deadlines").
#pragma once

#include <time.h>

#include <cstdint>
#include <limits>

namespace vsup {

using MonoNs = int64_t;
inline constexpr MonoNs kNoDeadline = std::numeric_limits<int64_t>::max();
inline constexpr int64_t kNsPerMs = 1'000'000;

inline MonoNs monoNow() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// now + ms, saturating at kNoDeadline.
inline MonoNs deadlineAfterMs(int64_t ms) {
  MonoNs now = monoNow();
  if (ms < 0 || ms > (kNoDeadline - now) / kNsPerMs) return kNoDeadline;
  return now + ms * kNsPerMs;
}

// Milliseconds from now until `deadline` (0 if passed), for uv timers.
inline uint64_t msUntil(MonoNs deadline) {
  MonoNs now = monoNow();
  if (deadline <= now) return 0;
  return uint64_t((deadline - now + kNsPerMs - 1) / kNsPerMs);
}

}  // namespace vsup
