// What an API server's /metrics says, as Prometheus text exposition format 0.0.4: the engine's
// figures under vLLM's metric names (so endpoint pickers and dashboards built for vLLM read vsup
// unchanged), and the API server's own vsup_* series.
//
// Written the way Python's prometheus_client writes it, which is what vLLM serves: a `# HELP`
// and a `# TYPE` line per family (a counter's family is named with its `_total`, e.g.
// `# TYPE vllm:prompt_tokens_total counter`), labels sorted by name, values as its
// floatToGoString writes them ("3.0", "0.25", "1e-05", "1.23456789e+08", "+Inf"), histogram
// samples as cumulative `_bucket{le="…"}` lines ending with le="+Inf", then `_count`, then
// `_sum`. No `_created` series.
//
// The vLLM series, each labelled model_name="<the first served model name>":
//   gauges      vllm:num_requests_running, vllm:num_requests_waiting,
//               vllm:kv_cache_usage_perc (0..1), vllm:cache_config_info{block_size,num_gpu_blocks} 1
//   counters    vllm:prompt_tokens_total, vllm:generation_tokens_total,
//               vllm:num_preemptions_total,
//               vllm:request_success_total{finished_reason="stop"|"length"|"abort"|"error"}:
//               every request the engine finished, by reason, like vLLM's (which counts aborts
//               too, and since its FinishReason.ERROR, errors as "error"); all four series are
//               always there, 0 until counted
//   histograms  vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
//               vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds
// The vsup series are per API server, labelled server="<index>" only: vsup_requests_in_flight,
// vsup_requests_total, vsup_requests_aborted_at_shutdown_total, vsup_request_errors_total,
// vsup_ready, vsup_draining, vsup_shutdown_drain_seconds.
//
// Pure functions of their arguments; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/stats.h"

namespace vsup::workers::metrics {

// The Content-Type of the text, as prometheus_client sends it.
inline constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

using Labels = std::vector<std::pair<std::string, std::string>>;

// A value as prometheus_client writes it (its floatToGoString): Python's repr of the float,
// switched to Go's exponent form past 6 integer digits; "+Inf", "-Inf", "NaN".
std::string formatValue(double value);

// Appends families to one exposition text. Names must be valid metric names; label values may
// be anything (escaped: backslash, double quote, newline).
class Exposition {
 public:
  void gauge(std::string_view name, std::string_view help, const Labels& labels, double value);
  // `name` ends in "_total".
  void counter(std::string_view name, std::string_view help, const Labels& labels, double value);
  // A family with several series: the HELP and TYPE lines, then one sample() per series.
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const Labels& labels, double value);
  void histogram(std::string_view name, std::string_view help, const Labels& labels,
                 const engine::Histogram& histogram);

  const std::string& text() const { return text_; }
  std::string take() { return std::move(text_); }

 private:
  std::string text_;
};

// The vllm:* families for `stats`, labelled model_name=`modelName`.
void renderEngineStats(Exposition& out, const engine::EngineStats& stats,
                       std::string_view modelName);

// The API server's own figures.
struct ServerFigures {
  uint32_t index = 0;  // the `server` label
  int64_t inFlight = 0;
  uint64_t requestsTotal = 0;
  uint64_t abortedAtShutdown = 0;
  uint64_t errors = 0;
  bool ready = false;
  bool draining = false;      // out of rotation or quiesced
  double drainSeconds = -1;   // the last drain's duration; -1: none yet
};
void renderServerFigures(Exposition& out, const ServerFigures& figures);

// Both: the engine's families, then the server's.
std::string render(const engine::EngineStats& stats, std::string_view modelName,
                   const ServerFigures& figures);

}  // namespace vsup::workers::metrics
