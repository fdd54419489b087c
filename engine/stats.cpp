#include "engine/stats.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace vsup::engine {

Histogram::Histogram(std::vector<double> upperBounds)
    : bounds(std::move(upperBounds)), counts(bounds.size() + 1, 0) {}

void Histogram::observe(double value) {
  if (std::isnan(value)) return;
  // Prometheus `le`: a value equal to a bound belongs to that bound's bucket, so the first
  // bound not below the value.
  size_t bucket = size_t(std::lower_bound(bounds.begin(), bounds.end(), value) - bounds.begin());
  if (counts.size() != bounds.size() + 1) counts.resize(bounds.size() + 1, 0);  // default-made
  ++counts[bucket];
  sum += value;
  ++count;
}

// The boundaries vLLM's metrics use (its vllm:time_to_first_token_seconds,
// vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds and
// vllm:request_queue_time_seconds), so dashboards built for vLLM read vsup unchanged.
const std::vector<double>& timeToFirstTokenBuckets() {
  static const std::vector<double> b = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                        0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                        20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
  return b;
}

const std::vector<double>& interTokenLatencyBuckets() {
  static const std::vector<double> b = {0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,
                                        0.3,  0.4,   0.5,  0.75,  1.0,  2.5,  5.0,
                                        7.5,  10.0,  20.0, 40.0,  80.0};
  return b;
}

const std::vector<double>& requestLatencyBuckets() {
  static const std::vector<double> b = {0.3,  0.5,  0.8,  1.0,   1.5,   2.0,   2.5,
                                        5.0,  10.0, 15.0, 20.0,  30.0,  40.0,  50.0,
                                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  return b;
}

}  // namespace vsup::engine
