// Tests for workers/http/http_server.h over real sockets on 127.0.0.1 (port 0).
//
// The Server runs on a uv loop on the test's main thread; the client side is plain blocking
// sockets on a std::thread. Every client socket has 5 s send/receive timeouts, so a test that
// goes wrong fails instead of hanging. The client reaches into the loop thread only through
// LoopBridge::call (a uv_async_t), so all Server and Response calls happen on the loop thread, as
// the contract demands. Nothing synchronises by sleeping: the client waits on replies, on EOF, or
// on a Notifier poked by loop-side callbacks.
#include "workers/http/http_server.h"

#include <dirent.h>
#include <signal.h>
#include <time.h>
#include <spdlog/sinks/ostream_sink.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <doctest/doctest.h>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/clock.h"
#include "base/log.h"
#include "ipc/test_util.h"
#include "base/fd.h"
#include "ipc/uv_handle.h"
#include "workers/http/http_test_util.h"

namespace {

using vsup::testing::Client;
using vsup::testing::connectTo;
using vsup::testing::elapsedMs;
using vsup::testing::get;
using vsup::testing::kWait;
using vsup::testing::LoopBridge;
using vsup::testing::openFdCount;
using vsup::testing::post;
using vsup::testing::Reply;
using vsup::testing::TestLoop;

using vsup::OwnFd;
using vsup::UvHandle;
using vsup::http::Request;
using vsup::http::Response;
using vsup::http::Server;
using vsup::http::ServerOptions;

// Loop-side callbacks poke it; the client thread waits for a condition on atomics.
class Notifier {
 public:
  void poke() {
    std::lock_guard lock(mu_);
    cv_.notify_all();
  }
  // Runs `f` (e.g. publishing a value to the client thread) under the lock, then wakes the
  // waiters: a waiter's predicate can never read it half-way or unsynchronised.
  template <typename F>
  void update(F&& f) {
    std::lock_guard lock(mu_);
    f();
    cv_.notify_all();
  }
  bool waitUntil(const std::function<bool()>& pred) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kWait, pred);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

// Answers "<method> <path> <body>" with the target in X-Target.
void echo(Request&& req, std::shared_ptr<Response> resp) {
  resp->respond(200, {{"Content-Type", "text/plain"}, {"X-Target", req.target}},
                req.method + " " + req.path + " " + req.body);
}

ServerOptions testOptions() {
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  return o;
}

// One test's world: loop, bridge, server (destroyed in reverse order).
struct Harness {
  TestLoop loop;
  LoopBridge bridge{loop.get()};
  std::unique_ptr<Server> server;
  Harness(ServerOptions options, vsup::http::Handler handler) {
    server = std::make_unique<Server>(loop.get(), std::move(options), std::move(handler));
    server->listen();
  }
  explicit Harness(vsup::http::Handler handler = echo) : Harness(testOptions(), std::move(handler)) {}
  ~Harness() { server.reset(); }
  uint16_t port() const { return server->port(); }
  void run(const std::function<void()>& client) { bridge.runClient(client); }
};

// The server's own answers have the OpenAI error shape of every other error:
// {"error":{"message":"...","type":"invalid_request_error","param":null,"code":"<code>"}}.
void expectJsonError(const Reply& reply, int status, const std::string& code) {
  CAPTURE(reply.body);
  CHECK(reply.status == status);
  CHECK(reply.header("connection") == "close");
  CHECK(reply.header("content-type") == "application/json");
  CHECK(reply.body.rfind("{\"error\":{\"message\":\"", 0) == 0);
  CHECK(reply.body.find("\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"" + code +
                        "\"}}") != std::string::npos);
}

// Client thread: polls `pred` on the loop thread until it holds (false after 5 s).
bool eventually(LoopBridge& bridge, const std::function<bool()>& pred) {
  auto deadline = std::chrono::steady_clock::now() + kWait;
  for (;;) {
    bool held = false;
    bridge.call([&] { held = pred(); });
    if (held) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// A fresh client gets a normal answer: the server survived whatever came before.
void expectStillServing(uint16_t port) {
  Client c(port);
  c.send(get("/alive"));
  auto reply = c.read();
  REQUIRE(reply.has_value());
  CHECK(reply->status == 200);
  CHECK(reply->body == "GET /alive ");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Requests and responses.

TEST_CASE("a GET and a POST with a body round-trip with Content-Length and Server headers") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(get("/v1/models?x=1&y=2"));
    auto r1 = c.read();
    REQUIRE(r1.has_value());
    CHECK(r1->status == 200);
    CHECK(r1->body == "GET /v1/models ");
    CHECK(r1->header("x-target") == "/v1/models?x=1&y=2");
    CHECK(r1->header("server") == "vsup");
    CHECK(r1->header("content-length") == std::to_string(r1->body.size()));
    CHECK(r1->header("content-type") == "text/plain");
    CHECK_FALSE(r1->has("connection"));

    Client d(h.port());
    d.send(post("/v1/completions", "{\"prompt\":\"hi\"}"));
    auto r2 = d.read();
    REQUIRE(r2.has_value());
    CHECK(r2->body == "POST /v1/completions {\"prompt\":\"hi\"}");
  });
}

TEST_CASE("request headers reach the handler lower-cased, trimmed and in order") {
  Request seen;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    seen = std::move(req);
    resp->respond(204, {}, "");
  });
  h.run([&] {
    Client c(h.port());
    c.send("GET /h HTTP/1.1\r\nHost: t\r\nX-One:  a b \r\nX-Empty:\r\nX-ONE: second\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->status == 204);
    CHECK_FALSE(reply->has("content-length"));
  });
  REQUIRE(seen.headers.size() == 4);
  CHECK(seen.headers[1] == std::pair<std::string, std::string>{"x-one", "a b"});
  CHECK(seen.headers[2] == std::pair<std::string, std::string>{"x-empty", ""});
  CHECK(seen.header("x-one") == "a b");
  CHECK(seen.header("x-missing").empty());
  CHECK(seen.path == "/h");
}

TEST_CASE("a keep-alive connection serves two requests in a row") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(get("/one"));
    auto r1 = c.read();
    REQUIRE(r1.has_value());
    CHECK(r1->body == "GET /one ");
    c.send(post("/two", "body"));
    auto r2 = c.read();
    REQUIRE(r2.has_value());
    CHECK(r2->body == "POST /two body");
  });
}

