#include "workers/api_server/api_server.h"

#include <chrono>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include <fmt/format.h>
#include <kj/debug.h>

#include "base/log.h"
#include "engine/types.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/fault_injection.h"
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

// Compares in time independent of where the strings differ.
bool constantTimeEquals(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= uint8_t(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
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
  return api::invalidRequest(r.message, "", engine::nameOf(r.code));
}

// One HTTP request being answered: one engine request per prompt (choice).
struct Pending {
  std::shared_ptr<http::Response> response;
  api::CompletionCall call;
  std::string id;
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
    limits_.servedModel = options_.model;
    limits_.maxTokensLimit = options_.maxTokens;
  }

  ~Impl() noexcept(false) { server_.reset(); }

  kj::Promise<void> start(OwnFd engine);
  kj::Promise<void> quiesce(MonoNs drainDeadline);
  kj::Promise<void> drain(MonoNs deadline, const std::function<void(const std::string&)>& defer);
  int64_t inFlight() const { return int64_t(pending_.size()); }
  ApiState state() const { return state_; }
  uint16_t port() const { return server_ ? server_->port() : 0; }

 private:
  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[api] {}: {}", options_.name, e.getDescription().cStr());
  }

  void deliver(const std::vector<engine::TokenDelta>& deltas);
  void engineFailed(const std::string& reason);
  void engineLost();
  void handle(http::Request&& request, std::shared_ptr<http::Response> response);
  void handleCompletion(const http::Request& request, std::shared_ptr<http::Response> response,
                        bool chat);
  void sendError(http::Response& response, const api::ApiError& error);
  void sendJson(http::Response& response, int status, const std::string& body);
  void onDelta(const engine::TokenDelta& d);
  void startStream(Pending& p);
  void endWithError(Pending& p, const api::ApiError& error);
  void complete(const std::string& id);
  void abortAll();
  void forceFinishAll();
  std::string metrics() const;

  uv_loop_t* loop_;
  ApiServerOptions options_;
  api::Limits limits_;
  std::string idPrefix_;
  uint64_t nextId_ = 0;
  ApiState state_ = ApiState::Starting;
  std::unique_ptr<http::Server> server_;
  EngineClient engine_;
  std::map<std::string, std::unique_ptr<Pending>> pending_;       // by HTTP request id
  std::map<std::string, std::pair<std::string, size_t>> choiceOf_;  // engine id → (id, index)
  // Metrics.
  uint64_t requestsTotal_ = 0;
  uint64_t deltaBatches_ = 0;  // for VSUP_TEST_FAULT crash@deltaN
  uint64_t abortedAtShutdown_ = 0;
  uint64_t errorsTotal_ = 0;
  MonoNs quiescedAt_ = 0;
  MonoNs drainDeadline_ = kNoDeadline;
  double drainSeconds_ = -1;
  kj::Own<kj::PromiseFulfiller<void>> idle_;
  kj::Promise<void> drainTimer_ = kj::READY_NOW;
  kj::TaskSet tasks_;  // last: its tasks use everything above
};

