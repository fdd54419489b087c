// Tests for workers/api_server/api_server.h: a real ApiServer on 127.0.0.1 (port 0) in front of
// the in-process fake engine (fake_engine.h), both on one uv loop on the test's main thread.
//
// The HTTP client is plain blocking sockets with 5 s timeouts on a std::thread, so a test that
// goes wrong fails instead of hanging. The client reaches the loop thread only through
// LoopBridge::call (a uv_async_t); it waits for what the engine saw through the fake's Log
// (a condition variable), never by sleeping.
#include "workers/api_server/api_server.h"

#include <spdlog/sinks/ostream_sink.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <doctest/doctest.h>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/log.h"
#include "ipc/test_util.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_kj.h"
#include "workers/api_server/fake_engine.h"
#include "workers/http/http_test_util.h"

namespace {

using nlohmann::json;
using vsup::engine::FinishReason;
using vsup::engine::GenerateRequest;
using vsup::engine::Rejection;
using vsup::engine::RejectCode;
using vsup::testing::Client;
using vsup::testing::connectTo;
using vsup::testing::FakeEngine;
using vsup::testing::get;
using vsup::testing::kWait;
using vsup::testing::LoopBridge;
using vsup::testing::Reply;
using vsup::testing::TestLoop;
using vsup::workers::ApiServer;
using vsup::workers::ApiServerOptions;
using vsup::workers::ApiState;

// Set on the loop thread, awaited on the client thread.
class Flag {
 public:
  void set() {
    std::lock_guard lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool isSet() {
    std::lock_guard lock(mu_);
    return set_;
  }
  bool wait() {  // false after 5 s
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kWait, [&] { return set_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// The error object of an OpenAI-style error body.
json errorOf(const Reply& reply) { return json::parse(reply.body).at("error"); }

std::string post(std::string_view path, const json& body) {
  return vsup::testing::post(path, body.dump(), "Content-Type: application/json\r\n");
}

json completion(bool stream, int maxTokens = 8) {
  return {{"model", "vsup-sim"}, {"prompt", "hi"}, {"max_tokens", maxTokens}, {"stream", stream}};
}

// The SSE events of a stream body: each "data: X\n\n" as X.
std::vector<std::string> events(const std::string& body) {
  std::vector<std::string> out;
  size_t at = 0;
  for (size_t end; (end = body.find("\n\n", at)) != std::string::npos; at = end + 2) {
    std::string e = body.substr(at, end - at);
    REQUIRE_MESSAGE(e.rfind("data: ", 0) == 0, e);
    out.push_back(e.substr(6));
  }
  CHECK(at == body.size());
  return out;
}

std::string joinedText(const std::vector<std::string>& evs) {
  std::string text;
  for (const auto& e : evs) {
    if (e == "[DONE]") continue;
    json j = json::parse(e);
    if (j.contains("choices") && !j["choices"].empty()) text += j["choices"][0]["text"];
  }
  return text;
}

// One test's world, destroyed in reverse order: the loop last.
struct Harness {
  TestLoop loop;
  vsup::ipc::KjOnUv kj{loop.get()};
  FakeEngine fake{loop.get()};
  std::unique_ptr<ApiServer> api;
  LoopBridge bridge{loop.get()};

  explicit Harness(std::function<void(FakeEngine&)> setup = nullptr,
                   std::function<void(ApiServerOptions&)> configure = nullptr) {
    if (setup) setup(fake);
    ApiServerOptions o;
    o.name = "api-test";
    o.port = 0;
    if (configure) configure(o);
    api = std::make_unique<ApiServer>(loop.get(), o);
    CHECK(api->state() == ApiState::Starting);
    api->start(fake.listen()).wait(kj.waitScope());
    REQUIRE(api->state() == ApiState::Ready);
    REQUIRE(api->port() != 0);
  }
  ~Harness() {
    api.reset();
    fake.disconnect();
  }
  uint16_t port() const { return api->port(); }
  void run(const std::function<void()>& client) { bridge.runClient(client); }
  ApiState state() {
    ApiState s{};
    bridge.call([&] { s = api->state(); });
    return s;
  }
  // Client thread: until the engine has seen `n` submits (false after 5 s).
  bool submitted(size_t n) {
    return fake.log.waitUntil([&](const FakeEngine::Log& l) { return l.submitsLocked().size() >= n; });
  }
  std::string submit(size_t i) { return fake.log.submits().at(i); }
  bool aborted(const std::string& id) {
    return fake.log.waitUntil([&](const FakeEngine::Log& l) {
      for (const auto& a : l.abortsLocked()) {
        if (a == id) return true;
      }
      return false;
    });
  }
};

void holdRequests(FakeEngine& f) { f.script = {}; }


}  // namespace

TEST_SUITE("unit") {

// An engine-core that is still loading: it answers the attach only when the test says so.
class LoadingEngine final : public vsup::ipc::schema::Engine::Server {
 public:
  explicit LoadingEngine(kj::Promise<void> loaded) : loaded_(loaded.fork()) {}

 protected:
  kj::Promise<void> attach(AttachContext context) override {
    return loaded_.addBranch().then([context]() mutable {
      context.getResults().setMaxModelLen(512);
      context.getResults().setChatFormat("plain");
    });
  }

 private:
  kj::ForkedPromise<void> loaded_;
};

TEST_CASE("api server: it listens while the engine loads: /health 503 starting, inference and "
          "/v1/models 503 'the engine is starting', ready once the attach is answered") {
  TestLoop loop;
  vsup::ipc::KjOnUv kj{loop.get()};
  LoopBridge bridge{loop.get()};
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  auto loaded = kj::newPromiseAndFulfiller<void>();
  auto link = vsup::ipc::RpcLink::serve(loop.get(), vsup::OwnFd(sv[0]),
                                        kj::heap<LoadingEngine>(kj::mv(loaded.promise)),
                                        vsup::ipc::dataReaderOptions());
  ApiServerOptions o;
  o.name = "api-test";
  o.port = 0;
  auto api = std::make_unique<ApiServer>(loop.get(), o);
  bool started = false;
  kj::Promise<void> start = api->start(vsup::OwnFd(sv[1])).then([&] { started = true; })
                                .eagerlyEvaluate(nullptr);
  uint16_t port = api->port();
  REQUIRE(port != 0);  // listening before the attach
  CHECK(api->state() == ApiState::Starting);
  bridge.runClient([&] {
    Client c(port);
    c.send(get("/health"));
    Reply health = c.requireRead();
    CHECK(health.status == 503);
    CHECK(json::parse(health.body)["status"] == "starting");
    c.send(post("/v1/completions", completion(false)));
    Reply refused = c.requireRead();
    CHECK(refused.status == 503);
    CHECK(refused.header("retry-after") == "1");
    json error = errorOf(refused);
    CHECK(error["message"].get<std::string>().find("the engine is starting") != std::string::npos);
    Client m(port);
    m.send(get("/v1/models"));
    Reply models = m.requireRead();
    CHECK(models.status == 503);
    CHECK(errorOf(models)["message"].get<std::string>().find("starting") != std::string::npos);
    bool early = true;
    bridge.call([&] { early = started; });
    CHECK_FALSE(early);  // start() resolves only once attached
    // engine-core has loaded: it answers the attach.
    bridge.call([&] { loaded.fulfiller->fulfill(); });
    auto deadline = std::chrono::steady_clock::now() + kWait;
    int status = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      Client h(port);
      h.send(get("/health"));
      Reply r = h.requireRead();
      status = r.status;
      if (status == 200) {
        CHECK(json::parse(r.body)["status"] == "ready");
        break;
      }
      CHECK(json::parse(r.body)["status"] == "starting");
    }
    CHECK(status == 200);
  });
  start.wait(kj.waitScope());
  CHECK(started);
  CHECK(api->state() == ApiState::Ready);
  api.reset();
  link.reset();
}

TEST_CASE("api server: an address it cannot bind fails start() before any attach, and nothing "
          "listens") {
  TestLoop loop;
  vsup::ipc::KjOnUv kj{loop.get()};
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  vsup::OwnFd engineEnd(sv[0]);  // nobody answers on it: the attach would never end
  ApiServerOptions o;
  o.name = "api-test";
  o.host = "203.0.113.1";  // TEST-NET-3: not an address of this machine
  o.port = 0;
  auto api = std::make_unique<ApiServer>(loop.get(), o);
  std::string why;
  try {
    api->start(vsup::OwnFd(sv[1])).wait(kj.waitScope());
  } catch (const kj::Exception& e) {
    why = e.getDescription().cStr();
  }
  CHECK(why.find("203.0.113.1") != std::string::npos);
  CHECK(api->port() == 0);
  CHECK(api->state() == ApiState::Starting);
}

TEST_CASE("api server: a streaming completion carries the engine's deltas and ends with [DONE]") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    Reply r = c.requireRead();
    CHECK(r.status == 200);
    CHECK(r.header("content-type") == "text/event-stream");
    auto evs = events(r.body);
    REQUIRE(evs.size() == 4);  // one chunk per engine step, then [DONE]
    CHECK(evs.back() == "[DONE]");
    CHECK(joinedText(evs) == "Hello!");
    json last = json::parse(evs[2]);
    CHECK(last["choices"][0]["finish_reason"] == "stop");
    CHECK(json::parse(evs[0])["choices"][0]["finish_reason"].is_null());
    CHECK(h.fake.log.submits().size() == 1);
  });
}

TEST_CASE("api server: a non-streaming completion returns the joined text and the usage") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(false)));
    Reply r = c.requireRead();
    REQUIRE(r.status == 200);
    CHECK(r.header("content-type") == "application/json");
    json j = json::parse(r.body);
    CHECK(j["object"] == "text_completion");
    CHECK(j["choices"][0]["text"] == "Hello!");
    CHECK(j["choices"][0]["finish_reason"] == "stop");
    CHECK(j["usage"]["prompt_tokens"] == 3);
    CHECK(j["usage"]["completion_tokens"] == 3);
    CHECK(j["usage"]["total_tokens"] == 6);
    REQUIRE(h.fake.log.requests().size() == 1);
    CHECK(h.fake.log.requests()[0].prompt == "hi");
    CHECK(h.fake.log.requests()[0].messages.empty());
    // The connection stays usable: /health says ready.
    c.send(get("/health"));
    Reply health = c.requireRead();
    CHECK(health.status == 200);
    CHECK(health.body == R"({"status":"ready"})");
  });
}

