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
// body sizes, first-byte/header/body/idle timeouts, a connection cap, a cap on queued output).
// Protocol errors (malformed input, an HTTP/1.1 request without Host or with two, a version
// other than 1.0 and 1.1: 505, the limits: 408, 413, 431, unsupported framing: 501, 417) are
// answered by the server itself with `Connection: close` and the OpenAI error body every other
// error has, {"error":{"message","type":"invalid_request_error","param":null,"code"}}, whose
// code names the reason ("malformed_request", "request_timeout", "payload_too_large",
// "request_header_fields_too_large", "http_version_not_supported", "incomplete_request",
// "not_implemented", "expectation_failed"); the handler never sees a malformed request.
//
// A client's FIN is a half-close, not a disconnect (clients such as `nc -N` and some proxies
// shut down their sending side after the request): every request that arrived before it is
// answered, in order, and the connection then closes; a request left incomplete by the FIN gets
// 400 "incomplete_request". The client counts as gone (onClientGone) only when a write to it
// fails (EPIPE, ECONNRESET) or the connection is reset; so a client that closes its socket
// while it waits for a plain response is noticed when that response is written, and a stream
// goes on after the client's FIN until a write fails.
//
// The connection cap (maxConnections) is logged once per burst: one warning when it is reached,
// then the number refused, at most once every 5 s.
//
// Quiescence (README, "How shutdown works") comes in two steps, and neither resets a connection
// whose request was sent:
//   setDraining()  The server goes on accepting and handing every request to the handler (the
//                  app decides what a request gets while draining: a 503, or its usual answer);
//                  each response from then on carries `Connection: close`, and its connection
//                  closes after it. Nothing is closed by setDraining() itself: an idle kept-alive
//                  connection stays open and its next request is answered (with close), a request
//                  being received completes and is answered, and a response whose head is
//                  already out keeps its connection open for one more request (its client was not
//                  told to close and may be sending that request now). inFlight() and onIdle()
//                  let the app wait for its requests without polling.
//   close()        The end, once the app's requests are answered. It accepts every connection
//                  the kernel has queued on the listening socket, closes the socket (new
//                  connects are refused from then on), and serves what has arrived: input
//                  already received on an idle connection, a request being received, and the
//                  first request of a connection that has not carried one yet (it gets 1 s from
//                  its accept to send it). Every connection then ends with FIN: the server sends
//                  its last byte, shuts down its side and goes on reading (and discarding) until
//                  the client's host has acknowledged everything, our FIN included, and nothing
//                  is unread, or until the client's own FIN, at most 2 s. So a request that
//                  crosses that FIN on the wire is read, and its client sees the connection end
//                  without an answer (what HTTP clients retry on a kept-alive connection), not a
//                  reset. `done` fires once the last connection is closed, or at the timeout,
//                  when a request still being received gets the drain response
//                  (setDrainResponse) and every connection left is closed at once.
// Whenever else the server ends a connection (`Connection: close`, a protocol error, the idle
// timeout) it does the same, lingering until the client's FIN, at most 2 s.
//
// What remains is the kernel's window:
//   - a connect whose handshake completes between close()'s last accept and the close of the
//     listening socket (the same loop turn: microseconds), or is still in flight then (the SYN
//     received, the final ACK not yet: at most one round trip), is reset, and its client may
//     have sent its request already; when the socket is shared (ServerOptions.listenFd: every
//     API server of a tree holds the same one), closing this process's copy resets nothing while
//     another process still holds it: only the last one to close is at risk;
//   - in close(), once the client's host has acknowledged our FIN and nothing is unread, the
//     socket is closed: a request sent after that (after our FIN had reached the client's host,
//     so it did not cross it) is reset, and so is a crossing one whose segment was lost and is
//     retransmitted only after that acknowledgement;
//   - what is still unread when the timeout of close() (or a linger) cuts a connection.
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

#include "base/fd.h"

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
  // 8 MiB would be queued the client is deemed not reading and is dropped. Either way, and when
  // the send fails (EPIPE, ECONNRESET: the client closed), onClientGone fires synchronously,
  // inside this call: an app must not hold references into state its callback frees.
  virtual bool write(std::string_view data) = 0;
  // Ends the chunked response (the zero-length chunk).
  virtual void finish() = 0;
  // True once the client disconnected before the app completed the response.
  virtual bool clientGone() const = 0;
  // Called once if the client disconnects before the app completed the response (so the app can
  // abort the work); called at once if that already happened. Not called after respond() or
  // finish(), and not called by ~Server (the app is tearing down; clientGone() turns true).
  // "Disconnects" means a write to it failed (EPIPE, ECONNRESET), the connection was reset, or
  // it stopped reading (above): a client that half-closes its side (shutdown(SHUT_WR), as
  // `nc -N` does) still gets its answer, and a stream goes on after its FIN (unlike Go and
  // uvicorn, which take a FIN as gone).
  virtual void onClientGone(std::function<void()> callback) = 0;
};

