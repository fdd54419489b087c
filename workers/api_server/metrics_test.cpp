// Tests for workers/api_server/metrics.h: the exact text for known figures, values formatted as
// prometheus_client formats them, escaping.
//
// With VSUP_METRICS_DUMP=PATH set, the text of the "known figures" case is also written to PATH,
// to be read by the real parser by hand:
//   /usr/bin/python3 -c "import sys; from prometheus_client.parser import
//     text_string_to_metric_families as f; [print(m.name, m.type, len(m.samples)) for m in
//     f(open(sys.argv[1]).read())]" PATH
#include "workers/api_server/metrics.h"

#include <cmath>
#include <cstdlib>
#include <doctest/doctest.h>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace vsup::workers::metrics {
namespace {

// Lines of `text` that start with `prefix`.
std::vector<std::string> linesOf(const std::string& text, const std::string& prefix) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    std::string line = text.substr(at, end - at);
    if (line.rfind(prefix, 0) == 0) out.push_back(line);
    at = end + 1;
  }
  return out;
}

engine::EngineStats knownStats() {
  engine::EngineStats s;
  s.running = 3;
  s.waiting = 2;
  s.totalBlocks = 1000;
  s.freeBlocks = 750;
  s.blockSize = 16;
  s.promptTokens = 1234;
  s.generationTokens = 5678;
  s.preemptions = 1;
  s.finishedStop = 4;
  s.finishedLength = 5;
  s.finishedAbort = 6;
  s.finishedError = 7;
  for (double v : {0.0005, 0.003, 0.003, 3000.0}) s.timeToFirstToken.observe(v);
  s.interTokenLatency.observe(0.02);
  s.e2eLatency.observe(1.5);  // exactly on a bound: counted in le="1.5"
  return s;
}

TEST_CASE("values are written as prometheus_client's floatToGoString writes them") {
  const std::pair<double, const char*> cases[] = {
      {0, "0.0"},
      {1, "1.0"},
      {3, "3.0"},
      {0.25, "0.25"},
      {1.0 / 3, "0.3333333333333333"},
      {2560, "2560.0"},
      {999999, "999999.0"},
      {1e6, "1e+06"},
      {10000000, "1e+07"},
      {1234567.5, "1.2345675e+06"},
      {123456789, "1.23456789e+08"},
      {1e15, "1e+015"},  // sic: prometheus_client's own quirk
      {1e16, "1e+16"},
      {18446744073709551615.0, "1.8446744073709552e+19"},
      {0.0001, "0.0001"},
      {0.00001, "1e-05"},
      {1.5e-7, "1.5e-07"},
      {0.001, "0.001"},
      {-5, "-5.0"},
      {-1e20, "-1e+20"},
      {-0.0, "-0.0"},
      {std::numeric_limits<double>::infinity(), "+Inf"},
      {-std::numeric_limits<double>::infinity(), "-Inf"},
      {std::nan(""), "NaN"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.first);
    CHECK(formatValue(c.first) == c.second);
  }
}