TEST_CASE("api server: a chat is one engine request carrying its messages, with no prompt") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    json body = {{"model", "vsup-sim"},
                 {"messages",
                  {{{"role", "developer"}, {"content", "Be brief."}},
                   {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "hi"}}}}}}},
                 {"max_tokens", 8}};
    c.send(post("/v1/chat/completions", body));
    Reply r = c.requireRead();
    REQUIRE(r.status == 200);
    json j = json::parse(r.body);
    CHECK(j["object"] == "chat.completion");
    CHECK(j["choices"][0]["message"]["content"] == "Hello!");
    auto requests = h.fake.log.requests();
    REQUIRE(requests.size() == 1);
    // The API server does not render: engine-core does, in the model's format.
    CHECK(requests[0].prompt.empty());
    CHECK(requests[0].messages == std::vector<vsup::engine::ChatMessage>{
                                      {"system", "Be brief."}, {"user", "hi"}});
    CHECK(requests[0].sampling.maxTokens == 8);
  });
}

TEST_CASE("api server: a context-length rejection is a 400 context_length_exceeded by its code, "
          "streaming or not") {
  Harness h([](FakeEngine& f) {
    f.reject = [](const GenerateRequest&) -> std::optional<Rejection> {
      // The message is the engine's; the mapping must not depend on its wording.
      return Rejection{RejectCode::ContextLengthExceeded, "prompt (50) + max_tokens (20) > 64"};
    };
  });
  h.run([&] {
    Client c(h.port());
    for (bool stream : {false, true}) {
      CAPTURE(stream);
      c.send(post("/v1/completions", completion(stream, 20)));
      Reply r = c.requireRead();
      CHECK(r.status == 400);
      CHECK(r.header("content-type") == "application/json");  // not an SSE 200
      json e = errorOf(r);
      CHECK(e["code"] == "context_length_exceeded");
      CHECK(e["param"] == "max_tokens");
      CHECK(e["type"] == "invalid_request_error");
      CHECK(e["message"] == "prompt (50) + max_tokens (20) > 64");
    }
    c.send(get("/health"));
    CHECK(c.requireRead().status == 200);  // a bad request does not make the server unhealthy
  });
}

