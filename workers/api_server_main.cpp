// `vsup __api-server --index I --engine-fd FD [...]`: one OpenAI-compatible HTTP front end.
//
// Several share the port (SO_REUSEPORT). Each talks to engine-core over its own socketpair
// (made by the root at spawn): it submits requests and receives, once per step, the deltas of
// all its requests (TokenSink).
//
// Shutdown (DESIGN.md 2.2-2.3): on Node.quiesce the listener closes at once (new connects are
// refused), a new request on a kept-alive connection gets 503 + Connection: close, idle
// connections close, and /health says "draining". In-flight requests run on until the drain
// deadline; then each is aborted and its client told (finish_reason "abort": a final chunk and
// [DONE] when streaming, the text so far otherwise). Then the shutdown hook waits for the last
// response to be written, and the process exits.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>

#include <kj/debug.h>

#include "engine/types.h"
#include "base/log.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_kj.h"
#include "supervisor/child_runtime.h"
#include "supervisor/fault_injection.h"
#include "supervisor/supervisor.h"
#include "workers/api_server/openai.h"
#include "workers/engine_codec.h"
#include "workers/http/http_server.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;
using engine::FinishReason;

struct Options {
  uint32_t index = 0;
  std::string host = "127.0.0.1";
  uint16_t port = 8000;
  std::string model = "vsup-sim";
  std::string apiKey;
  uint64_t maxRequestBytes = 16 * 1024 * 1024;
  int64_t maxTokens = 4096;
  int engineFd = -1;
};

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
  std::string rejected;       // the engine refused a choice (400 with this message)
};

class ApiServer final : private kj::TaskSet::ErrorHandler {
 public:
  ApiServer(uv_loop_t* loop, supervisor::ChildRuntime& runtime, Options options)
      : loop_(loop), runtime_(runtime), options_(std::move(options)), tasks_(*this) {
    std::random_device rd;
    idPrefix_ = std::to_string(options_.index) + "-" + std::to_string(rd() % 1000000);
    limits_.servedModel = options_.model;
    limits_.maxTokensLimit = options_.maxTokens;
  }

  ~ApiServer() {
    server_.reset();
    link_.reset();
  }

  // Node.start: connect to engine-core, then listen. Ready = accepting connections.
  kj::Promise<void> start();
  kj::Promise<void> quiesce(MonoNs drainDeadline);
  kj::Promise<void> drainHook(supervisor::ShutdownContext& ctx);
  void engineFailed(const std::string& reason);
  void deliver(const std::vector<engine::TokenDelta>& deltas);
  int64_t inFlight() const { return int64_t(pending_.size()); }

 private:
  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[api] {}: {}", runtime_.name(), e.getDescription().cStr());
  }

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
  void engineLost();
  std::string metrics() const;

  uv_loop_t* loop_;
  supervisor::ChildRuntime& runtime_;
  Options options_;
  api::Limits limits_;
  std::string idPrefix_;
  uint64_t nextId_ = 0;
  std::string state_ = "starting";
  std::unique_ptr<http::Server> server_;
  std::unique_ptr<ipc::RpcLink> link_;
  std::optional<schema::Engine::Client> engine_;
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
  kj::TaskSet tasks_;
};

class Sink final : public schema::TokenSink::Server {
 public:
  explicit Sink(ApiServer& server) : server_(server) {}

 protected:
  kj::Promise<void> deltas(DeltasContext context) override {
    std::vector<engine::TokenDelta> list;
    for (auto d : context.getParams().getDeltas()) list.push_back(decode(d));
    server_.deliver(list);
    return kj::READY_NOW;
  }

  kj::Promise<void> engineFailed(EngineFailedContext context) override {
    server_.engineFailed(context.getParams().getReason());
    return kj::READY_NOW;
  }

 private:
  ApiServer& server_;
};

