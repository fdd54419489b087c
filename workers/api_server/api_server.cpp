#include "workers/api_server/api_server.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <kj/debug.h>

#include "base/log.h"
#include "engine/types.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/fault_injection.h"
#include "workers/api_server/metrics.h"
#include "workers/api_server/openai.h"
#include "workers/engine_client.h"
#include "workers/http/http_server.h"

namespace vsup::workers {

const char* nameOf(ApiState state) {
  switch (state) {
    case ApiState::Starting: return "starting";
    case ApiState::Ready: return "ready";
    case ApiState::Draining: return "draining";
    case ApiState::Stopping: return "stopping";
    case ApiState::Failed: return "failed";
  }
  return "?";
}

namespace {

using engine::FinishReason;

// Retry-After on the 503 an inference request gets once the server stops serving: a client
// behind a load balancer that has taken this replica out retries elsewhere, so waiting longer
// gains nothing; 1 s rather than 0 keeps a client that comes back here directly from spinning.
constexpr const char* kRetryAfterSeconds = "1";

// The 503's message while engine-core loads (listening, not attached yet).
constexpr const char* kEngineStarting =
    "the engine is starting (loading the model): retry shortly";

// How long a scrape waits for the engine's figures before it serves the last ones it had.
constexpr uint64_t kStatsTimeoutMs = 1000;
// drain(): how long the final close may take to serve what has arrived and end every
// connection with FIN (never more than the shutdown deadline leaves).
constexpr uint64_t kCloseMs = 2000;

const char* joinedFinish(const std::vector<FinishReason>& finish, std::string& out) {
  out.clear();
  for (FinishReason f : finish) {
    if (!out.empty()) out += ",";
    out += f == FinishReason::None ? "none" : engine::nameOf(f);
  }
  return out.c_str();
}

// Compares in time independent of where the strings differ.
bool constantTimeEquals(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= uint8_t(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

// The credentials of `Authorization: Bearer <token>`: the scheme is case-insensitive (RFC 9110
// 11.1: "bearer" and "BEARER" are the same), one or more spaces follow it. "" for any other
// header, so it never equals a key (which is never empty).
std::string bearerToken(std::string_view header) {
  size_t space = header.find_first_of(" \t");
  if (space != 6) return "";
  for (size_t i = 0; i < 6; ++i) {
    if (std::tolower(static_cast<unsigned char>(header[i])) != "bearer"[i]) return "";
  }
  header.remove_prefix(space);
  while (!header.empty() && (header.front() == ' ' || header.front() == '\t')) {
    header.remove_prefix(1);
  }
  return std::string(header);
}

// A chat without max_tokens may use the rest of the context (as OpenAI and vLLM have it): the
// ceiling (sampling.maxTokens) is the largest max_tokens accepted, and no more than the whole
// context; engine-core, which alone knows the prompt's length, lowers it to what the prompt
// leaves (SamplingParams::maxTokensToContext).
void allowRestOfContext(engine::SamplingParams& sampling, int64_t maxModelLen) {
  if (maxModelLen > 0) sampling.maxTokens = std::min(sampling.maxTokens, maxModelLen);
  sampling.maxTokensToContext = true;
}

int64_t unixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

api::ApiError methodNotAllowed(const std::string& method, const std::string& path,
                               const char* hint = "") {
  return {405, "Method " + method + " not allowed on " + path + hint, "invalid_request_error",
          "method_not_allowed", ""};
}

// The 400 for a request the engine can never serve as asked. The OpenAI clients key on the code
// (and, for a context overflow, on param "max_tokens": the field the user can lower).
api::ApiError rejectionError(const engine::Rejection& r) {
  if (r.code == engine::RejectCode::ContextLengthExceeded) {
    return api::invalidRequest(r.message, "max_tokens", engine::nameOf(r.code));
  }
  if (r.code == engine::RejectCode::KvTransferInvalid) {
    return api::invalidRequest(r.message, "kv_transfer_params", engine::nameOf(r.code));
  }
  return api::invalidRequest(r.message, "", engine::nameOf(r.code));
}

// One HTTP request being answered: one engine request per prompt (choice).
struct Pending {
  std::shared_ptr<http::Response> response;
  api::CompletionCall call;
  std::string id;
  std::string requestId;      // X-Request-Id: the client's, else `id`; the id in log lines
  std::optional<engine::KvParams> kvParams;  // a prefill instance's answer (the final delta's)
  MonoNs arrived = 0;
  int64_t created = 0;
  std::vector<std::string> engineIds;
  std::vector<std::string> text;
  std::vector<FinishReason> finish;
  std::vector<bool> started;  // streaming: first chunk of this choice sent
  std::vector<int64_t> promptTokens;
  std::vector<int64_t> completionTokens;
  size_t open = 0;            // choices not finished
  size_t accepted = 0;        // choices the engine queued (answered submit without rejecting)
  bool streamStarted = false; // streaming: the 200 and its headers are out
  std::string error;          // an engine error ends the whole request
  std::optional<engine::Rejection> rejected;  // the engine refused a choice: a 400
};

}  // namespace

class ApiServer::Impl final : private kj::TaskSet::ErrorHandler {
 public:
  Impl(uv_loop_t* loop, ApiServerOptions options)
      : loop_(loop),
        options_(std::move(options)),
        engine_(loop, "[api] " + options_.name + ":",
                EngineClient::Callbacks{
                    [this](const std::vector<engine::TokenDelta>& d) { deliver(d); },
                    [this](const std::string& reason) { engineFailed(reason); },
                    [this]() { engineLost(); }}),
        tasks_(*this) {
    std::random_device rd;
    idPrefix_ = std::to_string(options_.index) + "-" + std::to_string(rd() % 1000000);
    servedNames_ = options_.servedModelNames;
    if (servedNames_.empty()) servedNames_.push_back(options_.model);
    limits_.servedModel = servedNames_.front();
    limits_.servedModels = servedNames_;
    limits_.maxTokensLimit = options_.maxTokens;
  }

  ~Impl() noexcept(false) { server_.reset(); }

  kj::Promise<void> start(OwnFd engine);
  kj::Promise<void> quiesce(MonoNs drainDeadline);
  kj::Promise<void> drain(MonoNs deadline, const std::function<void(const std::string&)>& defer);
  void leaveRotation();
  bool outOfRotation() const { return outOfRotation_; }
  int64_t inFlight() const { return int64_t(pending_.size()); }
  uint64_t requestsTotal() const { return requestsTotal_; }
  ApiState state() const { return state_; }
  uint16_t port() const { return server_ ? server_->port() : 0; }

 private:
  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[api] {}: {}", options_.name, ipc::userMessage(e));
  }

  void deliver(const std::vector<engine::TokenDelta>& deltas);
  void engineFailed(const std::string& reason);
  void engineLost();
  void handle(http::Request&& request, std::shared_ptr<http::Response> response);
  void handleCompletion(const http::Request& request, std::shared_ptr<http::Response> response,
                        bool chat, std::string clientId);
  void serveMetrics(std::shared_ptr<http::Response> response, const std::string& requestId);
  void sendError(http::Response& response, const api::ApiError& error,
                 const std::string& requestId, http::Headers extra = {});
  void sendJson(http::Response& response, int status, const std::string& body,
                const std::string& requestId, http::Headers extra = {});
  bool healthy() const { return state_ == ApiState::Ready && !outOfRotation_; }
  std::string healthBody() const;
  void onDelta(const engine::TokenDelta& d);
  void startStream(Pending& p);
  void endWithError(Pending& p, const api::ApiError& error);
  void complete(const std::string& id);
  void logEnd(const Pending& p, const std::string& outcome);
  void abortAll();
  void forceFinishAll();
  kj::Promise<void> closeServer(MonoNs deadline, MonoNs hard);
  std::string metricsText() const;

  uv_loop_t* loop_;
  ApiServerOptions options_;
  std::vector<std::string> servedNames_;  // the first is the public name
  api::Limits limits_;
  std::string idPrefix_;
  uint64_t nextId_ = 0;
  ApiState state_ = ApiState::Starting;
  bool outOfRotation_ = false;
  int64_t maxModelLen_ = 0;  // the engine's (attach); 0: unbounded
  std::unique_ptr<http::Server> server_;
  EngineClient engine_;
  std::map<std::string, std::unique_ptr<Pending>> pending_;       // by HTTP request id
  std::map<std::string, std::pair<std::string, size_t>> choiceOf_;  // engine id → (id, index)
  // Metrics.
  uint64_t requestsTotal_ = 0;
  uint64_t deltaBatches_ = 0;  // for VSUP_TEST_FAULT crash@deltaN
  uint64_t abortedAtShutdown_ = 0;
  uint64_t errorsTotal_ = 0;
  engine::EngineStats lastStats_;  // the engine's last answer to Engine.stats; zeros before
  bool statsFailureLogged_ = false;
  MonoNs quiescedAt_ = 0;
  MonoNs drainDeadline_ = kNoDeadline;
  double drainSeconds_ = -1;
  kj::Own<kj::PromiseFulfiller<void>> idle_;
  kj::Own<kj::PromiseFulfiller<void>> closed_;
  bool closing_ = false;  // the final close is under way: scrapes are not held for the engine
  kj::Promise<void> drainTimer_ = kj::READY_NOW;
  kj::TaskSet tasks_;  // last: its tasks use everything above
};

kj::Promise<void> ApiServer::Impl::start(OwnFd engine) {
  // Listening first, attaching second: engine-core answers the attach only once its ranks are
  // ready (it may be loading its weights now), and until then /health says 503 "starting" and
  // an inference request gets 503 "the engine is starting" rather than a refused connection.
  try {
    http::ServerOptions o;
    o.host = options_.host;
    o.port = options_.port;
    o.maxBodyBytes = options_.maxRequestBytes;
    o.listenFd = options_.listenFd;
    // Until the root binds the port for every API server, each binds its own, sharing it.
    o.reusePort = options_.listenFd < 0;
    o.maxConnections = options_.maxConnections;
    o.firstByteTimeoutMs = options_.firstByteTimeoutMs;
    o.headerTimeoutMs = options_.headerTimeoutMs;
    o.bodyTimeoutMs = options_.bodyTimeoutMs;
    o.idleTimeoutMs = options_.idleTimeoutMs;
    server_ = std::make_unique<http::Server>(
        loop_, o, [this](http::Request&& r, std::shared_ptr<http::Response> w) {
          handle(std::move(r), std::move(w));
        });
    server_->setDrainResponse("application/json",
                              api::renderError(api::unavailable("server is shutting down")),
                              {{"Retry-After", kRetryAfterSeconds}});
    server_->onIdle([this]() {
      if (idle_ && idle_->isWaiting()) idle_->fulfill();
    });
    server_->listen();
  } catch (const std::exception& e) {
    server_.reset();
    return KJ_EXCEPTION(FAILED, e.what());
  }
  if (outOfRotation_) server_->setDraining();  // taken out of rotation before it listened
  vsup::log().info("[api] {}: listening on {}:{}; attaching to the engine", options_.name,
                   options_.host, server_->port());
  return engine_.connect(std::move(engine))
      .then(
          [this](EngineInfo info) -> kj::Promise<void> {
            maxModelLen_ = info.maxModelLen;
            // The engine may have failed (or a shutdown begun) while we attached: those stay.
            if (state_ == ApiState::Starting) state_ = ApiState::Ready;
            vsup::log().info("[api] {}: attached to the engine: serving", options_.name);
            return kj::READY_NOW;
          },
          [this](kj::Exception&& e) -> kj::Promise<void> {
            if (e.getType() != kj::Exception::Type::DISCONNECTED) return kj::mv(e);
            // engine-core went away while it was loading: its own start failure (or its exit)
            // is what fails the tree's start, and says why; this start stays pending until the
            // supervisor stops this server (or its start timeout passes), so that the cause,
            // not this consequence, is what is reported.
            if (state_ != ApiState::Failed) state_ = ApiState::Failed;
            vsup::log().error("[api] {}: engine-core closed the connection before it attached "
                              "(it failed to start?): /health is now 503",
                              options_.name);
            return kj::NEVER_DONE;
          });
}

void ApiServer::Impl::leaveRotation() {
  if (outOfRotation_) return;
  outOfRotation_ = true;
  // Every response from now on closes its connection: a client holding a kept-alive connection
  // (which a Service's conntrack entry keeps pinned here) dials again, and its next connect goes
  // where the load balancers route now. Without this, keep-alive traffic would never let
  // `vsup drain` see the quiet it waits for. Requests are still all served.
  if (server_) server_->setDraining();
  vsup::log().info("[api] {}: out of rotation: /health is now 503 \"draining\"; still serving "
                   "every request, each response closing its connection",
                   options_.name);
}

kj::Promise<void> ApiServer::Impl::quiesce(MonoNs drainDeadline) {
  // Idempotent; an earlier deadline (a second signal: "abort now") re-arms the drain timer.
  if (quiescedAt_ != 0 && drainDeadline >= drainDeadline_) return kj::READY_NOW;
  bool first = quiescedAt_ == 0;
  drainDeadline_ = drainDeadline;
  if (!first) {
    vsup::log().warn("[shutdown] {}: drain deadline moved to {:.1f}s", options_.name,
                     double(drainDeadline - monoNow()) / 1e9);
  }
  if (first) quiescedAt_ = monoNow();
  if (state_ != ApiState::Failed) state_ = ApiState::Draining;
  if (server_ && first) {
    // The listener stays open until drain() ends: a connect is answered (inference requests
    // with 503 + Connection: close, /health with 503 "draining") rather than refused or reset.
    server_->setDraining();
    vsup::log().info("[shutdown] {}: draining {} request(s) (deadline {}); new inference "
                     "requests get 503",
                     options_.name, pending_.size(),
                     drainDeadline == kNoDeadline
                         ? std::string("none")
                         : fmt::format("{:.1f}s", double(drainDeadline - monoNow()) / 1e9));
  }
  if (drainDeadline != kNoDeadline) {
    drainTimer_ = ipc::uvSleep(loop_, msUntil(drainDeadline)).then([this]() {
      if (!pending_.empty()) {
        vsup::log().warn("[shutdown] {}: drain deadline: aborting {} request(s)",
                         options_.name, pending_.size());
        abortAll();
      }
    }).eagerlyEvaluate(nullptr);
  }
  return kj::READY_NOW;
}

kj::Promise<void> ApiServer::Impl::drain(MonoNs deadline,
                                         const std::function<void(const std::string&)>& defer) {
  if (quiescedAt_ == 0) tasks_.add(quiesce(deadline));
  if (state_ != ApiState::Failed) state_ = ApiState::Stopping;
  // Past this instant nothing more will come from the engine in time: answer locally, keeping
  // the same reserve a node keeps before its own deadline.
  MonoNs hard = supervisor::DeadlineBudget::forChildren(deadline, monoNow());
  kj::Promise<void> waited = kj::READY_NOW;
  if (server_ && server_->inFlight() != 0) {
    if (defer) defer("draining " + std::to_string(pending_.size()) + " request(s)");
    auto paf = kj::newPromiseAndFulfiller<void>();
    idle_ = kj::mv(paf.fulfiller);
    waited = kj::mv(paf.promise);
    if (hard != kNoDeadline) {
      waited = waited.exclusiveJoin(ipc::uvSleep(loop_, msUntil(hard)).then([this]() {
        forceFinishAll();
      }));
    }
  }
  return waited.then([this, deadline, hard]() { return closeServer(deadline, hard); });
}

// The end of the drain: the last responses are out (or cut at `hard`). The listener closes
// now (what it has queued is accepted and answered first), every connection ends with FIN.
kj::Promise<void> ApiServer::Impl::closeServer(MonoNs deadline, MonoNs hard) {
  drainSeconds_ = double(monoNow() - quiescedAt_) / 1e9;
  vsup::log().info("[shutdown] {}: drained in {:.3f}s ({} aborted)", options_.name,
                   drainSeconds_, abortedAtShutdown_);
  if (!server_) return kj::READY_NOW;
  uint64_t timeoutMs = kCloseMs;
  if (deadline != kNoDeadline) {
    // Half of what is left between the instant of local answers and the deadline, at least:
    // drain() resolves before `deadline` even if clients never close their side.
    MonoNs closeBy = std::max(hard, monoNow()) + (deadline - std::max(hard, monoNow())) / 2;
    timeoutMs = std::min<uint64_t>(timeoutMs, msUntil(closeBy));
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  closed_ = kj::mv(paf.fulfiller);
  closing_ = true;
  server_->close(timeoutMs, [this]() {
    server_.reset();
    if (closed_ && closed_->isWaiting()) closed_->fulfill();
  });
  return kj::mv(paf.promise);
}

void ApiServer::Impl::deliver(const std::vector<engine::TokenDelta>& deltas) {
  supervisor::crashIfInjected(options_.name, "delta" + std::to_string(++deltaBatches_));
  for (const auto& d : deltas) onDelta(d);
}

void ApiServer::Impl::sendJson(http::Response& response, int status, const std::string& body,
                               const std::string& requestId, http::Headers extra) {
  extra.emplace_back("Content-Type", "application/json");
  extra.emplace_back("X-Request-Id", requestId);
  response.respond(status, std::move(extra), body);
}

void ApiServer::Impl::sendError(http::Response& response, const api::ApiError& error,
                                const std::string& requestId, http::Headers extra) {
  ++errorsTotal_;
  sendJson(response, error.status, api::renderError(error), requestId, std::move(extra));
}

std::string ApiServer::Impl::healthBody() const {
  if (healthy()) return R"({"status":"ready"})";
  const char* status = state_ == ApiState::Ready ? "draining" : nameOf(state_);  // out of rotation
  return fmt::format(R"({{"status":"{}","in_flight":{}}})", status, pending_.size());
}

void ApiServer::Impl::handle(http::Request&& request, std::shared_ptr<http::Response> response) {
  const std::string& path = request.path;
  const std::string& method = request.method;
  std::string clientId = request.header("x-request-id");
  if (!http::echoableRequestId(clientId)) clientId.clear();
  bool completion = path == "/v1/completions" || path == "/v1/chat/completions";
  // X-Request-Id on every response: the client's, else a completion's response id
  // (handleCompletion), else one of these.
  std::string requestId = clientId;
  auto ourId = [&]() -> const std::string& {
    if (requestId.empty()) requestId = "req-" + idPrefix_ + "-" + std::to_string(++nextId_);
    return requestId;
  };
  if (!completion) ourId();
  auto bad = [&](const char* hint = "") {
    sendError(*response, methodNotAllowed(method, path, hint), ourId());
  };
  if (path == "/health" || path == "/ping") {
    // /ping as SageMaker and vLLM have it: the same answer as /health, to GET and POST.
    bool allowed = method == "GET" || method == "HEAD" || (path == "/ping" && method == "POST");
    if (!allowed) return bad();
    return sendJson(*response, healthy() ? 200 : 503, healthBody(), requestId);
  }
  if (path == "/live") {
    if (method != "GET" && method != "HEAD") return bad();
    bool alive = state_ != ApiState::Failed;
    return sendJson(*response, alive ? 200 : 503,
                    fmt::format(R"({{"status":"{}","state":"{}"}})", alive ? "alive" : "failed",
                                nameOf(state_)),
                    requestId);
  }
  if (path == "/version") {
    if (method != "GET" && method != "HEAD") return bad();
    return sendJson(*response, 200, std::string(R"({"version":")") + VSUP_VERSION + "\"}",
                    requestId);
  }
  if (path == "/metrics") {
    if (method != "GET" && method != "HEAD") return bad();
    return serveMetrics(std::move(response), requestId);
  }
  bool known = path == "/v1/models" || completion;
  if (!known) return sendError(*response, api::pathNotFound(method, path), requestId);
  if (!options_.apiKey.empty()) {
    const std::string auth = bearerToken(request.header("authorization"));
    const std::string& expected = options_.apiKey;
    if (!constantTimeEquals(auth, expected)) {
      return sendError(*response, api::authenticationFailed(), ourId());
    }
  }
  if (path == "/v1/models") {
    if (method != "GET") return bad();
    // Before the attach the engine's max_model_len is unknown: the model is not served yet.
    if (state_ == ApiState::Starting) {
      return sendError(*response, api::unavailable(kEngineStarting), requestId,
                       {{"Retry-After", kRetryAfterSeconds}});
    }
    return sendJson(*response, 200,
                    api::renderModels(servedNames_, options_.model, maxModelLen_, unixNow()),
                    requestId);
  }
  if (method != "POST") return bad(" (use POST)");
  handleCompletion(request, std::move(response), path == "/v1/chat/completions",
                   std::move(clientId));
}

// Each scrape asks the engine for its figures; when the engine cannot answer (failed, gone,
// stuck past kStatsTimeoutMs) the scrape still answers, with the last figures it had. During
// the final close (which ends within its own short bound) it answers with those at once.
void ApiServer::Impl::serveMetrics(std::shared_ptr<http::Response> response,
                                   const std::string& requestId) {
  if (closing_) {
    return response->respond(
        200, {{"Content-Type", metrics::kContentType}, {"X-Request-Id", requestId}},
        metricsText());
  }
  kj::Promise<engine::EngineStats> asked = engine_.stats().exclusiveJoin(
      ipc::uvSleep(loop_, kStatsTimeoutMs).then([]() -> kj::Promise<engine::EngineStats> {
        return KJ_EXCEPTION(FAILED, "no answer in time", kStatsTimeoutMs);
      }));
  tasks_.add(asked
                 .then(
                     [this](engine::EngineStats stats) {
                       lastStats_ = std::move(stats);
                       statsFailureLogged_ = false;
                     },
                     [this](kj::Exception&& e) {
                       if (std::exchange(statsFailureLogged_, true)) return;
                       vsup::log().warn("[api] {}: /metrics: the engine's figures are not "
                                        "available ({}); serving the last ones",
                                        options_.name, ipc::userMessage(e));
                     })
                 .then([this, response, requestId]() {
                   response->respond(200,
                                     {{"Content-Type", metrics::kContentType},
                                      {"X-Request-Id", requestId}},
                                     metricsText());
                 }));
}

void ApiServer::Impl::handleCompletion(const http::Request& request,
                                       std::shared_ptr<http::Response> response, bool chat,
                                       std::string clientId) {
  std::string id =
      std::string(chat ? "chatcmpl-" : "cmpl-") + idPrefix_ + "-" + std::to_string(++nextId_);
  std::string requestId = clientId.empty() ? id : std::move(clientId);
  if (state_ != ApiState::Ready) {
    bool stopping = state_ == ApiState::Draining || state_ == ApiState::Stopping;
    if (options_.logRequests) {
      vsup::log().info("[api] {}: request {} refused: 503 (server {})", options_.name,
                       requestId, nameOf(state_));
    }
    std::string why = stopping                         ? std::string("server is shutting down")
                      : state_ == ApiState::Starting ? std::string(kEngineStarting)
                                                     : std::string("server is ") + nameOf(state_);
    return sendError(*response, api::unavailable(why), requestId,
                     {{"Retry-After", kRetryAfterSeconds}, {"Connection", "close"}});
  }
  auto parsed = api::parseCompletionRequest(request.body, chat, limits_);
  if (auto* error = std::get_if<api::ApiError>(&parsed)) {
    if (options_.logRequests) {
      // The code and param only: the message may quote the body.
      vsup::log().info("[api] {}: request {} refused: {} {}{}", options_.name, requestId,
                       error->status, error->code.empty() ? error->type : error->code,
                       error->param.empty() ? "" : " (param " + error->param + ")");
    }
    return sendError(*response, *error, requestId);
  }
  auto p = std::make_unique<Pending>();
  p->call = std::move(std::get<api::CompletionCall>(parsed));
  p->response = response;
  p->id = id;
  p->requestId = requestId;
  p->arrived = monoNow();
  p->created = unixNow();
  size_t n = p->call.prompts.size();
  p->text.assign(n, "");
  p->finish.assign(n, FinishReason::None);
  p->started.assign(n, false);
  p->promptTokens.assign(n, 0);
  p->completionTokens.assign(n, 0);
  p->open = n;
  ++requestsTotal_;
  if (options_.logRequests) {
    vsup::log().info("[api] {}: request {} arrived: {}{}, id {}, max_tokens {}, {} prompt(s)",
                     options_.name, requestId, chat ? "chat completion" : "completion",
                     p->call.stream ? " (stream)" : "", id, p->call.sampling.maxTokens, n);
  }
  std::vector<engine::GenerateRequest> requests;
  for (size_t i = 0; i < n; ++i) {
    engine::GenerateRequest g;
    g.id = id + "-" + std::to_string(i);
    g.prompt = p->call.prompts[i];
    g.messages = std::move(p->call.messages);  // a chat's only choice; nothing reads them after
    g.sampling = p->call.sampling;
    g.kv = p->call.kv;
    if (chat && !p->call.maxTokensGiven) {
      allowRestOfContext(g.sampling, maxModelLen_);
    }
    p->engineIds.push_back(g.id);
    choiceOf_[g.id] = {id, i};
    requests.push_back(std::move(g));
  }
  // Registered before the submits: a submit that fails at once must find the request.
  pending_[id] = std::move(p);
  for (const auto& g : requests) {
    tasks_.add(engine_.submit(g)
                   .then([this, id](std::optional<engine::Rejection> rejection) {
                     auto it = pending_.find(id);
                     if (it == pending_.end()) return;
                     Pending& p = *it->second;
                     if (rejection) {
                       p.rejected = std::move(rejection);
                       complete(id);
                       return;
                     }
                     // A stream's 200 goes out once every choice is accepted: a rejection
                     // can still be a plain 400 until then.
                     if (++p.accepted == p.engineIds.size()) startStream(p);
                   })
                   .catch_([this, id](kj::Exception&& e) {
                     auto it = pending_.find(id);
                     if (it == pending_.end()) return;
                     it->second->error =
                         std::string("engine refused the request: ") + ipc::userMessage(e);
                     complete(id);
                   }));
  }
  // The client is gone once a write to it failed, which is mostly inside one of our own writes
  // (onDelta holds the request then): the request ends on a turn of its own. Meanwhile its
  // writes are no-ops.
  response->onClientGone([this, id]() {
    tasks_.add(kj::evalLater([this, id]() {
      auto it = pending_.find(id);
      if (it == pending_.end()) return;  // it ended meanwhile
      for (const auto& eid : it->second->engineIds) {
        engine_.abort(eid);
        choiceOf_.erase(eid);
      }
      logEnd(*it->second, "client gone (aborted)");
      pending_.erase(it);
    }));
  });
}

void ApiServer::Impl::onDelta(const engine::TokenDelta& d) {
  auto c = choiceOf_.find(d.requestId);
  if (c == choiceOf_.end()) return;
  auto [id, index] = c->second;
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  Pending& p = *it->second;
  p.text[index] += d.text;
  p.promptTokens[index] = d.promptTokens;
  p.completionTokens[index] = d.completionTokens;
  if (d.finish == FinishReason::Error) p.error = d.error.empty() ? "engine error" : d.error;
  if (d.kvParams) p.kvParams = d.kvParams;
  if (p.call.stream && d.finish != FinishReason::Error &&
      (!d.text.empty() || d.finish != FinishReason::None)) {
    startStream(p);
    api::Choice choice{int(index), d.text, d.finish};
    p.response->write(api::sseEvent(api::renderStreamChunk(p.call.chat, p.id, p.created,
                                                           p.call.model, choice,
                                                           !p.started[index])));
    p.started[index] = true;
  }
  if (d.finish != FinishReason::None) {
    if (d.finish == FinishReason::Abort && quiescedAt_ != 0) ++abortedAtShutdown_;
    p.finish[index] = d.finish;
    choiceOf_.erase(c);
    if (--p.open == 0 || d.finish == FinishReason::Error) complete(id);
  }
}

// Ends a request that failed: an error event and [DONE] once its stream has begun, else a
// plain JSON error with its status.
void ApiServer::Impl::endWithError(Pending& p, const api::ApiError& error) {
  logEnd(p, fmt::format("{} {}", error.status, error.code.empty() ? error.message : error.code));
  if (p.streamStarted) {
    p.response->write(api::sseEvent(api::renderError(error)));
    p.response->write(api::kSseDone);
    p.response->finish();
  } else {
    sendJson(*p.response, error.status, api::renderError(error), p.requestId);
  }
}

void ApiServer::Impl::startStream(Pending& p) {
  if (!p.call.stream || p.streamStarted) return;
  p.streamStarted = true;
  p.response->startStream(200, {{"Content-Type", "text/event-stream"},
                                {"Cache-Control", "no-cache"},
                                {"X-Request-Id", p.requestId}});
}

void ApiServer::Impl::logEnd(const Pending& p, const std::string& outcome) {
  if (!options_.logRequests) return;
  int64_t prompt = 0;
  int64_t completion = 0;
  for (size_t i = 0; i < p.promptTokens.size(); ++i) {
    prompt += p.promptTokens[i];
    completion += p.completionTokens[i];
  }
  std::string finish;
  vsup::log().info("[api] {}: request {} ended in {:.3f}s: {}; finish {}, prompt_tokens {}, "
                   "completion_tokens {}",
                   options_.name, p.requestId, double(monoNow() - p.arrived) / 1e9, outcome,
                   joinedFinish(p.finish, finish), prompt, completion);
}

// Writes the end of a response whose choices are all finished (or that failed).
void ApiServer::Impl::complete(const std::string& id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  std::unique_ptr<Pending> p = std::move(it->second);
  pending_.erase(it);
  for (size_t i = 0; i < p->engineIds.size(); ++i) {
    // Choices still running when the request ends early (an error, a rejected sibling).
    if (p->finish[i] == FinishReason::None && choiceOf_.count(p->engineIds[i]) != 0) {
      engine_.abort(p->engineIds[i]);
    }
    choiceOf_.erase(p->engineIds[i]);
  }
  if (p->rejected) {
    ++errorsTotal_;
    return endWithError(*p, rejectionError(*p->rejected));
  }
  api::Usage usage;
  for (size_t i = 0; i < p->text.size(); ++i) {
    usage.prompt += p->promptTokens[i];
    usage.completion += p->completionTokens[i];
  }
  if (!p->error.empty()) {
    ++errorsTotal_;
    return endWithError(*p, api::serverError(p->error));
  }
  logEnd(*p, "200");
  if (p->call.stream) {
    startStream(*p);
    if (p->kvParams) {
      p->response->write(api::sseEvent(api::renderKvParamsChunk(
          p->call.chat, p->id, p->created, p->call.model, *p->kvParams)));
    }
    if (p->call.includeUsage) {
      p->response->write(api::sseEvent(
          api::renderUsageChunk(p->call.chat, p->id, p->created, p->call.model, usage)));
    }
    p->response->write(api::kSseDone);
    p->response->finish();
    return;
  }
  api::CompletionResult result;
  result.chat = p->call.chat;
  result.id = p->id;
  result.created = p->created;
  result.model = p->call.model;  // the name the client asked for
  for (size_t i = 0; i < p->text.size(); ++i) {
    result.choices.push_back({int(i), p->text[i], p->finish[i]});
  }
  result.usage = usage;
  result.kvTransferParams = p->kvParams;
  sendJson(*p->response, 200, api::renderCompletion(result), p->requestId);
}

void ApiServer::Impl::abortAll() {
  for (auto& [id, p] : pending_) {
    for (size_t i = 0; i < p->engineIds.size(); ++i) {
      if (p->finish[i] != FinishReason::None) continue;
      engine_.abort(p->engineIds[i]);
    }
  }
  // The engine answers each abort with a final delta (finish = abort). Should it not (it is
  // gone), answer the clients ourselves shortly after.
  tasks_.add(ipc::uvSleep(loop_, 500).then([this]() { forceFinishAll(); }));
}

// Ends every pending request here and now with what it has, finish_reason "abort".
void ApiServer::Impl::forceFinishAll() {
  std::vector<std::string> ids;
  for (auto& [id, p] : pending_) ids.push_back(id);
  for (const auto& id : ids) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    // Built first: the last of them completes the request, which frees `p`.
    std::vector<engine::TokenDelta> finals;
    const Pending& p = *it->second;
    for (size_t i = 0; i < p.finish.size(); ++i) {
      if (p.finish[i] != FinishReason::None) continue;
      engine::TokenDelta d;
      d.requestId = p.engineIds[i];
      d.finish = FinishReason::Abort;
      d.promptTokens = p.promptTokens[i];
      d.completionTokens = p.completionTokens[i];
      finals.push_back(std::move(d));
    }
    for (const auto& d : finals) onDelta(d);
  }
}

void ApiServer::Impl::engineFailed(const std::string& reason) {
  if (state_ == ApiState::Failed) return;
  state_ = ApiState::Failed;
  vsup::log().error("[api] {}: the engine failed ({}): /health is now 503", options_.name,
                    reason);
}

void ApiServer::Impl::engineLost() {
  if (state_ == ApiState::Stopping && pending_.empty()) return;
  state_ = ApiState::Failed;
  vsup::log().error("[api] {}: lost the connection to engine-core: failing {} request(s)",
                    options_.name, pending_.size());
  std::vector<std::string> ids;
  for (auto& [id, p] : pending_) ids.push_back(id);
  for (const auto& id : ids) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    it->second->error = "engine failure: the engine process is gone";
    complete(id);
  }
}

std::string ApiServer::Impl::metricsText() const {
  metrics::ServerFigures f;
  f.index = options_.index;
  f.inFlight = int64_t(pending_.size());
  f.requestsTotal = requestsTotal_;
  f.abortedAtShutdown = abortedAtShutdown_;
  f.errors = errorsTotal_;
  f.ready = healthy();
  f.draining = outOfRotation_ || quiescedAt_ != 0;
  f.drainSeconds = drainSeconds_;
  return metrics::render(lastStats_, servedNames_.front(), f);
}

ApiServer::ApiServer(uv_loop_t* loop, ApiServerOptions options)
    : impl_(std::make_unique<Impl>(loop, std::move(options))) {}

ApiServer::~ApiServer() noexcept(false) = default;

kj::Promise<void> ApiServer::start(OwnFd engine) { return impl_->start(std::move(engine)); }

kj::Promise<void> ApiServer::quiesce(MonoNs drainDeadline) {
  return impl_->quiesce(drainDeadline);
}

kj::Promise<void> ApiServer::drain(MonoNs deadline,
                                   std::function<void(const std::string& reason)> defer) {
  return impl_->drain(deadline, defer);
}

void ApiServer::leaveRotation() { impl_->leaveRotation(); }
bool ApiServer::outOfRotation() const { return impl_->outOfRotation(); }
int64_t ApiServer::inFlight() const { return impl_->inFlight(); }
uint64_t ApiServer::requestsTotal() const { return impl_->requestsTotal(); }
ApiState ApiServer::state() const { return impl_->state(); }
uint16_t ApiServer::port() const { return impl_->port(); }

}  // namespace vsup::workers
