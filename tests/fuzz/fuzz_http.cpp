// Fuzz target: the HTTP request path of the API server, from raw client bytes to a rendered
// answer. A real vsup::http::Server (libuv + llhttp, request assembly, limits, pipelining,
// Expect, chunked bodies, drain) listens on 127.0.0.1:0 on an in-process loop; each input is sent
// on a fresh TCP connection. Its handler routes like workers/api_server_main.cpp handle() (/health,
// /metrics, /v1/models, POST /v1/completions and /v1/chat/completions through the OpenAI decoder
// and renderers, 404/405 otherwise), and under /fuzz/ misbehaves in the ways the Response
// contract allows an app to (throw, drop a response, defer it, cut a stream, send a bad header).
//
// Input: one selector byte, then the bytes the client sends.
//   selector % 3:       the server: 0 default limits (8 KiB head, 64 KiB body), 1 tiny limits
//                       (256-byte head, 512-byte body), 2 draining (every request is still
//                       handed over, and every response closes its connection)
//   (selector / 3) % 8: how the bytes are written: 0 (and 6, 7) all at once, else in pieces of
//                       1, 2, 5, 16 or 100 bytes with a loop turn between
// So a seed starting with '0' is sent whole to the default server ('0' = 48). The client half-
// closes after the last byte (the server answers every complete request that arrived, then
// closes; an incomplete one gets 400) and reads all the server sends. `X-Chat-Format: chatml|llama3` picks the format a chat's messages are rendered in
// (engine::renderChat, as engine-core would) to stand in for its generated text.
//
// Properties checked: nothing crashes or trips a sanitizer; the handler only ever sees a
// well-formed request (token header names, lower-cased, trimmed values without CR/LF, path =
// target up to '?', body within the limit); the bytes the client receives are a valid prefix of
// the HTTP/1.1 responses to the requests sent (an answer to HEAD has no body, nothing follows an
// answer that closes); the server closes the half-closed connection within 5 s (else
// "watchdog"), and once it has, nothing counts as in flight.
#include <llhttp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <uv.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/check.h"
#include "base/fd.h"
#include "engine/prompt.h"
#include "ipc/uv_handle.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_log.h"
#include "workers/api_server/openai.h"
#include "workers/http/http_server.h"

