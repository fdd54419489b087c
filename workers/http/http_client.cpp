#include "workers/http/http_client.h"

#include <arpa/inet.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/error.h"
#include "base/fd.h"
#include "ipc/uv_handle.h"

namespace vsup::http {

Url parseUrl(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return Error("'" + text + "': " + why +
                 " (give http://HOST:PORT, HOST an IPv4 address, an IPv6 address in brackets "
                 "or localhost, e.g. http://127.0.0.1:8100)");
  };
  const std::string scheme = "http://";
  if (text.rfind("https://", 0) == 0) throw bad("https is not supported");
  if (text.rfind(scheme, 0) != 0) throw bad("not an http:// URL");
  std::string rest = text.substr(scheme.size());
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  if (rest.find('/') != std::string::npos) throw bad("a path is not accepted here");
  Url url;
  std::string port;
  if (!rest.empty() && rest.front() == '[') {
    size_t close = rest.find(']');
    if (close == std::string::npos) throw bad("an IPv6 address without its closing ']'");
    url.host = rest.substr(1, close - 1);
    if (close + 1 >= rest.size() || rest[close + 1] != ':') throw bad("no :PORT");
    port = rest.substr(close + 2);
  } else {
    size_t colon = rest.rfind(':');
    if (colon == std::string::npos) throw bad("no :PORT");
    url.host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    if (url.host.find(':') != std::string::npos) throw bad("an IPv6 address must be in brackets");
  }
  if (url.host == "localhost") url.host = "127.0.0.1";
  in_addr a4{};
  in6_addr a6{};
  if (::inet_pton(AF_INET, url.host.c_str(), &a4) != 1 &&
      ::inet_pton(AF_INET6, url.host.c_str(), &a6) != 1) {
    throw bad("'" + url.host + "' is not an IP address (host names are not resolved)");
  }
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      std::stoul(port) == 0 || std::stoul(port) > 65535) {
    throw bad("the port '" + port + "' is not 1..65535");
  }
  url.port = uint16_t(std::stoul(port));
  url.text = url.host.find(':') != std::string::npos
                 ? "http://[" + url.host + "]:" + port
                 : "http://" + url.host + ":" + port;
  return url;
}

class ClientCall::Impl : public std::enable_shared_from_this<Impl> {
 public:
  Impl(uv_loop_t* loop, ClientCallbacks callbacks, ClientOptions options)
      : loop_(loop), cb_(std::move(callbacks)), options_(options) {}
  ~Impl() { close(false); }