kj::Promise<void> ApiServer::start() {
  link_ = ipc::RpcLink::connect(loop_, OwnFd(options_.engineFd), ipc::dataReaderOptions());
  engine_ = link_->bootstrap<schema::Engine>();
  tasks_.add(link_->onDisconnect().then([this]() { engineLost(); }));
  auto attach = engine_->attachRequest();
  attach.setSink(kj::heap<Sink>(*this));
  return attach.send().then([this](capnp::Response<schema::Engine::AttachResults>&& r) {
    limits_.chatFormat = r.getChatFormat();
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
    state_ = "ready";
    vsup::log().info("[api] {}: listening on {}:{}", runtime_.name(), options_.host,
                     server_->port());
  });
}

kj::Promise<void> ApiServer::quiesce(MonoNs drainDeadline) {
  // Idempotent; an earlier deadline (a second signal: "abort now") re-arms the drain timer.
  if (quiescedAt_ != 0 && drainDeadline >= drainDeadline_) return kj::READY_NOW;
  bool first = quiescedAt_ == 0;
  drainDeadline_ = drainDeadline;
  if (!first) {
    vsup::log().warn("[shutdown] {}: drain deadline moved to {:.1f}s", runtime_.name(),
                     double(drainDeadline - monoNow()) / 1e9);
  }
  if (first) quiescedAt_ = monoNow();
  if (state_ != "failed") state_ = "draining";
  if (server_ && first) {
    // Why first: new connects must be refused at once (load balancers retry those safely).
    server_->stopAccepting();
    server_->setDraining();
    vsup::log().info("[shutdown] {}: listener closed; draining {} request(s) (deadline {})",
                     runtime_.name(), pending_.size(),
                     drainDeadline == kNoDeadline
                         ? std::string("none")
                         : fmt::format("{:.1f}s", double(drainDeadline - monoNow()) / 1e9));
  }
  if (drainDeadline != kNoDeadline) {
    drainTimer_ = ipc::uvSleep(loop_, msUntil(drainDeadline)).then([this]() {
      if (!pending_.empty()) {
        vsup::log().warn("[shutdown] {}: drain deadline: aborting {} request(s)",
                         runtime_.name(), pending_.size());
        abortAll();
      }
    }).eagerlyEvaluate(nullptr);
  }
  return kj::READY_NOW;
}

kj::Promise<void> ApiServer::drainHook(supervisor::ShutdownContext& ctx) {
  if (quiescedAt_ == 0) tasks_.add(quiesce(ctx.deadline()));
  state_ = state_ == "failed" ? state_ : "stopping";
  auto finished = [this]() {
    drainSeconds_ = double(monoNow() - quiescedAt_) / 1e9;
    vsup::log().info("[shutdown] {}: drained in {:.3f}s ({} aborted)", runtime_.name(),
                     drainSeconds_, abortedAtShutdown_);
    server_.reset();  // closes every remaining connection
  };
  if (!server_ || server_->inFlight() == 0) {
    finished();
    return kj::READY_NOW;
  }
  ctx.defer("draining " + std::to_string(pending_.size()) + " request(s)");
  auto paf = kj::newPromiseAndFulfiller<void>();
  idle_ = kj::mv(paf.fulfiller);
  // Past the deadline nothing more will come from the engine in time: answer locally.
  MonoNs hard = ctx.deadline() == kNoDeadline ? kNoDeadline
                                               : ctx.deadline() - (ctx.deadline() - monoNow()) / 10;
  kj::Promise<void> waited = kj::mv(paf.promise);
  if (hard != kNoDeadline) {
    waited = waited.exclusiveJoin(ipc::uvSleep(loop_, msUntil(hard)).then([this]() {
      forceFinishAll();
    }));
  }
  return waited.then(kj::mv(finished));
}

void ApiServer::deliver(const std::vector<engine::TokenDelta>& deltas) {
  supervisor::crashIfInjected(runtime_.name(), "delta" + std::to_string(++deltaBatches_));
  for (const auto& d : deltas) onDelta(d);
}

void ApiServer::sendJson(http::Response& response, int status, const std::string& body) {
  response.respond(status, {{"Content-Type", "application/json"}}, body);
}

void ApiServer::sendError(http::Response& response, const api::ApiError& error) {
  ++errorsTotal_;
  sendJson(response, error.status, api::renderError(error));
}

