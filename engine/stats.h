// What engine-core reports about its serving, for /metrics: the gauges routers read to pick a
// replica (running, waiting, KV-cache use), the token and request counters, and latency
// histograms with vLLM's bucket boundaries, so dashboards and endpoint pickers built for vLLM
// read vsup unchanged. Plain values; engine-core records them (engine/core/serving_stats.h),
// ipc/engine.capnp carries them to every API server, which renders the Prometheus text.
#pragma once

#include <cstdint>
#include <vector>

namespace vsup::engine {

// A Prometheus histogram: observations counted into buckets by upper bound.
struct Histogram {
  std::vector<double> bounds;    // upper bounds, strictly ascending; +Inf is implicit
  std::vector<uint64_t> counts;  // bounds.size() + 1 entries, per bucket (not cumulative);
                                 // the last is (bounds.back(), +Inf)
  double sum = 0;
  uint64_t count = 0;

  Histogram() = default;
  explicit Histogram(std::vector<double> upperBounds);
  void observe(double value);  // NaN is ignored
};

// vLLM's bucket boundaries (seconds) for each latency histogram.
const std::vector<double>& timeToFirstTokenBuckets();
const std::vector<double>& interTokenLatencyBuckets();
const std::vector<double>& requestLatencyBuckets();  // e2e latency and queue time

struct EngineStats {
  // Gauges, at the moment of the request.
  uint32_t running = 0;       // requests in the running batch
  uint32_t waiting = 0;       // admitted, waiting for a place in the batch (incl. preempted)
  int32_t totalBlocks = 0;    // KV-cache blocks per rank
  int32_t freeBlocks = 0;     // blocks neither in use nor held for a KV transfer
  int32_t blockSize = 0;      // tokens per block
  // Counters since engine-core started.
  uint64_t promptTokens = 0;      // prompt tokens of requests that were scheduled
  uint64_t generationTokens = 0;  // tokens generated
  uint64_t preemptions = 0;
  uint64_t finishedStop = 0;      // requests finished, by finish reason
  uint64_t finishedLength = 0;
  uint64_t finishedAbort = 0;
  uint64_t finishedError = 0;
  // The vsup KV connector (disaggregated prefill/decode), counted by engine-core.
  struct Kv {
    uint64_t leasesHeld = 0;  // gauge: leases not yet ended on every rank
    uint64_t leasesGranted = 0;
    uint64_t leasesDone = 0, leasesGaveUp = 0, leasesDisconnected = 0, leasesExpired = 0,
             leasesAbandoned = 0;  // ended, by reason (counted once per lease, not per rank)
    uint64_t pullsOk = 0, pullsFailed = 0;  // requests whose KV was pulled, or failed to be
    uint64_t pullBytes = 0;                 // bytes pulled, every rank's
  } kv;
  // Seconds. TTFT: arrival at engine-core to first token; ITL: between consecutive tokens of
  // a request; e2e: arrival to finish; queue: arrival to first scheduled step.
  Histogram timeToFirstToken{timeToFirstTokenBuckets()};
  Histogram interTokenLatency{interTokenLatencyBuckets()};
  Histogram e2eLatency{requestLatencyBuckets()};
  Histogram queueTime{requestLatencyBuckets()};

  // 0..1: the share of blocks in use or held.
  double kvCacheUsage() const {
    return totalBlocks <= 0 ? 0.0 : double(totalBlocks - freeBlocks) / double(totalBlocks);
  }
};

}  // namespace vsup::engine
