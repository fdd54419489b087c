#include "workers/proxy/proxy.h"

#include <fmt/format.h>
#include <kj/debug.h>

#include <algorithm>
#include <ctime>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "workers/api_server/openai.h"
#include "workers/http/http_server.h"

namespace vsup::workers {
namespace {

using json = nlohmann::json;
namespace api = vsup::api;

constexpr const char* kRetryAfterSeconds = "1";  // as the API server's 503s
constexpr uint64_t kCloseMs = 2000;              // the final close, at most
// An SSE "event" longer than this without its blank line is relayed as it is (no instance of
// ours sends one; a foreign one must not grow our memory without bound).
constexpr size_t kMaxEventBytes = 1 << 20;

// What a completion came to, for /metrics and the request log.
enum class Outcome { Ok, UpstreamError, BadGateway, Aborted, ClientGone, Refused, Invalid };
constexpr Outcome kOutcomes[] = {Outcome::Ok,         Outcome::UpstreamError, Outcome::BadGateway,
                                 Outcome::Aborted,    Outcome::ClientGone,    Outcome::Refused,
                                 Outcome::Invalid};
const char* nameOf(Outcome o) {
  switch (o) {
    case Outcome::Ok: return "ok";
    case Outcome::UpstreamError: return "upstream_error";
    case Outcome::BadGateway: return "bad_gateway";
    case Outcome::Aborted: return "aborted";
    case Outcome::ClientGone: return "client_gone";
    case Outcome::Refused: return "refused";
    case Outcome::Invalid: return "invalid";
  }
  return "?";
}

api::ApiError badGateway(std::string message) {
  return api::ApiError{502, std::move(message), "unavailable", "bad_gateway", ""};
}

struct Upstream {
  http::Url url;
  int64_t inFlight = 0;
  uint64_t requests = 0;
  uint64_t failures = 0;
};

enum class Leg { Prefill, Decode };
const char* nameOf(Leg leg) { return leg == Leg::Prefill ? "prefill" : "decode"; }

}  // namespace

class Proxy::Impl {
 public:
  Impl(uv_loop_t* loop, ProxyOptions options) : loop_(loop), options_(std::move(options)) {
    for (const auto& u : options_.prefill) prefill_.push_back(Upstream{u});
    for (const auto& u : options_.decode) decode_.push_back(Upstream{u});
  }
  ~Impl() noexcept(false) {
    calls_.clear();  // resets every leg
    server_.reset();
  }

  kj::Promise<void> start();
  kj::Promise<void> quiesce(MonoNs drainDeadline);
  kj::Promise<void> drain(MonoNs deadline, const std::function<void(const std::string&)>& defer);
  void leaveRotation() {
    if (outOfRotation_) return;
    outOfRotation_ = true;
    if (server_) server_->setDraining();
    vsup::log().info("[proxy] {}: out of rotation: /health is now 503 \"draining\"; still "
                     "serving every request",
                     options_.name);
  }
  bool outOfRotation() const { return outOfRotation_; }
  int64_t inFlight() const { return int64_t(calls_.size()); }
  uint64_t requestsTotal() const { return requestsTotal_; }
  uint16_t port() const { return server_ ? server_->port() : 0; }
  std::string detail() const {
    int64_t p = 0, d = 0;
    for (const auto& u : prefill_) p += u.inFlight;
    for (const auto& u : decode_) d += u.inFlight;
    return fmt::format("prefill {} in flight · decode {} in flight", p, d);
  }

 private:
  // One completion: its client, the leg in flight, and what the relayed stream said so far.
  struct Call {
    uint64_t serial = 0;
    std::string requestId;
    std::string path;
    bool chat = false;
    bool stream = false;
    int n = 1;
    std::string model;
    json body;
    std::string authorization;
    std::shared_ptr<http::Response> response;
    MonoNs startedAt = 0;
    // The leg in flight.
    Leg leg = Leg::Prefill;
    std::unique_ptr<http::ClientCall> call;
    Upstream* upstream = nullptr;
    std::vector<Upstream*> tried;  // for this leg
    int status = 0;
    std::string contentType;
    std::string received;  // a buffered answer (prefill; a decode answer not streamed)
    std::string prefillUrl;
    // The client's stream, once open.
    bool streaming = false;
    std::string partial;  // the start of an event not complete yet
    std::string id, object;
    int64_t created = 0;
    std::set<int> finished;
    bool done = false;  // [DONE] relayed
  };