  void start(const Url& url, const std::string& method, const std::string& target,
             const Headers& headers, const std::string& body) {
    out_ = method + " " + target + " HTTP/1.1\r\nHost: " +
           (url.host.find(':') != std::string::npos ? "[" + url.host + "]" : url.host) + ":" +
           std::to_string(url.port) + "\r\n";
    for (const auto& [name, value] : headers) out_ += name + ": " + value + "\r\n";
    out_ += "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
    out_ += body;

    llhttp_settings_init(&settings_);
    settings_.on_header_field = [](llhttp_t* p, const char* at, size_t len) {
      Impl& self = of(p);
      if (self.valueDone_) {
        self.head_.emplace_back();
        self.valueDone_ = false;
      }
      if (self.head_.empty()) self.head_.emplace_back();
      for (size_t i = 0; i < len; ++i) {
        self.head_.back().first += char(std::tolower(static_cast<unsigned char>(at[i])));
      }
      return self.headBytes(len);
    };
    settings_.on_header_value = [](llhttp_t* p, const char* at, size_t len) {
      Impl& self = of(p);
      self.head_.back().second.append(at, len);
      return self.headBytes(len);
    };
    settings_.on_header_value_complete = [](llhttp_t* p) {
      Impl& self = of(p);
      self.valueDone_ = true;
      auto& v = self.head_.back().second;
      while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.pop_back();
      size_t lead = v.find_first_not_of(" \t");
      v.erase(0, lead == std::string::npos ? v.size() : lead);
      return 0;
    };
    settings_.on_headers_complete = [](llhttp_t* p) {
      Impl& self = of(p);
      self.headComplete_ = true;
      self.status_ = int(llhttp_get_status_code(p));
      return 0;
    };
    settings_.on_body = [](llhttp_t* p, const char* at, size_t len) {
      of(p).body_.append(at, len);
      return 0;
    };
    settings_.on_message_complete = [](llhttp_t* p) -> int {
      of(p).complete_ = true;
      return int(HPE_PAUSED);  // nothing after the one response is read
    };
    llhttp_init(&parser_, HTTP_RESPONSE, &settings_);
    parser_.data = this;

    sockaddr_storage addr{};
    socklen_t addrLen = 0;
    int family = url.host.find(':') != std::string::npos ? AF_INET6 : AF_INET;
    if (family == AF_INET) {
      auto* a = reinterpret_cast<sockaddr_in*>(&addr);
      a->sin_family = AF_INET;
      a->sin_port = htons(url.port);
      ::inet_pton(AF_INET, url.host.c_str(), &a->sin_addr);
      addrLen = sizeof(sockaddr_in);
    } else {
      auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
      a->sin6_family = AF_INET6;
      a->sin6_port = htons(url.port);
      ::inet_pton(AF_INET6, url.host.c_str(), &a->sin6_addr);
      addrLen = sizeof(sockaddr_in6);
    }
    timer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop_, t); });
    timer_->data = this;
    fd_ = OwnFd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd_) return failSoon(std::string("socket: ") + std::strerror(errno));
    int one = 1;
    ::setsockopt(fd_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(fd_.get(), reinterpret_cast<sockaddr*>(&addr), addrLen) != 0 &&
        errno != EINPROGRESS) {
      return failSoon(std::string("connect: ") + std::strerror(errno));
    }
    int rc = 0;
    poll_ = UvHandle<uv_poll_t>::make(
        [&](uv_poll_t* h) { rc = uv_poll_init_socket(loop_, h, fd_.get()); });
    if (rc != 0) return failSoon(std::string("uv_poll_init_socket: ") + uv_strerror(rc));
    poll_->data = this;
    connecting_ = true;
    arm(UV_WRITABLE);
    if (options_.connectTimeoutMs > 0) {
      startTimer(options_.connectTimeoutMs, "timed out connecting after " +
                                                std::to_string(options_.connectTimeoutMs) +
                                                " ms");
    }
  }

  // Ends the call; `reset`: with RST (the server must see the client gone now).
  void close(bool reset) {
    ended_ = true;
    poll_.reset();
    timer_.reset();
    if (fd_ && reset) {
      linger l{1, 0};
      ::setsockopt(fd_.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    fd_.reset();
  }
  bool ended() const { return ended_; }
  bool requestSent() const { return requestSent_; }

 private:
  static Impl& of(llhttp_t* p) { return *static_cast<Impl*>(p->data); }

  int headBytes(size_t len) {
    headSize_ += len;
    return headSize_ > options_.maxHeaderBytes ? -1 : 0;
  }

  void arm(int events) {
    uv_poll_start(poll_.get(), events, [](uv_poll_t* h, int status, int ev) {
      auto* self = static_cast<Impl*>(h->data);
      if (self == nullptr) return;
      auto keep = self->shared_from_this();  // a callback may drop the ClientCall
      self->onPoll(status, ev);
    });
  }

  void startTimer(uint64_t ms, std::string why) {
    timeoutWhy_ = std::move(why);
    uv_timer_start(
        timer_.get(),
        [](uv_timer_t* t) {
          auto* self = static_cast<Impl*>(t->data);
          if (self == nullptr) return;
          auto keep = self->shared_from_this();
          self->fail(self->timeoutWhy_);
        },
        ms, 0);
  }

  void startIdleTimer() {
    startTimer(options_.idleTimeoutMs,
               "no byte from the server for " + std::to_string(options_.idleTimeoutMs) + " ms");
  }

  // A failure found before the loop ran: reported from the loop, never inside the constructor.
  void failSoon(std::string why) { startTimer(0, std::move(why)); }

  void fail(const std::string& why) {
    if (ended_) return;
    close(true);
    if (cb_.onError) cb_.onError(why);
  }

  void onPoll(int status, int events) {
    if (ended_) return;
    if (status < 0) events = connecting_ ? UV_WRITABLE : UV_READABLE;
    if (connecting_ && (events & UV_WRITABLE)) {
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) return fail(std::string("connect: ") + std::strerror(err));
      connecting_ = false;
    }
    if (!connecting_ && sent_ < out_.size()) {
      while (sent_ < out_.size()) {
        ssize_t n = ::send(fd_.get(), out_.data() + sent_, out_.size() - sent_,
                           MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          if (errno == EINTR) continue;
          return fail(std::string("send: ") + std::strerror(errno));
        }
        sent_ += size_t(n);
      }
      if (sent_ == out_.size()) {
        out_.clear();
        out_.shrink_to_fit();
        sent_ = 0;
        requestSent_ = true;
        uv_timer_stop(timer_.get());
        if (options_.idleTimeoutMs > 0) startIdleTimer();
        arm(UV_READABLE);
      } else {
        arm(UV_WRITABLE | UV_READABLE);
      }
    }
    if (events & UV_READABLE) readSome();
  }

  void readSome() {
    char buf[64 * 1024];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        return fail(errno == ECONNRESET ? "the server reset the connection"
                                        : std::string("recv: ") + std::strerror(errno));
      }
      if (requestSent_ && options_.idleTimeoutMs > 0) startIdleTimer();  // a byte came
      llhttp_errno_t rc = n == 0 ? llhttp_finish(&parser_)
                                 : llhttp_execute(&parser_, buf, size_t(n));
      if (n == 0 && rc == HPE_INVALID_EOF_STATE) {
        if (!deliver()) return;
        return fail("the connection closed before the response ended");
      }
      if (rc != HPE_OK && rc != HPE_PAUSED) {
        return fail(headSize_ > options_.maxHeaderBytes
                        ? "malformed response: its head is over " +
                              std::to_string(options_.maxHeaderBytes) + " bytes"
                        : std::string("malformed response: ") + llhttp_errno_name(rc) + ": " +
                              (parser_.reason != nullptr ? parser_.reason : ""));
      }
      if (!deliver()) return;
      if (complete_) {
        close(false);
        if (cb_.onEnd) cb_.onEnd();
        return;
      }
      if (n == 0) return fail("the connection closed before the response ended");
    }
  }

  // Hands what llhttp parsed to the callbacks; false once the call ended meanwhile.
  bool deliver() {
    if (headComplete_ && !headDelivered_) {
      headDelivered_ = true;
      if (cb_.onHead) cb_.onHead(status_, head_);
      if (ended_) return false;
    }
    if (!body_.empty()) {
      std::string bytes = std::move(body_);
      body_.clear();
      if (cb_.onBody) cb_.onBody(bytes);
      if (ended_) return false;
    }
    return true;
  }

  uv_loop_t* loop_;
  ClientCallbacks cb_;
  ClientOptions options_;
  OwnFd fd_;
  UvHandle<uv_poll_t> poll_;
  UvHandle<uv_timer_t> timer_;
  std::string timeoutWhy_;
  std::string out_;
  size_t sent_ = 0;
  bool connecting_ = false;
  bool requestSent_ = false;
  bool ended_ = false;
  llhttp_settings_t settings_{};
  llhttp_t parser_{};
  Headers head_;
  size_t headSize_ = 0;
  bool valueDone_ = false;
  bool headComplete_ = false;
  bool headDelivered_ = false;
  bool complete_ = false;
  int status_ = 0;
  std::string body_;
};

ClientCall::ClientCall(uv_loop_t* loop, const Url& url, std::string method, std::string target,
                       Headers headers, std::string body, ClientCallbacks callbacks,
                       ClientOptions options)
    : impl_(std::make_shared<Impl>(loop, std::move(callbacks), options)) {
  impl_->start(url, method, target, headers, body);
}

ClientCall::~ClientCall() { abort(); }

void ClientCall::abort() {
  if (!impl_->ended()) impl_->close(true);
}

bool ClientCall::ended() const { return impl_->ended(); }

bool ClientCall::requestSent() const { return impl_->requestSent(); }

}  // namespace vsup::http
