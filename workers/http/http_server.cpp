#include "workers/http/http_server.h"

#include <fcntl.h>
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <optional>
#include <unordered_map>

#include "base/check.h"
#include "base/fd.h"
#include "base/log.h"
#include "ipc/uv_handle.h"

namespace vsup::http {

// ---------------------------------------------------------------------------------------------
// Small helpers.
namespace {

// A client that lets more than this pile up unread is dropped (Response::write's contract).
constexpr size_t kMaxQueuedBytes = 8 * 1024 * 1024;
// After a server-side close (shutdown(SHUT_WR)) the server keeps reading and discarding for at
// most this long, so unread request bytes don't turn the close into a RST that could destroy
// the answer before the client read it.
constexpr uint64_t kLingerMs = 2000;
// During close(): how often a lingering connection checks whether the client has acknowledged
// everything (our FIN included) and nothing is left unread, so it can be closed without waiting
// for the client's own FIN, which a pooling client sends only when it next looks at the socket.
constexpr uint64_t kClosePollMs = 5;
// During close(): how long a connection that has not carried a request yet (one accepted from
// the backlog, say) may take from its accept to send one. A client sends its request right
// after connecting; a connection silent for longer is a pre-opened one.
constexpr uint64_t kFirstRequestGraceMs = 1000;
constexpr size_t kReadChunk = 64 * 1024;
// Connections being refused (over maxConnections) may exceed the cap by this many; beyond it a
// flood is closed without an answer.
constexpr size_t kMaxRefusing = 64;
// Accepts per listener wakeup, so a connect storm doesn't starve established connections.
constexpr int kAcceptBatch = 64;
constexpr uint64_t kAcceptBackoffMs = 100;  // after EMFILE/ENFILE
// The connection cap is logged once per burst: a warning when it is reached, then a count of the
// connections refused, at most once per this period.
constexpr uint64_t kLimitLogMs = 5000;

std::string toLower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::string jsonEscape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

// The OpenAI error shape every error of the API server has (workers/api_server/openai.h,
// renderError): {"error":{"message":...,"type":...,"param":null,"code":...}}; an empty `code`
// renders as null.
std::string errorJson(std::string_view message, std::string_view type, std::string_view code) {
  std::string out = "{\"error\":{\"message\":\"" + jsonEscape(message) + "\",\"type\":\"" +
                    jsonEscape(type) + "\",\"param\":null,\"code\":";
  out += code.empty() ? std::string("null") : "\"" + jsonEscape(code) + "\"";
  out += "}}";
  return out;
}

const char* reasonPhrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

// RFC 9110 token characters: what a header name may consist of. llhttp 8 lets spaces through,
// and "Name : v" / "Na me: v" are request-smuggling material, so names are checked here.
bool isToken(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (std::isalnum(u) == 0 && std::strchr("!#$%&'*+-.^_`|~", c) == nullptr) return false;
  }
  return true;
}

bool hasCrLf(std::string_view s) { return s.find_first_of("\r\n") != std::string_view::npos; }

// A canned answer the server gives by itself (protocol errors, drain, overload).
struct Canned {
  int status = 0;
  std::string contentType;
  std::string body;
  Headers headers;  // extra headers (e.g. Retry-After)
};

// A request the server refuses by itself: 4xx/5xx, type invalid_request_error, `code` the
// machine-readable reason (e.g. "request_timeout").
Canned invalidRequest(int status, std::string_view message, std::string_view code) {
  return {status, "application/json", errorJson(message, "invalid_request_error", code), {}};
}

}  // namespace

