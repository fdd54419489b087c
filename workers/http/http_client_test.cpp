// Tests for workers/http/http_client.h: real sockets on 127.0.0.1, the server (http::Server, or
// a raw socket where the server must misbehave) and the client on one uv loop. Every wait is
// bounded: runUntil gives up after 5 s and the test fails.
#include "workers/http/http_client.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "ipc/test_util.h"
#include "ipc/uv_handle.h"
#include "workers/http/http_server.h"

namespace vsup::http {
namespace {

using vsup::testing::openFdCount;
using vsup::testing::TestLoop;

// Runs the loop until `done` or 5 s; returns whether `done` came true.
bool runUntil(uv_loop_t* loop, const std::function<bool()>& done, uint64_t ms = 5000) {
  auto tick = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop, t); });
  uv_timer_start(tick.get(), [](uv_timer_t*) {}, 10, 10);
  MonoNs deadline = monoNow() + MonoNs(ms) * kNsPerMs;
  while (!done() && monoNow() < deadline) uv_run(loop, UV_RUN_ONCE);
  return done();
}

// What a call delivered.
struct Seen {
  int status = 0;
  Headers headers;
  std::vector<std::string> pieces;
  bool ended = false;
  std::string error;
  std::string body() const {
    std::string all;
    for (const auto& p : pieces) all += p;
    return all;
  }
  bool over() const { return ended || !error.empty(); }
};

ClientCallbacks recordInto(Seen& seen) {
  ClientCallbacks cb;
  cb.onHead = [&seen](int status, const Headers& h) {
    seen.status = status;
    seen.headers = h;
  };
  cb.onBody = [&seen](std::string_view b) { seen.pieces.emplace_back(b); };
  cb.onEnd = [&seen]() { seen.ended = true; };
  cb.onError = [&seen](const std::string& why) { seen.error = why; };
  return cb;
}

Url local(uint16_t port) { return parseUrl("http://127.0.0.1:" + std::to_string(port)); }

struct Served {
  TestLoop loop;
  std::unique_ptr<Server> server;
  std::vector<Request> requests;
  std::shared_ptr<Response> last;  // the response of the last request, when held
  std::function<void(Request&, std::shared_ptr<Response>)> answer;
  explicit Served(std::function<void(Request&, std::shared_ptr<Response>)> a)
      : answer(std::move(a)) {
    ServerOptions o;
    o.port = 0;
    server = std::make_unique<Server>(loop.get(), o, [this](Request&& r,
                                                              std::shared_ptr<Response> w) {
      requests.push_back(std::move(r));
      last = w;
      answer(requests.back(), w);
    });
    server->listen();
  }
  ~Served() {
    last.reset();
    server.reset();
  }
  uint16_t port() const { return server->port(); }
};

