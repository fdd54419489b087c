#include "workers/api_server/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <system_error>

namespace vsup::workers::metrics {

namespace {

// Python's repr of a finite float: the shortest digits that read back as the same float, in
// positional notation when the decimal exponent is in [-4, 16), else d.ddde±XX.
std::string pythonRepr(double value) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific);
  if (ec != std::errc()) return "NaN";  // cannot happen for a finite double
  std::string_view text(buf, size_t(end - buf));
  bool negative = text.front() == '-';
  if (negative) text.remove_prefix(1);
  size_t e = text.find('e');
  std::string digits;
  for (char c : text.substr(0, e)) {
    if (c != '.') digits += c;
  }
  int exponent = std::atoi(std::string(text.substr(e + 1)).c_str());
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp[16];
    std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + exp;
  }
  int point = exponent + 1;  // digits before the decimal point
  if (point <= 0) return out + "0." + std::string(size_t(-point), '0') + digits;
  if (size_t(point) >= digits.size()) {
    return out + digits + std::string(size_t(point) - digits.size(), '0') + ".0";
  }
  return out + digits.substr(0, size_t(point)) + "." + digits.substr(size_t(point));
}

std::string escapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string escapeHelp(std::string_view help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

std::string formatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  std::string s = pythonRepr(value);
  // prometheus_client: "Go switches to exponents sooner than Python" (positive values only).
  size_t dot = s.find('.');
  if (value > 0 && dot != std::string::npos && dot > 6) {
    std::string mantissa = s.substr(0, 1) + "." + s.substr(1, dot - 1) + s.substr(dot + 1);
    while (!mantissa.empty() && (mantissa.back() == '0' || mantissa.back() == '.')) {
      mantissa.pop_back();
    }
    return mantissa + "e+0" + std::to_string(dot - 1);
  }
  return s;
}

void Exposition::family(std::string_view name, std::string_view type, std::string_view help) {
  text_ += "# HELP ";
  text_ += name;
  text_ += ' ';
  text_ += escapeHelp(help);
  text_ += "\n# TYPE ";
  text_ += name;
  text_ += ' ';
  text_ += type;
  text_ += '\n';
}

void Exposition::sample(std::string_view name, const Labels& labels, double value) {
  text_ += name;
  if (!labels.empty()) {
    Labels sorted = labels;
    std::sort(sorted.begin(), sorted.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    text_ += '{';
    for (size_t i = 0; i < sorted.size(); ++i) {
      if (i > 0) text_ += ',';
      text_ += sorted[i].first;
      text_ += "=\"";
      text_ += escapeLabelValue(sorted[i].second);
      text_ += '"';
    }
    text_ += '}';
  }
  text_ += ' ';
  text_ += formatValue(value);
  text_ += '\n';
}

void Exposition::gauge(std::string_view name, std::string_view help, const Labels& labels,
                       double value) {
  family(name, "gauge", help);
  sample(name, labels, value);
}

void Exposition::counter(std::string_view name, std::string_view help, const Labels& labels,
                         double value) {
  family(name, "counter", help);
  sample(name, labels, value);
}

void Exposition::histogram(std::string_view name, std::string_view help, const Labels& labels,
                           const engine::Histogram& h) {
  family(name, "histogram", help);
  const std::string base(name);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < h.bounds.size(); ++i) {
    if (i < h.counts.size()) cumulative += h.counts[i];
    Labels l = labels;
    l.emplace_back("le", formatValue(h.bounds[i]));
    sample(base + "_bucket", l, double(cumulative));
  }
  // The +Inf bucket holds every observation; counts has it last.
  if (h.counts.size() > h.bounds.size()) cumulative += h.counts[h.bounds.size()];
  Labels inf = labels;
  inf.emplace_back("le", "+Inf");
  sample(base + "_bucket", inf, double(cumulative));
  sample(base + "_count", labels, double(h.count));
  sample(base + "_sum", labels, h.sum);
}

