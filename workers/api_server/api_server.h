// ApiServer: one OpenAI-compatible HTTP front end of engine-core (the body of `vsup
// __api-server`). Several share a port (SO_REUSEPORT); each talks to engine-core over its own
// socket through an EngineClient: it submits one engine request per prompt and receives, once
// per engine step, the deltas of all its requests.
//
// Life: start() attaches to the engine, then listens ("ready"). quiesce() closes the listener at
// once (new connects are refused), answers a new request on a kept-alive connection with 503 +
// `Connection: close`, closes idle connections, and makes /health say "draining". In-flight
// requests run on until the drain deadline; then each is aborted and its client told
// (finish_reason "abort": a final chunk and [DONE] when streaming, the text so far otherwise).
// drain() waits for the last response to be written; then the owner may destroy the server.
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

// What /health reports (and /metrics' vsup_ready: 1 only when Ready).
enum class ApiState {
  Starting,  // not listening yet
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
  bool logRequests = false;         // one log line per request (id, sizes, outcome; no prompt)
  std::string apiKey;               // empty: no authentication
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  int64_t maxTokens = 4096;         // the largest max_tokens a request may ask for
};

class ApiServer final {
 public:
  ApiServer(uv_loop_t* loop, ApiServerOptions options);
  // Closes the listener, every connection and the engine connection without answering anyone:
  // call drain() first for a graceful end.
  ~ApiServer() noexcept(false);
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Connects to engine-core over `engine` (a connected socket), attaches, then listens. Resolves
  // once listening (state Ready); rejects if attaching fails or the address cannot be bound
  // (the message then names host:port and the errno text). Call once.
  kj::Promise<void> start(OwnFd engine);

  // Stop intake now and drain until `drainDeadline` (kNoDeadline: no limit), then abort what is
  // still running. Idempotent; an earlier deadline than the current one (a second signal:
  // "abort now") re-arms the drain.
  kj::Promise<void> quiesce(MonoNs drainDeadline);

  // The shutdown hook: quiesces (if not yet) with `deadline`, then resolves once every response
  // is written, and closes the connections. While requests remain it calls `defer` (may be
  // empty) once, during this call, with why it waits. At DeadlineBudget::forChildren(deadline)
  // it stops waiting for the engine and answers the clients itself (finish_reason "abort"), so
  // it resolves before `deadline` even if the engine is stuck.
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