namespace {

using vsup::OwnFd;
using vsup::UvHandle;
using vsup::http::Headers;
using vsup::http::Request;
using vsup::http::Response;
using vsup::http::Server;
using vsup::http::ServerOptions;
namespace api = vsup::api;

constexpr size_t kPieces[] = {0, 1, 2, 5, 16, 100, 0, 0};  // 0: everything at once
constexpr uint64_t kWatchdogMs = 5000;
constexpr size_t kMaxReceived = 4 * 1024 * 1024;  // kept for the response check; more is dropped

ServerOptions optionsFor(int kind) {
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.reusePort = false;
  if (kind == 1) {
    o.maxHeaderBytes = 256;
    o.maxBodyBytes = 512;
  } else {
    o.maxHeaderBytes = 8 * 1024;
    o.maxBodyBytes = 64 * 1024;
  }
  return o;
}

bool isTokenChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 ||
         std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

// What http_server.h promises the handler.
void checkRequest(const Request& r, const ServerOptions& options) {
  FUZZ_CHECK(!r.method.empty());
  FUZZ_CHECK(r.path == r.target.substr(0, r.target.find('?')), r.target);
  for (const auto& [name, value] : r.headers) {
    FUZZ_CHECK(!name.empty() && std::all_of(name.begin(), name.end(), isTokenChar), name);
    FUZZ_CHECK(std::none_of(name.begin(), name.end(),
                            [](char c) { return std::isupper(static_cast<unsigned char>(c)); }),
               name);
    FUZZ_CHECK(value.find_first_of("\r\n") == std::string::npos, value);
    FUZZ_CHECK(value.empty() || (value.front() != ' ' && value.front() != '\t' &&
                                 value.back() != ' ' && value.back() != '\t'),
               value);
  }
  FUZZ_CHECK(r.body.size() <= options.maxBodyBytes);
}

// The app behind each server. One instance per server; all calls on the loop thread.
class App {
 public:
  App(uv_loop_t* loop, ServerOptions options) : options_(std::move(options)) {
    timer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop, t); });
    timer_->data = this;
  }

  void handle(Request&& r, std::shared_ptr<Response> w) {
    checkRequest(r, options_);
    const std::string& path = r.path;
    if (path == "/health") {
      if (r.method != "GET" && r.method != "HEAD") return methodNotAllowed(*w, r);
      return json(*w, 200, R"({"status":"ready"})");
    }
    if (path == "/metrics") {
      if (r.method != "GET") return methodNotAllowed(*w, r);
      return w->respond(200, {{"Content-Type", "text/plain; version=0.0.4"}}, "vsup_up 1\n");
    }
    if (path == "/v1/models") {
      if (r.method != "GET") return methodNotAllowed(*w, r);
      return json(*w, 200, api::renderModels("vsup-sim", 1700000000));
    }
    if (path == "/v1/completions" || path == "/v1/chat/completions") {
      if (r.method != "POST") return methodNotAllowed(*w, r);
      return complete(r, *w, path == "/v1/chat/completions");
    }
    if (path.starts_with("/fuzz/")) return misbehave(path.substr(6), std::move(w));
    json(*w, 404, api::renderError(api::pathNotFound(r.method, path)));
  }

  // Answers what was deferred (from its own loop turn, like an engine's reply would).
  void answerDeferred() {
    auto deferred = std::move(deferred_);
    deferred_.clear();
    for (auto& w : deferred) json(*w, 200, R"({"deferred":true})");
  }

  void reset() { deferred_.clear(); }

 private:
  static void json(Response& w, int status, std::string body) {
    w.respond(status, {{"Content-Type", "application/json"}}, std::move(body));
  }

  static void methodNotAllowed(Response& w, const Request& r) {
    json(w, 405, api::renderError({405, "Method " + r.method + " not allowed on " + r.path,
                                   "invalid_request_error", "method_not_allowed", ""}));
  }

  void complete(const Request& r, Response& w, bool chat) {
    api::Limits limits;
    limits.servedModel = "vsup-sim";
    auto parsed = api::parseCompletionRequest(r.body, chat, limits);
    if (auto* error = std::get_if<api::ApiError>(&parsed)) {
      return json(w, error->status, api::renderError(*error));
    }
    const auto& call = std::get<api::CompletionCall>(parsed);
    FUZZ_CHECK(!chat || (call.prompts.size() == 1 && !call.messages.empty()));
    const std::string id = chat ? "chatcmpl-fuzz" : "cmpl-fuzz";
    constexpr int64_t kCreated = 1700000000;
    // The prompts (a chat: its messages rendered) stand in for generated text: arbitrary client
    // bytes in every rendered body.
    std::vector<std::string> texts = call.prompts;
    if (chat) {
      const auto format = vsup::engine::chatFormatFromName(r.header("x-chat-format"));
      texts[0] = vsup::engine::renderChat(call.messages,
                                          format.value_or(vsup::engine::ChatFormat::Plain));
    }
    if (!call.stream) {
      api::CompletionResult result{chat, id, kCreated, call.model, {}, {3, 5}, {}};
      for (size_t i = 0; i < texts.size(); ++i) {
        result.choices.push_back({int(i), texts[i], vsup::engine::FinishReason::Length});
      }
      return json(w, 200, api::renderCompletion(result));
    }
    w.startStream(200, {{"Content-Type", "text/event-stream"}, {"Cache-Control", "no-cache"}});
    for (size_t i = 0; i < texts.size(); ++i) {
      api::Choice delta{int(i), texts[i], vsup::engine::FinishReason::None};
      w.write(api::sseEvent(api::renderStreamChunk(chat, id, kCreated, call.model, delta, true)));
      delta = {int(i), "", vsup::engine::FinishReason::Stop};
      w.write(api::sseEvent(api::renderStreamChunk(chat, id, kCreated, call.model, delta, false)));
    }
    if (call.includeUsage) {
      w.write(api::sseEvent(api::renderUsageChunk(chat, id, kCreated, call.model, {3, 5})));
    }
    w.write(api::kSseDone);
    w.finish();
  }

  void misbehave(const std::string& what, std::shared_ptr<Response> w) {
    if (what == "defer" || what == "gone") {
      if (what == "gone") w->onClientGone([] {});
      deferred_.push_back(std::move(w));
      uv_timer_start(
          timer_.get(),
          [](uv_timer_t* t) {
            if (t->data != nullptr) static_cast<App*>(t->data)->answerDeferred();
          },
          0, 0);
    } else if (what == "drop") {
      // The response goes out of scope unanswered: the server must answer 500 by itself.
    } else if (what == "throw") {
      throw std::runtime_error("the handler threw");
    } else if (what == "stream-throw" || what == "stream-drop") {
      w->startStream(200, {{"Content-Type", "text/plain"}});
      w->write("partial");
      if (what == "stream-throw") throw std::runtime_error("the handler threw mid-stream");
    } else if (what == "bad-header") {
      w->respond(200, {{"X-Bad", "a\r\nInjected: yes"}}, "");  // throws vsup::Error
    } else if (what == "close") {
      w->respond(200, {{"Connection", "close"}}, "bye");
    } else if (what == "big") {
      w->startStream(200, {{"Content-Type", "text/plain"}});
      const std::string block(16 * 1024, 'x');
      for (int i = 0; i < 16 && !w->clientGone(); ++i) w->write(block);
      w->finish();
    } else {
      json(*w, 404, api::renderError(api::pathNotFound("GET", "/fuzz/" + what)));
    }
  }

  ServerOptions options_;
  UvHandle<uv_timer_t> timer_;
  std::vector<std::shared_ptr<Response>> deferred_;
};