TEST_CASE("api server: a prompt list is one engine request per choice; a rejected choice makes "
          "the whole request a 400 and aborts its siblings") {
  Harness h([](FakeEngine& f) {
    f.script = {};
    f.reject = [](const GenerateRequest& r) -> std::optional<Rejection> {
      if (r.prompt != "too long") return std::nullopt;
      return Rejection{RejectCode::ContextLengthExceeded, "too long"};
    };
  });
  h.run([&] {
    Client c(h.port());
    json body = completion(false);
    body["prompt"] = {"a", "too long"};
    c.send(post("/v1/completions", body));
    Reply r = c.requireRead();
    CHECK(r.status == 400);
    CHECK(errorOf(r)["code"] == "context_length_exceeded");
    auto submits = h.fake.log.submits();
    REQUIRE(submits.size() == 2);
    CHECK(h.aborted(submits[0]));  // the accepted sibling
  });
}

TEST_CASE("api server: another rejection code is a 400 with that code") {
  Harness h([](FakeEngine& f) {
    f.reject = [](const GenerateRequest&) -> std::optional<Rejection> {
      return Rejection{RejectCode::EmptyPrompt, "the prompt encodes to no tokens"};
    };
  });
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    Reply r = c.requireRead();
    CHECK(r.status == 400);
    json e = errorOf(r);
    CHECK(e["code"] == "empty_prompt");
    CHECK(e["param"].is_null());
    CHECK(e["message"] == "the prompt encodes to no tokens");
  });
}

TEST_CASE("api server: a refused submit (engine stopping) is a 500 naming the refusal") {
  Harness h([](FakeEngine& f) { f.refuse = true; });
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(false)));
    Reply r = c.requireRead();
    CHECK(r.status == 500);
    std::string message = errorOf(r)["message"];
    CHECK(message.find("engine refused the request") != std::string::npos);
  });
}

