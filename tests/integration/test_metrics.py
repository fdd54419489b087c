"""/metrics under vLLM's names, checked with a real Prometheus parser.

Endpoint pickers (llm-d's, KServe's, AIBrix's) and vLLM dashboards read `vllm:*` series from
every replica; with several API servers per tree, each scrape lands on any of them, so the
engine-side figures must be the same whichever answers. Each test runs a real `vsup run`, sends
real requests, and parses what /metrics returns with prometheus_client's text parser (Debian's
python3-prometheus-client), never with a regular expression.
"""

from __future__ import annotations

import http.client
import json
import signal
import time

import pytest

from conftest import wait_for
from test_serving import HTTP_TIMEOUT_S, PlainClient, StreamClient, completion, serving  # noqa: F401

prometheus = pytest.importorskip("prometheus_client.parser",
                                 reason="python3-prometheus-client is not installed")

VLLM_GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting",
               "vllm:kv_cache_usage_perc", "vllm:cache_config_info"]
VLLM_COUNTERS = ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
                 "vllm:num_preemptions"]
VLLM_HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]


def scrape(serving) -> tuple[int, dict, str]:
    """One scrape on a fresh connection (so any API server may accept it)."""
    c = http.client.HTTPConnection("127.0.0.1", serving.port, timeout=HTTP_TIMEOUT_S)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    families = {f.name: f for f in prometheus.text_string_to_metric_families(text)}
    return r.status, families, text


def samples(family, suffix="") -> list:
    return [s for s in family.samples if s.name == family.name + suffix]