TEST_CASE("pipelined requests are handed over one at a time and answered in order") {
  std::vector<std::shared_ptr<Response>> pending;
  std::vector<std::string> paths;
  std::atomic<int> calls{0};
  Notifier notifier;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    paths.push_back(req.path);
    pending.push_back(std::move(resp));
    ++calls;
    notifier.poke();
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/a") + post("/b", "xyz") + get("/c"));
    for (int i = 1; i <= 3; ++i) {
      REQUIRE(notifier.waitUntil([&] { return calls.load() >= i; }));
      h.bridge.call([&] {
        // The next request is not parsed before this one's response is complete.
        CHECK(calls.load() == i);
        CHECK(h.server->inFlight() == 1);
        pending.back()->respond(200, {}, "answer " + paths.back());
      });
      auto reply = c.read();
      REQUIRE(reply.has_value());
      CHECK(reply->body == "answer " + std::string(i == 1 ? "/a" : i == 2 ? "/b" : "/c"));
    }
  });
}

TEST_CASE("a chunked request body is de-chunked for the handler") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send("POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->status == 200);
    CHECK(reply->body == "POST /chunked hello world");
    // The connection is still usable.
    c.send(get("/after"));
    auto again = c.read();
    REQUIRE(again.has_value());
    CHECK(again->body == "GET /after ");
  });
}

TEST_CASE("Expect: 100-continue within the limits gets 100 Continue before the body is sent") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send("POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    auto cont = c.read();
    REQUIRE(cont.has_value());
    CHECK(cont->status == 100);
    c.send("data");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->status == 200);
    CHECK(reply->body == "POST /e data");
  });
}

TEST_CASE("an HTTP/1.0 request is answered and then the connection is closed") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send("GET /old HTTP/1.0\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->body == "GET /old ");
    CHECK(reply->header("connection") == "close");
    CHECK(c.closedByPeer());
  });
}

TEST_CASE("Connection: close from the client is honoured") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(get("/bye", "Connection: close\r\n"));
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->status == 200);
    CHECK(reply->header("connection") == "close");
    CHECK(c.closedByPeer());
  });
}

TEST_CASE("1000 sequential requests on one keep-alive connection all succeed") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    for (int i = 0; i < 1000; ++i) {
      std::string body = std::to_string(i);
      c.send(post("/n", body));
      auto reply = c.read();
      REQUIRE(reply.has_value());
      REQUIRE(reply->body == "POST /n " + body);
    }
  });
  CHECK(h.server->inFlight() == 0);
}

TEST_CASE("a handler that throws or drops its response unanswered yields a 500, not a hang") {
  Harness h([](Request&& req, std::shared_ptr<Response>) {
    if (req.path == "/throw") throw vsup::Error("boom");
    // "/drop": the response is simply let go.
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/throw"));
    auto r1 = c.read();
    REQUIRE(r1.has_value());
    CHECK(r1->status == 500);
    c.send(get("/drop"));
    auto r2 = c.read();
    REQUIRE(r2.has_value());
    CHECK(r2->status == 500);
  });
  CHECK(h.server->inFlight() == 0);
}

TEST_CASE("a response header with CR or LF is refused and the response can still be sent") {
  Harness h([](Request&&, std::shared_ptr<Response> resp) {
    CHECK_THROWS_AS(resp->respond(200, {{"X-Bad", "a\r\nInjected: yes"}}, "no"), vsup::Error);
    resp->respond(200, {}, "ok");
    CHECK_THROWS_AS(resp->respond(200, {}, "twice"), vsup::Error);
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/"));
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->body == "ok");
    CHECK_FALSE(reply->has("injected"));
  });
}

// ---------------------------------------------------------------------------------------------
// Streaming.

TEST_CASE("a streaming response arrives chunk by chunk before finish() is called") {
  std::shared_ptr<Response> stream;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    resp->startStream(200, {{"Content-Type", "text/event-stream"}});
    CHECK(resp->write("data: first\n\n"));
    stream = std::move(resp);
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/stream"));
    auto head = c.readHead();
    REQUIRE(head.has_value());
    CHECK(head->status == 200);
    CHECK(head->header("transfer-encoding") == "chunked");
    CHECK(head->header("content-type") == "text/event-stream");
    CHECK_FALSE(head->has("content-length"));
    // The handler has returned but not finished: the first chunk is already here.
    CHECK(c.readChunk() == "data: first\n\n");
    h.bridge.call([&] {
      CHECK(h.server->inFlight() == 1);
      CHECK(stream->write(""));  // an empty write must not end the stream
      CHECK(stream->write("data: second\n\n"));
      stream->finish();
    });
    CHECK(c.readChunk() == "data: second\n\n");
    CHECK(c.readChunk().empty());
    // Keep-alive after a chunked response.
    c.send(get("/again"));
    auto next = c.readHead();
    REQUIRE(next.has_value());
    CHECK(next->status == 200);
    h.bridge.call([&] { stream->finish(); });
  });
}

TEST_CASE("a client that disconnects mid-stream fires onClientGone, and write() returns false "
          "without SIGPIPE") {
  std::shared_ptr<Response> stream;
  std::atomic<int> goneCalls{0};
  Notifier notifier;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    resp->onClientGone([&] {
      ++goneCalls;
      notifier.poke();
    });
    resp->startStream(200, {});
    resp->write("token");
    stream = std::move(resp);
  });
  // The proof below is that the process survives: SIGPIPE must still be at its default (fatal).
  struct sigaction current{};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &current) == 0);
  bool defaultAction = current.sa_handler == SIG_DFL;
  REQUIRE(defaultAction);
  h.run([&] {
    Client c(h.port());
    c.send(get("/stream"));
    REQUIRE(c.readHead().has_value());
    CHECK(c.readChunk() == "token");
    c.close();
    // Writing at once races the server noticing the close: either way no SIGPIPE may kill us
    // (the default disposition is in force) and write() turns false.
    h.bridge.call([&] {
      bool ok = true;
      for (int i = 0; i < 1000 && ok; ++i) ok = stream->write(std::string(1024, 'x'));
      CHECK_FALSE(ok);
    });
    REQUIRE(notifier.waitUntil([&] { return goneCalls.load() == 1; }));
    h.bridge.call([&] {
      CHECK(stream->clientGone());
      CHECK_FALSE(stream->write("more"));
      stream->finish();  // harmless once gone
      CHECK(h.server->inFlight() == 0);
      bool lateCall = false;
      stream->onClientGone([&] { lateCall = true; });
      CHECK(lateCall);  // registered after the fact: called at once
    });
  });
  CHECK(goneCalls.load() == 1);
}