TEST_CASE("api server: once quiesced the listener still accepts: a completion gets 503 + "
          "Connection: close + Retry-After + the error JSON, /health 503 draining, /live, /metrics, "
          "/version, /ping and /v1/models answer, and the in-flight request completes") {
  Harness h(holdRequests);
  h.run([&] {
    Client busy(h.port());
    busy.send(post("/v1/completions", completion(false)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    h.bridge.call([&] {
      CHECK(h.api->inFlight() == 1);
      auto done = h.api->quiesce(vsup::kNoDeadline);
      CHECK(h.api->state() == ApiState::Draining);
      CHECK(std::string(vsup::workers::nameOf(h.api->state())) == "draining");
    });
    for (bool chat : {false, true}) {
      CAPTURE(chat);
      Client late(h.port());  // a new connection, accepted
      json body = completion(true);
      if (chat) {
        body = {{"model", "vsup-sim"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
      }
      late.send(post(chat ? "/v1/chat/completions" : "/v1/completions", body));
      Reply refused = late.requireRead();
      CHECK(refused.status == 503);
      CHECK(refused.header("connection") == "close");
      CHECK(refused.header("retry-after") == "1");
      CHECK(refused.header("content-type") == "application/json");
      json e = errorOf(refused);
      CHECK(e["message"] == "server is shutting down");
      CHECK(e["type"] == "unavailable");
      CHECK(late.endsCleanly());
    }
    {
      Client c(h.port());
      c.send(get("/health"));
      Reply health = c.requireRead();
      CHECK(health.status == 503);
      CHECK(json::parse(health.body) == json{{"status", "draining"}, {"in_flight", 1}});
      CHECK(health.header("connection") == "close");
    }
    auto answer = [&](const std::string& request) {
      Client c(h.port());
      c.send(request);
      return c.requireRead();
    };
    Reply live = answer(get("/live"));
    CHECK(live.status == 200);
    CHECK(json::parse(live.body)["status"] == "alive");
    Reply metrics = answer(get("/metrics"));
    CHECK(metrics.status == 200);
    CHECK(metrics.body.find("vsup_draining{server=\"0\"} 1.0\n") != std::string::npos);
    CHECK(metrics.body.find("vsup_ready{server=\"0\"} 0.0\n") != std::string::npos);
    CHECK(metrics.body.find("vsup_requests_in_flight{server=\"0\"} 1.0\n") != std::string::npos);
    CHECK(answer(get("/version")).status == 200);
    CHECK(answer(get("/ping")).status == 503);
    CHECK(answer(get("/v1/models")).status == 200);

    h.bridge.call([&] {
      h.fake.send(id, "done");
      h.fake.send(id, "", FinishReason::Length);
    });
    Reply r = busy.requireRead();
    CHECK(r.status == 200);
    CHECK(r.header("connection") == "close");
    json j = json::parse(r.body);
    CHECK(j["choices"][0]["text"] == "done");
    CHECK(j["choices"][0]["finish_reason"] == "length");
    CHECK(busy.endsCleanly());
    CHECK(h.fake.log.aborts().empty());
    h.bridge.call([&] { CHECK(h.api->requestsTotal() == 1); });  // the 503s were not accepted
  });
}

TEST_CASE("api server: a request sent after quiesce on a connection kept alive from before gets a "
          "whole 503 with Connection: close, then FIN, never a reset") {
  Harness h;
  h.run([&] {
    Client kept(h.port());
    kept.send(post("/v1/completions", completion(false)));
    Reply first = kept.requireRead();
    CHECK(first.status == 200);
    CHECK_FALSE(first.has("connection"));  // kept alive
    h.bridge.call([&] { auto done = h.api->quiesce(vsup::kNoDeadline); });
    kept.send(post("/v1/completions", completion(false)));
    Reply refused = kept.requireRead();
    CHECK(refused.status == 503);
    CHECK(refused.header("connection") == "close");
    CHECK(refused.header("retry-after") == "1");
    CHECK(errorOf(refused)["type"] == "unavailable");
    CHECK(kept.endsCleanly());
  });
}

TEST_CASE("api server: an in-flight stream drains to its end while the server is quiesced, and "
          "drain() then closes the listener") {
  Harness h(holdRequests);
  Flag drained;
  kj::Promise<void> drain = nullptr;
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    h.bridge.call([&] { h.fake.send(id, "Hel"); });
    Reply head = c.requireHead();
    REQUIRE(head.status == 200);
    CHECK_FALSE(head.has("connection"));  // its head went out before the drain
    std::string body = c.readChunk();
    h.bridge.call([&] {
      drain = h.api->drain(vsup::kNoDeadline, nullptr)
                  .then([&] { drained.set(); })
                  .eagerlyEvaluate(nullptr);
    });
    CHECK_FALSE(drained.isSet());
    h.bridge.call([&] {
      h.fake.send(id, "lo");
      h.fake.send(id, "", FinishReason::Stop);
    });
    for (std::string chunk = c.readChunk(); !chunk.empty(); chunk = c.readChunk()) body += chunk;
    auto evs = events(body);
    CHECK(joinedText(evs) == "Hello");
    CHECK(evs.back() == "[DONE]");
    CHECK(json::parse(evs[evs.size() - 2])["choices"][0]["finish_reason"] == "stop");
    CHECK(c.endsCleanly());  // drain() ends the kept-alive connection with FIN
    CHECK(drained.wait());
    CHECK_FALSE(connectTo(h.port()));
    h.bridge.call([&] { CHECK(h.api->port() == 0); });
    CHECK(h.fake.log.aborts().empty());
  });
}

TEST_CASE("api server: out of rotation, /health and /ping are 503 draining while every request, "
          "new ones included, is served, each closing its connection; /live stays 200") {
  Harness h;
  h.run([&] {
    h.bridge.call([&] {
      CHECK_FALSE(h.api->outOfRotation());
      h.api->leaveRotation();
      h.api->leaveRotation();  // idempotent
      CHECK(h.api->outOfRotation());
      CHECK(h.api->state() == ApiState::Ready);
    });
    // Every response closes its connection, so a kept-alive client dials again and lands where
    // the load balancers route now; each request here is therefore on a connection of its own.
    auto ask = [&](const std::string& request) {
      Client c(h.port());
      c.send(request);
      Reply r = c.requireRead();
      CHECK(r.header("connection") == "close");
      return r;
    };
    Reply health = ask(get("/health"));
    CHECK(health.status == 503);
    CHECK(json::parse(health.body) == json{{"status", "draining"}, {"in_flight", 0}});
    CHECK(ask(get("/ping")).status == 503);
    CHECK(ask(vsup::testing::post("/ping", "")).status == 503);
    CHECK(ask(get("/live")).status == 200);
    {
      Reply r = ask(post("/v1/completions", completion(false)));
      CHECK(r.status == 200);
      CHECK(json::parse(r.body)["choices"][0]["text"] == "Hello!");
    }
    {
      Reply r = ask(post("/v1/completions", completion(true)));
      CHECK(r.status == 200);
      CHECK(joinedText(events(r.body)) == "Hello!");
    }
    Reply m = ask(get("/metrics"));
    CHECK(m.body.find("vsup_draining{server=\"0\"} 1.0\n") != std::string::npos);
    CHECK(m.body.find("vsup_ready{server=\"0\"} 0.0\n") != std::string::npos);
    CHECK(m.body.find("vsup_requests_total{server=\"0\"} 2.0\n") != std::string::npos);
    h.bridge.call([&] { CHECK(h.api->requestsTotal() == 2); });
  });
}

TEST_CASE("api server: /ping answers GET and POST like /health; /version names the version") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(get("/ping"));
    Reply ping = c.requireRead();
    CHECK(ping.status == 200);
    CHECK(ping.body == R"({"status":"ready"})");
    c.send(vsup::testing::post("/ping", "{}"));
    CHECK(c.requireRead().status == 200);
    c.send("PUT /ping HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    CHECK(c.requireRead().status == 405);
    c.send(get("/version"));
    Reply version = c.requireRead();
    CHECK(version.status == 200);
    CHECK(json::parse(version.body) == json{{"version", VSUP_VERSION}});
    c.send(get("/live"));
    Reply live = c.requireRead();
    CHECK(live.status == 200);
    CHECK(json::parse(live.body) == json{{"status", "alive"}, {"state", "ready"}});
  });
}

