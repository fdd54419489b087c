// ApiServer: one OpenAI-compatible HTTP front end of engine-core (the body of `vsup
// __api-server`). Several accept from one listening socket, bound by `vsup run`'s root; each talks to engine-core over its own
// socket through an EngineClient: it submits one engine request per prompt and receives, once
// per engine step, the deltas of all its requests.
//
// Endpoints: POST /v1/completions and /v1/chat/completions (the model named may be any of the
// served names; the response carries the name asked for), GET /v1/models (every served name,
// root = options.model, the engine's max_model_len), GET /health (200 {"status":"ready"}; else
// 503 {"status":"starting"|"draining"|"stopping"|"failed","in_flight":N}), GET|POST /ping (the same as
// /health, as SageMaker and vLLM have it), GET /live (200 while the process works, 503 once
// Failed), GET /version ({"version":VSUP_VERSION}), GET /metrics (workers/api_server/metrics.h;
// the engine's figures are asked of it on each scrape, and when it cannot answer within 1 s the
// last ones it gave are served, zeros before any: a scrape never fails; during the final close
// of drain() the last ones at once). Every response carries
// X-Request-Id: the client's when it is 1..256 bytes of printable ASCII, else the completion's
// response id ("cmpl-…", "chatcmpl-…") or one of ours ("req-…"); it is the request's id in the
// log lines of options.logRequests.
//
// With options.apiKey, /v1/* need `Authorization: Bearer <key>` (the scheme in any case, as RFC
// 9110 has it; the key compared in constant time); else 401 invalid_api_key. A completion
// without max_tokens gets 16 (vLLM's legacy default); a chat without max_tokens (and
// max_completion_tokens) may use the rest of the context: up to options.maxTokens, lowered by
// engine-core to what the prompt leaves of max_model_len. A client that leaves (a write to it
// fails, or its connection is reset: http_server.h) has its engine requests aborted; one that
// only half-closes after its request gets its answer.
//
// Life: start() listens, then attaches to the engine; until engine-core answers the attach (it
// answers once its ranks have loaded the model) /health says 503 "starting", and an inference
// request or /v1/models gets 503 with `Retry-After: 1` and the OpenAI error body ("the engine is
// starting"); then "ready". leaveRotation() only turns
// /health (and /ping) 503 "draining": every request is served as before. From quiesce() on,
// the listener stays open and every connection is answered (http_server.h has the guarantee and
// the kernel's remaining window): an inference request gets 503 with `Connection: close`,
// `Retry-After: 1` (its client, behind a load balancer that no longer routes here, retries
// elsewhere at once; 1 s keeps one that comes back here directly from spinning) and the OpenAI
// error body (as does every inference request once the engine failed); /health says
// "draining" with the count in flight; /live, /metrics, /version, /ping and /v1/models answer
// as usual; every response closes its connection, and an idle kept-alive connection stays open
// for the request its client may be sending. In-flight requests run on
// until the drain deadline; then each is aborted and its client told (finish_reason "abort": a
// final chunk and [DONE] when streaming, the text so far otherwise). drain() waits for the last
// response, then closes the listener (accepting and answering what it has queued) and ends every
// connection with FIN, within the shutdown deadline; then the owner may destroy the server.
//
// Thread: construct, use and destroy on the thread that runs `loop`, with KJ on it (KjOnUv).
// The loop must run at least once more after destruction (libuv close callbacks).
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/clock.h"
#include "base/fd.h"

namespace vsup::workers {

// What /health reports (and /metrics' vsup_ready: 1 only when Ready and in rotation).
enum class ApiState {
  Starting,  // listening, not attached to the engine yet (it is loading)
  Ready,     // serving
  Draining,  // quiesced: finishing the requests in flight
  Stopping,  // the drain hook runs: about to exit
  Failed,    // the engine failed or is gone; never leaves this state
};
const char* nameOf(ApiState state);  // "starting", "ready", "draining", "stopping", "failed"

struct ApiServerOptions {
  std::string name = "api-server";  // the node's name: log lines and fault injection
  uint32_t index = 0;               // the `server` label of /metrics; part of response ids
  std::string host = "127.0.0.1";
  uint16_t port = 8000;  // 0: a free port, see port()
  std::string model = "vsup-sim";   // the model as `vsup run` was given it (a preset or a
                                    // directory): /v1/models' `root`
  // The names requests may use for it (--served-model-name); the first is the public name
  // (/v1/models' id, the `model_name` label of /metrics). Empty: {model}.
  std::vector<std::string> servedModelNames;
  // Log each completion request: one info line when it arrives (X-Request-Id, id, stream or
  // not, max_tokens, number of prompts), one when it ends (status, finish reasons, token
  // counts, seconds), or one when it is refused (status, error code); never the prompt.
  bool logRequests = false;
  std::string apiKey;               // empty: no authentication
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  int64_t maxTokens = 4096;         // the largest max_tokens a request may ask for
  // The listening socket (bound once by `vsup run`'s root, inherited); -1: bind host:port.
  int listenFd = -1;
  // HTTP limits (http::ServerOptions; 0 disables a timeout).
  size_t maxConnections = 1024;
  uint64_t firstByteTimeoutMs = 5'000;
  uint64_t headerTimeoutMs = 10'000;
  uint64_t bodyTimeoutMs = 30'000;
  uint64_t idleTimeoutMs = 60'000;
};

class ApiServer final {
 public:
  ApiServer(uv_loop_t* loop, ApiServerOptions options);
  // Closes the listener, every connection and the engine connection without answering anyone:
  // call drain() first for a graceful end.
  ~ApiServer() noexcept(false);
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Listens (state Starting), then connects to engine-core over `engine` (a connected socket)
  // and attaches. Resolves once attached (state Ready); rejects if the address cannot be bound
  // (the message then names host:port and the errno text; nothing listens then) or attaching
  // fails. Call once.
  kj::Promise<void> start(OwnFd engine);

  // Stop taking inference requests now (they get 503; the listener stays open) and drain until
  // `drainDeadline` (kNoDeadline: no limit), then abort what is still running. Idempotent; an
  // earlier deadline than the current one (a second signal: "abort now") re-arms the drain.
  kj::Promise<void> quiesce(MonoNs drainDeadline);

  // The shutdown hook: quiesces (if not yet) with `deadline`, waits until every response is
  // written, then closes the listener and the connections (http::Server::close: what has
  // arrived is answered, every connection ends with FIN; at most 2 s) and resolves. While
  // requests remain it calls `defer` (may be empty) once, during this call, with why it waits.
  // At DeadlineBudget::forChildren(deadline) it stops waiting for the engine and answers the
  // clients itself (finish_reason "abort"), and the close gets half of what is left after that,
  // so it resolves before `deadline` even if the engine is stuck or clients never close.
  kj::Promise<void> drain(MonoNs deadline, std::function<void(const std::string& reason)> defer);

  // Leave the load balancers' rotation (Node.leaveRotation, `vsup drain`): /health turns 503
  // "draining" now, while every request, new ones included, is still served as before.
  // Idempotent; quiesce() follows with the real drain.
  void leaveRotation();
  bool outOfRotation() const;

  int64_t inFlight() const;  // completion requests being answered
  uint64_t requestsTotal() const;  // completion requests accepted since start
  ApiState state() const;
  uint16_t port() const;     // the bound port while listening or draining; 0 before start()
                             // and once drain() has closed everything

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup::workers