TEST_CASE("parseUrl takes http://HOST:PORT and names what is wrong otherwise") {
  Url u = parseUrl("http://127.0.0.1:8100/");
  CHECK(u.host == "127.0.0.1");
  CHECK(u.port == 8100);
  CHECK(u.text == "http://127.0.0.1:8100");
  CHECK(parseUrl("http://[::1]:9").host == "::1");
  CHECK(parseUrl("http://[::1]:9").text == "http://[::1]:9");
  CHECK(parseUrl("http://localhost:80").host == "127.0.0.1");
  auto why = [](const std::string& text) {
    try {
      (void)parseUrl(text);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK(why("https://127.0.0.1:1").find("https is not supported") != std::string::npos);
  CHECK(why("127.0.0.1:1").find("not an http:// URL") != std::string::npos);
  CHECK(why("http://127.0.0.1").find("no :PORT") != std::string::npos);
  CHECK(why("http://127.0.0.1:0").find("is not 1..65535") != std::string::npos);
  CHECK(why("http://127.0.0.1:65536").find("is not 1..65535") != std::string::npos);
  CHECK(why("http://127.0.0.1:8x").find("is not 1..65535") != std::string::npos);
  CHECK(why("http://example.com:80").find("not an IP address") != std::string::npos);
  CHECK(why("http://::1:80").find("must be in brackets") != std::string::npos);
  CHECK(why("http://127.0.0.1:80/v1").find("a path is not accepted") != std::string::npos);
  // Every message says what is accepted.
  CHECK(why("ftp://x").find("give http://HOST:PORT") != std::string::npos);
}

TEST_CASE("a POST reaches the server whole and its answer comes back: head, body, end") {
  Served s([](Request& r, std::shared_ptr<Response> w) {
    w->respond(201, {{"Content-Type", "application/json"}, {"X-Echo", r.header("x-test")}},
               "got " + r.body);
  });
  Seen seen;
  ClientCall call(s.loop.get(), local(s.port()), "POST", "/v1/completions?x=1",
                  {{"X-Test", "yes"}, {"Content-Type", "application/json"}}, "{\"a\":1}",
                  recordInto(seen));
  REQUIRE(runUntil(s.loop.get(), [&] { return seen.over(); }));
  CHECK(seen.error == "");
  CHECK(seen.status == 201);
  CHECK(seen.body() == "got {\"a\":1}");
  bool echoed = false;
  for (const auto& [k, v] : seen.headers) echoed |= k == "x-echo" && v == "yes";
  CHECK(echoed);
  REQUIRE(s.requests.size() == 1);
  CHECK(s.requests[0].method == "POST");
  CHECK(s.requests[0].target == "/v1/completions?x=1");
  CHECK(s.requests[0].header("connection") == "close");
  CHECK(s.requests[0].header("host") == "127.0.0.1:" + std::to_string(s.port()));
  CHECK(call.ended());
  CHECK(call.requestSent());
}

TEST_CASE("a chunked stream arrives piece by piece, each before the server sends the next") {
  Served s([](Request&, std::shared_ptr<Response> w) {
    w->startStream(200, {{"Content-Type", "text/event-stream"}});
    w->write("data: one\n\n");
  });
  Seen seen;
  ClientCall call(s.loop.get(), local(s.port()), "POST", "/s", {}, "", recordInto(seen));
  REQUIRE(runUntil(s.loop.get(), [&] { return seen.pieces.size() == 1; }));
  CHECK(seen.pieces[0] == "data: one\n\n");
  CHECK_FALSE(seen.ended);
  s.last->write("data: two\n\n");
  REQUIRE(runUntil(s.loop.get(), [&] { return seen.pieces.size() == 2; }));
  CHECK(seen.pieces[1] == "data: two\n\n");
  s.last->finish();
  REQUIRE(runUntil(s.loop.get(), [&] { return seen.over(); }));
  CHECK(seen.ended);
  CHECK(seen.error == "");
}

TEST_CASE("a refused connect fails the call, reported from the loop, with nothing sent") {
  TestLoop loop;
  uint16_t port = 0;
  {
    // A port nobody listens on: bound, then closed.
    OwnFd fd = bindListener("127.0.0.1", 0, 1);
    port = boundPort(fd.get());
  }
  Seen seen;
  ClientCall call(loop.get(), local(port), "GET", "/", {}, "", recordInto(seen));
  CHECK(seen.error == "");  // never inside the constructor
  REQUIRE(runUntil(loop.get(), [&] { return seen.over(); }));
  CHECK(seen.error.find("connect: Connection refused") != std::string::npos);
  CHECK_FALSE(call.requestSent());
}

TEST_CASE("aborting a call resets its connection: the server sees its client gone at once") {
  bool gone = false;
  Served s([&gone](Request&, std::shared_ptr<Response> w) {
    w->startStream(200, {});
    w->write("x");
    w->onClientGone([&gone] { gone = true; });
  });
  Seen seen;
  auto call = std::make_unique<ClientCall>(s.loop.get(), local(s.port()), "POST", "/", Headers{},
                                           "", recordInto(seen));
  REQUIRE(runUntil(s.loop.get(), [&] { return !seen.pieces.empty(); }));
  call.reset();
  // The server notices the reset without writing anything more.
  REQUIRE(runUntil(s.loop.get(), [&] { return gone; }));
  CHECK_FALSE(seen.over());  // no callback after the abort
}

TEST_CASE("a server that closes in the middle of the body fails the call, not ends it") {
  TestLoop loop;
  OwnFd listener = bindListener("127.0.0.1", 0, 4);
  uint16_t port = boundPort(listener.get());
  Seen seen;
  ClientCall call(loop.get(), local(port), "GET", "/", {}, "", recordInto(seen));
  // Accept once the client has connected, answer half a body, close.
  OwnFd conn;
  REQUIRE(runUntil(loop.get(), [&] {
    if (!conn) conn = OwnFd(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK));
    return bool(conn);
  }));
  // The request read first: a close with unread bytes would be a reset, not a FIN.
  std::string request;
  REQUIRE(runUntil(loop.get(), [&] {
    char buf[4096];
    ssize_t n = ::recv(conn.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) request.append(buf, size_t(n));
    return request.find("\r\n\r\n") != std::string::npos;
  }));
  std::string half = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
  REQUIRE(::send(conn.get(), half.data(), half.size(), MSG_NOSIGNAL) == ssize_t(half.size()));
  REQUIRE(runUntil(loop.get(), [&] { return !seen.pieces.empty(); }));
  conn.reset();
  REQUIRE(runUntil(loop.get(), [&] { return seen.over(); }));
  CHECK(seen.body() == "abc");
  CHECK_FALSE(seen.ended);
  CHECK(seen.error == "the connection closed before the response ended");
}

TEST_CASE("a malformed response fails the call with llhttp's reason") {
  TestLoop loop;
  OwnFd listener = bindListener("127.0.0.1", 0, 4);
  Seen seen;
  ClientCall call(loop.get(), local(boundPort(listener.get())), "GET", "/", {}, "",
                  recordInto(seen));
  OwnFd conn;
  REQUIRE(runUntil(loop.get(), [&] {
    if (!conn) conn = OwnFd(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK));
    return bool(conn);
  }));
  std::string junk = "SMTP ready\r\n\r\n";
  REQUIRE(::send(conn.get(), junk.data(), junk.size(), MSG_NOSIGNAL) == ssize_t(junk.size()));
  REQUIRE(runUntil(loop.get(), [&] { return seen.over(); }));
  CHECK(seen.error.rfind("malformed response: ", 0) == 0);
}