void renderEngineStats(Exposition& out, const engine::EngineStats& s, std::string_view modelName) {
  const Labels model = {{"model_name", std::string(modelName)}};
  out.gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
            model, s.running);
  out.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", model,
            s.waiting);
  out.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", model,
            s.kvCacheUsage());
  Labels cache = model;
  cache.emplace_back("block_size", std::to_string(s.blockSize));
  cache.emplace_back("num_gpu_blocks", std::to_string(s.totalBlocks));
  out.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", cache, 1);
  out.counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.",
              model, double(s.preemptions));
  out.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", model,
              double(s.promptTokens));
  out.counter("vllm:generation_tokens_total", "Number of generation tokens processed.", model,
              double(s.generationTokens));
  out.family("vllm:request_success_total", "counter", "Count of successfully processed requests.");
  const std::pair<const char*, uint64_t> reasons[] = {{"stop", s.finishedStop},
                                                      {"length", s.finishedLength},
                                                      {"abort", s.finishedAbort},
                                                      {"error", s.finishedError}};
  for (const auto& [reason, n] : reasons) {
    Labels l = model;
    l.emplace_back("finished_reason", reason);
    out.sample("vllm:request_success_total", l, double(n));
  }
  // vsup's own: KV transfer between prefill and decode instances (all 0 without --kv-connector
  // vsup).
  out.gauge("vsup_kv_leases_held", "Finished prefills whose KV blocks are leased to a decode "
            "instance.", model, double(s.kv.leasesHeld));
  out.counter("vsup_kv_leases_granted_total", "KV leases granted to decode instances.", model,
              double(s.kv.leasesGranted));
  out.family("vsup_kv_leases_ended_total", "counter", "KV leases ended, by reason.");
  const std::pair<const char*, uint64_t> ends[] = {{"done", s.kv.leasesDone},
                                                   {"gave_up", s.kv.leasesGaveUp},
                                                   {"disconnected", s.kv.leasesDisconnected},
                                                   {"expired", s.kv.leasesExpired},
                                                   {"abandoned", s.kv.leasesAbandoned}};
  for (const auto& [reason, n] : ends) {
    Labels l = model;
    l.emplace_back("reason", reason);
    out.sample("vsup_kv_leases_ended_total", l, double(n));
  }
  out.family("vsup_kv_pulls_total", "counter",
             "Requests whose KV was pulled from a prefill instance, by outcome.");
  for (const auto& [outcome, n] : {std::pair<const char*, uint64_t>{"ok", s.kv.pullsOk},
                                   std::pair<const char*, uint64_t>{"failed", s.kv.pullsFailed}}) {
    Labels l = model;
    l.emplace_back("outcome", outcome);
    out.sample("vsup_kv_pulls_total", l, double(n));
  }
  out.counter("vsup_kv_pull_bytes_total", "KV bytes pulled from prefill instances (all ranks).",
              model, double(s.kv.pullBytes));
  out.histogram("vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.", model, s.timeToFirstToken);
  out.histogram("vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.", model, s.interTokenLatency);
  out.histogram("vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.", model, s.e2eLatency);
  out.histogram("vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.", model, s.queueTime);
}

void renderServerFigures(Exposition& out, const ServerFigures& f) {
  const Labels server = {{"server", std::to_string(f.index)}};
  out.gauge("vsup_requests_in_flight", "Requests being answered.", server, double(f.inFlight));
  out.counter("vsup_requests_total", "Completion requests accepted.", server,
              double(f.requestsTotal));
  out.counter("vsup_requests_aborted_at_shutdown_total",
              "Requests aborted at the drain deadline (clients were told).", server,
              double(f.abortedAtShutdown));
  out.counter("vsup_request_errors_total", "Requests answered with an error.", server,
              double(f.errors));
  out.gauge("vsup_ready", "1 when serving, 0 otherwise.", server, f.ready ? 1 : 0);
  out.gauge("vsup_draining", "1 once out of rotation or draining, 0 otherwise.", server,
            f.draining ? 1 : 0);
  out.gauge("vsup_shutdown_drain_seconds", "Duration of the last drain (-1: none yet).", server,
            f.drainSeconds);
}

std::string render(const engine::EngineStats& stats, std::string_view modelName,
                   const ServerFigures& figures) {
  Exposition out;
  renderEngineStats(out, stats, modelName);
  renderServerFigures(out, figures);
  return out.take();
}

}  // namespace vsup::workers::metrics