// Set up once for the whole fuzzing process; never destroyed (the process exits).
struct Harness {
  uv_loop_t loop{};
  std::unique_ptr<App> apps[3];
  std::unique_ptr<Server> servers[3];
  UvHandle<uv_timer_t> watchdog;

  Harness() {
    vsup::fuzz::quietLogs();
    VSUP_ASSERT(uv_loop_init(&loop) == 0);
    for (int i = 0; i < 3; ++i) {
      ServerOptions options = optionsFor(i);
      apps[i] = std::make_unique<App>(&loop, options);
      App* app = apps[i].get();
      servers[i] = std::make_unique<Server>(
          &loop, options,
          [app](Request&& r, std::shared_ptr<Response> w) { app->handle(std::move(r), w); });
      servers[i]->listen();
    }
    servers[2]->setDraining();
    watchdog = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(&loop, t); });
  }
};

// The client: a plain TCP socket on the same loop, collecting everything the server sends.
struct Client {
  OwnFd fd;
  UvHandle<uv_poll_t> poll;
  std::string received;
  bool eof = false;

  Client(uv_loop_t* loop, uint16_t port) {
    fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    VSUP_ASSERT(fd, std::strerror(errno));
    // Close with RST: no TIME_WAIT per input, or a long run would exhaust the ephemeral ports.
    linger noLinger{1, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &noLinger, sizeof noLinger);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    // Blocking: on loopback the handshake completes in the kernel, before the server accepts.
    // libFuzzer's SIGALRM (its -timeout timer; no SA_RESTART) can interrupt it: the connect then
    // goes on asynchronously, and its outcome is read once the socket turns writable.
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      VSUP_ASSERT(errno == EINTR, std::strerror(errno));
      pollfd p{fd.get(), POLLOUT, 0};
      int n;
      do n = ::poll(&p, 1, 10'000); while (n < 0 && errno == EINTR);
      VSUP_ASSERT(n == 1, "connect did not complete within 10 s");
      int error = 0;
      socklen_t len = sizeof error;
      VSUP_ASSERT(::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0,
                  std::strerror(error));
    }
    poll = UvHandle<uv_poll_t>::make([&](uv_poll_t* p) { uv_poll_init_socket(loop, p, fd.get()); });
    poll->data = this;
    uv_poll_start(poll.get(), UV_READABLE, [](uv_poll_t* p, int, int) {
      if (p->data != nullptr) static_cast<Client*>(p->data)->drain();
    });
  }

  void drain() {
    char buf[64 * 1024];
    for (;;) {
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        if (received.size() < kMaxReceived) received.append(buf, size_t(n));
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      eof = true;  // EOF, or a reset: the server is done with us
      uv_poll_stop(poll.get());
      return;
    }
  }

