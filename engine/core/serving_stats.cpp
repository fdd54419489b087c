#include "engine/core/serving_stats.h"

#include <algorithm>

namespace vsup::engine::core {

namespace {

double secondsBetween(MonoNs from, MonoNs to) {
  return double(std::max<MonoNs>(to - from, 0)) / 1e9;
}

}  // namespace

void ServingStats::arrived(const std::string& id, MonoNs at) {
  Live& l = live_[id];
  l = Live{};
  l.arrival = at;
}

void ServingStats::forget(const std::string& id) { live_.erase(id); }

void ServingStats::scheduled(const StepInput& step, MonoNs at) {
  for (const SeqStep& s : step.seqs) {
    auto it = live_.find(s.id);
    if (it == live_.end() || it->second.scheduled) continue;
    it->second.scheduled = true;
    totals_.queueTime.observe(secondsBetween(it->second.arrival, at));
  }
}

void ServingStats::delivered(const std::vector<TokenDelta>& deltas, MonoNs at) {
  for (const TokenDelta& d : deltas) {
    auto it = live_.find(d.requestId);
    if (it == live_.end()) continue;
    Live& l = it->second;
    bool token = d.completionTokens > l.completion;
    if (!l.promptCounted && (l.scheduled || token)) {
      l.promptCounted = true;
      totals_.promptTokens += uint64_t(std::max<int64_t>(d.promptTokens, 0));
    }
    if (token) {
      totals_.generationTokens += uint64_t(d.completionTokens - l.completion);
      l.completion = d.completionTokens;
      if (l.hasToken) {
        totals_.interTokenLatency.observe(secondsBetween(l.lastToken, at));
      } else {
        l.hasToken = true;
        totals_.timeToFirstToken.observe(secondsBetween(l.arrival, at));
      }
      l.lastToken = at;
    }
    if (d.finish == FinishReason::None) continue;
    totals_.e2eLatency.observe(secondsBetween(l.arrival, at));
    switch (d.finish) {
      case FinishReason::Stop: ++totals_.finishedStop; break;
      case FinishReason::Length: ++totals_.finishedLength; break;
      case FinishReason::Abort: ++totals_.finishedAbort; break;
      case FinishReason::Error: ++totals_.finishedError; break;
      case FinishReason::None: break;
    }
    live_.erase(it);
  }
}

EngineStats ServingStats::snapshot(const SchedulerStats& scheduler, int32_t blockSize,
                                   size_t waitingExtra) const {
  EngineStats s = totals_;
  s.running = uint32_t(scheduler.running);
  s.waiting = uint32_t(scheduler.waiting + waitingExtra);
  s.totalBlocks = scheduler.totalBlocks;
  s.freeBlocks = scheduler.freeBlocks;
  s.blockSize = blockSize;
  s.preemptions = scheduler.preemptions;
  return s;
}

}  // namespace vsup::engine::core