def value(families, name, suffix="", **labels) -> float:
    matching = [s for s in samples(families[name], suffix)
                if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{suffix}{labels}: {matching}"
    return matching[0].value


def engine_part(families) -> dict:
    """Every vllm:* sample, as comparable values (the API servers' own vsup_* left out)."""
    out = {}
    for name, f in families.items():
        if name.startswith("vllm:"):
            for s in f.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_vllm_series_is_there_labelled_and_counts_the_requests_served(serving):
    serving.start("--sim-token-ms", "2", "--api-server-count", "2")
    n, tokens = 6, 5
    usage_prompt = 0
    for i in range(n - 2):
        r, data = serving.post("/v1/completions", completion(tokens, prompt=f"hello number {i}"))
        assert r.status == 200, data
        usage_prompt += json.loads(data)["usage"]["prompt_tokens"]
    for _ in range(2):
        s = StreamClient(serving, {**completion(tokens, prompt="a stream"),
                                   "stream_options": {"include_usage": True}})
        s.start()
        s.join(HTTP_TIMEOUT_S)
        assert s.error is None and s.events[-1] == "[DONE]"
        usage_prompt += s.events[-2]["usage"]["prompt_tokens"]

    status, families, text = scrape(serving)
    assert status == 200, text
    for name in VLLM_GAUGES + VLLM_COUNTERS + VLLM_HISTOGRAMS:
        assert name in families, f"{name} missing from /metrics:\n{text}"
        for s in families[name].samples:
            assert s.labels.get("model_name") == "vsup-sim", f"{s} has no model_name label"
    for name in VLLM_GAUGES:
        assert families[name].type == "gauge", name
    for name in VLLM_COUNTERS:
        assert families[name].type == "counter", name
    for name in VLLM_HISTOGRAMS:
        assert families[name].type == "histogram", name

    assert value(families, "vllm:request_success", "_total", finished_reason="length") == n
    assert value(families, "vllm:generation_tokens", "_total") == n * tokens
    assert value(families, "vllm:prompt_tokens", "_total") == usage_prompt
    assert value(families, "vllm:num_requests_running") == 0
    assert value(families, "vllm:num_requests_waiting") == 0
    usage = value(families, "vllm:kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0
    info = samples(families["vllm:cache_config_info"])
    assert len(info) == 1 and info[0].value == 1
    assert int(info[0].labels["block_size"]) > 0 and int(info[0].labels["num_gpu_blocks"]) > 0

    # Histograms: cumulative buckets ending in +Inf == _count; one TTFT and one e2e per
    # request, one inter-token gap per token after the first.
    expected_count = {"vllm:time_to_first_token_seconds": n,
                      "vllm:e2e_request_latency_seconds": n,
                      "vllm:request_queue_time_seconds": n,
                      "vllm:inter_token_latency_seconds": n * (tokens - 1)}
    for name, count in expected_count.items():
        buckets = samples(families[name], "_bucket")
        cumulative = [b.value for b in buckets]
        assert cumulative == sorted(cumulative), f"{name} buckets are not cumulative"
        assert buckets[-1].labels["le"] == "+Inf"
        assert buckets[-1].value == value(families, name, "_count") == count, name
        assert value(families, name, "_sum") >= 0
    # A request takes at least its 5 tokens × 2 ms.
    assert value(families, "vllm:e2e_request_latency_seconds", "_sum") >= n * tokens * 0.002


def test_both_api_servers_serve_the_same_engine_figures(serving):
    serving.start("--sim-token-ms", "1", "--api-server-count", "2")
    for i in range(3):
        r, data = serving.post("/v1/completions", completion(3, prompt=f"p{i}"))
        assert r.status == 200, data
    # Nothing runs now, so the engine's figures are still: whichever API server answers, they
    # must be the same. Scrape until both have answered (their vsup_* series say which one).
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        _, families, _ = scrape(serving)
        server = samples(families["vsup_requests"], "_total")[0].labels["server"]
        seen[server] = engine_part(families)
    assert len(seen) == 2, f"only API server(s) {sorted(seen)} answered 40 fresh connections"
    a, b = seen.values()
    assert a == b, "the API servers disagree on the engine's figures"


def test_running_and_waiting_gauges_follow_the_batch(serving):
    # One sequence at a time: the second request waits while the first runs.
    serving.start("--sim-token-ms", "20", "--max-num-seqs", "1", "--shutdown-timeout", "0")
    first = StreamClient(serving, completion(200))
    second = StreamClient(serving, completion(200))
    first.start()
    assert first.first.wait(10), "the first request did not start"
    second.start()

    def gauges():
        _, f, _ = scrape(serving)
        return value(f, "vllm:num_requests_running"), value(f, "vllm:num_requests_waiting")

    wait_for(lambda: gauges() == (1, 1), 10, "running 1 and waiting 1", serving.stderr)
    _, f, _ = scrape(serving)
    assert value(f, "vllm:kv_cache_usage_perc") > 0, "a running request holds blocks"
    serving.signal(signal.SIGTERM)  # --shutdown-timeout 0: both are aborted at once
    first.join(HTTP_TIMEOUT_S)
    second.join(HTTP_TIMEOUT_S)
    assert first.finish_reason() == "abort" and second.finish_reason() == "abort"
    assert serving.wait_exit(30) == 0, serving.stderr()


def test_metrics_answer_throughout_the_drain_and_say_draining(serving):
    serving.start("--sim-token-ms", "20", "--shutdown-timeout", "30")
    long = StreamClient(serving, completion(60))
    long.start()
    assert long.first.wait(10)
    serving.signal(signal.SIGTERM)

    def draining():
        status, f, _ = scrape(serving)
        return status == 200 and value(f, "vsup_draining", server="0") == 1

    wait_for(draining, 5, "/metrics to say vsup_draining 1", serving.stderr)
    # Still answering, with the engine's figures, while the long request drains.
    status, f, text = scrape(serving)
    assert status == 200, text
    assert value(f, "vllm:num_requests_running") == 1
    long.join(HTTP_TIMEOUT_S)
    assert long.error is None and long.finish_reason() == "length"
    assert serving.wait_exit(30) == 0, serving.stderr()