kj::Promise<void> ApiServer::Impl::start(OwnFd engine) {
  return engine_.connect(std::move(engine)).then([this](EngineInfo) {
    http::ServerOptions o;
    o.host = options_.host;
    o.port = options_.port;
    o.maxBodyBytes = options_.maxRequestBytes;
    server_ = std::make_unique<http::Server>(
        loop_, o, [this](http::Request&& r, std::shared_ptr<http::Response> w) {
          handle(std::move(r), std::move(w));
        });
    server_->setDrainResponse("application/json",
                              api::renderError(api::unavailable("server is shutting down")));
    server_->onIdle([this]() {
      if (idle_ && idle_->isWaiting()) idle_->fulfill();
    });
    server_->listen();
    // The engine may have failed while we attached: Failed is final.
    if (state_ == ApiState::Starting) state_ = ApiState::Ready;
    vsup::log().info("[api] {}: listening on {}:{}", options_.name, options_.host,
                     server_->port());
  });
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
    // Why first: new connects must be refused at once (load balancers retry those safely).
    server_->stopAccepting();
    server_->setDraining();
    vsup::log().info("[shutdown] {}: listener closed; draining {} request(s) (deadline {})",
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
  auto finished = [this]() {
    drainSeconds_ = double(monoNow() - quiescedAt_) / 1e9;
    vsup::log().info("[shutdown] {}: drained in {:.3f}s ({} aborted)", options_.name,
                     drainSeconds_, abortedAtShutdown_);
    server_.reset();  // closes every remaining connection
  };
  if (!server_ || server_->inFlight() == 0) {
    finished();
    return kj::READY_NOW;
  }
  if (defer) defer("draining " + std::to_string(pending_.size()) + " request(s)");
  auto paf = kj::newPromiseAndFulfiller<void>();
  idle_ = kj::mv(paf.fulfiller);
  // Past this instant nothing more will come from the engine in time: answer locally, keeping
  // the same reserve a node keeps before its own deadline.
  MonoNs hard = supervisor::DeadlineBudget::forChildren(deadline, monoNow());
  kj::Promise<void> waited = kj::mv(paf.promise);
  if (hard != kNoDeadline) {
    waited = waited.exclusiveJoin(ipc::uvSleep(loop_, msUntil(hard)).then([this]() {
      forceFinishAll();
    }));
  }
  return waited.then(kj::mv(finished));
}

void ApiServer::Impl::deliver(const std::vector<engine::TokenDelta>& deltas) {
  supervisor::crashIfInjected(options_.name, "delta" + std::to_string(++deltaBatches_));
  for (const auto& d : deltas) onDelta(d);
}

void ApiServer::Impl::sendJson(http::Response& response, int status, const std::string& body) {
  response.respond(status, {{"Content-Type", "application/json"}}, body);
}

void ApiServer::Impl::sendError(http::Response& response, const api::ApiError& error) {
  ++errorsTotal_;
  sendJson(response, error.status, api::renderError(error));
}

void ApiServer::Impl::handle(http::Request&& request, std::shared_ptr<http::Response> response) {
  const std::string& path = request.path;
  if (path == "/health") {
    if (request.method != "GET" && request.method != "HEAD") {
      return sendError(*response, methodNotAllowed(request.method, path));
    }
    bool ready = state_ == ApiState::Ready;
    return sendJson(*response, ready ? 200 : 503,
                    std::string("{\"status\":\"") + nameOf(state_) + "\"}");
  }
  if (path == "/metrics") {
    if (request.method != "GET") return sendError(*response, methodNotAllowed(request.method, path));
    return response->respond(200, {{"Content-Type", "text/plain; version=0.0.4"}}, metrics());
  }
  bool known = path == "/v1/models" || path == "/v1/completions" || path == "/v1/chat/completions";
  if (!known) return sendError(*response, api::pathNotFound(request.method, path));
  if (!options_.apiKey.empty()) {
    std::string auth = request.header("authorization");
    std::string expected = "Bearer " + options_.apiKey;
    if (!constantTimeEquals(auth, expected)) {
      return sendError(*response, api::authenticationFailed());
    }
  }
  if (path == "/v1/models") {
    if (request.method != "GET") return sendError(*response, methodNotAllowed(request.method, path));
    return sendJson(*response, 200, api::renderModels(options_.model, unixNow()));
  }
  if (request.method != "POST") {
    return sendError(*response, methodNotAllowed(request.method, path, " (use POST)"));
  }
  handleCompletion(request, std::move(response), path == "/v1/chat/completions");
}

void ApiServer::Impl::handleCompletion(const http::Request& request,
                                       std::shared_ptr<http::Response> response, bool chat) {
  if (state_ != ApiState::Ready) {
    return sendError(*response, api::unavailable(std::string("server is ") + nameOf(state_)));
  }
  auto parsed = api::parseCompletionRequest(request.body, chat, limits_);
  if (auto* error = std::get_if<api::ApiError>(&parsed)) return sendError(*response, *error);
  auto p = std::make_unique<Pending>();
  p->call = std::move(std::get<api::CompletionCall>(parsed));
  p->response = response;
  p->id = std::string(chat ? "chatcmpl-" : "cmpl-") + idPrefix_ + "-" + std::to_string(++nextId_);
  p->created = unixNow();
  size_t n = p->call.prompts.size();
  p->text.assign(n, "");
  p->finish.assign(n, FinishReason::None);
  p->started.assign(n, false);
  p->promptTokens.assign(n, 0);
  p->completionTokens.assign(n, 0);
  p->open = n;
  ++requestsTotal_;
  std::string id = p->id;
  std::vector<engine::GenerateRequest> requests;
  for (size_t i = 0; i < n; ++i) {
    engine::GenerateRequest g;
    g.id = id + "-" + std::to_string(i);
    g.prompt = p->call.prompts[i];
    g.messages = std::move(p->call.messages);  // a chat's only choice; nothing reads them after
    g.sampling = p->call.sampling;
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
                         std::string("engine refused the request: ") + e.getDescription().cStr();
                     complete(id);
                   }));
  }
  response->onClientGone([this, id]() {
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    for (const auto& eid : it->second->engineIds) {
      engine_.abort(eid);
      choiceOf_.erase(eid);
    }
    pending_.erase(it);
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
  if (p.call.stream && d.finish != FinishReason::Error &&
      (!d.text.empty() || d.finish != FinishReason::None)) {
    startStream(p);
    api::Choice choice{int(index), d.text, d.finish};
    p.response->write(api::sseEvent(api::renderStreamChunk(p.call.chat, p.id, p.created,
                                                           options_.model, choice,
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
  if (p.streamStarted) {
    p.response->write(api::sseEvent(api::renderError(error)));
    p.response->write(api::kSseDone);
    p.response->finish();
  } else {
    sendJson(*p.response, error.status, api::renderError(error));
  }
}

void ApiServer::Impl::startStream(Pending& p) {
  if (!p.call.stream || p.streamStarted) return;
  p.streamStarted = true;
  p.response->startStream(200, {{"Content-Type", "text/event-stream"},
                                {"Cache-Control", "no-cache"}});
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
  if (p->call.stream) {
    startStream(*p);
    if (p->call.includeUsage) {
      p->response->write(api::sseEvent(
          api::renderUsageChunk(p->call.chat, p->id, p->created, options_.model, usage)));
    }
    p->response->write(api::kSseDone);
    p->response->finish();
    return;
  }
  api::CompletionResult result;
  result.chat = p->call.chat;
  result.id = p->id;
  result.created = p->created;
  result.model = options_.model;
  for (size_t i = 0; i < p->text.size(); ++i) {
    result.choices.push_back({int(i), p->text[i], p->finish[i]});
  }
  result.usage = usage;
  sendJson(*p->response, 200, api::renderCompletion(result));
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

std::string ApiServer::Impl::metrics() const {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" +
           name + "{server=\"" + std::to_string(options_.index) + "\"} " + std::to_string(value) +
           "\n";
  };
  metric("vsup_requests_in_flight", "gauge", "Requests being answered.", double(pending_.size()));
  metric("vsup_requests_total", "counter", "Completion requests accepted.", double(requestsTotal_));
  metric("vsup_requests_aborted_at_shutdown_total", "counter",
         "Requests aborted at the drain deadline (clients were told).", double(abortedAtShutdown_));
  metric("vsup_request_errors_total", "counter", "Requests answered with an error.",
         double(errorsTotal_));
  metric("vsup_ready", "gauge", "1 when serving, 0 otherwise.",
         state_ == ApiState::Ready ? 1 : 0);
  metric("vsup_shutdown_drain_seconds", "gauge", "Duration of the last drain (-1: none yet).",
         drainSeconds_);
  return out;
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

int64_t ApiServer::inFlight() const { return impl_->inFlight(); }
ApiState ApiServer::state() const { return impl_->state(); }
uint16_t ApiServer::port() const { return impl_->port(); }

}  // namespace vsup::workers