  bool send(uv_loop_t* loop, const uint8_t* data, size_t size) {
    while (size > 0) {
      ssize_t n = ::send(fd.get(), data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        data += n;
        size -= size_t(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        uv_run(loop, UV_RUN_NOWAIT);  // the server reads (or stops reading and closes)
      } else {
        return false;  // the server closed: the rest is never read
      }
    }
    return true;
  }
};

// The methods of the requests in `input`, in order, as llhttp (the server's parser) reads them;
// the last may be a request the server refused half-read.
std::vector<std::string> requestMethods(std::string_view input) {
  std::vector<std::string> methods;
  llhttp_settings_t settings;
  llhttp_settings_init(&settings);
  settings.on_message_begin = [](llhttp_t* p) {
    static_cast<std::vector<std::string>*>(p->data)->emplace_back();
    return 0;
  };
  settings.on_method = [](llhttp_t* p, const char* at, size_t len) {
    static_cast<std::vector<std::string>*>(p->data)->back().append(at, len);
    return 0;
  };
  llhttp_t parser;
  llhttp_init(&parser, HTTP_REQUEST, &settings);
  parser.data = &methods;
  llhttp_execute(&parser, input.data(), input.size());  // stops at the first error
  return methods;
}

// The bytes the client got must be a valid prefix of the HTTP/1.1 responses to `methods` (a
// connection the server cut, or a stream the app abandoned, ends early). Nothing may be
// malformed, an answer to HEAD has no body (RFC 9112 section 6.3), and nothing follows an answer
// that closes the connection.
void checkResponses(const std::string& bytes, const std::vector<std::string>& methods,
                    bool truncated) {
  struct State {
    const std::vector<std::string>* methods;
    size_t finals = 0;     // final (non-1xx) responses seen
    bool closing = false;  // the response just completed closes the connection
  } state{&methods};
  llhttp_settings_t settings;
  llhttp_settings_init(&settings);
  settings.on_headers_complete = [](llhttp_t* p) {
    auto& st = *static_cast<State*>(p->data);
    if (p->status_code < 200) return 0;
    const size_t i = st.finals++;
    return i < st.methods->size() && (*st.methods)[i] == "HEAD" ? 1 : 0;  // 1: no body
  };
  settings.on_message_complete = [](llhttp_t* p) {
    static_cast<State*>(p->data)->closing = llhttp_should_keep_alive(p) == 0;
    return int(HPE_PAUSED);  // one response at a time
  };
  llhttp_t parser;
  llhttp_init(&parser, HTTP_RESPONSE, &settings);
  parser.data = &state;
  auto context = [&] { return "\n--- received ---\n" + bytes.substr(0, 4096); };
  size_t at = 0;
  while (at < bytes.size()) {
    const llhttp_errno_t err = llhttp_execute(&parser, bytes.data() + at, bytes.size() - at);
    if (err == HPE_OK) break;
    if (err != HPE_PAUSED) {
      if (truncated) return;
      FUZZ_CHECK(false, std::string("the server sent a malformed response: ") +
                            llhttp_errno_name(err) + ": " + llhttp_get_error_reason(&parser) +
                            " (response " + std::to_string(state.finals) + ")" + context());
    }
    at = size_t(llhttp_get_error_pos(&parser) - bytes.data());
    llhttp_resume(&parser);
    FUZZ_CHECK(!state.closing || at == bytes.size(),
               "the server sent bytes after response " + std::to_string(state.finals) +
                   ", which closed the connection" +
                   (state.finals >= 1 && state.finals <= methods.size() &&
                            methods[state.finals - 1] == "HEAD"
                        ? " (a body in an answer to HEAD?)"
                        : "") +
                   context());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static Harness* harness = new Harness();
  Harness& h = *harness;
  const int kind = data[0] % 3;
  const size_t piece = kPieces[(data[0] / 3) % 8];
  ++data;
  --size;
  Server& server = *h.servers[kind];

  bool timedOut = false;
  h.watchdog->data = &timedOut;
  uv_timer_start(
      h.watchdog.get(), [](uv_timer_t* t) { *static_cast<bool*>(t->data) = true; }, kWatchdogMs,
      0);
  std::string received;
  {
    Client client(&h.loop, server.port());
    bool open = true;
    if (piece == 0) {
      open = client.send(&h.loop, data, size);
    } else {
      for (size_t at = 0; open && at < size; at += piece) {
        open = client.send(&h.loop, data + at, std::min(piece, size - at));
        uv_run(&h.loop, UV_RUN_NOWAIT);
      }
    }
    if (open) ::shutdown(client.fd.get(), SHUT_WR);
    while ((!client.eof || server.connections() > 0) && !timedOut) uv_run(&h.loop, UV_RUN_ONCE);
    FUZZ_CHECK(!timedOut, "watchdog: the server did not close a connection whose client hung up");
    received = std::move(client.received);
  }
  uv_timer_stop(h.watchdog.get());
  uv_run(&h.loop, UV_RUN_NOWAIT);  // close callbacks of the client's handle
  FUZZ_CHECK(server.inFlight() == 0, "a request still counts as in flight after its client left");
  h.apps[kind]->reset();

  if (vsup::fuzz::tracing()) {
    std::fprintf(stderr, "--- server %d answered (%zu bytes) ---\n%.*s\n--- end ---\n", kind,
                 received.size(), int(std::min<size_t>(received.size(), 8192)), received.data());
  }
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  // Cut on purpose: an abandoned stream, or the output cap above.
  const bool truncated = input.find("/fuzz/stream-") != std::string_view::npos ||
                         received.size() >= kMaxReceived;
  checkResponses(received, requestMethods(input), truncated);
  return 0;
}