TEST_CASE("a client that resets its connection while it waits is noticed as gone at once, with "
          "nothing written") {
  std::shared_ptr<Response> pending;  // written on the loop thread, read after `arrived`
  std::atomic<bool> arrived{false};
  std::atomic<bool> gone{false};
  Notifier notifier;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    resp->onClientGone([&] {
      gone = true;
      notifier.poke();
    });
    pending = std::move(resp);
    arrived = true;
    notifier.poke();
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/slow-generation"));
    REQUIRE(notifier.waitUntil([&] { return arrived.load(); }));
    c.reset();
    REQUIRE(notifier.waitUntil([&] { return gone.load(); }));
    h.bridge.call([&] {
      CHECK(h.server->inFlight() == 0);
      pending->respond(200, {}, "too late");  // a no-op
    });
  });
}

TEST_CASE("a client that half-closes after its request gets its answer, then the connection "
          "closes") {
  std::shared_ptr<Response> pending;
  std::atomic<bool> gone{false};
  Notifier notifier;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    if (req.path != "/held") return echo(std::move(req), std::move(resp));
    resp->onClientGone([&] { gone = true; });
    notifier.update([&] { pending = std::move(resp); });
  });
  h.run([&] {
    // Answered while the handler holds it (as an engine would), after the FIN has arrived.
    Client c(h.port());
    c.send(get("/held"));
    c.halfClose();
    REQUIRE(notifier.waitUntil([&] { return pending != nullptr; }));
    // On loopback the FIN is in the server's socket once shutdown() returns; the first call
    // wakes the loop, whose turn reads it (the fd stays readable), the second runs a turn later.
    h.bridge.call([] {});
    h.bridge.call([&] {
      CHECK(h.server->inFlight() == 1);
      CHECK_FALSE(pending->clientGone());
      pending->respond(200, {}, "the answer");
    });
    Reply reply = c.requireRead();
    CHECK(reply.status == 200);
    CHECK(reply.body == "the answer");
    CHECK(c.endsCleanly());
    CHECK_FALSE(gone.load());

    // Answered at once (the request and the FIN in one segment, say): the same.
    Client d(h.port());
    d.send(post("/echo", "body"));
    d.halfClose();
    Reply direct = d.requireRead();
    CHECK(direct.body == "POST /echo body");
    CHECK(d.endsCleanly());
    CHECK(eventually(h.bridge, [&] { return h.server->connections() == 0; }));
  });
}

TEST_CASE("pipelined requests followed by a half-close are all answered in order, then the "
          "connection closes") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send(get("/1") + post("/2", "two") + get("/3"));
    c.halfClose();
    CHECK(c.requireRead().body == "GET /1 ");
    CHECK(c.requireRead().body == "POST /2 two");
    Reply last = c.requireRead();
    CHECK(last.body == "GET /3 ");
    CHECK(c.endsCleanly());
  });
}

TEST_CASE("a stream goes on after the client's FIN, and ends when a write fails") {
  std::shared_ptr<Response> stream;
  std::atomic<int> goneCalls{0};
  Notifier notifier;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    resp->onClientGone([&] {
      ++goneCalls;
      notifier.poke();
    });
    resp->startStream(200, {});
    notifier.update([&] { stream = std::move(resp); });
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/stream"));
    c.halfClose();
    REQUIRE(c.readHead().has_value());
    REQUIRE(notifier.waitUntil([&] { return stream != nullptr; }));
    for (const char* token : {"one", "two", "three"}) {
      h.bridge.call([&] { CHECK(stream->write(token)); });
      CHECK(c.readChunk() == token);  // the client reads on after its FIN
    }
    h.bridge.call([&] { CHECK_FALSE(stream->clientGone()); });
    c.close();  // now it is gone: the next writes fail
    h.bridge.call([&] {
      bool ok = true;
      for (int i = 0; i < 1000 && ok; ++i) ok = stream->write(std::string(1024, 'x'));
      CHECK_FALSE(ok);
    });
    REQUIRE(notifier.waitUntil([&] { return goneCalls.load() == 1; }));
    h.bridge.call([&] { CHECK(h.server->inFlight() == 0); });
  });
}

TEST_CASE("a connection whose input is paused behind a request is waited on without spinning, "
          "urgent data and FIN included") {
  // While input is paused (or over, after a FIN) the poll waits only for errors
  // (UV_PRIORITIZED), which TCP urgent data would trigger again and again, level-triggered,
  // were it not read.
  std::shared_ptr<Response> pending;
  Notifier notifier;
  ServerOptions options = testOptions();
  options.maxHeaderBytes = 1024;  // input pauses past 1 KiB + 64 KiB of pipelined bytes
  Harness h(options, [&](Request&& req, std::shared_ptr<Response> resp) {
    if (req.path != "/held") return echo(std::move(req), std::move(resp));
    notifier.update([&] { pending = std::move(resp); });
  });
  UvHandle<uv_timer_t> timer;  // after h: closed before the loop
  h.run([&] {
    Client c(h.port());
    c.send(get("/held"));
    REQUIRE(notifier.waitUntil([&] { return pending != nullptr; }));
    std::string pipelined;
    while (pipelined.size() < 70 * 1024) pipelined += get("/next");
    c.send(pipelined);
    REQUIRE(::send(c.fd(), "!", 1, MSG_OOB) == 1);
    c.halfClose();
    auto cpuMs = [] {
      timespec t{};
      ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
      return double(t.tv_sec) * 1e3 + double(t.tv_nsec) / 1e6;
    };
    double before = cpuMs();
    auto start = vsup::monoNow();
    // The loop holds the connection for 300 ms of wall time, then answers.
    h.bridge.call([&] {
      timer = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(h.loop.get(), t); });
      timer->data = &pending;
      uv_timer_start(
          timer.get(),
          [](uv_timer_t* t) {
            (*static_cast<std::shared_ptr<Response>*>(t->data))->respond(200, {}, "late");
          },
          300, 0);
    });
    Reply reply = c.requireRead();
    CHECK(reply.body == "late");
    CHECK(elapsedMs(start) >= 250.0);
    CHECK(cpuMs() - before < 150.0);  // a spinning loop would burn the whole 300 ms
    size_t answered = 0;
    for (auto r = c.read(); r.has_value(); r = c.read()) {  // then the pipelined ones, in order
      REQUIRE(r->body == "GET /next ");
      ++answered;
    }
    CHECK(answered == pipelined.size() / get("/next").size());
    h.bridge.call([&] { timer.reset(); });
  });
}