TEST_CASE("api server: X-Request-Id is echoed on every response to its request: plain, "
          "streaming and errors; without one (or with an invalid one) it is the response id") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    const std::string mine = "X-Request-Id: trace-42/abc def\r\n";
    c.send(vsup::testing::post("/v1/completions", completion(false).dump(), mine));
    Reply plain = c.requireRead();
    CHECK(plain.status == 200);
    CHECK(plain.header("x-request-id") == "trace-42/abc def");
    c.send(vsup::testing::post("/v1/completions", completion(true).dump(), mine));
    Reply stream = c.requireRead();
    CHECK(stream.status == 200);
    CHECK(stream.header("x-request-id") == "trace-42/abc def");
    json bad = completion(false);
    bad["temperature"] = 9;
    c.send(vsup::testing::post("/v1/completions", bad.dump(), mine));
    Reply error = c.requireRead();
    CHECK(error.status == 400);
    CHECK(error.header("x-request-id") == "trace-42/abc def");
    c.send(get("/nowhere", mine));
    Reply notFound = c.requireRead();
    CHECK(notFound.status == 404);
    CHECK(notFound.header("x-request-id") == "trace-42/abc def");
    c.send(get("/health", mine));
    CHECK(c.requireRead().header("x-request-id") == "trace-42/abc def");

    // None, too long, or with a byte outside printable ASCII (a control byte is refused by the
    // HTTP parser already): the response id instead.
    const std::string tooLong = "X-Request-Id: " + std::string(257, 'a') + "\r\n";
    const std::string nonAscii = "X-Request-Id: caf\xc3\xa9\r\n";
    for (const std::string& extra : {std::string(), tooLong, nonAscii}) {
      c.send(vsup::testing::post("/v1/completions", completion(false).dump(), extra));
      Reply r = c.requireRead();
      REQUIRE(r.status == 200);
      std::string id = json::parse(r.body)["id"];
      CHECK(id.rfind("cmpl-", 0) == 0);
      CHECK(r.header("x-request-id") == id);
    }
    c.send(vsup::testing::post("/v1/completions", completion(true).dump()));
    Reply s = c.requireRead();
    std::string id = json::parse(events(s.body)[0])["id"];
    CHECK(s.header("x-request-id") == id);
    c.send(get("/health"));
    CHECK(c.requireRead().header("x-request-id").rfind("req-", 0) == 0);
    const std::string exactly = "X-Request-Id: " + std::string(256, 'b') + "\r\n";
    c.send(get("/health", exactly));
    CHECK(c.requireRead().header("x-request-id") == std::string(256, 'b'));
  });
}

TEST_CASE("api server: a request may name any served model name and gets that name back; "
          "/v1/models lists each with root and max_model_len") {
  Harness h(nullptr, [](ApiServerOptions& o) {
    o.model = "/models/llama-3";
    o.servedModelNames = {"llama", "alias"};
  });
  h.run([&] {
    Client c(h.port());
    for (const char* name : {"llama", "alias"}) {
      CAPTURE(name);
      json body = completion(false);
      body["model"] = name;
      c.send(post("/v1/completions", body));
      Reply r = c.requireRead();
      REQUIRE(r.status == 200);
      CHECK(json::parse(r.body)["model"] == name);
      body["stream"] = true;
      c.send(post("/v1/completions", body));
      Reply s = c.requireRead();
      REQUIRE(s.status == 200);
      for (const auto& e : events(s.body)) {
        if (e != "[DONE]") CHECK(json::parse(e)["model"] == name);
      }
    }
    for (const char* other : {"vsup-sim", "/models/llama-3"}) {
      json body = completion(false);
      body["model"] = other;
      c.send(post("/v1/completions", body));
      Reply r = c.requireRead();
      CHECK(r.status == 404);
      CHECK(errorOf(r)["message"] == std::string("The model `") + other +
                                         "` does not exist. Served models: `llama`, `alias`.");
    }
    c.send(get("/v1/models"));
    Reply models = c.requireRead();
    REQUIRE(models.status == 200);
    json list = json::parse(models.body);
    REQUIRE(list["data"].size() == 2);
    for (size_t i = 0; i < 2; ++i) {
      const json& m = list["data"][i];
      CHECK(m["id"] == (i == 0 ? "llama" : "alias"));
      CHECK(m["object"] == "model");
      CHECK(m["owned_by"] == "vsup");
      CHECK(m["root"] == "/models/llama-3");
      CHECK(m["parent"].is_null());
      CHECK(m["max_model_len"] == 2048);  // the fake engine's, from attach
      CHECK(m["created"].is_number_integer());
    }
    c.send(get("/metrics"));
    CHECK(c.requireRead().body.find("vllm:num_requests_running{model_name=\"llama\"} ") !=
          std::string::npos);
  });
}

TEST_CASE("api server: /v1/models says max_model_len null when the engine has no bound") {
  Harness h([](FakeEngine& f) { f.maxModelLen = 0; });
  h.run([&] {
    Client c(h.port());
    c.send(get("/v1/models"));
    json list = json::parse(c.requireRead().body);
    REQUIRE(list["data"].size() == 1);
    CHECK(list["data"][0]["id"] == "vsup-sim");
    CHECK(list["data"][0]["root"] == "vsup-sim");
    CHECK(list["data"][0]["max_model_len"].is_null());
  });
}