bool echoableRequestId(std::string_view id) {
  constexpr size_t kMaxBytes = 256;
  if (id.empty() || id.size() > kMaxBytes) return false;
  for (char c : id) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

std::string Request::header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (key == name) return value;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
namespace detail {

class Connection;

class ResponseImpl final : public Response {
 public:
  explicit ResponseImpl(Connection* conn) : conn_(conn) {}
  ~ResponseImpl() override;
  void respond(int status, Headers headers, std::string body) override;
  void startStream(int status, Headers headers) override;
  bool write(std::string_view data) override;
  void finish() override;
  bool clientGone() const override { return gone_; }
  void onClientGone(std::function<void()> callback) override;

 private:
  friend class Connection;
  enum class Phase { Fresh, Streaming, Done };  // Done: the app completed the response
  Connection* conn_;  // null once the connection let go of this response (it may be freed)
  Phase phase_ = Phase::Fresh;
  bool gone_ = false;
  std::function<void()> goneCallback_;
};

// The listener, the connection table and the quiescence state. Loop thread only.
class ServerCore {
 public:
  ServerCore(uv_loop_t* loop, ServerOptions options, Handler handler);
  ~ServerCore();

  void listen();
  void stopAccepting();
  void setDraining();
  void close(uint64_t timeoutMs, std::function<void()> done);
  void onIdle(std::function<void()> callback) { idleCallback_ = std::move(callback); }

  // Called by Connection.
  void requestStarted() { ++inFlight_; }
  void requestDone();
  void removeConnection(Connection* conn);
  void slotReleased();

  uv_loop_t* const loop_;
  const ServerOptions options_;
  const Handler handler_;
  uint16_t port_ = 0;
  bool listened_ = false;
  bool draining_ = false;  // setDraining(): every response closes its connection
  bool closing_ = false;   // close(): the listener is gone, connections end as they go idle
  Canned drain_{503, "application/json", errorJson("server is shutting down", "unavailable", ""),
                {}};
  size_t inFlight_ = 0;
  size_t serving_ = 0;  // connections holding a slot of the cap (Connection::holdsSlot)
  std::unordered_map<Connection*, std::shared_ptr<Connection>> connections_;

 private:
  void onAcceptable();
  void acceptQueued();
  void acceptOne(int fd);
  void closeListener();
  void onCloseTimeout();
  void closeDone();
  void noteRefused();
  void limitSummary();

  // The connection cap's log (noteRefused): whether it is reached now, the refusals not yet
  // reported, and when the last line was written.
  bool atLimit_ = false;
  uint64_t refusedUnlogged_ = 0;
  uint64_t limitLoggedAtMs_ = 0;
  bool limitLogged_ = false;
  UvHandle<uv_timer_t> limitTimer_;

  std::function<void()> idleCallback_;
  std::function<void()> closeCallback_;
  bool closeFired_ = false;
  // Declared before the poll handle: the poll handle is destroyed (uv_close, which unregisters
  // the fd from epoll) before the fd is closed.
  OwnFd listenFd_;
  UvHandle<uv_poll_t> listenPoll_;
  UvHandle<uv_timer_t> acceptBackoff_;
  UvHandle<uv_timer_t> idleTimer_;
  UvHandle<uv_timer_t> closeTimer_;  // close(): the timeout, then the done callback
};

// One client connection. Lifetime: owned by ServerCore::connections_ (shared_ptr) until closed;
// every entry point from outside (libuv callbacks, Response calls, ServerCore calls) holds a
// shared_ptr to itself for its duration, so closing from deep inside a call never frees `this`
// under a running member function. After close, state_ is Closed and every entry is a no-op.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(ServerCore& server, OwnFd fd, bool refusing);
  ~Connection() = default;

  void start(uv_loop_t* loop);  // registers the handles; refuses with 503 if `refusing`
  void drain();                 // the server started draining
  void closeGracefully();       // the server's close() began
  void closeAtTimeout();        // close() ran out of time: answer what can be, close now
  void abandon();               // the server is being destroyed: let go, call nobody
  bool refusing() const { return refusing_; }
  // Counts against maxConnections: from the accept (unless refused) until our FIN is sent; a
  // connection that only lingers for the client's FIN (at most 2 s) holds no slot.
  bool holdsSlot() const { return holdsSlot_; }

  // From ResponseImpl (the app).
  void respond(ResponseImpl& resp, int status, Headers headers, std::string body);
  void startStream(ResponseImpl& resp, int status, Headers headers);
  bool write(ResponseImpl& resp, std::string_view data);
  void finish(ResponseImpl& resp);
  // From ~ResponseImpl: the app dropped an incomplete response (`fresh`: nothing was sent yet).
  void responseDropped(bool fresh);

 private:
  enum class State {
    Idle,      // keep-alive, waiting for the first byte of a request (idle timer)
    Head,      // receiving request line + headers (header timer)
    Body,      // receiving the body (body timer)
    Handling,  // the request is with the handler, or its response is being flushed
    Closing,   // the server closes: flush, shutdown(SHUT_WR), discard input until EOF (linger)
    Closed,
  };

  // llhttp callbacks.
  static int onMessageBegin(llhttp_t* p);
  static int onMethodComplete(llhttp_t* p);
  static int onMethod(llhttp_t* p, const char* at, size_t len);
  static int onUrl(llhttp_t* p, const char* at, size_t len);
  static int onVersion(llhttp_t* p, const char* at, size_t len);
  static int onHeaderField(llhttp_t* p, const char* at, size_t len);
  static int onHeaderValue(llhttp_t* p, const char* at, size_t len);
  static int onHeaderValueComplete(llhttp_t* p);
  static int onHeadersComplete(llhttp_t* p);
  static int onBody(llhttp_t* p, const char* at, size_t len);
  static int onChunkHeader(llhttp_t* p);
  static int onMessageComplete(llhttp_t* p);
  static const llhttp_settings_t* settings();
  static Connection& of(llhttp_t* p) { return *static_cast<Connection*>(p->data); }

  bool countHeadBytes(size_t n);
  int headersComplete();

  void onPoll(int status, int events);
  void discardUrgent();
  void onTimer();
  void readInput();
  void pump();
  void dispatch();
  void answer(const Canned& canned);
  void queue(std::string bytes);
  void flush();
  void responseComplete();
  void beginClose();
  void idleWhileClosing();
  bool peerHasEverything() const;
  void lose();
  void closeNow();
  void updatePoll();
  void startTimer(uint64_t ms);
  void stopTimer();
  bool wantsInput() const;
  std::string responseHead(int status, const Headers& headers, std::string_view framing);
  void sendWhole(int status, const Headers& headers, std::string body);
  static void validateHeaders(const Headers& headers);

  ServerCore* server_;  // null after abandon()
  const bool refusing_;
  bool holdsSlot_;
  State state_ = State::Idle;
  // Declared before the handles: they are closed before the fd (see ServerCore::listenFd_).
  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
  UvHandle<uv_timer_t> timer_;
  int pollEvents_ = 0;
  uv_loop_t* loop_ = nullptr;
  uint64_t acceptedAtMs_ = 0;  // uv_now at start()
  bool used_ = false;          // a request has begun arriving on this connection
  // The client's FIN was read (it half-closed, or closed): nothing more will arrive, but the
  // requests it sent are answered; only a failed write (or a reset) means it is gone.
  bool peerClosed_ = false;

  llhttp_t parser_{};
  std::string in_;     // received, not yet parsed
  size_t inPos_ = 0;   // parsed prefix of in_
  bool pumping_ = false;

  // The request being parsed.
  Request request_;
  std::string field_;
  std::string value_;
  bool inValue_ = false;
  size_t headBytes_ = 0;
  bool headersDone_ = false;
  bool messageComplete_ = false;
  bool http10_ = false;
  bool isHead_ = false;
  bool keepAlive_ = true;
  std::optional<Canned> pendingError_;  // set by a callback; answered after llhttp returns
  bool sendContinue_ = false;

  // The response in progress. Weak: the app holds it, and ~ResponseImpl must be able to run
  // (to tell us it was dropped unanswered) while the request is in progress.
  std::weak_ptr<ResponseImpl> response_;
  bool appDone_ = false;     // the app completed the response (respond() or finish())
  bool counted_ = false;     // the current request counts in ServerCore::inFlight_
  bool closeAfter_ = false;  // close once the current response is complete
  bool headQueued_ = false;  // the current response's head is queued or sent
  bool chunked_ = false;     // the current streaming response uses chunked encoding
  std::deque<std::string> out_;
  size_t outFront_ = 0;  // bytes of out_.front() already sent
  size_t outBytes_ = 0;  // unsent bytes in out_
  bool shutdownSent_ = false;
  uint64_t finAtMs_ = 0;  // uv_now when shutdown(SHUT_WR) was sent
};

// ---------------------------------------------------------------------------------------------
// ResponseImpl: validates the call order, then forwards to the connection if it is still there.

void ResponseImpl::respond(int status, Headers headers, std::string body) {
  VSUP_REQUIRE(phase_ == Phase::Fresh, "http::Response::respond: the response was already started");
  VSUP_REQUIRE(status >= 200 && status <= 999,
               "http::Response::respond: bad status " + std::to_string(status));
  if (conn_ != nullptr) {
    conn_->respond(*this, status, std::move(headers), std::move(body));  // sets phase_
  } else {
    phase_ = Phase::Done;
  }
}

void ResponseImpl::startStream(int status, Headers headers) {
  VSUP_REQUIRE(phase_ == Phase::Fresh,
               "http::Response::startStream: the response was already started");
  VSUP_REQUIRE(status >= 200 && status <= 999,
               "http::Response::startStream: bad status " + std::to_string(status));
  if (conn_ != nullptr) {
    conn_->startStream(*this, status, std::move(headers));  // sets phase_
  } else {
    phase_ = Phase::Streaming;
  }
}

bool ResponseImpl::write(std::string_view data) {
  VSUP_REQUIRE(phase_ == Phase::Streaming, "http::Response::write: no stream in progress");
  if (conn_ == nullptr) return false;
  return conn_->write(*this, data);
}

void ResponseImpl::finish() {
  VSUP_REQUIRE(phase_ == Phase::Streaming, "http::Response::finish: no stream in progress");
  phase_ = Phase::Done;
  if (conn_ != nullptr) conn_->finish(*this);
}

// The app let go of a response it never completed: without this the client would wait forever.
ResponseImpl::~ResponseImpl() {
  if (conn_ != nullptr && phase_ != Phase::Done) conn_->responseDropped(phase_ == Phase::Fresh);
}

void ResponseImpl::onClientGone(std::function<void()> callback) {
  if (gone_) {
    if (callback) callback();
    return;
  }
  goneCallback_ = std::move(callback);
}

// ---------------------------------------------------------------------------------------------
// Connection.

const llhttp_settings_t* Connection::settings() {
  // Immutable after first use: a constant table of function pointers, not mutable global state.
  static const llhttp_settings_t s = [] {
    llhttp_settings_t t;
    llhttp_settings_init(&t);
    t.on_message_begin = &Connection::onMessageBegin;
    t.on_method = &Connection::onMethod;
    t.on_method_complete = &Connection::onMethodComplete;
    t.on_url = &Connection::onUrl;
    t.on_version = &Connection::onVersion;
    t.on_header_field = &Connection::onHeaderField;
    t.on_header_value = &Connection::onHeaderValue;
    t.on_header_value_complete = &Connection::onHeaderValueComplete;
    t.on_headers_complete = &Connection::onHeadersComplete;
    t.on_body = &Connection::onBody;
    t.on_chunk_header = &Connection::onChunkHeader;
    t.on_message_complete = &Connection::onMessageComplete;
    return t;
  }();
  return &s;
}

Connection::Connection(ServerCore& server, OwnFd fd, bool refusing)
    : server_(&server), refusing_(refusing), holdsSlot_(!refusing), fd_(std::move(fd)) {
  llhttp_init(&parser_, HTTP_REQUEST, settings());
  parser_.data = this;
}

void Connection::start(uv_loop_t* loop) {
  auto self = shared_from_this();
  loop_ = loop;
  acceptedAtMs_ = uv_now(loop);
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) {
    int rc = uv_poll_init_socket(loop, h, fd_.get());
    VSUP_ASSERT(rc == 0, uv_strerror(rc));
  });
  poll_->data = this;
  timer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop, h); });
  timer_->data = this;
  if (refusing_) {
    answer({503, "application/json",
            errorJson("too many connections: the server's limit of " +
                          std::to_string(server_->options_.maxConnections) + " is reached",
                      "unavailable", "too_many_connections"),
            {}});
    return;
  }
  // A new connection gets the first-byte timeout (no longer than the idle timeout) to start its
  // first request; silent ones must not hold the connection cap.
  const ServerOptions& opt = server_->options_;
  uint64_t wait = opt.idleTimeoutMs;
  if (opt.firstByteTimeoutMs != 0 && (wait == 0 || opt.firstByteTimeoutMs < wait)) {
    wait = opt.firstByteTimeoutMs;
  }
  startTimer(wait);
  updatePoll();
}