TEST_CASE("a request left incomplete by the client's FIN gets 400 incomplete_request") {
  int handled = 0;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    ++handled;
    echo(std::move(req), std::move(resp));
  });
  h.run([&] {
    Client c(h.port());  // a body shorter than its Content-Length
    c.send("POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    c.halfClose();
    Reply reply = c.requireRead();
    expectJsonError(reply, 400, "incomplete_request");
    CHECK(reply.body.find("after 3 byte(s) of the request body (Content-Length: 10)") !=
          std::string::npos);
    CHECK(c.endsCleanly());

    Client d(h.port());  // headers cut short
    d.send("GET / HTTP/1.1\r\nHost: t\r\nX-Par");
    d.halfClose();
    Reply head = d.requireRead();
    expectJsonError(head, 400, "incomplete_request");
    CHECK(head.body.find("before the end of the request headers") != std::string::npos);
    CHECK(d.endsCleanly());

    Client e(h.port());  // a complete request, then half of the next: the first is answered
    e.send(get("/whole") + "GET /cut HTTP/1.1\r\n");
    e.halfClose();
    CHECK(e.requireRead().body == "GET /whole ");
    expectJsonError(e.requireRead(), 400, "incomplete_request");
    CHECK(e.endsCleanly());
    expectStillServing(h.port());
  });
  CHECK(handled == 2);  // /whole and /alive
}

TEST_CASE("a client that stops reading a stream is dropped once 8 MiB are queued") {
  std::shared_ptr<Response> stream;
  std::atomic<bool> gone{false};
  Notifier notifier;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    resp->onClientGone([&] { gone = true; });
    resp->startStream(200, {});
    notifier.update([&] { stream = std::move(resp); });
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/firehose"));
    REQUIRE(notifier.waitUntil([&] { return stream != nullptr; }));
    h.bridge.call([&] {
      std::string mib(1 << 20, 'x');
      bool ok = true;
      int written = 0;
      for (; written < 200 && ok; ++written) ok = stream->write(mib);
      CHECK_FALSE(ok);  // kernel buffers hold a few MiB, the queue 8 more, never 200
      CHECK(gone.load());
      CHECK(stream->clientGone());
      CHECK(h.server->connections() == 0);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Protocol errors: answered by the server, connection closed, server keeps serving.

TEST_CASE("a malformed request gets 400 with llhttp's reason, then the connection closes") {
  int handled = 0;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    ++handled;
    echo(std::move(req), std::move(resp));
  });
  h.run([&] {
    Client c(h.port());
    c.send("GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 12x\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 400, "malformed_request");
    CHECK(reply->body.find("malformed request") != std::string::npos);
    CHECK(reply->body.find("invalid_request_error") != std::string::npos);
    CHECK(c.closedByPeer());

    Client d(h.port());
    d.send("\x01\x02garbage\r\n\r\n");
    auto r2 = d.read();
    REQUIRE(r2.has_value());
    expectJsonError(*r2, 400, "malformed_request");
    CHECK(d.closedByPeer());
    Client e(h.port());  // llhttp 8 lets this through; the server must not
    e.send("GET / HTTP/1.1\r\nHost: t\r\nBad Header Name: x\r\n\r\n");
    auto r3 = e.read();
    REQUIRE(r3.has_value());
    expectJsonError(*r3, 400, "malformed_request");
    CHECK(r3->body.find("invalid header name") != std::string::npos);
    expectStillServing(h.port());
  });
  CHECK(handled == 1);
}

TEST_CASE("a header block over maxHeaderBytes gets 431, and the server keeps serving") {
  ServerOptions options = testOptions();
  options.maxHeaderBytes = 4096;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    c.send(get("/big", "X-Big: " + std::string(100'000, 'a') + "\r\n"));
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 431, "request_header_fields_too_large");
    CHECK(c.closedByPeer());

    Client d(h.port());  // a long URL counts too
    d.send(get("/" + std::string(8000, 'u')));
    auto r2 = d.read();
    REQUIRE(r2.has_value());
    CHECK(r2->status == 431);
    expectStillServing(h.port());
  });
}

TEST_CASE("a body over maxBodyBytes gets 413 by Content-Length before it is sent") {
  ServerOptions options = testOptions();
  options.maxBodyBytes = 1000;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    c.send("POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 413, "payload_too_large");
    CHECK(c.closedByPeer());

    // With Expect: 100-continue the client gets the 413 instead of a 100.
    Client d(h.port());
    d.send("POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n");
    auto r2 = d.read();
    REQUIRE(r2.has_value());
    CHECK(r2->status == 413);

    Client e(h.port());  // exactly at the limit is fine
    e.send(post("/p", std::string(1000, 'b')));
    auto r3 = e.read();
    REQUIRE(r3.has_value());
    CHECK(r3->status == 200);
    expectStillServing(h.port());
  });
}

TEST_CASE("a chunked body over maxBodyBytes gets 413 by its actual size") {
  ServerOptions options = testOptions();
  options.maxBodyBytes = 1000;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    std::string chunk(800, 'c');
    c.send("POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n" + chunk +
           "\r\n320\r\n" + chunk + "\r\n0\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 413, "payload_too_large");
    CHECK(c.closedByPeer());
    expectStillServing(h.port());
  });
}

