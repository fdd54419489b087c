// Tests for workers/api_server/api_server.h: a real ApiServer on 127.0.0.1 (port 0) in front of
// the in-process fake engine (fake_engine.h), both on one uv loop on the test's main thread.
//
// The HTTP client is plain blocking sockets with 5 s timeouts on a std::thread, so a test that
// goes wrong fails instead of hanging. The client reaches the loop thread only through
// LoopBridge::call (a uv_async_t); it waits for what the engine saw through the fake's Log
// (a condition variable), never by sleeping.
#include "workers/api_server/api_server.h"

#include <condition_variable>
#include <doctest/doctest.h>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ipc/test_util.h"
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

  explicit Harness(std::function<void(FakeEngine&)> setup = nullptr) {
    if (setup) setup(fake);
    ApiServerOptions o;
    o.name = "api-test";
    o.port = 0;
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

TEST_CASE("api server: quiesce closes the listener, a request arriving then gets 503 + close, "
          "the state is draining, and an in-flight request still completes") {
  Harness h(holdRequests);
  h.run([&] {
    Client busy(h.port());
    busy.send(post("/v1/completions", completion(false)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    Client late(h.port());  // kept alive, with a new request half sent when the drain starts
    late.send(get("/health"));
    CHECK(late.requireRead().status == 200);
    late.send("GET /health HTTP/1.1\r\nHost: t\r\n");
    h.bridge.call([] {});  // two loop round trips: the server has read those bytes
    h.bridge.call([] {});
    h.bridge.call([&] {
      CHECK(h.api->inFlight() == 1);
      auto done = h.api->quiesce(vsup::kNoDeadline);
      CHECK(h.api->state() == ApiState::Draining);
      CHECK(std::string(vsup::workers::nameOf(h.api->state())) == "draining");
    });
    Reply refused = late.requireRead();
    CHECK(refused.status == 503);
    CHECK(refused.header("connection") == "close");
    CHECK(errorOf(refused)["message"] == "server is shutting down");
    CHECK(late.closedByPeer());
    CHECK_FALSE(connectTo(h.port()));  // new connects are refused

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
    CHECK(busy.closedByPeer());
    CHECK(h.fake.log.aborts().empty());
  });
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
    CHECK(health.body == R"({"status":"failed"})");
    c.send(post("/v1/completions", completion(false)));
    Reply r = c.requireRead();
    CHECK(r.status == 503);
    CHECK(errorOf(r)["message"] == "server is failed");
    c.send(get("/metrics"));
    CHECK(c.requireRead().body.find("vsup_ready{server=\"0\"} 0") != std::string::npos);
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

TEST_CASE("api server: a client that disconnects has its engine request aborted") {
  Harness h(holdRequests);
  h.run([&] {
    Client c(h.port());
    c.send(post("/v1/completions", completion(true)));
    REQUIRE(h.submitted(1));
    std::string id = h.submit(0);
    h.bridge.call([&] { h.fake.send(id, "a"); });
    CHECK(c.requireHead().status == 200);
    c.close();
    CHECK(h.aborted(id));
    h.bridge.call([&] { CHECK(h.api->inFlight() == 0); });
  });
}

}  // TEST_SUITE