  void handle(http::Request&& request, std::shared_ptr<http::Response> response);
  void completion(http::Request&& request, std::shared_ptr<http::Response> response,
                  std::string requestId);
  void relayModels(std::shared_ptr<http::Response> response, std::string requestId);
  void startLeg(Call& c);
  void onLegEnd(uint64_t serial);
  void onLegError(uint64_t serial, const std::string& why);
  void onDecodeHead(Call& c, int status, const http::Headers& headers);
  void onDecodeBody(Call& c, std::string_view bytes);
  // Each returns false once the call is over (the client left while it was written to).
  bool relayEvent(Call& c, std::string event);
  void endLeg(Call& c, bool failed);
  void finish(uint64_t serial, Outcome outcome, int status);
  void fail(Call& c, const api::ApiError& error, Outcome outcome);
  void endStream(Call& c, const std::string& lastEvents, Outcome outcome);
  void abortAll();
  void clientGone(uint64_t serial);
  kj::Promise<void> closeServer(MonoNs deadline, MonoNs hard);
  Upstream* pick(std::vector<Upstream>& pool, const std::vector<Upstream*>& tried);
  std::string metrics() const;
  bool healthy() const { return !quiescing() && !outOfRotation_ && server_ != nullptr; }
  bool quiescing() const { return quiescedAt_ != 0; }
  void sendJson(http::Response& r, int status, const std::string& body,
                const std::string& requestId, http::Headers extra = {}) {
    extra.emplace_back("Content-Type", "application/json");
    extra.emplace_back("X-Request-Id", requestId);
    r.respond(status, std::move(extra), body);
  }
  void sendError(http::Response& r, const api::ApiError& e, const std::string& requestId,
                 http::Headers extra = {}) {
    sendJson(r, e.status, api::renderError(e), requestId, std::move(extra));
  }