TEST_CASE("an unsupported Transfer-Encoding is refused with 501 or 400") {
  Harness h;
  h.run([&] {
    Client c(h.port());
    c.send("POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 501, "not_implemented");
    CHECK(c.closedByPeer());

    Client d(h.port());
    d.send("POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n");
    auto r2 = d.read();
    REQUIRE(r2.has_value());
    CHECK((r2->status == 501 || r2->status == 400));
    CHECK(d.closedByPeer());
    expectStillServing(h.port());
  });
}

TEST_CASE("an HTTP/1.1 request without Host, or any with two, gets 400; HTTP/1.0 may omit it") {
  int handled = 0;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    ++handled;
    echo(std::move(req), std::move(resp));
  });
  h.run([&] {
    Client c(h.port());
    c.send("GET /nohost HTTP/1.1\r\n\r\n");
    Reply missing = c.requireRead();
    expectJsonError(missing, 400, "malformed_request");
    CHECK(missing.body.find("must have a Host header") != std::string::npos);
    CHECK(c.closedByPeer());

    Client d(h.port());
    d.send("GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    Reply two = d.requireRead();
    expectJsonError(two, 400, "malformed_request");
    CHECK(two.body.find("more than one Host header") != std::string::npos);

    Client e(h.port());
    e.send("GET /old HTTP/1.0\r\n\r\n");
    Reply old = e.requireRead();
    CHECK(old.status == 200);
    CHECK(old.body == "GET /old ");
  });
  CHECK(handled == 1);
}

TEST_CASE("a request line with a version other than HTTP/1.0 or 1.1 gets 505") {
  Harness h;
  h.run([&] {
    for (const char* version : {"HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/3.0"}) {
      CAPTURE(version);
      Client c(h.port());
      c.send(std::string("GET / ") + version + "\r\nHost: t\r\n\r\n");
      Reply reply = c.requireRead();
      expectJsonError(reply, 505, "http_version_not_supported");
      CHECK(reply.body.find("HTTP/1.0 and HTTP/1.1") != std::string::npos);
      CHECK(c.closedByPeer());
    }
    expectStillServing(h.port());
  });
}

TEST_CASE("hostile framing gets a clear error and a close, and never reaches the handler") {
  int handled = 0;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    ++handled;
    echo(std::move(req), std::move(resp));
  });
  h.run([&] {
    struct Case {
      const char* what;
      std::string bytes;
      int status;
      const char* code;
    };
    const Case cases[] = {
        {"Transfer-Encoding and Content-Length",
         "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
         "0\r\n\r\n",
         400, "malformed_request"},
        {"a chunk size past 64 bits",
         "POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         "ffffffffffffffffffff\r\n",
         400, "malformed_request"},
        {"a chunk size over the body limit (and never sent)",
         "POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\nabc",
         413, "payload_too_large"},
        {"a chunk size that is not hex",
         "POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
         "malformed_request"},
        {"two Content-Lengths",
         "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400,
         "malformed_request"},
        {"a negative Content-Length", "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
         400, "malformed_request"},
    };
    for (const Case& k : cases) {
      std::string what = k.what;
      CAPTURE(what);
      Client c(h.port());
      c.send(k.bytes);
      expectJsonError(c.requireRead(), k.status, k.code);
      CHECK(c.closedByPeer());
    }
    // Garbage pipelined after a valid request: the request is answered, the garbage gets a 400
    // and the close; nothing else of the connection is touched.
    Client g(h.port());
    g.send(get("/valid") + "\x16\x03\x01 garbage\r\n\r\n");
    CHECK(g.requireRead().body == "GET /valid ");
    expectJsonError(g.requireRead(), 400, "malformed_request");
    CHECK(g.closedByPeer());
    expectStillServing(h.port());
  });
  CHECK(handled == 2);  // /valid and /alive
}

// ---------------------------------------------------------------------------------------------
// Timeouts.

TEST_CASE("half a request line gets 408 and a close once headerTimeoutMs passes") {
  ServerOptions options = testOptions();
  options.headerTimeoutMs = 200;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    auto start = vsup::monoNow();
    c.send("GET /slowl");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 408, "request_timeout");
    CHECK(c.closedByPeer());
    double ms = elapsedMs(start);
    CHECK(ms >= 150.0);
    CHECK(ms < 1000.0);
    expectStillServing(h.port());
  });
}

TEST_CASE("a body that stalls gets 408 once bodyTimeoutMs passes") {
  ServerOptions options = testOptions();
  options.bodyTimeoutMs = 200;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    auto start = vsup::monoNow();
    c.send("POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    auto reply = c.read();
    REQUIRE(reply.has_value());
    expectJsonError(*reply, 408, "request_timeout");
    CHECK(c.closedByPeer());
    CHECK(elapsedMs(start) < 1000.0);
  });
}

TEST_CASE("an idle keep-alive connection is closed after idleTimeoutMs") {
  ServerOptions options = testOptions();
  options.idleTimeoutMs = 200;
  Harness h(options, echo);
  h.run([&] {
    Client c(h.port());
    c.send(get("/"));
    REQUIRE(c.read().has_value());
    auto start = vsup::monoNow();
    CHECK(c.endsCleanly());  // FIN, then the server reads until ours: a crossing request is no reset
    double ms = elapsedMs(start);
    CHECK(ms >= 150.0);
    CHECK(ms < 2000.0);
    c.close();
    CHECK(eventually(h.bridge, [&] { return h.server->connections() == 0; }));
  });
}

TEST_CASE("a connection that sends nothing is closed after firstByteTimeoutMs; one that has "
          "begun a request is not") {
  ServerOptions options = testOptions();
  options.firstByteTimeoutMs = 200;  // the idle timeout stays at its 60 s
  Harness h(options, echo);
  h.run([&] {
    Client started(h.port());
    started.send("GET /started HTTP/1.1\r\n");  // a first byte: the header timeout governs now
    auto start = vsup::monoNow();
    Client silent(h.port());
    CHECK(silent.endsCleanly());  // FIN, no answer: it asked nothing
    double ms = elapsedMs(start);
    CHECK(ms >= 150.0);
    CHECK(ms < 2000.0);
    started.send("Host: t\r\n\r\n");  // older than the silent one, and still open
    CHECK(started.requireRead().body == "GET /started ");
  });
}

TEST_CASE("firstByteTimeoutMs 0 leaves a new connection to the idle timeout") {
  ServerOptions options = testOptions();
  options.firstByteTimeoutMs = 0;
  options.idleTimeoutMs = 300;
  Harness h(options, echo);
  h.run([&] {
    auto start = vsup::monoNow();
    Client silent(h.port());
    CHECK(silent.endsCleanly());
    CHECK(elapsedMs(start) >= 250.0);
  });
}