bool Connection::wantsInput() const {
  if (peerClosed_) return false;  // only EOF is left to read
  switch (state_) {
    case State::Idle:
    case State::Head:
    case State::Body:
    case State::Closing:
      return true;
    case State::Handling:
      // Keep reading (to notice a reset) while buffering a bounded amount of pipelined input.
      return in_.size() - inPos_ < server_->options_.maxHeaderBytes + kReadChunk;
    case State::Closed:
      return false;
  }
  return false;
}

void Connection::updatePoll() {
  if (state_ == State::Closed) return;
  // While input is paused (or over: the client's FIN was read) the poll stays registered for
  // UV_PRIORITIZED, which nothing normally triggers: epoll reports an error (a reset) to every
  // registered fd, so a reset client is noticed even when nothing is being written. Not
  // UV_DISCONNECT: a half-close is no reason to stop, and it would stay reported (level-triggered).
  int events = wantsInput() ? UV_READABLE : UV_PRIORITIZED;
  if (!out_.empty()) events |= UV_WRITABLE;
  if (events == pollEvents_) return;
  pollEvents_ = events;
  uv_poll_start(poll_.get(), events, [](uv_poll_t* h, int status, int ev) {
    if (h->data != nullptr) static_cast<Connection*>(h->data)->onPoll(status, ev);
  });
}

void Connection::startTimer(uint64_t ms) {
  if (ms == 0) {
    stopTimer();
    return;
  }
  uv_timer_start(
      timer_.get(),
      [](uv_timer_t* h) {
        if (h->data != nullptr) static_cast<Connection*>(h->data)->onTimer();
      },
      ms, 0);
}

void Connection::stopTimer() {
  if (timer_) uv_timer_stop(timer_.get());
}

void Connection::onTimer() {
  auto self = shared_from_this();
  switch (state_) {
    case State::Idle:
      // An idle keep-alive connection, a new one that sent nothing within the first-byte
      // timeout (or, in close(), a fresh one whose grace ran out): nothing to answer. FIN, then
      // linger: a request that crosses the FIN is read, not reset.
      beginClose();
      return;
    case State::Head:
      keepAlive_ = false;
      answer(invalidRequest(408, "timed out reading the request headers", "request_timeout"));
      return;
    case State::Body:
      keepAlive_ = false;
      answer(invalidRequest(408, "timed out reading the request body", "request_timeout"));
      return;
    case State::Handling:
      // Only armed while output is queued: the client stopped reading.
      log().info("http: dropping a client that stopped reading ({} bytes queued)", outBytes_);
      lose();
      return;
    case State::Closing:
      // In close(): poll until the client has everything, bounded by the linger.
      if (shutdownSent_ && server_->closing_ && uv_now(loop_) - finAtMs_ < kLingerMs) {
        if (peerHasEverything()) {
          closeNow();
        } else {
          startTimer(kClosePollMs);
        }
        return;
      }
      closeNow();
      return;
    case State::Closed:
      closeNow();
      return;
  }
}

void Connection::onPoll(int status, int events) {
  auto self = shared_from_this();
  if (status < 0) {
    lose();  // an error on the socket (libuv reports POLLERR so): a reset
    return;
  }
  if ((events & UV_PRIORITIZED) != 0) discardUrgent();
  if ((events & UV_WRITABLE) != 0) flush();
  if (state_ == State::Closed) return;
  if ((events & UV_READABLE) != 0 && wantsInput()) readInput();
}

// TCP urgent data (what UV_PRIORITIZED reports): no HTTP client sends it; it is read and
// dropped so that the level-triggered event does not fire again and again.
void Connection::discardUrgent() {
  char byte = 0;
  while (::recv(fd_.get(), &byte, 1, MSG_OOB | MSG_DONTWAIT) < 0 && errno == EINTR) {
  }
}

