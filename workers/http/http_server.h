// vsup::http: the HTTP/1.1 server of the API-server process.
//
// One Server listens on one TCP address and runs entirely on one libuv loop:
// every method here, every Response method and every callback (handler, onClientGone, onIdle)
// runs on that loop's thread. There are no locks, no signal handlers and no global state; writes
// use send(MSG_NOSIGNAL), so a vanished client never raises SIGPIPE in the host process.
//
// The server speaks just enough HTTP/1.1 for an OpenAI-compatible API: keep-alive, pipelining
// (answered strictly in order, one request at a time), chunked request bodies, chunked streaming
// responses, `Expect: 100-continue`, and hard limits against slow or hostile clients (header and
// body sizes, header/body/idle timeouts, a connection cap, a cap on queued output). Protocol
// errors are answered by the server itself with an OpenAI-shaped JSON error and
// `Connection: close`; the handler never sees a malformed request.
//
// Quiescence (README, "How shutdown works"): stopAccepting() closes the listening socket; setDraining()
// answers every request not yet handed to the handler with 503 + `Connection: close`, closes idle
// keep-alive connections and closes busy ones once their response is complete; inFlight() and
// onIdle() let the app wait for the drain without polling.
#pragma once

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace vsup::http {

using Headers = std::vector<std::pair<std::string, std::string>>;

// One parsed request, owned by the handler once handed over.
struct Request {
  std::string method;  // "GET", "POST", ...
  std::string target;  // raw request target, e.g. "/v1/completions?x=1"
  std::string path;    // target without the query string
  Headers headers;     // names lower-cased, in order of arrival; values with outer spaces trimmed
  std::string body;    // de-chunked
  // First header with this (lower-case) name, or "".
  std::string header(std::string_view name) const;
};

// Answers one request. Owned jointly by the server and the handler (std::shared_ptr); all calls
// on the loop thread. Exactly one of respond() or startStream()+write()...+finish() per request;
// breaking that order throws vsup::Error. A Response outlives its connection and its Server
// safely: once the client is gone every call is a no-op (write() returns false).
//
// The request counts in Server::inFlight() until its last byte was handed to the kernel (or the
// client is gone), not merely until respond()/finish() was called: an app that waits for onIdle()
// before destroying the Server loses no response bytes.
class Response {
 public:
  virtual ~Response() = default;
  // A complete response; Content-Length is set; extra headers as given (e.g. Content-Type).
  // Content-Length / Transfer-Encoding given here are ignored (the server frames the body);
  // `Connection: close` makes the server close the connection after this response.
  virtual void respond(int status, Headers headers, std::string body) = 0;
  // Starts a chunked response (Transfer-Encoding: chunked). Then write() any number of times.
  // (An HTTP/1.0 client gets the raw body ended by closing the connection instead.)
  virtual void startStream(int status, Headers headers) = 0;
  // Sends one chunk (an empty `data` sends nothing). Returns false if the client is gone (the
  // bytes are dropped). Never blocks: bytes the socket cannot take now are queued; if more than
  // 8 MiB would be queued the client is deemed not reading, is dropped, and onClientGone fires
  // (synchronously, inside this call).
  virtual bool write(std::string_view data) = 0;
  // Ends the chunked response (the zero-length chunk).
  virtual void finish() = 0;
  // True once the client disconnected before the app completed the response.
  virtual bool clientGone() const = 0;
  // Called once if the client disconnects before the app completed the response (so the app can
  // abort the work); called at once if that already happened. Not called after respond() or
  // finish(), and not called by ~Server (the app is tearing down; clientGone() turns true).
  // A client that half-closes its side (shutdown(SHUT_WR)) counts as gone, as in Go and uvicorn.
  virtual void onClientGone(std::function<void()> callback) = 0;
};

using Handler = std::function<void(Request&&, std::shared_ptr<Response>)>;

struct ServerOptions {
  std::string host = "127.0.0.1";  // IPv4 or IPv6 literal ("[::1]" too), or "localhost"/"0.0.0.0"/"::"
  uint16_t port = 8000;            // 0: pick a free port (see port())
  bool reusePort = true;           // SO_REUSEPORT: several API-server processes share a port
  int backlog = 512;
  size_t maxHeaderBytes = 64 * 1024;       // request line + headers; over → 431
  size_t maxBodyBytes = 16 * 1024 * 1024;  // over (Content-Length or actual) → 413
  // Timeouts; 0 disables one.
  uint64_t headerTimeoutMs = 10'000;  // first byte to end of headers; over → 408 + close
  uint64_t bodyTimeoutMs = 30'000;    // end of headers to end of body; over → 408 + close
  // A keep-alive connection with no request in progress is closed after this long. It also bounds
  // a stalled reader: queued response bytes that make no progress for this long drop the client.
  uint64_t idleTimeoutMs = 60'000;
  size_t maxConnections = 1024;  // over → accept, answer 503 + close at once
};

namespace detail {
class ServerCore;
}

class Server {
 public:
  // Borrows `loop`, which must outlive the Server and run at least once more after ~Server (to
  // deliver libuv close callbacks). Nothing happens until listen().
  Server(uv_loop_t* loop, ServerOptions options, Handler handler);
  // Closes everything (listener, connections) immediately, without calling any callback.
  // Responses still held by the app turn into no-ops.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens. Throws vsup::Error naming host:port and the errno text on failure, e.g.
  // "127.0.0.1:8000: address already in use". Call at most once.
  void listen();
  uint16_t port() const;  // the bound port (0 before listen())

  // Quiescence (README, "How shutdown works"); idempotent, may be called in any order.
  // Closes the listening socket now: new connects are refused.
  void stopAccepting();
  // Every request not yet handed to the handler (new ones, and ones still being received) gets
  // 503 with `Connection: close` and the drain body; idle keep-alive connections are closed now;
  // a connection whose in-flight response completes is closed after it.
  void setDraining();
  // The drain answer's body. Default: {"error":{"message":"server is shutting down",
  // "type":"unavailable","code":503}} as application/json.
  void setDrainResponse(std::string contentType, std::string body);

  size_t inFlight() const;     // requests handed to the handler and not yet complete
  size_t connections() const;  // open client connections (including ones being closed)
  // Fires (from its own loop callback, so it may destroy the Server) each time inFlight()
  // drops to 0 and is still 0 when the loop gets to it.
  void onIdle(std::function<void()> callback);

 private:
  std::unique_ptr<detail::ServerCore> core_;
};

}  // namespace vsup::http