using Handler = std::function<void(Request&&, std::shared_ptr<Response>)>;

struct ServerOptions {
  std::string host = "127.0.0.1";  // IPv4 or IPv6 literal ("[::1]" too), or "localhost"/"0.0.0.0"/"::"
  uint16_t port = 8000;            // 0: pick a free port (see port())
  bool reusePort = false;          // SO_REUSEPORT (tests and benchmarks only; `vsup run` binds
                                   // one socket in the root and hands it to every API server)
  // An already bound and listening TCP socket (an inherited fd; bindListener()): listen() adopts
  // it (made non-blocking, CLOEXEC) instead of binding host:port, and close() closes only this
  // process's copy. -1: bind host:port.
  int listenFd = -1;
  int backlog = 512;
  size_t maxHeaderBytes = 64 * 1024;       // request line + headers; over → 431
  size_t maxBodyBytes = 16 * 1024 * 1024;  // over (Content-Length or actual) → 413
  // Timeouts; 0 disables one.
  // A new connection that sends no byte for this long is closed (no answer: it sent nothing to
  // answer), so silent connections cannot hold the connection cap for long. Never longer than
  // the idle timeout; 0: the idle timeout alone.
  uint64_t firstByteTimeoutMs = 5'000;
  uint64_t headerTimeoutMs = 10'000;  // first byte to end of headers; over → 408 + close
  uint64_t bodyTimeoutMs = 30'000;    // end of headers to end of body; over → 408 + close
  // A keep-alive connection with no request in progress is closed after this long. It also bounds
  // a stalled reader: queued response bytes that make no progress for this long drop the client.
  uint64_t idleTimeoutMs = 60'000;
  // Over → accept, answer 503 (code "too_many_connections") + close at once; beyond 64 more
  // being refused, a connection is closed unanswered.
  size_t maxConnections = 1024;
};

// Binds `host`:`port` (as ServerOptions.host; port 0: a free one) and listens with `backlog`:
// the socket a parent binds once and hands to the processes that serve it (ServerOptions.
// listenFd). SO_REUSEADDR, never SO_REUSEPORT unless asked: a second server on the port is an
// error, not a share of its traffic. Throws vsup::SysError naming the address and the errno
// text, e.g. "127.0.0.1:8000: address already in use"; vsup::Error for a host that is not an
// address literal.
OwnFd bindListener(const std::string& host, uint16_t port, int backlog, bool reusePort = false);
// The port a bound socket listens on.
uint16_t boundPort(int fd);

// Whether a client's X-Request-Id may be echoed and logged as it is: 1..256 bytes of printable
// ASCII. A front end replaces any other with an id of its own.
bool echoableRequestId(std::string_view id);

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

  // Quiescence (see the top of this file).
  // Accepts the connections the kernel has queued (they are served as usual), then closes the
  // listening socket: new connects are refused. Idempotent. close() does it too.
  void stopAccepting();
  // From now on every response carries `Connection: close` and its connection closes after it;
  // every request still reaches the handler; nothing is closed now. Idempotent.
  void setDraining();
  // Ends the server: setDraining() and stopAccepting() if not yet, then serves what has arrived,
  // ends every connection with FIN, and calls `done` (from its own loop callback, so it may
  // destroy the Server) once none is left, or after `timeoutMs` (then the rest is cut: a request
  // still being received gets the drain response first). The handler is still called meanwhile,
  // for requests that arrive. Call once.
  void close(uint64_t timeoutMs, std::function<void()> done);
  // The answer close() gives at its timeout to a request still being received (with `Connection:
  // close`; `headers` are added, e.g. Retry-After; they must be valid header lines). Default:
  // 503 {"error":{"message":"server is shutting down","type":"unavailable","param":null,
  // "code":null}} as application/json.
  void setDrainResponse(std::string contentType, std::string body, Headers headers = {});

  size_t inFlight() const;     // requests handed to the handler and not yet complete
  size_t connections() const;  // open client connections (including ones being closed)
  // Fires (from its own loop callback, so it may destroy the Server) each time inFlight()
  // drops to 0 and is still 0 when the loop gets to it.
  void onIdle(std::function<void()> callback);

 private:
  std::unique_ptr<detail::ServerCore> core_;
};

}  // namespace vsup::http