TEST_CASE("known engine figures render as these exact lines") {
  const std::string text = render(knownStats(), "my-model", ServerFigures{});
  if (const char* path = std::getenv("VSUP_METRICS_DUMP")) std::ofstream(path) << text;

  CHECK(linesOf(text, "vllm:num_requests") == std::vector<std::string>{
                                                  R"(vllm:num_requests_running{model_name="my-model"} 3.0)",
                                                  R"(vllm:num_requests_waiting{model_name="my-model"} 2.0)"});
  CHECK(linesOf(text, "vllm:kv_cache_usage_perc") ==
        std::vector<std::string>{R"(vllm:kv_cache_usage_perc{model_name="my-model"} 0.25)"});
  CHECK(linesOf(text, "vllm:cache_config_info") ==
        std::vector<std::string>{
            R"(vllm:cache_config_info{block_size="16",model_name="my-model",num_gpu_blocks="1000"} 1.0)"});
  CHECK(linesOf(text, "vllm:num_preemptions") ==
        std::vector<std::string>{R"(vllm:num_preemptions_total{model_name="my-model"} 1.0)"});
  CHECK(linesOf(text, "vllm:prompt_tokens") ==
        std::vector<std::string>{R"(vllm:prompt_tokens_total{model_name="my-model"} 1234.0)"});
  CHECK(linesOf(text, "vllm:generation_tokens") ==
        std::vector<std::string>{R"(vllm:generation_tokens_total{model_name="my-model"} 5678.0)"});
  CHECK(linesOf(text, "vllm:request_success") ==
        std::vector<std::string>{
            R"(vllm:request_success_total{finished_reason="stop",model_name="my-model"} 4.0)",
            R"(vllm:request_success_total{finished_reason="length",model_name="my-model"} 5.0)",
            R"(vllm:request_success_total{finished_reason="abort",model_name="my-model"} 6.0)",
            R"(vllm:request_success_total{finished_reason="error",model_name="my-model"} 7.0)"});

  // HELP and TYPE as prometheus_client writes them: a counter's family name has its _total.
  const std::string counterHead =
      "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
      "# TYPE vllm:prompt_tokens_total counter\n"
      "vllm:prompt_tokens_total{";
  CHECK(text.find(counterHead) != std::string::npos);
  CHECK(text.find("# TYPE vllm:request_success_total counter\nvllm:request_success_total{") !=
        std::string::npos);
  CHECK(text.find("# TYPE vllm:num_requests_running gauge\n") != std::string::npos);
  CHECK(linesOf(text, "# TYPE vllm:").size() == 12);

  // A histogram: cumulative buckets at vLLM's bounds, +Inf, then _count and _sum.
  const std::vector<std::string> ttft = linesOf(text, "vllm:time_to_first_token_seconds");
  REQUIRE(ttft.size() == engine::timeToFirstTokenBuckets().size() + 3);
  CHECK(ttft[0] ==
        R"(vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="my-model"} 1.0)");
  CHECK(ttft[1] ==
        R"(vllm:time_to_first_token_seconds_bucket{le="0.005",model_name="my-model"} 3.0)");
  CHECK(ttft[2] ==
        R"(vllm:time_to_first_token_seconds_bucket{le="0.01",model_name="my-model"} 3.0)");
  CHECK(ttft[21] ==
        R"(vllm:time_to_first_token_seconds_bucket{le="2560.0",model_name="my-model"} 3.0)");
  CHECK(ttft[22] ==
        R"(vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="my-model"} 4.0)");
  CHECK(ttft[23] == R"(vllm:time_to_first_token_seconds_count{model_name="my-model"} 4.0)");
  CHECK(ttft[24] == R"(vllm:time_to_first_token_seconds_sum{model_name="my-model"} 3000.0065)");
  CHECK(text.find("# HELP vllm:time_to_first_token_seconds Histogram of time to first token in "
                  "seconds.\n# TYPE vllm:time_to_first_token_seconds histogram\n"
                  "vllm:time_to_first_token_seconds_bucket{le=\"0.001\"") != std::string::npos);
  const std::vector<std::string> e2e = linesOf(text, "vllm:e2e_request_latency_seconds_bucket");
  REQUIRE(e2e.size() == engine::requestLatencyBuckets().size() + 1);
  CHECK(e2e[3] == R"(vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="my-model"} 0.0)");
  CHECK(e2e[4] == R"(vllm:e2e_request_latency_seconds_bucket{le="1.5",model_name="my-model"} 1.0)");
  CHECK(linesOf(text, "vllm:inter_token_latency_seconds_bucket{le=\"0.025\"") ==
        std::vector<std::string>{
            R"(vllm:inter_token_latency_seconds_bucket{le="0.025",model_name="my-model"} 1.0)"});
  CHECK(linesOf(text, "vllm:request_queue_time_seconds_count") ==
        std::vector<std::string>{
            R"(vllm:request_queue_time_seconds_count{model_name="my-model"} 0.0)"});
  CHECK(text.back() == '\n');
}