void Connection::readInput() {
  bool eof = false;
  for (int i = 0; i < 4 && wantsInput(); ++i) {
    if (state_ == State::Closing) {
      char scratch[16 * 1024];
      ssize_t n = ::recv(fd_.get(), scratch, sizeof scratch, MSG_DONTWAIT);
      if (n > 0) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
      if (n == 0 && !shutdownSent_) {
        // The client's FIN while our answer is still queued: it may be waiting for it (a
        // half-close). Stop reading, finish the answer; flush() closes after it.
        peerClosed_ = true;
        updatePoll();
        return;
      }
      closeNow();  // EOF after our FIN, or an error: the client is done with us
      return;
    }
    if (inPos_ > 0 && inPos_ == in_.size()) {
      in_.clear();
      inPos_ = 0;
    }
    size_t old = in_.size();
    in_.resize(old + kReadChunk);
    ssize_t n = ::recv(fd_.get(), in_.data() + old, kReadChunk, MSG_DONTWAIT);
    in_.resize(old + static_cast<size_t>(std::max<ssize_t>(n, 0)));
    if (n > 0) {
      if (static_cast<size_t>(n) < kReadChunk) break;
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
    if (n < 0) {
      lose();  // a reset: the client is gone, nothing it sent will be answered
      return;
    }
    eof = true;  // the client's FIN
    break;
  }
  // A FIN is a half-close, not a disconnect: the requests that arrived before it are parsed,
  // handed over and answered; pump() then closes (or answers an incomplete request with 400).
  if (eof) peerClosed_ = true;
  pump();
  if (state_ == State::Closed) return;
  updatePoll();
}

// Parses buffered input while the connection is between responses. Re-entrant calls (a handler
// that answers synchronously completes the response, which wants to parse the next pipelined
// request) only flag the outer loop, so 1000 pipelined requests don't recurse 1000 deep.
void Connection::pump() {
  if (pumping_) return;
  pumping_ = true;
  while ((state_ == State::Idle || state_ == State::Head || state_ == State::Body) &&
         inPos_ < in_.size()) {
    const char* data = in_.data() + inPos_;
    size_t len = in_.size() - inPos_;
    llhttp_errno_t err = llhttp_execute(&parser_, data, len);
    size_t used = len;
    if (err != HPE_OK) {
      const char* pos = llhttp_get_error_pos(&parser_);
      if (pos != nullptr && pos >= data && pos <= data + len) used = static_cast<size_t>(pos - data);
    }
    inPos_ += used;
    // No 100 Continue once the whole body is here (the client sent it without waiting).
    if (sendContinue_ && !messageComplete_ && state_ != State::Closed) {
      sendContinue_ = false;
      queue("HTTP/1.1 100 Continue\r\n\r\n");
      flush();
    }
    if (state_ == State::Closed) break;
    if (pendingError_) {
      Canned canned = std::move(*pendingError_);
      pendingError_.reset();
      answer(canned);
      break;
    }
    if (err == HPE_PAUSED) {
      llhttp_resume(&parser_);
    } else if (err != HPE_OK) {
      // HPE_PAUSED_UPGRADE is unreachable (upgrade requests close after their response); any
      // other code is malformed input (a version llhttp cannot read: 505).
      keepAlive_ = false;
      std::string what = std::string(llhttp_errno_name(err)) + ": " +
                         llhttp_get_error_reason(&parser_);
      if (err == HPE_INVALID_VERSION) {
        answer(invalidRequest(505, "HTTP version not supported (" + what +
                                       "); this server speaks HTTP/1.0 and HTTP/1.1",
                              "http_version_not_supported"));
      } else {
        answer(invalidRequest(400, "malformed request: " + what, "malformed_request"));
      }
      break;
    }
    if (messageComplete_) dispatch();
  }
  pumping_ = false;
  if (state_ == State::Closed) return;
  // The client has half-closed and every byte it sent is parsed: no request can come after.
  if (peerClosed_ && inPos_ == in_.size()) {
    if (state_ == State::Idle) {
      beginClose();
      return;
    }
    if (state_ == State::Head || state_ == State::Body) {
      keepAlive_ = false;
      answer(invalidRequest(
          400,
          state_ == State::Head
              ? "incomplete request: the client closed its side of the connection before the "
                "end of the request headers"
              : "incomplete request: the client closed its side of the connection after " +
                    std::to_string(request_.body.size()) + " byte(s) of the request body" +
                    ((parser_.flags & F_CONTENT_LENGTH) != 0
                         ? " (Content-Length: " +
                               std::to_string(request_.body.size() + parser_.content_length) + ")"
                         : std::string()),
          "incomplete_request"));
      return;
    }
  }
  if (state_ == State::Idle && server_->closing_) {
    idleWhileClosing();
    if (state_ != State::Idle) return;
  }
  if (inPos_ == in_.size()) {
    in_.clear();
    inPos_ = 0;
  } else if (inPos_ > kReadChunk) {
    in_.erase(0, inPos_);
    inPos_ = 0;
  }
  updatePoll();
}

// --- llhttp callbacks: collect the request, enforce limits. A limit violation stores the answer
// in pendingError_ and stops the parser; pump() answers it.

int Connection::onMessageBegin(llhttp_t* p) {
  Connection& c = of(p);
  c.request_ = Request{};
  c.field_.clear();
  c.value_.clear();
  c.inValue_ = false;
  c.headBytes_ = 0;
  c.headersDone_ = false;
  c.messageComplete_ = false;
  c.state_ = State::Head;
  c.isHead_ = false;
  c.used_ = true;
  c.startTimer(c.server_->options_.headerTimeoutMs);
  return 0;
}

// Known as soon as the method is, so that a canned answer to a HEAD (a timeout, say) has no
// body (found by tests/fuzz).
int Connection::onMethodComplete(llhttp_t* p) {
  of(p).isHead_ = p->method == HTTP_HEAD;
  return 0;
}

bool Connection::countHeadBytes(size_t n) {
  headBytes_ += n;
  if (headBytes_ <= server_->options_.maxHeaderBytes) return true;
  keepAlive_ = false;
  pendingError_ = invalidRequest(431, "request header block is larger than " +
                                          std::to_string(server_->options_.maxHeaderBytes) +
                                          " bytes",
                                  "request_header_fields_too_large");
  return false;
}

int Connection::onMethod(llhttp_t* p, const char* at, size_t len) {
  Connection& c = of(p);
  if (!c.countHeadBytes(len)) return HPE_USER;
  c.request_.method.append(at, len);
  return 0;
}

int Connection::onUrl(llhttp_t* p, const char* at, size_t len) {
  Connection& c = of(p);
  if (!c.countHeadBytes(len)) return HPE_USER;
  c.request_.target.append(at, len);
  return 0;
}

int Connection::onVersion(llhttp_t* p, const char*, size_t len) {
  return of(p).countHeadBytes(len) ? 0 : HPE_USER;
}

int Connection::onHeaderField(llhttp_t* p, const char* at, size_t len) {
  Connection& c = of(p);
  if (!c.countHeadBytes(len + (c.inValue_ || c.field_.empty() ? 4 : 0))) return HPE_USER;
  c.inValue_ = false;
  c.field_.append(at, len);
  return 0;
}

int Connection::onHeaderValue(llhttp_t* p, const char* at, size_t len) {
  Connection& c = of(p);
  if (!c.countHeadBytes(len)) return HPE_USER;
  c.inValue_ = true;
  c.value_.append(at, len);
  return 0;
}

int Connection::onHeaderValueComplete(llhttp_t* p) {
  Connection& c = of(p);
  if (!isToken(c.field_)) {
    c.keepAlive_ = false;
    c.pendingError_ = invalidRequest(400, "malformed request: invalid header name \"" +
                                              c.field_.substr(0, 64) + "\"",
                                     "malformed_request");
    return -1;
  }
  c.request_.headers.emplace_back(toLower(c.field_), std::string(trim(c.value_)));
  c.field_.clear();
  c.value_.clear();
  c.inValue_ = false;
  return 0;
}

int Connection::onHeadersComplete(llhttp_t* p) { return of(p).headersComplete(); }

int Connection::headersComplete() {
  const ServerOptions& opt = server_->options_;
  if (headersDone_) return 0;  // trailers of a chunked body
  headersDone_ = true;
  // A header that ended with an empty value has no value callbacks.
  if (!field_.empty()) onHeaderValueComplete(&parser_);
  http10_ = parser_.http_major == 1 && parser_.http_minor == 0;
  isHead_ = parser_.method == HTTP_HEAD;
  keepAlive_ = llhttp_should_keep_alive(&parser_) != 0;
  const std::string& target = request_.target;
  request_.path = target.substr(0, target.find('?'));

  if (parser_.http_major != 1 || parser_.http_minor > 1) {
    keepAlive_ = false;
    pendingError_ = invalidRequest(
        505,
        "HTTP version " + std::to_string(parser_.http_major) + "." +
            std::to_string(parser_.http_minor) +
            " not supported; this server speaks HTTP/1.0 and HTTP/1.1",
        "http_version_not_supported");
    return -1;
  }
  if (parser_.method == HTTP_CONNECT) {
    keepAlive_ = false;
    pendingError_ = invalidRequest(501, "CONNECT is not supported", "not_implemented");
    return -1;
  }
  // RFC 9112 3.2: an HTTP/1.1 request without Host, or any request with more than one, is a 400.
  size_t hosts = 0;
  for (const auto& header : request_.headers) hosts += header.first == "host" ? 1 : 0;
  if (hosts > 1 || (hosts == 0 && !http10_)) {
    keepAlive_ = false;
    pendingError_ = invalidRequest(
        400,
        hosts > 1 ? "malformed request: more than one Host header"
                  : "malformed request: an HTTP/1.1 request must have a Host header",
        "malformed_request");
    return -1;
  }
  // An upgrade request (e.g. WebSocket) is served as plain HTTP and the connection closed after.
  if (parser_.upgrade != 0) keepAlive_ = false;
  // llhttp accepts `Transfer-Encoding: gzip, chunked`; the body would reach the handler still
  // gzip-encoded, so only plain chunked is accepted.
  for (const auto& [name, value] : request_.headers) {
    if (name != "transfer-encoding") continue;
    std::string_view rest = value;
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string coding = toLower(trim(rest.substr(0, comma)));
      rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
      if (!coding.empty() && coding != "chunked") {
        keepAlive_ = false;
        pendingError_ = invalidRequest(501, "unsupported Transfer-Encoding: " + value +
                                                 " (only chunked is accepted)",
                                        "not_implemented");
        return -1;
      }
    }
  }
  if ((parser_.flags & F_CONTENT_LENGTH) != 0 && parser_.content_length > opt.maxBodyBytes) {
    keepAlive_ = false;
    pendingError_ = invalidRequest(413, "request body of " + std::to_string(parser_.content_length) +
                                            " bytes is larger than the limit of " +
                                            std::to_string(opt.maxBodyBytes) + " bytes",
                                    "payload_too_large");
    return -1;
  }
  std::string expect = request_.header("expect");
  if (!expect.empty()) {
    if (toLower(expect) != "100-continue") {
      keepAlive_ = false;
      pendingError_ = invalidRequest(417, "unsupported Expect: " + expect +
                                         " (only 100-continue is accepted)",
                                    "expectation_failed");
      return -1;
    }
    if (!http10_) sendContinue_ = true;
  }
  state_ = State::Body;
  startTimer(opt.bodyTimeoutMs);
  return 0;
}