  uv_loop_t* loop_;
  ProxyOptions options_;
  std::vector<Upstream> prefill_;
  std::vector<Upstream> decode_;
  size_t cursor_ = 0;  // round robin among the least loaded
  std::unique_ptr<http::Server> server_;
  std::map<uint64_t, std::unique_ptr<Call>> calls_;
  uint64_t nextSerial_ = 0;
  uint64_t requestsTotal_ = 0;
  std::map<Outcome, uint64_t> outcomes_;
  bool outOfRotation_ = false;
  bool stopping_ = false;
  MonoNs quiescedAt_ = 0;
  MonoNs drainDeadline_ = kNoDeadline;
  uint64_t aborted_ = 0;
  kj::Own<kj::PromiseFulfiller<void>> idle_;
  kj::Own<kj::PromiseFulfiller<void>> closed_;
  kj::Promise<void> drainTimer_ = kj::READY_NOW;
};

kj::Promise<void> Proxy::Impl::start() {
  try {
    http::ServerOptions o;
    o.host = options_.host;
    o.port = options_.port;
    o.listenFd = options_.listenFd;
    o.maxBodyBytes = options_.maxRequestBytes;
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
  if (outOfRotation_) server_->setDraining();
  std::string p, d;
  for (const auto& u : prefill_) p += (p.empty() ? "" : ",") + u.url.text;
  for (const auto& u : decode_) d += (d.empty() ? "" : ",") + u.url.text;
  vsup::log().info("[proxy] {}: listening on {}:{}; prefill {}; decode {}", options_.name,
                   options_.host, server_->port(), p, d);
  return kj::READY_NOW;
}

void Proxy::Impl::handle(http::Request&& request, std::shared_ptr<http::Response> response) {
  std::string requestId = request.header("x-request-id");
  if (!http::echoableRequestId(requestId)) requestId = "proxy-" + std::to_string(++nextSerial_);
  const std::string& method = request.method;
  const std::string& path = request.path;
  auto bad = [&]() {
    sendError(*response,
              api::ApiError{405, "method " + method + " is not allowed on " + path,
                            "invalid_request_error", "method_not_allowed", ""},
              requestId);
  };
  bool get = method == "GET" || method == "HEAD";
  if (path == "/v1/completions" || path == "/v1/chat/completions") {
    if (method != "POST") return bad();
    return completion(std::move(request), std::move(response), std::move(requestId));
  }
  if (path == "/health" || path == "/ping") {
    if (!get && !(path == "/ping" && method == "POST")) return bad();
    if (healthy()) return sendJson(*response, 200, R"({"status":"ready"})", requestId);
    return sendJson(*response, 503,
                    fmt::format(R"({{"status":"{}","in_flight":{}}})",
                                stopping_ ? "stopping" : "draining", calls_.size()),
                    requestId);
  }
  if (path == "/live") {
    if (!get) return bad();
    return sendJson(*response, 200, R"({"status":"alive"})", requestId);
  }
  if (path == "/version") {
    if (!get) return bad();
    return sendJson(*response, 200, std::string(R"({"version":")") + VSUP_VERSION + "\"}",
                    requestId);
  }
  if (path == "/metrics") {
    if (!get) return bad();
    return response->respond(200,
                             {{"Content-Type", "text/plain; version=0.0.4; charset=utf-8"},
                              {"X-Request-Id", requestId}},
                             metrics());
  }
  if (path == "/v1/models") {
    if (!get) return bad();
    return relayModels(std::move(response), std::move(requestId));
  }
  sendError(*response, api::pathNotFound(method, path), requestId);
}

void Proxy::Impl::completion(http::Request&& request, std::shared_ptr<http::Response> response,
                             std::string requestId) {
  auto refuse = [&](const api::ApiError& e, Outcome outcome, http::Headers extra = {}) {
    ++outcomes_[outcome];
    sendError(*response, e, requestId, std::move(extra));
  };
  if (quiescing()) {
    return refuse(api::unavailable("server is shutting down"), Outcome::Refused,
                  {{"Retry-After", kRetryAfterSeconds}});
  }
  json body = json::parse(request.body, nullptr, false);
  if (body.is_discarded() || !body.is_object()) {
    return refuse(api::invalidRequest("the request body is not a JSON object"),
                  Outcome::Invalid);
  }
  if (body.contains("kv_transfer_params")) {
    return refuse(api::invalidRequest("kv_transfer_params: the proxy sets it for each leg; "
                                      "send the request without it",
                                      "kv_transfer_params"),
                  Outcome::Invalid);
  }
  if (body.contains("stream") && !body["stream"].is_boolean()) {
    return refuse(api::invalidRequest("stream: must be true or false", "stream"),
                  Outcome::Invalid);
  }
  auto c = std::make_unique<Call>();
  c->serial = ++nextSerial_;
  c->requestId = std::move(requestId);
  c->path = request.path;
  c->chat = request.path == "/v1/chat/completions";
  c->stream = body.value("stream", false);
  c->n = body.contains("n") && body["n"].is_number_integer()
             ? std::max(1, std::min(128, body["n"].get<int>()))
             : 1;
  c->model = body.contains("model") && body["model"].is_string() ? body["model"].get<std::string>()
                                                                 : "";
  c->body = std::move(body);
  c->authorization = request.header("authorization");
  c->response = std::move(response);
  c->startedAt = monoNow();
  uint64_t serial = c->serial;
  Call& call = *c;
  calls_.emplace(serial, std::move(c));
  ++requestsTotal_;
  call.response->onClientGone([this, serial]() { clientGone(serial); });
  if (options_.logRequests) {
    vsup::log().info("[proxy] {}: {} {} (stream {}, n {})", options_.name, call.requestId,
                     call.path, call.stream, call.n);
  }
  startLeg(call);
}

Upstream* Proxy::Impl::pick(std::vector<Upstream>& pool, const std::vector<Upstream*>& tried) {
  Upstream* best = nullptr;
  for (size_t k = 0; k < pool.size(); ++k) {
    Upstream* u = &pool[(cursor_ + k) % pool.size()];
    if (std::find(tried.begin(), tried.end(), u) != tried.end()) continue;
    if (best == nullptr || u->inFlight < best->inFlight) best = u;
  }
  ++cursor_;
  return best;
}

void Proxy::Impl::startLeg(Call& c) {
  std::vector<Upstream>& pool = c.leg == Leg::Prefill ? prefill_ : decode_;
  Upstream* u = pick(pool, c.tried);
  c.tried.push_back(u);
  c.upstream = u;
  ++u->inFlight;
  ++u->requests;
  c.status = 0;
  c.contentType.clear();
  c.received.clear();
  json body = c.body;
  if (c.leg == Leg::Prefill) {
    // Only the prompt's KV is wanted: one token, not streamed; the instance holds the blocks.
    body["kv_transfer_params"] = {{"do_remote_decode", true}};
    body["stream"] = false;
    body["max_tokens"] = 1;
    body.erase("stream_options");
    body.erase("max_completion_tokens");
    body.erase("min_tokens");
  }
  http::Headers headers = {{"Content-Type", "application/json"},
                           {"X-Request-Id", c.requestId}};
  if (!c.authorization.empty()) headers.emplace_back("Authorization", c.authorization);
  uint64_t serial = c.serial;
  http::ClientCallbacks cb;
  cb.onHead = [this, serial](int status, const http::Headers& h) {
    auto it = calls_.find(serial);
    if (it == calls_.end()) return;
    Call& call = *it->second;
    call.status = status;
    for (const auto& [name, value] : h) {
      if (name == "content-type") call.contentType = value;
    }
    if (call.leg == Leg::Decode) onDecodeHead(call, status, h);
  };
  cb.onBody = [this, serial](std::string_view bytes) {
    auto it = calls_.find(serial);
    if (it == calls_.end()) return;
    Call& call = *it->second;
    if (call.streaming) return onDecodeBody(call, bytes);
    call.received.append(bytes);
  };
  cb.onEnd = [this, serial]() { onLegEnd(serial); };
  cb.onError = [this, serial](const std::string& why) { onLegError(serial, why); };
  http::ClientOptions o;
  o.connectTimeoutMs = options_.connectTimeoutMs;
  c.call = std::make_unique<http::ClientCall>(loop_, u->url, "POST", c.path, std::move(headers),
                                              body.dump(), std::move(cb), o);
}

void Proxy::Impl::endLeg(Call& c, bool failed) {
  if (c.upstream == nullptr) return;
  --c.upstream->inFlight;
  if (failed) ++c.upstream->failures;
  c.upstream = nullptr;
}

void Proxy::Impl::onLegEnd(uint64_t serial) {
  auto it = calls_.find(serial);
  if (it == calls_.end()) return;
  Call& c = *it->second;
  std::string url = c.upstream ? c.upstream->url.text : "";
  Upstream* upstream = c.upstream;
  endLeg(c, false);
  if (c.leg == Leg::Decode) {
    if (c.streaming) {
      // An instance of ours always ends its stream with [DONE]; one that did not was cut.
      if (!c.partial.empty() && !relayEvent(c, std::exchange(c.partial, {}) + "\n\n")) return;
      if (c.done) {
        c.response->finish();
        return finish(serial, Outcome::Ok, 200);
      }
      if (upstream != nullptr) ++upstream->failures;
      return endStream(c,
                       api::sseEvent(api::renderError(badGateway(
                           "decode " + url + " ended the stream without [DONE]"))) +
                           std::string(api::kSseDone),
                       Outcome::BadGateway);
    }
    http::Headers extra = {{"X-Request-Id", c.requestId}};
    extra.emplace_back("Content-Type",
                       c.contentType.empty() ? "application/json" : c.contentType);
    int status = c.status;
    c.response->respond(status, std::move(extra), std::move(c.received));
    return finish(serial, status == 200 ? Outcome::Ok : Outcome::UpstreamError, status);
  }
  // The prefill leg's answer: an error is the client's answer, as the instance gave it.
  if (c.status != 200) {
    http::Headers extra = {{"X-Request-Id", c.requestId}};
    extra.emplace_back("Content-Type",
                       c.contentType.empty() ? "application/json" : c.contentType);
    int status = c.status;
    c.response->respond(status, std::move(extra), std::move(c.received));
    return finish(serial, Outcome::UpstreamError, status);
  }
  json answer = json::parse(c.received, nullptr, false);
  const json* kv = nullptr;
  if (answer.is_object() && answer.contains("kv_transfer_params") &&
      answer["kv_transfer_params"].is_object()) {
    kv = &answer["kv_transfer_params"];
  }
  if (kv == nullptr || !kv->value("do_remote_prefill", false)) {
    return fail(c,
                badGateway("prefill " + url +
                           " answered without kv_transfer_params (is it started with "
                           "--kv-role prefill --kv-connector vsup?)"),
                Outcome::BadGateway);
  }
  c.body["kv_transfer_params"] = *kv;
  c.prefillUrl = url;
  c.leg = Leg::Decode;
  c.tried.clear();
  c.call.reset();
  startLeg(c);
}

void Proxy::Impl::onLegError(uint64_t serial, const std::string& why) {
  auto it = calls_.find(serial);
  if (it == calls_.end()) return;
  Call& c = *it->second;
  std::string url = c.upstream ? c.upstream->url.text : "";
  bool sent = c.call && c.call->requestSent();
  endLeg(c, true);
  vsup::log().warn("[proxy] {}: {}: {} {}: {}", options_.name, c.requestId, nameOf(c.leg), url,
                   why);
  std::vector<Upstream>& pool = c.leg == Leg::Prefill ? prefill_ : decode_;
  // Nothing reached that instance: the next one of its kind may take the leg.
  if (!sent && c.tried.size() < pool.size()) {
    c.call.reset();
    return startLeg(c);
  }
  std::string message = std::string(nameOf(c.leg)) + " " + url + ": " + why;
  if (c.streaming) {
    return endStream(c,
                     api::sseEvent(api::renderError(badGateway(message))) +
                         std::string(api::kSseDone),
                     Outcome::BadGateway);
  }
  fail(c, badGateway(message), Outcome::BadGateway);
}

void Proxy::Impl::onDecodeHead(Call& c, int status, const http::Headers&) {
  if (!c.stream || status != 200) return;  // buffered, answered whole at the end
  c.streaming = true;
  c.response->startStream(200, {{"Content-Type", "text/event-stream"},
                                {"Cache-Control", "no-cache"},
                                {"X-Request-Id", c.requestId}});
}

void Proxy::Impl::onDecodeBody(Call& c, std::string_view bytes) {
  c.partial.append(bytes);
  size_t start = 0;
  for (;;) {
    size_t end = c.partial.find("\n\n", start);
    if (end == std::string::npos) break;
    if (!relayEvent(c, c.partial.substr(start, end + 2 - start))) return;
    start = end + 2;
  }
  c.partial.erase(0, start);
  if (c.partial.size() > kMaxEventBytes) (void)relayEvent(c, std::exchange(c.partial, {}));
}

// One SSE event to the client, and what it says: the envelope (for an abort chunk of our own),
// which choices finished, whether it is [DONE].
bool Proxy::Impl::relayEvent(Call& c, std::string event) {
  size_t pos = 0;
  while (pos < event.size()) {
    size_t eol = event.find('\n', pos);
    if (eol == std::string::npos) eol = event.size();
    std::string_view line(event.data() + pos, eol - pos);
    pos = eol + 1;
    if (line.rfind("data: ", 0) != 0) continue;
    std::string_view data = line.substr(6);
    if (data == "[DONE]") {
      c.done = true;
      continue;
    }
    json chunk = json::parse(data, nullptr, false);
    if (!chunk.is_object()) continue;
    if (c.id.empty() && chunk.contains("id") && chunk["id"].is_string()) {
      c.id = chunk["id"].get<std::string>();
      if (chunk.contains("created") && chunk["created"].is_number_integer()) {
        c.created = chunk["created"].get<int64_t>();
      }
      if (chunk.contains("model") && chunk["model"].is_string()) {
        c.model = chunk["model"].get<std::string>();
      }
    }
    if (chunk.contains("choices") && chunk["choices"].is_array()) {
      for (const auto& choice : chunk["choices"]) {
        if (choice.is_object() && choice.contains("finish_reason") &&
            !choice["finish_reason"].is_null() && choice.contains("index") &&
            choice["index"].is_number_integer()) {
          c.finished.insert(choice["index"].get<int>());
        }
      }
    }
  }
  uint64_t serial = c.serial;
  c.response->write(event);  // a client gone: clientGone() ran inside, and `c` is freed
  return calls_.count(serial) != 0;
}

// Ends the client's stream with `lastEvents`, after a chunk with finish_reason "abort" for
// every choice that has not finished when the outcome is an abort.
void Proxy::Impl::endStream(Call& c, const std::string& lastEvents, Outcome outcome) {
  std::string out;
  if (outcome == Outcome::Aborted) {
    std::string id = c.id.empty() ? c.requestId : c.id;
    int64_t created = c.created != 0 ? c.created : int64_t(std::time(nullptr));
    for (int i = 0; i < c.n; ++i) {
      if (c.finished.count(i) != 0) continue;
      api::Choice choice;
      choice.index = i;
      choice.finish = engine::FinishReason::Abort;
      out += api::sseEvent(api::renderStreamChunk(c.chat, id, created, c.model, choice, false));
    }
  }
  out += lastEvents;
  uint64_t serial = c.serial;
  std::shared_ptr<http::Response> response = c.response;
  response->write(out);  // a client gone: the call is over already (clientGone)
  if (calls_.count(serial) == 0) return;
  response->finish();
  finish(serial, outcome, 200);
}

void Proxy::Impl::fail(Call& c, const api::ApiError& error, Outcome outcome) {
  sendError(*c.response, error, c.requestId);
  finish(c.serial, outcome, error.status);
}

void Proxy::Impl::finish(uint64_t serial, Outcome outcome, int status) {
  auto it = calls_.find(serial);
  if (it == calls_.end()) return;
  Call& c = *it->second;
  ++outcomes_[outcome];
  if (outcome == Outcome::Aborted) ++aborted_;
  if (options_.logRequests) {
    vsup::log().info("[proxy] {}: {} {}: {} (prefill {}) in {:.3f}s", options_.name,
                     c.requestId, status, nameOf(outcome),
                     c.prefillUrl.empty() ? "-" : c.prefillUrl,
                     double(monoNow() - c.startedAt) / 1e9);
  }
  endLeg(c, false);
  calls_.erase(it);  // resets a leg still open; this may run inside that leg's callback
}

void Proxy::Impl::clientGone(uint64_t serial) {
  auto it = calls_.find(serial);
  if (it == calls_.end()) return;
  vsup::log().info("[proxy] {}: {}: the client left: {} leg reset", options_.name,
                   it->second->requestId, nameOf(it->second->leg));
  finish(serial, Outcome::ClientGone, 499);
}

void Proxy::Impl::abortAll() {
  std::vector<uint64_t> serials;
  for (const auto& [serial, c] : calls_) serials.push_back(serial);
  for (uint64_t serial : serials) {
    auto it = calls_.find(serial);
    if (it == calls_.end()) continue;
    Call& c = *it->second;
    c.call.reset();  // the instance sees the reset and aborts its request
    endLeg(c, false);
    if (c.streaming) {
      if (c.done) {
        c.response->finish();
        finish(serial, Outcome::Ok, 200);
        continue;
      }
      endStream(c, std::string(api::kSseDone), Outcome::Aborted);
    } else {
      fail(c,
           api::ApiError{503, "aborted: the proxy is shutting down and its drain deadline "
                              "passed before the answer came",
                         "unavailable", "aborted", ""},
           Outcome::Aborted);
    }
  }
}

void Proxy::Impl::relayModels(std::shared_ptr<http::Response> response, std::string requestId) {
  Upstream* u = pick(decode_, {});
  struct Models {
    int status = 0;
    std::string body;
    std::unique_ptr<http::ClientCall> call;
  };
  auto m = std::make_shared<Models>();
  http::ClientCallbacks cb;
  std::weak_ptr<Models> weak = m;
  cb.onHead = [weak](int status, const http::Headers&) {
    if (auto s = weak.lock()) s->status = status;
  };
  cb.onBody = [weak](std::string_view bytes) {
    if (auto s = weak.lock()) s->body.append(bytes);
  };
  std::string url = u->url.text;
  cb.onEnd = [this, weak, response, requestId]() {
    auto s = weak.lock();
    if (!s) return;
    sendJson(*response, s->status, s->body, requestId);
    response->onClientGone(nullptr);
    auto keep = std::move(s->call);  // freed after this callback (ClientCall allows it)
  };
  cb.onError = [this, weak, response, requestId, url](const std::string& why) {
    auto s = weak.lock();
    if (!s) return;
    sendError(*response, badGateway("decode " + url + ": " + why), requestId);
    response->onClientGone(nullptr);
    auto keep = std::move(s->call);
  };
  http::ClientOptions o;
  o.connectTimeoutMs = options_.connectTimeoutMs;
  o.idleTimeoutMs = 10'000;
  m->call = std::make_unique<http::ClientCall>(loop_, u->url, "GET", "/v1/models",
                                               http::Headers{}, "", std::move(cb), o);
  // The call lives as long as the client waits for it.
  response->onClientGone([m]() { m->call.reset(); });
}

kj::Promise<void> Proxy::Impl::quiesce(MonoNs drainDeadline) {
  if (quiescing() && drainDeadline >= drainDeadline_) return kj::READY_NOW;
  bool first = !quiescing();
  drainDeadline_ = drainDeadline;
  if (first) {
    quiescedAt_ = monoNow();
    if (server_) server_->setDraining();
    vsup::log().info("[shutdown] {}: draining {} request(s) (deadline {}); new completions "
                     "get 503",
                     options_.name, calls_.size(),
                     drainDeadline == kNoDeadline
                         ? std::string("none")
                         : fmt::format("{:.1f}s", double(drainDeadline - monoNow()) / 1e9));
  } else {
    vsup::log().warn("[shutdown] {}: drain deadline moved to {:.1f}s", options_.name,
                     double(drainDeadline - monoNow()) / 1e9);
  }
  if (drainDeadline != kNoDeadline) {
    drainTimer_ = ipc::uvSleep(loop_, msUntil(drainDeadline))
                      .then([this]() {
                        if (!calls_.empty()) {
                          vsup::log().warn("[shutdown] {}: drain deadline: aborting {} "
                                           "request(s)",
                                           options_.name, calls_.size());
                          abortAll();
                        }
                      })
                      .eagerlyEvaluate(nullptr);
  }
  return kj::READY_NOW;
}

kj::Promise<void> Proxy::Impl::drain(MonoNs deadline,
                                     const std::function<void(const std::string&)>& defer) {
  if (!quiescing()) (void)quiesce(deadline);
  stopping_ = true;
  MonoNs hard = supervisor::DeadlineBudget::forChildren(deadline, monoNow());
  kj::Promise<void> waited = kj::READY_NOW;
  if (server_ && server_->inFlight() != 0) {
    if (defer) defer("draining " + std::to_string(calls_.size()) + " request(s)");
    auto paf = kj::newPromiseAndFulfiller<void>();
    idle_ = kj::mv(paf.fulfiller);
    waited = kj::mv(paf.promise);
    if (hard != kNoDeadline) {
      waited = waited.exclusiveJoin(ipc::uvSleep(loop_, msUntil(hard)).then([this]() {
        abortAll();
      }));
    }
  }
  return waited.then([this, deadline, hard]() { return closeServer(deadline, hard); });
}

kj::Promise<void> Proxy::Impl::closeServer(MonoNs deadline, MonoNs hard) {
  vsup::log().info("[shutdown] {}: drained in {:.3f}s ({} aborted)", options_.name,
                   double(monoNow() - quiescedAt_) / 1e9, aborted_);
  if (!server_) return kj::READY_NOW;
  uint64_t timeoutMs = kCloseMs;
  if (deadline != kNoDeadline) {
    MonoNs from = std::max(hard, monoNow());
    timeoutMs = std::min<uint64_t>(timeoutMs, msUntil(from + (deadline - from) / 2));
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  closed_ = kj::mv(paf.fulfiller);
  server_->close(timeoutMs, [this]() {
    server_.reset();
    if (closed_ && closed_->isWaiting()) closed_->fulfill();
  });
  return kj::mv(paf.promise);
}

std::string Proxy::Impl::metrics() const {
  std::string out;
  out += "# HELP vsup_proxy_ready 1 while the proxy takes completions and is in rotation.\n";
  out += "# TYPE vsup_proxy_ready gauge\n";
  out += fmt::format("vsup_proxy_ready {}\n", healthy() ? 1 : 0);
  out += "# HELP vsup_proxy_requests_total Completions answered, by outcome.\n";
  out += "# TYPE vsup_proxy_requests_total counter\n";
  for (Outcome o : kOutcomes) {
    auto it = outcomes_.find(o);
    out += fmt::format("vsup_proxy_requests_total{{outcome=\"{}\"}} {}\n", nameOf(o),
                       it == outcomes_.end() ? 0 : it->second);
  }
  out += "# HELP vsup_proxy_requests_in_flight Completions being answered.\n";
  out += "# TYPE vsup_proxy_requests_in_flight gauge\n";
  out += fmt::format("vsup_proxy_requests_in_flight {}\n", calls_.size());
  auto each = [&](const char* name, const char* type, const char* help, auto value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
    for (const auto* pool : {&prefill_, &decode_}) {
      for (const auto& u : *pool) {
        out += fmt::format("{}{{leg=\"{}\",url=\"{}\"}} {}\n", name,
                           pool == &prefill_ ? "prefill" : "decode", u.url.text, value(u));
      }
    }
  };
  each("vsup_proxy_upstream_requests_total", "counter", "Legs sent to each instance.",
       [](const Upstream& u) { return u.requests; });
  each("vsup_proxy_upstream_failures_total", "counter",
       "Legs that failed at each instance (no connection, a reset, a bad answer).",
       [](const Upstream& u) { return u.failures; });
  each("vsup_proxy_upstream_in_flight", "gauge", "Legs in flight at each instance.",
       [](const Upstream& u) { return u.inFlight; });
  return out;
}

Proxy::Proxy(uv_loop_t* loop, ProxyOptions options)
    : impl_(std::make_unique<Impl>(loop, std::move(options))) {}
Proxy::~Proxy() noexcept(false) = default;
kj::Promise<void> Proxy::start() { return impl_->start(); }
kj::Promise<void> Proxy::quiesce(MonoNs drainDeadline) { return impl_->quiesce(drainDeadline); }
kj::Promise<void> Proxy::drain(MonoNs deadline,
                               std::function<void(const std::string& reason)> defer) {
  return impl_->drain(deadline, defer);
}
void Proxy::leaveRotation() { impl_->leaveRotation(); }
bool Proxy::outOfRotation() const { return impl_->outOfRotation(); }
int64_t Proxy::inFlight() const { return impl_->inFlight(); }
uint64_t Proxy::requestsTotal() const { return impl_->requestsTotal(); }
uint16_t Proxy::port() const { return impl_->port(); }
std::string Proxy::detail() const { return impl_->detail(); }

}  // namespace vsup::workers