TEST_CASE("no snapshot yet: zeros, every family still there") {
  const std::string text = render(engine::EngineStats{}, "m", ServerFigures{});
  CHECK(linesOf(text, "vllm:kv_cache_usage_perc{") ==
        std::vector<std::string>{R"(vllm:kv_cache_usage_perc{model_name="m"} 0.0)"});
  CHECK(linesOf(text, "vllm:cache_config_info{") ==
        std::vector<std::string>{
            R"(vllm:cache_config_info{block_size="0",model_name="m",num_gpu_blocks="0"} 1.0)"});
  CHECK(linesOf(text, "vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\"") ==
        std::vector<std::string>{
            R"(vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 0.0)"});
  CHECK(linesOf(text, "# TYPE vllm:").size() == 12);
}

TEST_CASE("the API server's own series carry only the server label") {
  ServerFigures f;
  f.index = 2;
  f.inFlight = 3;
  f.requestsTotal = 10;
  f.abortedAtShutdown = 1;
  f.errors = 4;
  f.ready = false;
  f.draining = true;
  f.drainSeconds = 0.5;
  Exposition out;
  renderServerFigures(out, f);
  CHECK(out.text() ==
        "# HELP vsup_requests_in_flight Requests being answered.\n"
        "# TYPE vsup_requests_in_flight gauge\n"
        "vsup_requests_in_flight{server=\"2\"} 3.0\n"
        "# HELP vsup_requests_total Completion requests accepted.\n"
        "# TYPE vsup_requests_total counter\n"
        "vsup_requests_total{server=\"2\"} 10.0\n"
        "# HELP vsup_requests_aborted_at_shutdown_total Requests aborted at the drain deadline "
        "(clients were told).\n"
        "# TYPE vsup_requests_aborted_at_shutdown_total counter\n"
        "vsup_requests_aborted_at_shutdown_total{server=\"2\"} 1.0\n"
        "# HELP vsup_request_errors_total Requests answered with an error.\n"
        "# TYPE vsup_request_errors_total counter\n"
        "vsup_request_errors_total{server=\"2\"} 4.0\n"
        "# HELP vsup_ready 1 when serving, 0 otherwise.\n"
        "# TYPE vsup_ready gauge\n"
        "vsup_ready{server=\"2\"} 0.0\n"
        "# HELP vsup_draining 1 once out of rotation or draining, 0 otherwise.\n"
        "# TYPE vsup_draining gauge\n"
        "vsup_draining{server=\"2\"} 1.0\n"
        "# HELP vsup_shutdown_drain_seconds Duration of the last drain (-1: none yet).\n"
        "# TYPE vsup_shutdown_drain_seconds gauge\n"
        "vsup_shutdown_drain_seconds{server=\"2\"} 0.5\n");
}

TEST_CASE("label values and help text are escaped") {
  Exposition out;
  out.gauge("x", "a \\ help\nline", {{"b", "q\"uo\\te\nnl"}, {"a", "1"}}, 1);
  CHECK(out.text() == "# HELP x a \\\\ help\\nline\n# TYPE x gauge\n"
                      "x{a=\"1\",b=\"q\\\"uo\\\\te\\nnl\"} 1.0\n");
}

TEST_CASE("a histogram whose counts miss entries renders what it has, never past its end") {
  engine::Histogram h;
  h.bounds = {1.0, 2.0};
  h.counts = {2};  // malformed: no entry for (1, 2] nor +Inf
  h.count = 2;
  h.sum = 1;
  Exposition out;
  out.histogram("h", "x", {}, h);
  CHECK(linesOf(out.text(), "h_") ==
        std::vector<std::string>{R"(h_bucket{le="1.0"} 2.0)", R"(h_bucket{le="2.0"} 2.0)",
                                 R"(h_bucket{le="+Inf"} 2.0)", "h_count 2.0", "h_sum 1.0"});
}

}  // namespace
}  // namespace vsup::workers::metrics