TEST_CASE("a handler taking longer than every timeout is not cut off") {
  ServerOptions options = testOptions();
  options.headerTimeoutMs = 50;
  options.bodyTimeoutMs = 50;
  options.idleTimeoutMs = 50;
  std::shared_ptr<Response> pending;
  Notifier notifier;
  Harness h(options, [&](Request&&, std::shared_ptr<Response> resp) {
    notifier.update([&] { pending = std::move(resp); });
  });
  UvHandle<uv_timer_t> timer;  // after h: closed before the loop
  h.run([&] {
    Client c(h.port());
    c.send(post("/p", "x"));
    REQUIRE(notifier.waitUntil([&] { return pending != nullptr; }));
    // Let the loop run well past every timeout: a uv timer answers after 300 ms.
    h.bridge.call([&] {
      timer = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(h.loop.get(), t); });
      timer->data = &pending;
      uv_timer_start(
          timer.get(),
          [](uv_timer_t* t) {
            (*static_cast<std::shared_ptr<Response>*>(t->data))->respond(200, {}, "late");
          },
          300, 0);
    });
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->body == "late");
    h.bridge.call([&] { timer.reset(); });
  });
}

// ---------------------------------------------------------------------------------------------
// Limits and quiescence.

TEST_CASE("a connection over maxConnections gets 503 and a close, the others keep working") {
  ServerOptions options = testOptions();
  options.maxConnections = 2;
  Harness h(options, echo);
  h.run([&] {
    Client a(h.port());
    Client b(h.port());
    for (Client* c : {&a, &b}) {  // a round trip proves each was accepted
      c->send(get("/"));
      REQUIRE(c->read().has_value());
    }
    Client extra(h.port());
    auto reply = extra.read();
    REQUIRE(reply.has_value());
    CHECK(reply->status == 503);
    CHECK(reply->header("connection") == "close");
    CHECK(extra.closedByPeer());
    a.send(get("/still"));
    auto r = a.read();
    REQUIRE(r.has_value());
    CHECK(r->body == "GET /still ");
    // Once one leaves, a newcomer is served.
    b.close();
    REQUIRE(b.fd() < 0);
  });
  h.run([&] {
    // b's close reaches the loop in this run; retry until the slot is free (bounded).
    for (int i = 0; i < 100; ++i) {
      Client c(h.port());
      c.send(get("/late"));
      auto reply = c.read();
      REQUIRE(reply.has_value());
      if (reply->status == 200) return;
      CHECK(reply->status == 503);
    }
    FAIL("a freed slot was never reused");
  });
}

TEST_CASE("silent connections at maxConnections lock a probe out only until the first-byte "
          "timeout, and the limit is logged once per burst") {
  std::ostringstream captured;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(captured);
  vsup::log().sinks().push_back(sink);
  ServerOptions options = testOptions();
  options.maxConnections = 2;
  options.firstByteTimeoutMs = 400;
  Harness h(options, echo);
  h.run([&] {
    auto start = vsup::monoNow();
    Client a(h.port());
    Client b(h.port());
    REQUIRE(eventually(h.bridge, [&] { return h.server->connections() == 2; }));
    // The cap is reached: probes are refused with 503 (the OpenAI shape, type unavailable).
    for (int i = 0; i < 5; ++i) {
      Client probe(h.port());
      probe.send(get("/health"));
      Reply refused = probe.requireRead();
      CAPTURE(refused.body);
      CHECK(refused.status == 503);
      CHECK(refused.header("connection") == "close");
      CHECK(refused.body.find("\"type\":\"unavailable\",\"param\":null,"
                              "\"code\":\"too_many_connections\"}}") != std::string::npos);
    }
    CHECK(elapsedMs(start) < 400.0);  // all refused before the silent ones could time out
    CHECK(a.endsCleanly());
    CHECK(b.endsCleanly());
    CHECK(elapsedMs(start) >= 350.0);
    // Their slots are free: a probe is served.
    bool served = false;
    for (int i = 0; i < 100 && !served; ++i) {
      Client probe(h.port());
      probe.send(get("/health"));
      served = probe.requireRead().status == 200;
    }
    CHECK(served);
  });
  h.server.reset();  // tells the refusals not yet logged
  auto& sinks = vsup::log().sinks();
  sinks.erase(std::find(sinks.begin(), sinks.end(), sink));
  const std::string text = captured.str();
  CAPTURE(text);
  auto count = [&](const std::string& what) {
    size_t n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
    return n;
  };
  CHECK(count("the connection limit of 2 (--max-connections) is reached") == 1);
  CHECK(count("refused 4 connection(s) over the limit of 2") == 1);  // the 4 after the first
}

TEST_CASE("stopAccepting serves the connections already queued, then refuses new connects while "
          "an open connection still gets its response") {
  std::shared_ptr<Response> pending;
  Notifier notifier;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    if (req.path == "/queued") return echo(std::move(req), std::move(resp));
    notifier.update([&] { pending = std::move(resp); });
  });
  h.run([&] {
    Client c(h.port());
    c.send(get("/inflight"));
    REQUIRE(notifier.waitUntil([&] { return pending != nullptr; }));
    std::optional<Client> queued;
    h.bridge.call([&] {
      // On the loop thread: the handshake completes in the kernel, and the server cannot accept
      // before stopAccepting() runs.
      queued.emplace(h.port());
      queued->send(get("/queued"));
      h.server->stopAccepting();
      h.server->stopAccepting();  // idempotent
    });
    Reply q = queued->requireRead();
    CHECK(q.status == 200);
    CHECK(q.body == "GET /queued ");
    OwnFd refused = connectTo(h.port());
    CHECK_FALSE(refused);
    CHECK(errno == ECONNREFUSED);
    h.bridge.call([&] { pending->respond(200, {}, "done"); });
    auto reply = c.read();
    REQUIRE(reply.has_value());
    CHECK(reply->body == "done");
    // Keep-alive still works on the open connection.
    h.bridge.call([&] { pending.reset(); });
    c.send(get("/next"));
    REQUIRE(notifier.waitUntil([&] { return pending != nullptr; }));
    h.bridge.call([&] { pending->respond(200, {}, "next"); });
    auto again = c.read();
    REQUIRE(again.has_value());
    CHECK(again->body == "next");
  });
}