TEST_CASE("api server: /metrics asks the engine on each scrape, and still answers with the last "
          "figures when the engine fails or never answers, or with zeros before any") {
  vsup::engine::EngineStats stats;
  stats.running = 3;
  stats.waiting = 1;
  stats.totalBlocks = 100;
  stats.freeBlocks = 75;
  stats.blockSize = 16;
  stats.finishedLength = 9;
  stats.e2eLatency.observe(0.4);
  auto scrape = [](uint16_t port) {
    Client c(port);
    c.send(get("/metrics"));
    return c.requireRead();
  };
  const std::string running7 = "vllm:num_requests_running{model_name=\"vsup-sim\"} 7.0\n";
  SUBCASE("answered, then failing, then stuck") {
    Harness h([&](FakeEngine& f) { f.stats = stats; });
    h.run([&] {
      Reply r = scrape(h.port());
      CHECK(r.status == 200);
      CHECK(r.header("content-type") == "text/plain; version=0.0.4; charset=utf-8");
      const std::string lines[] = {
          "vllm:num_requests_running{model_name=\"vsup-sim\"} 3.0\n",
          "vllm:num_requests_waiting{model_name=\"vsup-sim\"} 1.0\n",
          "vllm:kv_cache_usage_perc{model_name=\"vsup-sim\"} 0.25\n",
          "vllm:cache_config_info{block_size=\"16\",model_name=\"vsup-sim\",num_gpu_blocks=\"100\"} "
          "1.0\n",
          "vllm:request_success_total{finished_reason=\"length\",model_name=\"vsup-sim\"} 9.0\n",
          "vllm:e2e_request_latency_seconds_bucket{le=\"0.5\",model_name=\"vsup-sim\"} 1.0\n",
          "vllm:e2e_request_latency_seconds_count{model_name=\"vsup-sim\"} 1.0\n",
          "vsup_ready{server=\"0\"} 1.0\n",
          "vsup_draining{server=\"0\"} 0.0\n",
      };
      for (const auto& line : lines) CHECK_MESSAGE(r.body.find(line) != std::string::npos, line);
      CHECK(h.fake.log.statsCalls() == 1);

      h.bridge.call([&] { h.fake.stats.running = 7; });  // asked again on the next scrape
      CHECK(scrape(h.port()).body.find(running7) != std::string::npos);
      CHECK(h.fake.log.statsCalls() == 2);

      h.bridge.call([&] {
        h.fake.stats.running = 11;
        h.fake.statsFail = true;
      });
      Reply failing = scrape(h.port());
      CHECK(failing.status == 200);
      CHECK(failing.body.find(running7) != std::string::npos);
      CHECK(h.fake.log.statsCalls() == 3);

      h.bridge.call([&] {
        h.fake.statsFail = false;
        h.fake.statsHang = true;
      });
      vsup::MonoNs sent = vsup::monoNow();
      Reply stuck = scrape(h.port());
      CHECK(stuck.status == 200);
      CHECK(stuck.body.find(running7) != std::string::npos);
      CHECK(vsup::testing::elapsedMs(sent) >= 900);  // it waited for the engine, boundedly
    });
  }
  SUBCASE("the engine gone before any answer: zeros") {
    Harness h([&](FakeEngine& f) { f.statsFail = true; });
    h.run([&] {
      h.bridge.call([&] { h.fake.disconnect(); });
      for (int i = 0; i < 100 && h.state() != ApiState::Failed; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      REQUIRE(h.state() == ApiState::Failed);
      Reply r = scrape(h.port());
      CHECK(r.status == 200);
      CHECK(r.body.find("vllm:num_requests_running{model_name=\"vsup-sim\"} 0.0\n") !=
            std::string::npos);
      CHECK(r.body.find("vllm:request_success_total{finished_reason=\"stop\","
                        "model_name=\"vsup-sim\"} 0.0\n") != std::string::npos);
      Client c(h.port());
      c.send(get("/live"));
      Reply live = c.requireRead();
      CHECK(live.status == 503);
      CHECK(json::parse(live.body)["status"] == "failed");
    });
  }
}

TEST_CASE("api server: with logRequests, one line when a completion arrives and one when it ends, "
          "under its X-Request-Id, never with the prompt") {
  std::ostringstream captured;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(captured);
  vsup::log().sinks().push_back(sink);
  {
    Harness h(nullptr, [](ApiServerOptions& o) { o.logRequests = true; });
    h.run([&] {
      Client c(h.port());
      json body = completion(true, 5);
      body["prompt"] = "secret prompt text";
      c.send(vsup::testing::post("/v1/completions", body.dump(), "X-Request-Id: trace-7\r\n"));
      CHECK(c.requireRead().status == 200);
      json bad = completion(false);
      bad["prompt"] = "secret prompt text";
      bad["temperature"] = 9;
      c.send(vsup::testing::post("/v1/completions", bad.dump(), "X-Request-Id: trace-8\r\n"));
      CHECK(c.requireRead().status == 400);
    });
  }
  auto& sinks = vsup::log().sinks();
  sinks.erase(std::find(sinks.begin(), sinks.end(), sink));
  const std::string text = captured.str();
  CAPTURE(text);
  CHECK(text.find("request trace-7 arrived: completion (stream), id cmpl-") != std::string::npos);
  CHECK(text.find(", max_tokens 5, 1 prompt(s)") != std::string::npos);
  CHECK(text.find("request trace-7 ended in ") != std::string::npos);
  CHECK(text.find(": 200; finish stop, prompt_tokens 3, completion_tokens 3") != std::string::npos);
  CHECK(text.find("request trace-8 refused: 400 invalid_value (param temperature)") !=
        std::string::npos);
  CHECK(text.find("secret") == std::string::npos);
}

TEST_CASE("api server: drain waits for the in-flight response, deferring with the count") {
  Harness h(holdRequests);
  std::mutex mu;
  std::vector<std::string> deferrals;
  Flag drained;
  kj::Promise<void> drain = nullptr;
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(false)));
    REQUIRE(h.submitted(1));
    h.bridge.call([&] {
      drain = h.api->drain(vsup::kNoDeadline, [&](const std::string& reason) {
                     std::lock_guard lock(mu);
                     deferrals.push_back(reason);
                   })
                  .then([&] { drained.set(); })
                  .eagerlyEvaluate(nullptr);
      CHECK(h.api->state() == ApiState::Stopping);
    });
    CHECK_FALSE(drained.isSet());
    h.bridge.call([&] { h.fake.send(h.submit(0), "x", FinishReason::Stop); });
    CHECK(c.requireRead().status == 200);
    CHECK(c.closedByPeer());  // the drain closed the connection once the response was out
    CHECK(drained.wait());
  });
  std::lock_guard lock(mu);
  CHECK(deferrals == std::vector<std::string>{"draining 1 request(s)"});
}

