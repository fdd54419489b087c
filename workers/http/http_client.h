// vsup::http client: one HTTP/1.1 request on its own TCP connection, on a libuv loop, with the
// response parsed by llhttp and handed over as it arrives (head, body bytes de-chunked, end).
// What `vsup proxy` uses to run the two legs of a disaggregated request.
//
// One connection per call, `Connection: close`: no pool, so no stale kept-alive connection can
// eat a request, and aborting a call is closing its socket. An aborted call (abort(), or the
// destructor before the response ended) resets its connection (SO_LINGER 0: RST), so the server
// notices at once that its client is gone (vsup's API server then aborts the engine request)
// instead of on its next write.
//
// Threading: construct, call and destroy on the loop's thread. Callbacks run on it, never
// inside the constructor, at most one of onEnd/onError, nothing after either or after abort().
// A callback may destroy its ClientCall. Writes use send(MSG_NOSIGNAL): no SIGPIPE in a host.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "workers/http/http_server.h"

namespace vsup::http {

// "http://HOST:PORT", optionally with a trailing "/"; HOST an IPv4 literal, an IPv6 literal in
// brackets, or localhost (names are not resolved: a proxy in a serving tree names its peers by
// address). parseUrl throws vsup::Error saying what is wrong and what is accepted.
struct Url {
  std::string host;  // without brackets: "127.0.0.1", "::1"; "localhost" → "127.0.0.1"
  uint16_t port = 0;
  std::string text;  // "http://host:port", for messages
};
Url parseUrl(const std::string& text);

struct ClientOptions {
  uint64_t connectTimeoutMs = 5'000;  // connect() + the request sent; 0: none
  // No byte from the server for this long, once the request is sent: the call fails. 0: none
  // (a long non-streamed completion may be silent for minutes).
  uint64_t idleTimeoutMs = 0;
  size_t maxHeaderBytes = 64 * 1024;  // the response's status line + headers
};

struct ClientCallbacks {
  // The status line and headers (names lower-cased), once.
  std::function<void(int status, const Headers& headers)> onHead;
  // Body bytes as they arrive, de-chunked (any number of calls, after onHead).
  std::function<void(std::string_view bytes)> onBody;
  // The whole response arrived.
  std::function<void()> onEnd;
  // The call failed: "connect: connection refused", "timed out connecting after 5000 ms",
  // "the connection closed before the response ended", "malformed response: ...". The URL is
  // not repeated (the caller knows which one it called).
  std::function<void(const std::string& why)> onError;
};

class ClientCall {
 public:
  // Starts at once: connects to `url` and sends `method target` with `headers` and `body`
  // (Host, Content-Length and Connection: close are added; give neither of those).
  ClientCall(uv_loop_t* loop, const Url& url, std::string method, std::string target,
             Headers headers, std::string body, ClientCallbacks callbacks,
             ClientOptions options = {});
  // abort() if not ended.
  ~ClientCall();
  ClientCall(const ClientCall&) = delete;
  ClientCall& operator=(const ClientCall&) = delete;

  // Ends the call now, resetting the connection if it is open. No callback runs after this.
  void abort();
  bool ended() const;  // onEnd or onError ran, or abort()
  // The whole request was handed to the kernel. A call that failed before (no connection)
  // reached nobody: it is safe to send it elsewhere.
  bool requestSent() const;

 private:
  class Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace vsup::http