int Connection::onBody(llhttp_t* p, const char* at, size_t len) {
  Connection& c = of(p);
  size_t limit = c.server_->options_.maxBodyBytes;
  if (c.request_.body.size() + len > limit) {
    c.keepAlive_ = false;
    c.pendingError_ =
        invalidRequest(413, "request body is larger than the limit of " + std::to_string(limit) +
                                " bytes",
                       "payload_too_large");
    return HPE_USER;
  }
  c.request_.body.append(at, len);
  return 0;
}

// A chunk's size is known before its data: one that would take the body over the limit is
// refused at once, not after the client has sent (or failed to send) it.
int Connection::onChunkHeader(llhttp_t* p) {
  Connection& c = of(p);
  size_t limit = c.server_->options_.maxBodyBytes;
  if (p->content_length > limit - std::min(limit, c.request_.body.size())) {
    c.keepAlive_ = false;
    c.pendingError_ =
        invalidRequest(413, "request body is larger than the limit of " + std::to_string(limit) +
                                " bytes (a chunk of " + std::to_string(p->content_length) +
                                " bytes)",
                       "payload_too_large");
    return HPE_USER;
  }
  return 0;
}

int Connection::onMessageComplete(llhttp_t* p) {
  of(p).messageComplete_ = true;
  return HPE_PAUSED;  // one request at a time: the next is parsed after this response
}

// ---

void Connection::dispatch() {
  messageComplete_ = false;
  sendContinue_ = false;
  state_ = State::Handling;
  stopTimer();
  closeAfter_ = !keepAlive_ || server_->draining_;
  headQueued_ = false;
  auto resp = std::make_shared<ResponseImpl>(this);
  response_ = resp;
  appDone_ = false;
  counted_ = true;
  server_->requestStarted();
  Request request = std::move(request_);
  request_ = Request{};
  try {
    server_->handler_(std::move(request), resp);
  } catch (const std::exception& e) {
    log().error("http: the handler threw: {}", e.what());
    if (resp->conn_ != this) return;  // the connection already let go of it
    if (resp->phase_ == ResponseImpl::Phase::Fresh) {
      resp->respond(500, {{"Content-Type", "application/json"}},
                    errorJson("internal error", "server_error", ""));
    } else if (resp->phase_ == ResponseImpl::Phase::Streaming) {
      lose();  // a half-sent stream can only be cut off
    }
  }
}

// Throws before anything is queued, so a bad header leaves the response fresh.
void Connection::validateHeaders(const Headers& headers) {
  for (const auto& [name, value] : headers) {
    VSUP_REQUIRE(!name.empty() && !hasCrLf(name) && !hasCrLf(value) &&
                     name.find(':') == std::string::npos,
                 "http::Response: invalid header \"" + jsonEscape(name) + "\"");
  }
}

std::string Connection::responseHead(int status, const Headers& headers,
                                     std::string_view framing) {
  std::string head = "HTTP/1.1 " + std::to_string(status) + " " + reasonPhrase(status) +
                     "\r\nServer: vsup\r\n";
  for (const auto& [name, value] : headers) {
    std::string lower = toLower(name);
    if (lower == "content-length" || lower == "transfer-encoding" || lower == "server") continue;
    if (lower == "connection") {
      if (toLower(trim(value)) == "close") closeAfter_ = true;
      continue;
    }
    head += name;
    head += ": ";
    head += value;
    head += "\r\n";
  }
  head += framing;
  if (closeAfter_) {
    head += "Connection: close\r\n";
  } else if (http10_) {
    head += "Connection: keep-alive\r\n";
  }
  head += "\r\n";
  headQueued_ = true;
  return head;
}

void Connection::sendWhole(int status, const Headers& headers, std::string body) {
  bool bodyless = status == 204 || status == 304;
  std::string head = responseHead(
      status, headers, bodyless ? "" : "Content-Length: " + std::to_string(body.size()) + "\r\n");
  appDone_ = true;
  queue(std::move(head));
  if (!isHead_ && !bodyless) queue(std::move(body));
  flush();
}

void Connection::respond(ResponseImpl& resp, int status, Headers headers, std::string body) {
  auto self = shared_from_this();
  VSUP_ASSERT(resp.conn_ == this && state_ == State::Handling && !appDone_);
  validateHeaders(headers);
  resp.phase_ = ResponseImpl::Phase::Done;
  sendWhole(status, headers, std::move(body));
}

void Connection::startStream(ResponseImpl& resp, int status, Headers headers) {
  auto self = shared_from_this();
  VSUP_ASSERT(resp.conn_ == this && state_ == State::Handling && !appDone_);
  validateHeaders(headers);
  resp.phase_ = ResponseImpl::Phase::Streaming;
  chunked_ = !http10_;
  if (http10_) closeAfter_ = true;  // an HTTP/1.0 client reads the stream until EOF
  queue(responseHead(status, headers, chunked_ ? "Transfer-Encoding: chunked\r\n" : ""));
  flush();
}