TEST_CASE("draining closes nothing by itself: every request still reaches the handler and its "
          "response carries Connection: close; new connections are accepted") {
  std::shared_ptr<Response> stream;
  std::atomic<int> idleCalls{0};
  Notifier notifier;
  Harness h([&](Request&& req, std::shared_ptr<Response> resp) {
    if (req.path == "/stream") {
      resp->startStream(200, {});
      resp->write("one");
      notifier.update([&] { stream = std::move(resp); });
      return;
    }
    echo(std::move(req), std::move(resp));
  });
  h.server->onIdle([&] {
    ++idleCalls;
    notifier.poke();
  });
  h.run([&] {
    Client idle(h.port());     // kept alive, idle when the drain starts
    Client partial(h.port());  // has a new request half sent when the drain starts
    Client streaming(h.port());
    for (Client* c : {&idle, &partial}) {
      c->send(get("/warm"));
      Reply warm = c->requireRead();
      CHECK_FALSE(warm.has("connection"));
    }
    REQUIRE(notifier.waitUntil([&] { return idleCalls.load() == 2; }));
    streaming.send(get("/stream"));
    REQUIRE(streaming.readHead().has_value());
    CHECK(streaming.readChunk() == "one");

    partial.send("GET /new HTTP/1.1\r\nHost: t\r\n");
    // Two round trips through the loop: the loop has read those bytes before the drain starts.
    h.bridge.call([] {});
    h.bridge.call([] {});
    h.bridge.call([&] {
      h.server->setDraining();
      h.server->setDraining();  // idempotent
      CHECK(h.server->inFlight() == 1);
      CHECK(h.server->connections() == 3);
    });

    // The half-sent request completes and is answered by the handler, with close.
    partial.send("\r\n");
    Reply r = partial.requireRead();
    CHECK(r.status == 200);
    CHECK(r.body == "GET /new ");
    CHECK(r.header("connection") == "close");
    CHECK(partial.endsCleanly());

    // The idle connection was left open: its next request is answered, with close.
    idle.send(get("/after"));
    Reply after = idle.requireRead();
    CHECK(after.body == "GET /after ");
    CHECK(after.header("connection") == "close");
    CHECK(idle.endsCleanly());

    // The listener still accepts.
    Client late(h.port());
    late.send(get("/late"));
    Reply l = late.requireRead();
    CHECK(l.status == 200);
    CHECK(l.header("connection") == "close");
    CHECK(late.endsCleanly());

    // The stream's head went out before the drain without `Connection: close`: once it ends,
    // its connection takes one more request (its client may be sending it), answered with close.
    h.bridge.call([&] {
      CHECK(stream->write("two"));
      stream->finish();
    });
    CHECK(streaming.readChunk() == "two");
    CHECK(streaming.readChunk().empty());
    streaming.send(get("/more"));
    Reply more = streaming.requireRead();
    CHECK(more.body == "GET /more ");
    CHECK(more.header("connection") == "close");
    CHECK(streaming.endsCleanly());
    REQUIRE(notifier.waitUntil([&] { return idleCalls.load() >= 3; }));
    h.bridge.call([&] { CHECK(h.server->inFlight() == 0); });
  });
}

TEST_CASE("close: queued connections and input not yet read are served, an idle connection ends "
          "with FIN (never a reset), then connects are refused and done fires") {
  std::atomic<bool> done{false};
  Notifier notifier;
  Harness h;
  h.run([&] {
    Client idle(h.port());
    idle.send(get("/warm"));
    CHECK(idle.requireRead().status == 200);
    Client unread(h.port());
    unread.send(get("/warm"));
    CHECK(unread.requireRead().status == 200);
    std::optional<Client> queued;
    h.bridge.call([&] {
      // On the loop thread, so the server has neither accepted `queued` nor read `unread`'s
      // request when close() begins (on loopback both are in the kernel when the calls return).
      queued.emplace(h.port());
      queued->send(get("/queued"));
      unread.send(get("/unread"));
      h.server->close(5000, [&] { notifier.update([&] { done = true; }); });
      CHECK_THROWS_AS(h.server->close(5000, [] {}), vsup::Error);
    });
    Reply q = queued->requireRead();
    CHECK(q.status == 200);
    CHECK(q.body == "GET /queued ");
    CHECK(q.header("connection") == "close");
    CHECK(queued->endsCleanly());
    Reply u = unread.requireRead();
    CHECK(u.body == "GET /unread ");
    CHECK(u.header("connection") == "close");
    CHECK(unread.endsCleanly());
    CHECK(idle.endsCleanly());
    OwnFd refused = connectTo(h.port());
    CHECK_FALSE(refused);
    REQUIRE(notifier.waitUntil([&] { return done.load(); }));
    h.bridge.call([&] { CHECK(h.server->connections() == 0); });
  });
}