void ApiServer::handle(http::Request&& request, std::shared_ptr<http::Response> response) {
  const std::string& path = request.path;
  if (path == "/health") {
    if (request.method != "GET" && request.method != "HEAD") {
      return sendError(*response, {405, "Method " + request.method + " not allowed on /health",
                                   "invalid_request_error", "method_not_allowed", ""});
    }
    bool ready = state_ == "ready";
    return sendJson(*response, ready ? 200 : 503,
                    std::string("{\"status\":\"") + state_ + "\"}");
  }
  if (path == "/metrics") {
    if (request.method != "GET") {
      return sendError(*response, {405, "Method " + request.method + " not allowed on /metrics",
                                   "invalid_request_error", "method_not_allowed", ""});
    }
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
    if (request.method != "GET") {
      return sendError(*response, {405, "Method " + request.method + " not allowed on " + path,
                                   "invalid_request_error", "method_not_allowed", ""});
    }
    return sendJson(*response, 200, api::renderModels(options_.model, unixNow()));
  }
  if (request.method != "POST") {
    return sendError(*response, {405, "Method " + request.method + " not allowed on " + path +
                                          " (use POST)",
                                 "invalid_request_error", "method_not_allowed", ""});
  }
  handleCompletion(request, std::move(response), path == "/v1/chat/completions");
}

