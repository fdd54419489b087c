// ServingStats: engine-core's recorder of what /metrics reports about its serving
// (engine::EngineStats, engine/stats.h): the token and request counters and the latency
// histograms, fed by engine-core at the points a request passes, with the times given
// explicitly (so it is tested without a clock), and the scheduler's gauges added at snapshot().
//
// A request is tracked from arrived() to the delta that finishes it (or forget()), so memory is
// bounded by the requests in flight. What each figure measures:
//   - queue time: arrival → the first step that contains the request (a recompute after a
//     preemption is not a second first step);
//   - prompt tokens: once per request, at its first delta once it was scheduled (or at a first
//     delta that carries a token), never again after a preemption's recompute;
//   - TTFT: arrival → its first delta whose completionTokens went up; ITL: between consecutive
//     such deltas; generation tokens: the increase of completionTokens;
//   - at a delta with a finish: e2e latency (arrival → that delta), and the finish counter.
// Deltas and steps of requests it does not track (never arrived, or already finished) are
// ignored. Each call costs one hash lookup per delta or per sequence in the step.
//
// Single-threaded: engine-core's loop thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/clock.h"
#include "engine/core/scheduler.h"
#include "engine/engine.h"
#include "engine/stats.h"
#include "engine/types.h"

namespace vsup::engine::core {

class ServingStats {
 public:
  // engine-core accepted request `id` at `at` (before it is tokenized). A second arrival of a
  // tracked id restarts its record.
  void arrived(const std::string& id, MonoNs at);
  // The request was refused at admission (a rejection): nothing was served, nothing counts.
  void forget(const std::string& id);
  // `step` was sent to the ranks at `at`.
  void scheduled(const StepInput& step, MonoNs at);
  // These deltas were routed at `at` (a step's deltas, or the final deltas of aborts and
  // failures).
  void delivered(const std::vector<TokenDelta>& deltas, MonoNs at);

  // The figures so far, with the gauges of `scheduler` (whose blocks are `blockSize` tokens) and
  // `waitingExtra` requests waiting outside it (being tokenized) counted as waiting.
  EngineStats snapshot(const SchedulerStats& scheduler, int32_t blockSize,
                       size_t waitingExtra) const;

  size_t tracked() const { return live_.size(); }  // requests between arrival and finish

 private:
  struct Live {
    MonoNs arrival = 0;
    MonoNs lastToken = 0;       // when the last token-carrying delta was routed
    int64_t completion = 0;     // completionTokens of the last delta
    bool scheduled = false;     // queue time observed
    bool promptCounted = false;
    bool hasToken = false;      // TTFT observed
  };

  std::unordered_map<std::string, Live> live_;
  EngineStats totals_;  // counters and histograms; gauges filled in by snapshot()
};

}  // namespace vsup::engine::core