TEST_CASE("api server: at the drain deadline an in-flight stream is aborted: a final chunk with "
          "finish_reason abort, then [DONE]") {
  Harness h(holdRequests);
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    h.bridge.call([&] { h.fake.send(id, "Hel"); });
    Reply head = c.requireHead();
    REQUIRE(head.status == 200);
    std::string body = c.readChunk();
    CHECK(joinedText(events(body)) == "Hel");
    h.bridge.call([&] { auto done = h.api->quiesce(vsup::deadlineAfterMs(100)); });
    for (std::string chunk = c.readChunk(); !chunk.empty(); chunk = c.readChunk()) body += chunk;
    auto evs = events(body);
    REQUIRE(evs.size() == 3);
    CHECK(json::parse(evs[1])["choices"][0]["finish_reason"] == "abort");
    CHECK(evs[2] == "[DONE]");
    CHECK(h.aborted(id));
  });
}

TEST_CASE("api server: drain answers the clients itself (abort) when the engine does not") {
  Harness h([](FakeEngine& f) {
    f.script = {};
    f.answerAborts = false;
  });
  Flag drained;
  kj::Promise<void> drain = nullptr;
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(false)));
    REQUIRE(h.submitted(1));
    h.bridge.call([&] { h.fake.send(h.submit(0), "par"); });
    REQUIRE(h.fake.log.waitUntil([](const FakeEngine::Log& l) { return l.answeredLocked() >= 1; }));
    vsup::MonoNs sent = vsup::monoNow();
    h.bridge.call([&] {
      drain = h.api->drain(vsup::deadlineAfterMs(300), nullptr)
                  .then([&] { drained.set(); })
                  .eagerlyEvaluate(nullptr);
    });
    Reply r = c.requireRead();
    CHECK(r.status == 200);
    json j = json::parse(r.body);
    CHECK(j["choices"][0]["text"] == "par");  // the text so far
    CHECK(j["choices"][0]["finish_reason"] == "abort");
    CHECK(vsup::testing::elapsedMs(sent) < 300);  // before the deadline itself
    CHECK(drained.wait());
  });
}

TEST_CASE("api server: engineFailed makes /health 503 failed, and new requests 503") {
  Harness h;
  h.run([&] {
    h.bridge.call([&] { h.fake.engineFailed("rank 1 died"); });
    REQUIRE(h.fake.log.waitUntil([](const FakeEngine::Log& l) { return l.answeredLocked() >= 1; }));
    Client c(h.port());
    c.send(get("/health"));
    Reply health = c.requireRead();
    CHECK(health.status == 503);
    CHECK(health.body == R"({"status":"failed","in_flight":0})");
    c.send(get("/metrics"));
    CHECK(c.requireRead().body.find("vsup_ready{server=\"0\"} 0.0\n") != std::string::npos);
    c.send(post("/v1/completions", completion(false)));
    Reply r = c.requireRead();
    CHECK(r.status == 503);
    CHECK(r.header("retry-after") == "1");
    CHECK(r.header("connection") == "close");
    CHECK(errorOf(r)["message"] == "server is failed");
  });
}

TEST_CASE("api server: when the engine connection is lost, in-flight requests end with an error") {
  Harness h(holdRequests);
  h.run([&] {
    Client plain(h.port());
    plain.send(post("/v1/completions", completion(false)));
    Client stream(h.port());
    stream.send(post("/v1/completions", completion(true)));
    REQUIRE(h.submitted(2));
    for (const auto& id : h.fake.log.submits()) h.bridge.call([&] { h.fake.send(id, "a"); });
    Reply head = stream.requireHead();
    REQUIRE(head.status == 200);
    std::string body = stream.readChunk();
    h.bridge.call([&] { h.fake.disconnect(); });

    Reply r = plain.requireRead();
    CHECK(r.status == 500);
    CHECK(errorOf(r)["message"] == "engine failure: the engine process is gone");
    for (std::string chunk = stream.readChunk(); !chunk.empty(); chunk = stream.readChunk()) {
      body += chunk;
    }
    auto evs = events(body);
    REQUIRE(evs.size() == 3);
    CHECK(json::parse(evs[1])["error"]["message"] == "engine failure: the engine process is gone");
    CHECK(evs[2] == "[DONE]");
    CHECK(h.state() == ApiState::Failed);
    Client c(h.port());
    c.send(get("/health"));
    CHECK(c.requireRead().status == 503);
  });
}