bool Connection::write(ResponseImpl& resp, std::string_view data) {
  auto self = shared_from_this();
  VSUP_ASSERT(resp.conn_ == this && state_ == State::Handling && !appDone_);
  if (data.empty() || isHead_) return true;
  if (outBytes_ > 0 && outBytes_ + data.size() > kMaxQueuedBytes) {
    log().info("http: dropping a client that stopped reading ({} bytes queued)", outBytes_);
    lose();
    return false;
  }
  if (chunked_) {
    char size[24];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    std::string chunk;
    chunk.reserve(data.size() + 32);
    chunk += size;
    chunk += data;
    chunk += "\r\n";
    queue(std::move(chunk));
  } else {
    queue(std::string(data));
  }
  flush();
  return !resp.gone_;
}

void Connection::finish(ResponseImpl& resp) {
  auto self = shared_from_this();
  VSUP_ASSERT(resp.conn_ == this && state_ == State::Handling && !appDone_);
  appDone_ = true;
  if (chunked_ && !isHead_) queue("0\r\n\r\n");
  flush();
}

void Connection::responseDropped(bool fresh) {
  auto self = shared_from_this();
  if (state_ != State::Handling || appDone_) return;
  response_.reset();
  if (fresh) {
    log().error("http: the handler dropped the response to a request without answering it");
    sendWhole(500, {{"Content-Type", "application/json"}},
              errorJson("the server dropped this request without answering", "server_error",
                        ""));
  } else {
    log().error("http: the handler dropped a streaming response without finishing it");
    lose();  // a half-sent stream can only be cut off
  }
}

void Connection::queue(std::string bytes) {
  if (bytes.empty()) return;
  outBytes_ += bytes.size();
  out_.push_back(std::move(bytes));
}

// Sends what the socket takes now, then moves the state machine on if the output drained.
void Connection::flush() {
  if (state_ == State::Closed) return;
  bool progress = false;
  while (!out_.empty()) {
    iovec iov[64];
    int count = 0;
    for (auto it = out_.begin(); it != out_.end() && count < 64; ++it, ++count) {
      size_t skip = count == 0 ? outFront_ : 0;
      iov[count].iov_base = it->data() + skip;
      iov[count].iov_len = it->size() - skip;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(count);
    // MSG_NOSIGNAL: a vanished peer yields EPIPE, never SIGPIPE in the host process.
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      lose();  // EPIPE, ECONNRESET, ...
      return;
    }
    progress = progress || n > 0;
    auto sent = static_cast<size_t>(n);
    outBytes_ -= sent;
    while (sent > 0) {
      size_t left = out_.front().size() - outFront_;
      if (sent < left) {
        outFront_ += sent;
        sent = 0;
      } else {
        sent -= left;
        out_.pop_front();
        outFront_ = 0;
      }
    }
  }
  if (!out_.empty()) {
    // Bound a client that stopped reading (restarted on every bit of progress).
    if (state_ == State::Handling && (progress || uv_is_active(reinterpret_cast<uv_handle_t*>(
                                                       timer_.get())) == 0)) {
      startTimer(server_->options_.idleTimeoutMs);
    }
  } else if (state_ == State::Handling) {
    stopTimer();
    if (appDone_) {
      responseComplete();
      return;
    }
  } else if (state_ == State::Closing && !shutdownSent_) {
    // The answer is out; FIN tells the client, and the linger timer bounds the wait for its FIN.
    ::shutdown(fd_.get(), SHUT_WR);
    shutdownSent_ = true;
    finAtMs_ = uv_now(loop_);
    if (std::exchange(holdsSlot_, false)) server_->slotReleased();
    if (peerClosed_) {
      // Its FIN is read already and nothing is unread: a close now cannot reset the connection
      // (the kernel still delivers what is queued, then our FIN).
      closeNow();
      return;
    }
    startTimer(server_->closing_ ? kClosePollMs : kLingerMs);
  }
  updatePoll();
}

// The response's last byte went to the kernel: the request is complete.
void Connection::responseComplete() {
  if (auto resp = response_.lock()) resp->conn_ = nullptr;
  response_.reset();
  appDone_ = false;
  if (std::exchange(counted_, false)) server_->requestDone();
  if (closeAfter_) {
    beginClose();
    return;
  }
  // Keep-alive. While draining only a response whose head went out before the drain began
  // gets here: its client was not told to close, so the connection stays open for one more
  // request (answered with `Connection: close`) rather than closing under a client that may be
  // sending it now.
  headQueued_ = false;
  state_ = State::Idle;
  startTimer(server_->options_.idleTimeoutMs);
  pump();  // a pipelined request may be waiting; in close(), an idle connection ends here
  if (state_ != State::Closed) updatePoll();
}

// Answers a request the handler will never see, then closes.
void Connection::answer(const Canned& canned) {
  closeAfter_ = true;
  std::string head = "HTTP/1.1 " + std::to_string(canned.status) + " " +
                     reasonPhrase(canned.status) + "\r\nServer: vsup\r\nContent-Type: " +
                     canned.contentType + "\r\nContent-Length: " +
                     std::to_string(canned.body.size()) + "\r\n";
  for (const auto& [name, value] : canned.headers) head += name + ": " + value + "\r\n";
  head += "Connection: close\r\n\r\n";
  queue(std::move(head));
  if (!isHead_) queue(canned.body);  // a response to HEAD has no body (RFC 9112 6.3)
  beginClose();
}

void Connection::beginClose() {
  if (state_ == State::Closed || state_ == State::Closing) return;
  state_ = State::Closing;
  in_.clear();
  inPos_ = 0;
  startTimer(kLingerMs);
  flush();
}

// The client is gone (or dropped): tell the app if its response was still in progress.
void Connection::lose() { closeNow(); }

void Connection::closeNow() {
  if (state_ == State::Closed) return;
  auto self = shared_from_this();
  state_ = State::Closed;
  // The handles go first (uv_close unregisters the fd from epoll), then the fd.
  poll_.reset();
  timer_.reset();
  fd_.reset();
  out_.clear();
  outBytes_ = 0;
  std::shared_ptr<ResponseImpl> resp = response_.lock();
  response_.reset();
  bool inProgress = !std::exchange(appDone_, false);
  bool counted = std::exchange(counted_, false);
  ServerCore* server = std::exchange(server_, nullptr);
  server->removeConnection(this);
  if (counted) server->requestDone();  // defers onIdle: it never runs inside this call
  if (resp) {
    resp->conn_ = nullptr;
    if (inProgress) {
      resp->gone_ = true;
      // Last: the callback may do anything, including destroying the Server.
      if (auto callback = std::move(resp->goneCallback_)) callback();
    }
  }
}

// Nothing closes here: an idle connection stays open (its next request is answered with
// `Connection: close`), a request being received completes and is answered the same way.
void Connection::drain() {
  // A response whose head is already out keeps it; its connection then stays open for one more
  // request (responseComplete).
  if (state_ == State::Handling && !headQueued_) closeAfter_ = true;
}