void ApiServer::handleCompletion(const http::Request& request,
                                 std::shared_ptr<http::Response> response, bool chat) {
  if (state_ != "ready") {
    return sendError(*response, api::unavailable("server is " + state_));
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
  for (size_t i = 0; i < n; ++i) {
    engine::GenerateRequest g;
    g.id = id + "-" + std::to_string(i);
    g.prompt = p->call.prompts[i];
    g.sampling = p->call.sampling;
    p->engineIds.push_back(g.id);
    choiceOf_[g.id] = {id, i};
    auto submit = engine_->submitRequest();
    encode(g, submit.initRequest());
    tasks_.add(submit.send()
                   .then([this, id](capnp::Response<schema::Engine::SubmitResults>&& r) {
                     auto it = pending_.find(id);
                     if (it == pending_.end()) return;
                     Pending& p = *it->second;
                     if (r.getRejected().size() > 0) {
                       p.rejected = r.getRejected();
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
      auto abort = engine_->abortRequest();
      abort.setId(eid);
      tasks_.add(abort.send().ignoreResult());
      choiceOf_.erase(eid);
    }
    pending_.erase(it);
  });
  pending_[id] = std::move(p);
}

void ApiServer::onDelta(const engine::TokenDelta& d) {
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
  if (p.call.stream && d.finish != FinishReason::Error && (!d.text.empty() || d.finish != FinishReason::None)) {
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
void ApiServer::endWithError(Pending& p, const api::ApiError& error) {
  if (p.streamStarted) {
    p.response->write(api::sseEvent(api::renderError(error)));
    p.response->write(api::kSseDone);
    p.response->finish();
  } else {
    sendJson(*p.response, error.status, api::renderError(error));
  }
}

void ApiServer::startStream(Pending& p) {
  if (!p.call.stream || p.streamStarted) return;
  p.streamStarted = true;
  p.response->startStream(200, {{"Content-Type", "text/event-stream"},
                                {"Cache-Control", "no-cache"}});
}

// Writes the end of a response whose choices are all finished (or that failed).
void ApiServer::complete(const std::string& id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  std::unique_ptr<Pending> p = std::move(it->second);
  pending_.erase(it);
  for (size_t i = 0; i < p->engineIds.size(); ++i) {
    // Choices still running when the request ends early (an error, a rejected sibling).
    if (p->finish[i] == FinishReason::None && choiceOf_.count(p->engineIds[i]) != 0) {
      auto abort = engine_->abortRequest();
      abort.setId(p->engineIds[i]);
      tasks_.add(abort.send().ignoreResult());
    }
    choiceOf_.erase(p->engineIds[i]);
  }
  if (!p->rejected.empty()) {
    ++errorsTotal_;
    bool tooLong = p->rejected.find("maximum context length") != std::string::npos;
    api::ApiError error = api::invalidRequest(p->rejected, tooLong ? "max_tokens" : "",
                                              tooLong ? "context_length_exceeded" : "");
    return endWithError(*p, error);
  }
  api::Usage usage;
  for (size_t i = 0; i < p->text.size(); ++i) {
    usage.prompt += p->promptTokens[i];
    usage.completion += p->completionTokens[i];
  }
  if (!p->error.empty()) {
    ++errorsTotal_;
    api::ApiError error = api::serverError(p->error);
    return endWithError(*p, error);
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

void ApiServer::abortAll() {
  for (auto& [id, p] : pending_) {
    for (size_t i = 0; i < p->engineIds.size(); ++i) {
      if (p->finish[i] != FinishReason::None) continue;
      auto abort = engine_->abortRequest();
      abort.setId(p->engineIds[i]);
      tasks_.add(abort.send().ignoreResult());
    }
  }
  // The engine answers each abort with a final delta (finish = abort). Should it not (it is
  // gone), answer the clients ourselves shortly after.
  tasks_.add(ipc::uvSleep(loop_, 500).then([this]() { forceFinishAll(); }));
}

// Ends every pending request here and now with what it has, finish_reason "abort".
void ApiServer::forceFinishAll() {
  std::vector<std::string> ids;
  for (auto& [id, p] : pending_) ids.push_back(id);
  for (const auto& id : ids) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    Pending& p = *it->second;
    for (size_t i = 0; i < p.finish.size(); ++i) {
      if (p.finish[i] != FinishReason::None) continue;
      engine::TokenDelta d;
      d.requestId = p.engineIds[i];
      d.finish = FinishReason::Abort;
      d.promptTokens = p.promptTokens[i];
      d.completionTokens = p.completionTokens[i];
      onDelta(d);
    }
  }
}

void ApiServer::engineFailed(const std::string& reason) {
  if (state_ == "failed") return;
  state_ = "failed";
  vsup::log().error("[api] {}: the engine failed ({}): /health is now 503", runtime_.name(), reason);
}

void ApiServer::engineLost() {
  if (state_ == "stopping" && pending_.empty()) return;
  state_ = "failed";
  vsup::log().error("[api] {}: lost the connection to engine-core: failing {} request(s)",
                    runtime_.name(), pending_.size());
  std::vector<std::string> ids;
  for (auto& [id, p] : pending_) ids.push_back(id);
  for (const auto& id : ids) {
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;
    it->second->error = "engine failure: the engine process is gone";
    complete(id);
  }
}

std::string ApiServer::metrics() const {
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
  metric("vsup_ready", "gauge", "1 when serving, 0 otherwise.", state_ == "ready" ? 1 : 0);
  metric("vsup_shutdown_drain_seconds", "gauge", "Duration of the last drain (-1: none yet).",
         drainSeconds_);
  return out;
}

}  // namespace

int apiServerMain(int argc, char** argv) {
  CLI::App app{"vsup API server (started by vsup run)"};
  Options options;
  app.add_option("--index", options.index);
  app.add_option("--host", options.host);
  app.add_option("--port", options.port);
  app.add_option("--model", options.model);
  app.add_option("--max-request-bytes", options.maxRequestBytes);
  app.add_option("--max-tokens", options.maxTokens);
  app.add_option("--engine-fd", options.engineFd)->required();
  CLI11_PARSE(app, argc, argv);
  // The API key comes through the environment, never argv (visible in ps).
  if (const char* key = std::getenv("VSUP_API_KEY")) options.apiKey = key;

  return runNodeProcess("vsup __api-server",
                        [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    auto api = std::make_unique<ApiServer>(loop, runtime, options);
    ApiServer* a = api.get();
    runtime.onStart([a](const supervisor::SupervisorSpec&) { return a->start(); });
    runtime.onQuiesce([a](MonoNs deadline) { return a->quiesce(deadline); });
    runtime.onStatus([a]() -> kj::Promise<supervisor::NodeStatus> {
      supervisor::NodeStatus s;
      s.type = "worker";
      s.state = "running";
      s.inFlight = a->inFlight();
      return s;
    });
    runtime.addShutdownHook("drain",
                            [a](supervisor::ShutdownContext& ctx) { return a->drainHook(ctx); });
    return holding(std::move(api));
  });
}

}  // namespace vsup::workers