TEST_CASE("close: a request being received is completed and answered, a fresh connection may still "
          "send its first request, and at the timeout a stalled one gets the drain response") {
  std::atomic<bool> done{false};
  Notifier notifier;
  Harness h;
  h.server->setDrainResponse("text/plain", "bye", {{"Retry-After", "1"}});
  CHECK_THROWS_AS(h.server->setDrainResponse("text/plain", "x", {{"Bad Name", "1"}}), vsup::Error);
  h.run([&] {
    Client slow(h.port());
    slow.send("GET /slow HTTP/1.1\r\nHost: t\r\n");
    Client stalled(h.port());
    stalled.send("POST /stalled HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    Client fresh(h.port());  // connected, no request yet
    h.bridge.call([] {});
    h.bridge.call([] {});
    vsup::MonoNs began = vsup::monoNow();
    h.bridge.call([&] {
      h.server->close(400, [&] { notifier.update([&] { done = true; }); });
    });
    slow.send("\r\n");
    Reply r = slow.requireRead();
    CHECK(r.status == 200);
    CHECK(r.body == "GET /slow ");
    CHECK(r.header("connection") == "close");
    CHECK(slow.endsCleanly());
    fresh.send(get("/first"));
    Reply f = fresh.requireRead();
    CHECK(f.body == "GET /first ");
    CHECK(f.header("connection") == "close");
    CHECK(fresh.endsCleanly());

    Reply s = stalled.requireRead();
    CHECK(s.status == 503);
    CHECK(s.body == "bye");
    CHECK(s.header("content-type") == "text/plain");
    CHECK(s.header("retry-after") == "1");
    CHECK(s.header("connection") == "close");
    CHECK(vsup::testing::elapsedMs(began) >= 390);  // uv timers count whole ms
    REQUIRE(notifier.waitUntil([&] { return done.load(); }));
  });
}

TEST_CASE("close with no connection calls done from its own loop callback, which may destroy the "
          "Server") {
  TestLoop loop;
  LoopBridge bridge(loop.get());
  auto server = std::make_unique<Server>(loop.get(), testOptions(), echo);
  server->listen();
  uint16_t port = server->port();
  std::atomic<bool> destroyed{false};
  Notifier notifier;
  bridge.runClient([&] {
    bridge.call([&] {
      server->close(1000, [&] {
        server.reset();
        notifier.update([&] { destroyed = true; });
      });
      CHECK_FALSE(destroyed.load());  // not from inside close()
    });
    REQUIRE(notifier.waitUntil([&] { return destroyed.load(); }));
    CHECK_FALSE(connectTo(port));
  });
}

TEST_CASE("onIdle fires when the last in-flight request completes, not before") {
  std::vector<std::shared_ptr<Response>> pending;
  std::atomic<int> calls{0};
  std::atomic<int> idleCalls{0};
  Notifier notifier;
  Harness h([&](Request&&, std::shared_ptr<Response> resp) {
    pending.push_back(std::move(resp));
    ++calls;
    notifier.poke();
  });
  h.server->onIdle([&] {
    ++idleCalls;
    notifier.poke();
  });
  h.run([&] {
    Client a(h.port());
    Client b(h.port());
    a.send(get("/a"));
    b.send(get("/b"));
    REQUIRE(notifier.waitUntil([&] { return calls.load() == 2; }));
    h.bridge.call([&] {
      CHECK(h.server->inFlight() == 2);
      pending[0]->respond(200, {}, "a");
    });
    REQUIRE(a.read().has_value());
    h.bridge.call([&] {
      CHECK(h.server->inFlight() == 1);
      CHECK(idleCalls.load() == 0);
      pending[1]->respond(200, {}, "b");
    });
    REQUIRE(b.read().has_value());
    REQUIRE(notifier.waitUntil([&] { return idleCalls.load() == 1; }));
  });
}

TEST_CASE("onIdle may destroy the Server from inside its callback") {
  TestLoop loop;
  LoopBridge bridge(loop.get());
  std::unique_ptr<Server> server;
  std::atomic<bool> destroyed{false};
  Notifier notifier;
  server = std::make_unique<Server>(loop.get(), testOptions(), echo);
  server->listen();
  server->onIdle([&] {
    server.reset();
    destroyed = true;
    notifier.poke();
  });
  uint16_t port = server->port();
  bridge.runClient([&] {
    Client c(port);
    c.send(get("/"));
    REQUIRE(c.read().has_value());
    REQUIRE(notifier.waitUntil([&] { return destroyed.load(); }));
    CHECK(c.closedByPeer());
  });
}

// ---------------------------------------------------------------------------------------------
// Listening.

TEST_CASE("with SO_REUSEPORT two Servers listen on the same port") {
  TestLoop loop;
  LoopBridge bridge(loop.get());
  ServerOptions options = testOptions();
  options.reusePort = true;
  Server first(loop.get(), options, echo);
  first.listen();
  options.port = first.port();
  Server second(loop.get(), options, echo);
  CHECK_NOTHROW(second.listen());
  CHECK(second.port() == first.port());
  bridge.runClient([&] {
    for (int i = 0; i < 4; ++i) expectStillServing(first.port());
  });
}

TEST_CASE("listening on a busy port without reusePort throws naming the address and the error") {
  TestLoop loop;
  ServerOptions options = testOptions();
  options.reusePort = false;
  Server first(loop.get(), options, echo);
  first.listen();
  options.port = first.port();
  Server second(loop.get(), options, echo);
  CHECK_THROWS_WITH_AS(second.listen(),
                       ("127.0.0.1:" + std::to_string(first.port()) + ": address already in use")
                           .c_str(),
                       vsup::Error);
  ServerOptions bad = testOptions();
  bad.host = "not-an-address";
  Server third(loop.get(), bad, echo);
  CHECK_THROWS_AS(third.listen(), vsup::Error);
}

TEST_CASE("a Server listens on IPv6 loopback") {
  TestLoop loop;
  ServerOptions options = testOptions();
  options.host = "::1";
  Server server(loop.get(), options, echo);
  try {
    server.listen();
  } catch (const vsup::Error& e) {
    MESSAGE("no IPv6 here: ", e.what());
    return;
  }
  CHECK(server.port() != 0);
}

TEST_CASE("destroying the Server closes the listener and every connection and leaks no fd") {
  {  // libuv creates a process-wide pipe with the first loop: make it exist before counting
    TestLoop warm;
    Server s(warm.get(), testOptions(), echo);
    s.listen();
  }
  int before = openFdCount();
  {
    std::shared_ptr<Response> stream;
    bool goneCalled = false;
    Notifier notifier;
    TestLoop loop;
    LoopBridge bridge(loop.get());
    auto server = std::make_unique<Server>(loop.get(), testOptions(), [&](Request&& req,
                                                                         std::shared_ptr<Response> resp) {
      if (req.path != "/stream") return echo(std::move(req), std::move(resp));
      resp->onClientGone([&] { goneCalled = true; });
      resp->startStream(200, {});
      notifier.update([&] { stream = std::move(resp); });
    });
    server->listen();
    uint16_t port = server->port();
    bridge.runClient([&] {
      Client idle(port);
      idle.send(get("/"));
      REQUIRE(idle.read().has_value());
      Client streaming(port);
      streaming.send(get("/stream"));
      REQUIRE(notifier.waitUntil([&] { return stream != nullptr; }));
      Client partial(port);
      partial.send("GET /half");
      bridge.call([&] {
        CHECK(server->connections() >= 2);
        server.reset();
        CHECK(stream->clientGone());
        CHECK_FALSE(stream->write("x"));
      });
      CHECK(idle.closedByPeer());
      CHECK(streaming.closedByPeer());
      CHECK(partial.closedByPeer());
      CHECK_FALSE(connectTo(port));
    });
    CHECK_FALSE(goneCalled);  // ~Server calls nobody
  }
  CHECK(openFdCount() == before);
}