void Connection::closeGracefully() {
  auto self = shared_from_this();
  switch (state_) {
    case State::Idle:
      // Input the loop has not read yet (a request already sent) is served before the close.
      readInput();
      if (state_ == State::Idle) idleWhileClosing();
      return;
    case State::Head:
    case State::Body:
    case State::Handling:
      return;  // answered (with `Connection: close`), then closed; or cut at the timeout
    case State::Closing:
      if (shutdownSent_) startTimer(kClosePollMs);  // no longer wait for the client's FIN
      return;
    case State::Closed:
      return;
  }
}

// close() is under way and this connection has no request: one that has carried a request
// closes now; a fresh one gets the rest of its grace to send its first request.
void Connection::idleWhileClosing() {
  uint64_t age = uv_now(loop_) - acceptedAtMs_;
  if (used_ || age >= kFirstRequestGraceMs) {
    beginClose();
  } else {
    startTimer(kFirstRequestGraceMs - age);
  }
}

// Our every byte and our FIN are acknowledged, and nothing the client sent is left unread: a
// close now cannot reset the connection under a response or a request.
bool Connection::peerHasEverything() const {
  int unacked = 0;
  int unread = 0;
  if (::ioctl(fd_.get(), SIOCOUTQ, &unacked) != 0 || ::ioctl(fd_.get(), SIOCINQ, &unread) != 0) {
    return false;
  }
  return unacked == 0 && unread == 0;
}

void Connection::closeAtTimeout() {
  auto self = shared_from_this();
  if (state_ == State::Head || state_ == State::Body) {
    keepAlive_ = false;
    answer(server_->drain_);  // queued and flushed as far as the socket takes it
  }
  closeNow();
}

void Connection::abandon() {
  state_ = State::Closed;
  poll_.reset();
  timer_.reset();
  fd_.reset();
  server_ = nullptr;
  if (auto resp = response_.lock()) {
    resp->conn_ = nullptr;
    if (!appDone_) resp->gone_ = true;
  }
  response_.reset();
}

// ---------------------------------------------------------------------------------------------
// ServerCore.

ServerCore::ServerCore(uv_loop_t* loop, ServerOptions options, Handler handler)
    : loop_(loop), options_(std::move(options)), handler_(std::move(handler)) {
  VSUP_REQUIRE(loop_ != nullptr, "http::Server: no loop");
  VSUP_REQUIRE(static_cast<bool>(handler_), "http::Server: no handler");
  idleTimer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop_, h); });
  idleTimer_->data = this;
}

ServerCore::~ServerCore() {
  closeListener();
  auto connections = std::move(connections_);
  connections_.clear();
  for (auto& [raw, conn] : connections) conn->abandon();
}

}  // namespace detail

OwnFd bindListener(const std::string& hostIn, uint16_t port, int backlog, bool reusePort) {
  std::string host = hostIn;
  if (host == "localhost") host = "127.0.0.1";
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  sockaddr_storage addr{};
  socklen_t addrLen = 0;
  std::string where;
  if (auto* v4 = reinterpret_cast<sockaddr_in*>(&addr);
      ::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    addrLen = sizeof(sockaddr_in);
    where = host + ":" + std::to_string(port);
  } else if (auto* v6 = reinterpret_cast<sockaddr_in6*>(&addr);
             ::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    addrLen = sizeof(sockaddr_in6);
    where = "[" + host + "]:" + std::to_string(port);
  } else {
    throw Error("http::Server: host \"" + hostIn +
                "\" is not an IP address literal (nor \"localhost\")");
  }

  auto fail = [&](int err) {
    std::string text = std::strerror(err);
    if (!text.empty()) text[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(text[0])));
    throw SysError(where + ": " + text, err);
  };
  OwnFd fd(::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) fail(errno);
  int one = 1;
  // SO_REUSEADDR: a restarted server binds despite connections of its predecessor in TIME_WAIT
  // (on Linux it never lets two sockets listen on one port; SO_REUSEPORT does that).
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) fail(errno);
  if (reusePort && ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    fail(errno);
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), addrLen) != 0) fail(errno);
  if (::listen(fd.get(), backlog) != 0) fail(errno);
  return fd;
}

uint16_t boundPort(int fd) {
  sockaddr_storage bound{};
  socklen_t boundLen = sizeof bound;
  VSUP_SYSCALL(::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &boundLen));
  return ntohs(bound.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                          : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
}

namespace detail {

void ServerCore::listen() {
  VSUP_REQUIRE(!listened_, "http::Server::listen called twice");
  listened_ = true;
  OwnFd fd;
  if (options_.listenFd >= 0) {
    // Inherited (the root bound it): this process's copy, served like one of its own.
    fd.reset(options_.listenFd);
    int flags = VSUP_SYSCALL(::fcntl(fd.get(), F_GETFL));
    VSUP_SYSCALL(::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK));
    VSUP_SYSCALL(::fcntl(fd.get(), F_SETFD, FD_CLOEXEC));
    int listening = 0;
    socklen_t len = sizeof listening;
    VSUP_SYSCALL(::getsockopt(fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len));
    VSUP_REQUIRE(listening != 0, "http::Server: fd " + std::to_string(options_.listenFd) +
                                     " is not a listening socket");
  } else {
    fd = bindListener(options_.host, options_.port, options_.backlog, options_.reusePort);
  }
  port_ = boundPort(fd.get());

  listenFd_ = std::move(fd);
  listenPoll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) {
    int rc = uv_poll_init_socket(loop_, h, listenFd_.get());
    VSUP_ASSERT(rc == 0, uv_strerror(rc));
  });
  listenPoll_->data = this;
  uv_poll_start(listenPoll_.get(), UV_READABLE, [](uv_poll_t* h, int, int) {
    if (h->data != nullptr) static_cast<ServerCore*>(h->data)->onAcceptable();
  });
}

// Takes every connection the kernel has queued (their clients may have sent their requests
// already), bounded so that a connect flood cannot keep it going.
void ServerCore::acceptQueued() {
  for (int i = 0; listenFd_ && i < options_.backlog + kAcceptBatch; ++i) {
    int fd = ::accept4(listenFd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      acceptOne(fd);
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      log().warn("http: accepting the queued connections failed: {}", std::strerror(errno));
    }
    return;
  }
}

void ServerCore::onAcceptable() {
  for (int i = 0; i < kAcceptBatch && listenFd_; ++i) {
    int fd = ::accept4(listenFd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      acceptOne(fd);
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      // Out of fds: the pending connect stays readable, so polling on would spin. Pause accepting.
      log().warn("http: accept failed ({}); pausing accepts for {} ms", std::strerror(errno),
                 kAcceptBackoffMs);
      uv_poll_stop(listenPoll_.get());
      if (!acceptBackoff_) {
        acceptBackoff_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop_, h); });
        acceptBackoff_->data = this;
      }
      uv_timer_start(
          acceptBackoff_.get(),
          [](uv_timer_t* h) {
            auto* self = static_cast<ServerCore*>(h->data);
            if (self == nullptr || !self->listenPoll_) return;
            uv_poll_start(self->listenPoll_.get(), UV_READABLE, [](uv_poll_t* p, int, int) {
              if (p->data != nullptr) static_cast<ServerCore*>(p->data)->onAcceptable();
            });
          },
          kAcceptBackoffMs, 0);
      return;
    }
    log().warn("http: accept failed: {}", std::strerror(errno));
    return;
  }
}