TEST_CASE("api server: a client that disconnects has its engine request aborted once a write "
          "to it fails") {
  Harness h(holdRequests);
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    h.bridge.call([&] { h.fake.send(id, "a"); });
    CHECK(c.requireHead().status == 200);
    CHECK(c.readChunk().find("\"text\":\"a\"") != std::string::npos);
    c.close();  // a FIN, all read: nothing tells it from a half-close until a write fails
    bool gone = false;
    for (int i = 0; i < 100 && !gone; ++i) {
      h.bridge.call([&] {
        h.fake.send(id, "b");
        gone = h.api->inFlight() == 0;
      });
    }
    CHECK(h.aborted(id));
    h.bridge.call([&] { CHECK(h.api->inFlight() == 0); });
  });
}

TEST_CASE("api server: a client that half-closes after its request gets the whole completion, "
          "plain or streamed") {
  Harness h;
  h.run([&] {
    Client plain(h.port());
    plain.send(post("/v1/completions", completion(false)));
    plain.halfClose();  // as `nc -N` does
    Reply r = plain.requireRead();
    REQUIRE(r.status == 200);
    CHECK(json::parse(r.body)["choices"][0]["text"] == "Hello!");
    CHECK(plain.endsCleanly());

    Client stream(h.port());
    stream.send(post("/v1/completions", completion(true)));
    stream.halfClose();
    Reply s = stream.requireRead();
    REQUIRE(s.status == 200);
    auto evs = events(s.body);
    CHECK(joinedText(evs) == "Hello!");
    CHECK(evs.back() == "[DONE]");
    CHECK(stream.endsCleanly());
    CHECK(h.fake.log.aborts().empty());
  });
}

TEST_CASE("api server: the API key is checked under the Bearer scheme, in any case") {
  Harness h(nullptr, [](ApiServerOptions& o) { o.apiKey = "sk-test-key"; });
  h.run([&] {
    auto status = [&](const std::string& authorization) {
      Client c(h.port());
      c.send(get("/v1/models",
                 authorization.empty() ? "" : "Authorization: " + authorization + "\r\n"));
      return c.requireRead().status;
    };
    for (const char* ok : {"Bearer sk-test-key", "bearer sk-test-key", "BEARER sk-test-key",
                           "BeArEr   sk-test-key"}) {
      CAPTURE(ok);
      CHECK(status(ok) == 200);
    }
    for (const char* bad : {"", "Bearer sk-test-ke", "Bearer sk-test-key2", "Basic sk-test-key",
                            "Bearersk-test-key", "sk-test-key", "Bearer", "Bearer ",
                            "Bearer sk-test-key extra", "Bearers sk-test-key"}) {
      CAPTURE(bad);
      CHECK(status(bad) == 401);
    }
  });
}

TEST_CASE("api server: the HTTP layer's own errors have the shape of every other error") {
  Harness h;
  h.run([&] {
    auto keys = [](const Reply& r) {  // in the order they were rendered
      const nlohmann::ordered_json doc = nlohmann::ordered_json::parse(r.body);
      std::vector<std::string> out;
      for (const auto& [key, value] : doc.at("error").items()) out.push_back(key);
      CHECK(doc.size() == 1);
      return out;
    };
    Client api(h.port());
    api.send(get("/no-such-path"));
    Reply notFound = api.requireRead();
    REQUIRE(notFound.status == 404);
    const std::vector<std::string> expected = keys(notFound);
    CHECK(expected == std::vector<std::string>{"message", "type", "param", "code"});
    const char* raw[] = {
        "GET /health HTTP/1.1\r\n\r\n",                          // no Host: 400
        "GET /health HTTP/2.0\r\nHost: t\r\n\r\n",               // 505
        "GET /health HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n",  // 400
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n",  // 413
    };
    for (const char* bytes : raw) {
      CAPTURE(bytes);
      Client c(h.port());
      c.send(bytes);
      Reply r = c.requireRead();
      CHECK(r.status >= 400);
      CHECK(keys(r) == expected);
      json e = errorOf(r);
      CHECK(e["message"].is_string());
      CHECK(e["type"] == "invalid_request_error");
      CHECK(e["param"].is_null());
      CHECK(e["code"].is_string());
    }
  });
}

TEST_CASE("api server: a chat without max_tokens asks for the rest of the context; a completion "
          "without it gets 16") {
  json chat = {{"model", "vsup-sim"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
  SUBCASE("an engine without a context bound: the largest max_tokens accepted") {
    Harness h([](FakeEngine& f) { f.maxModelLen = 0; },
              [](ApiServerOptions& o) { o.maxTokens = 3000; });
    h.run([&] {
      Client c(h.port());
      c.send(post("/v1/chat/completions", chat));
      CHECK(c.requireRead().status == 200);
      c.send(post("/v1/completions", json{{"model", "vsup-sim"}, {"prompt", "hi"}}));
      CHECK(c.requireRead().status == 200);
      auto requests = h.fake.log.requests();
      REQUIRE(requests.size() == 2);
      CHECK(requests[0].sampling.maxTokens == 3000);
      CHECK(requests[1].sampling.maxTokens == 16);
    });
  }
  SUBCASE("an engine with a context of 2048") {
    Harness h;  // the fake's max_model_len: 2048; the largest max_tokens: 4096
    h.run([&] {
      Client c(h.port());
      c.send(post("/v1/chat/completions", chat));
      CHECK(c.requireRead().status == 200);
      json given = chat;
      given["max_tokens"] = 5;
      c.send(post("/v1/chat/completions", given));
      CHECK(c.requireRead().status == 200);
      auto requests = h.fake.log.requests();
      REQUIRE(requests.size() == 2);
      // The ceiling is the context; the engine lowers it to what the prompt leaves.
      CHECK(requests[0].sampling.maxTokens == 2048);
      CHECK(requests[0].sampling.maxTokensToContext);
      CHECK_FALSE(requests[1].sampling.maxTokensToContext);
      CHECK(requests[1].sampling.maxTokens == 5);
    });
  }
}

}  // TEST_SUITE
