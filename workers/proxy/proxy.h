// Proxy: the OpenAI-compatible front end of a disaggregated deployment (the body of
// `vsup __proxy`, started by `vsup proxy`). It runs each completion in two legs over HTTP:
//
//   1. prefill: the client's body with kv_transfer_params {"do_remote_decode":true},
//      "stream":false and max_tokens 1 (stream_options, min_tokens and max_completion_tokens
//      left out), POSTed to a prefill instance (`vsup run --kv-role prefill`). Its answer
//      carries kv_transfer_params: where the prompt's KV blocks are held, under a lease.
//   2. decode: the client's body, unchanged but for those kv_transfer_params, POSTed to a
//      decode instance (`vsup run --kv-role decode`), whose answer (streamed or not) is relayed
//      to the client as it comes: status, body, SSE events whole.
//
// Each leg goes to the instance of its kind with the fewest calls in flight (round robin among
// equals). A leg whose connection cannot be made (nothing was sent) is tried on the next
// instance of its kind, each at most once. A prefill instance's error (a 4xx or 5xx with an
// OpenAI error body) is relayed as it is; an instance that cannot be reached, resets, or
// answers without kv_transfer_params gets the client a 502 naming the instance and the cause
// (while streaming: an error event, then [DONE]). A client that leaves has its leg's connection
// reset, so the instance aborts the request at once. The client's Authorization and
// X-Request-Id go to both legs (an id of ours, "proxy-N", when the client gave none).
//
// Other endpoints: GET /health and /ping (200 {"status":"ready"}; 503 "draining"|"stopping"
// with the count in flight), GET /live, GET /version, GET /metrics (the proxy's own counters,
// Prometheus text: vsup_proxy_*), GET /v1/models (relayed from a decode instance).
//
// Shutdown, as the API server's: quiesce() turns every new completion into 503 with
// Retry-After: 1 and Connection: close while the listener stays open; the ones in flight run on
// until the drain deadline, when each is cut: its leg reset (the instance aborts it) and its
// client told (streaming: a chunk with finish_reason "abort" for every choice not finished,
// then [DONE]; otherwise 503 "aborted"). drain() waits for the last response, then closes the
// listener and ends every connection with FIN, before the shutdown deadline.
//
// Thread: construct, use and destroy on the thread that runs `loop`, with KJ on it (KjOnUv).
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/clock.h"
#include "workers/http/http_client.h"

namespace vsup::workers {

struct ProxyOptions {
  std::string name = "proxy";  // the node's name, in log lines
  std::string host = "127.0.0.1";
  uint16_t port = 8000;  // 0: a free one (see port())
  int listenFd = -1;     // the socket `vsup proxy`'s root bound (inherited); -1: bind host:port
  std::vector<http::Url> prefill;  // at least one
  std::vector<http::Url> decode;   // at least one
  bool logRequests = false;        // one line per completion: id, legs, status, seconds
  uint64_t connectTimeoutMs = 5'000;  // per leg: connect and send the request
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  size_t maxConnections = 1024;
  uint64_t firstByteTimeoutMs = 5'000;
  uint64_t headerTimeoutMs = 10'000;
  uint64_t bodyTimeoutMs = 30'000;
  uint64_t idleTimeoutMs = 60'000;
};

class Proxy final {
 public:
  Proxy(uv_loop_t* loop, ProxyOptions options);
  // Resets every leg and closes every connection without answering: drain() first.
  ~Proxy() noexcept(false);
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Listens. Rejects (naming host:port and the errno text) if it cannot. Call once.
  kj::Promise<void> start();
  // New completions get 503 from now; those in flight are cut at `drainDeadline`.
  // Idempotent; an earlier deadline re-arms the cut.
  kj::Promise<void> quiesce(MonoNs drainDeadline);
  // The shutdown hook: quiesce (if not yet), wait for the last response, close. `defer` is
  // called once, during this call, while completions remain.
  kj::Promise<void> drain(MonoNs deadline, std::function<void(const std::string& reason)> defer);
  // /health turns 503 "draining"; every request is still served (`vsup drain`).
  void leaveRotation();

  bool outOfRotation() const;
  int64_t inFlight() const;        // completions being answered
  uint64_t requestsTotal() const;  // completions accepted since start
  uint16_t port() const;           // while listening; 0 before start() and after drain()
  // "prefill 2 in flight · decode 1 in flight" (`vsup tree`).
  std::string detail() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup::workers