TEST_CASE("a server silent past the idle timeout fails the call, naming the timeout") {
  Served s([](Request&, std::shared_ptr<Response>) {});  // never answers
  Seen seen;
  ClientOptions o;
  o.idleTimeoutMs = 100;
  MonoNs t0 = monoNow();
  ClientCall call(s.loop.get(), local(s.port()), "POST", "/", {}, "", recordInto(seen), o);
  REQUIRE(runUntil(s.loop.get(), [&] { return seen.over(); }));
  CHECK(seen.error == "no byte from the server for 100 ms");
  CHECK(vsup::testing::elapsedMs(t0) >= 99.0);
}

TEST_CASE("a callback may destroy its own call") {
  Served s([](Request&, std::shared_ptr<Response> w) {
    w->startStream(200, {});
    w->write("first");
  });
  std::unique_ptr<ClientCall> call;
  int heads = 0, bodies = 0;
  ClientCallbacks cb;
  cb.onHead = [&](int, const Headers&) {
    ++heads;
    call.reset();  // from inside: nothing runs after this
  };
  cb.onBody = [&](std::string_view) { ++bodies; };
  call = std::make_unique<ClientCall>(s.loop.get(), local(s.port()), "POST", "/", Headers{}, "",
                                      std::move(cb));
  REQUIRE(runUntil(s.loop.get(), [&] { return heads == 1; }));
  // Let the rest of the stream arrive at a call that is gone.
  s.last->write("second");
  bool gone = false;
  s.last->onClientGone([&gone] { gone = true; });
  REQUIRE(runUntil(s.loop.get(), [&] { return gone; }));
  CHECK(bodies == 0);
}

TEST_CASE("a hundred calls leave no fd behind") {
  Served s([](Request&, std::shared_ptr<Response> w) { w->respond(200, {}, "ok"); });
  int before = openFdCount();
  for (int i = 0; i < 100; ++i) {
    Seen seen;
    ClientCall call(s.loop.get(), local(s.port()), "GET", "/", {}, "", recordInto(seen));
    REQUIRE(runUntil(s.loop.get(), [&] { return seen.over(); }));
    REQUIRE(seen.ended);
  }
  // The server's side closes once it has read our FIN.
  CHECK(runUntil(s.loop.get(), [&] { return s.server->connections() == 0; }));
  CHECK(openFdCount() == before);
}

}  // namespace
}  // namespace vsup::http