void ServerCore::acceptOne(int rawFd) {
  OwnFd fd(rawFd);
  bool refusing = serving_ >= options_.maxConnections;
  if (refusing) noteRefused();
  if (refusing && connections_.size() >= options_.maxConnections + kMaxRefusing) return;  // flood
  int one = 1;
  // Streamed tokens are small writes that must leave at once.
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  auto conn = std::make_shared<Connection>(*this, std::move(fd), refusing);
  connections_.emplace(conn.get(), conn);
  if (!refusing) ++serving_;
  conn->start(loop_);
}

void ServerCore::removeConnection(Connection* conn) {
  auto it = connections_.find(conn);
  if (it == connections_.end()) return;
  bool held = conn->holdsSlot();
  connections_.erase(it);
  if (held) slotReleased();
  if (closing_ && connections_.empty()) closeDone();
}

void ServerCore::slotReleased() {
  --serving_;
  if (atLimit_ && serving_ < options_.maxConnections) {
    atLimit_ = false;
    // The burst is over: its count now, unless a line went out just before (then the timer).
    if (refusedUnlogged_ > 0 && uv_now(loop_) - limitLoggedAtMs_ >= kLimitLogMs) limitSummary();
  }
}

// A connection over the cap: one warning when a burst begins, then (limitSummary) the number
// refused, at most once per kLimitLogMs, so a flood does not flood the log too.
void ServerCore::noteRefused() {
  ++refusedUnlogged_;
  uint64_t now = uv_now(loop_);
  bool quiet = !limitLogged_ || now - limitLoggedAtMs_ >= kLimitLogMs;
  if (!atLimit_) {
    atLimit_ = true;
    if (quiet) {
      log().warn("http: the connection limit of {} (--max-connections) is reached: new "
                 "connections get 503 until one closes",
                 options_.maxConnections);
      refusedUnlogged_ = 0;  // this one is told; the summary counts the ones after it
      limitLoggedAtMs_ = now;
      limitLogged_ = true;
      return;
    }
  }
  if (!limitTimer_) {
    limitTimer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop_, h); });
    limitTimer_->data = this;
  }
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(limitTimer_.get())) != 0) return;
  uint64_t due = limitLoggedAtMs_ + kLimitLogMs;
  uv_timer_start(
      limitTimer_.get(),
      [](uv_timer_t* h) {
        if (h->data != nullptr) static_cast<ServerCore*>(h->data)->limitSummary();
      },
      due > now ? due - now : 0, 0);
}

void ServerCore::limitSummary() {
  if (limitTimer_) uv_timer_stop(limitTimer_.get());
  if (refusedUnlogged_ == 0) return;
  uint64_t now = uv_now(loop_);
  log().warn("http: refused {} connection(s) over the limit of {} in the last {:.1f} s{}",
             refusedUnlogged_, options_.maxConnections,
             double(now - limitLoggedAtMs_) / 1000.0,
             atLimit_ ? " (still at the limit)" : "; back under it");
  refusedUnlogged_ = 0;
  limitLoggedAtMs_ = now;
  limitLogged_ = true;
}

void ServerCore::stopAccepting() {
  // Closing a listening socket resets the connections still in its accept queue, whose clients
  // may have sent their requests: take them first, and serve them like any other.
  acceptQueued();
  closeListener();
}

void ServerCore::closeListener() {
  // The poll handle first: uv_close unregisters the fd before it is closed.
  listenPoll_.reset();
  if (refusedUnlogged_ > 0) limitSummary();
  limitTimer_.reset();
  acceptBackoff_.reset();
  listenFd_.reset();
}

void ServerCore::setDraining() {
  if (draining_) return;
  draining_ = true;
  std::vector<std::shared_ptr<Connection>> snapshot;
  snapshot.reserve(connections_.size());
  for (auto& [raw, conn] : connections_) snapshot.push_back(conn);
  for (auto& conn : snapshot) conn->drain();
}

void ServerCore::close(uint64_t timeoutMs, std::function<void()> done) {
  VSUP_REQUIRE(!closing_, "http::Server::close called twice");
  setDraining();
  stopAccepting();
  closing_ = true;
  closeCallback_ = std::move(done);
  closeTimer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop_, h); });
  closeTimer_->data = this;
  std::vector<std::shared_ptr<Connection>> snapshot;
  snapshot.reserve(connections_.size());
  for (auto& [raw, conn] : connections_) snapshot.push_back(conn);
  for (auto& conn : snapshot) conn->closeGracefully();
  if (closeFired_) return;  // every connection closed inside the loop above
  if (connections_.empty()) {
    closeDone();
    return;
  }
  uv_timer_start(
      closeTimer_.get(),
      [](uv_timer_t* h) {
        if (h->data != nullptr) static_cast<ServerCore*>(h->data)->onCloseTimeout();
      },
      timeoutMs, 0);
}

void ServerCore::onCloseTimeout() {
  std::vector<std::shared_ptr<Connection>> snapshot;
  snapshot.reserve(connections_.size());
  for (auto& [raw, conn] : connections_) snapshot.push_back(conn);
  if (!snapshot.empty()) {
    log().info("http: closing {} connection(s) still open at the close timeout",
               snapshot.size());
  }
  for (auto& conn : snapshot) conn->closeAtTimeout();  // the last one calls closeDone()
  if (!closeFired_) closeDone();
}

// From its own loop callback (the close timer's), so the app may destroy the Server in it.
void ServerCore::closeDone() {
  if (closeFired_) return;
  closeFired_ = true;
  uv_timer_start(
      closeTimer_.get(),
      [](uv_timer_t* h) {
        auto* self = static_cast<ServerCore*>(h->data);
        if (self == nullptr || !self->closeCallback_) return;
        auto callback = std::move(self->closeCallback_);  // may destroy `self`
        callback();
      },
      0, 0);
}

void ServerCore::requestDone() {
  VSUP_ASSERT(inFlight_ > 0);
  if (--inFlight_ > 0 || !idleCallback_) return;
  // From its own loop callback: the app may destroy the Server in it.
  uv_timer_start(
      idleTimer_.get(),
      [](uv_timer_t* h) {
        auto* self = static_cast<ServerCore*>(h->data);
        if (self == nullptr || self->inFlight_ != 0 || !self->idleCallback_) return;
        auto callback = self->idleCallback_;  // a copy: the callback may destroy `self`
        callback();
      },
      0, 0);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Server: the public face.

Server::Server(uv_loop_t* loop, ServerOptions options, Handler handler)
    : core_(std::make_unique<detail::ServerCore>(loop, std::move(options), std::move(handler))) {}

Server::~Server() = default;

void Server::listen() { core_->listen(); }
uint16_t Server::port() const { return core_->port_; }
void Server::stopAccepting() { core_->stopAccepting(); }
void Server::setDraining() { core_->setDraining(); }
void Server::close(uint64_t timeoutMs, std::function<void()> done) {
  core_->close(timeoutMs, std::move(done));
}
void Server::setDrainResponse(std::string contentType, std::string body, Headers headers) {
  for (const auto& [name, value] : headers) {
    VSUP_REQUIRE(isToken(name) && !hasCrLf(value),
                 "http::Server::setDrainResponse: invalid header \"" + jsonEscape(name) + "\"");
  }
  core_->drain_ = {503, std::move(contentType), std::move(body), std::move(headers)};
}
size_t Server::inFlight() const { return core_->inFlight_; }
size_t Server::connections() const { return core_->connections_.size(); }
void Server::onIdle(std::function<void()> callback) { core_->onIdle(std::move(callback)); }

}  // namespace vsup::http
