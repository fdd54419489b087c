// Helpers for the suites that drive an HTTP server over real sockets on 127.0.0.1: the server
// runs on a uv loop on the test's main thread, the client is plain blocking sockets on a
// std::thread. Test code only: it uses doctest's REQUIRE.
//
// Every client socket has 5 s send/receive timeouts, so a test that goes wrong fails instead of
// hanging. The client reaches into the loop thread only through LoopBridge::call (a uv_async_t),
// so everything the server owns is touched on the loop thread alone.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <uv.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <doctest/doctest.h>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "base/fd.h"
#include "ipc/uv_handle.h"
#include "workers/http/http_server.h"

namespace vsup::testing {

inline constexpr auto kWait = std::chrono::seconds(5);

// Lets the client thread run code on the loop thread, and runs the loop until the client is done.
class LoopBridge {
 public:
  explicit LoopBridge(uv_loop_t* loop) : loop_(loop) {
    async_ = UvHandle<uv_async_t>::make([&](uv_async_t* a) {
      uv_async_init(loop, a, [](uv_async_t* h) {
        if (h->data != nullptr) static_cast<LoopBridge*>(h->data)->drainQueue();
      });
    });
    async_->data = this;
  }

  // Client thread: runs `fn` on the loop thread; returns once it ran (rethrows what it threw).
  void call(std::function<void()> fn) {
    auto task = std::make_shared<std::packaged_task<void()>>(std::move(fn));
    auto done = task->get_future();
    {
      std::lock_guard lock(mu_);
      queue_.push_back([task] { (*task)(); });
    }
    uv_async_send(async_.get());
    REQUIRE(done.wait_for(kWait) == std::future_status::ready);
    done.get();
  }

  // Main (loop) thread: runs `client` on a new thread and the loop until it returns.
  void runClient(const std::function<void()>& client) {
    std::atomic<bool> finished{false};
    std::exception_ptr failure;
    std::thread thread([&] {
      try {
        client();
      } catch (...) {
        failure = std::current_exception();
      }
      finished = true;
      uv_async_send(async_.get());
    });
    while (!finished) uv_run(loop_, UV_RUN_ONCE);
    thread.join();
    drainQueue();
    if (failure) std::rethrow_exception(failure);
  }

 private:
  void drainQueue() {
    std::deque<std::function<void()>> tasks;
    {
      std::lock_guard lock(mu_);
      tasks.swap(queue_);
    }
    for (auto& task : tasks) task();
  }

  uv_loop_t* loop_;
  UvHandle<uv_async_t> async_;
  std::mutex mu_;
  std::deque<std::function<void()>> queue_;
};

// --- The client side: blocking sockets with timeouts.

// An invalid OwnFd when the connect is refused, so a test can check that nobody listens.
inline OwnFd connectTo(uint16_t port) {
  OwnFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  timeval tv{5, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return OwnFd();
  return fd;
}

struct Reply {
  int status = 0;
  http::Headers headers;  // names lower-cased
  std::string body;
  std::string header(std::string_view name) const {
    for (const auto& [k, v] : headers) {
      if (k == name) return v;
    }
    return "";
  }
  bool has(std::string_view name) const {
    for (const auto& [k, v] : headers) {
      if (k == name) return true;
    }
    return false;
  }
};

class Client {
 public:
  explicit Client(uint16_t port) : fd_(connectTo(port)) { REQUIRE(fd_); }

  void send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
      REQUIRE_MESSAGE(n > 0, "send: ", std::strerror(errno));
      data.remove_prefix(static_cast<size_t>(n));
    }
  }

  // Status line and headers; nullopt on EOF first.
  std::optional<Reply> readHead() {
    auto status = line();
    if (!status) return std::nullopt;
    REQUIRE_MESSAGE(status->rfind("HTTP/1.1 ", 0) == 0, *status);
    Reply reply;
    reply.status = std::stoi(status->substr(9, 3));
    for (;;) {
      auto h = line();
      REQUIRE(h.has_value());
      if (h->empty()) break;
      size_t colon = h->find(':');
      REQUIRE(colon != std::string::npos);
      size_t v = h->find_first_not_of(' ', colon + 1);
      reply.headers.emplace_back(lower(h->substr(0, colon)),
                                 v == std::string::npos ? "" : h->substr(v));
    }
    return reply;
  }

  // One chunk's data of a chunked body; "" for the final chunk.
  std::string readChunk() {
    auto size = line();
    REQUIRE(size.has_value());
    size_t n = std::stoul(*size, nullptr, 16);
    std::string data = take(n + 2);
    REQUIRE(data.substr(n) == "\r\n");
    data.resize(n);
    return data;
  }

  // A whole response (skipping nothing: a 100 Continue is returned as such); nullopt on EOF
  // first. A body with neither a length nor chunking runs to EOF, as HTTP/1.1 frames it.
  std::optional<Reply> read() {
    auto reply = readHead();
    if (!reply || reply->status == 100) return reply;
    if (reply->has("content-length")) {
      reply->body = take(std::stoul(reply->header("content-length")));
    } else if (reply->header("transfer-encoding") == "chunked") {
      for (std::string chunk = readChunk(); !chunk.empty(); chunk = readChunk()) reply->body += chunk;
    } else {
      while (fill()) {
      }
      reply->body = std::move(buf_);
      buf_.clear();
    }
    return reply;
  }

  // For suites where a response must come: EOF first fails the test.
  Reply requireHead() { return required(readHead()); }
  Reply requireRead() { return required(read()); }

  // True if the server closes the connection (EOF or reset) within the timeout; data is skipped.
  bool closedByPeer() {
    buf_.clear();
    char scratch[4096];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), scratch, sizeof scratch, 0);
      if (n > 0) continue;
      if (n == 0) return true;
      return errno == ECONNRESET;
    }
  }

  // True if the server ends the connection with FIN (EOF) within the timeout; false on a reset
  // or a timeout. Data before the end is skipped.
  bool endsCleanly() {
    buf_.clear();
    char scratch[4096];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), scratch, sizeof scratch, 0);
      if (n > 0) continue;
      return n == 0;
    }
  }

  void close() { fd_.reset(); }
  // shutdown(SHUT_WR): our FIN, as `nc -N` sends after its request; reading goes on.
  void halfClose() { REQUIRE(::shutdown(fd_.get(), SHUT_WR) == 0); }
  // Closes with a reset (SO_LINGER 0) instead of a FIN: the peer sees ECONNRESET.
  void reset() {
    linger noLinger{1, 0};
    REQUIRE(::setsockopt(fd_.get(), SOL_SOCKET, SO_LINGER, &noLinger, sizeof noLinger) == 0);
    fd_.reset();
  }
  int fd() const { return fd_.get(); }

 private:
  static std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  }
  static Reply required(std::optional<Reply> reply) {
    REQUIRE_MESSAGE(reply.has_value(), "the connection ended before a response");
    return std::move(*reply);
  }
  bool fill() {
    char chunk[16 * 1024];
    ssize_t n = ::recv(fd_.get(), chunk, sizeof chunk, 0);
    if (n <= 0) return false;
    buf_.append(chunk, static_cast<size_t>(n));
    return true;
  }
  std::optional<std::string> line() {
    for (;;) {
      size_t end = buf_.find("\r\n");
      if (end != std::string::npos) {
        std::string l = buf_.substr(0, end);
        buf_.erase(0, end + 2);
        return l;
      }
      if (!fill()) return std::nullopt;
    }
  }
  std::string take(size_t n) {
    while (buf_.size() < n) REQUIRE_MESSAGE(fill(), "connection ended inside a body");
    std::string out = buf_.substr(0, n);
    buf_.erase(0, n);
    return out;
  }

  OwnFd fd_;
  std::string buf_;
};

// `extra`: more header lines, each ending in "\r\n".
inline std::string get(std::string_view path, std::string_view extra = "") {
  return "GET " + std::string(path) + " HTTP/1.1\r\nHost: t\r\n" + std::string(extra) + "\r\n";
}

inline std::string post(std::string_view path, std::string_view body,
                        std::string_view extra = "") {
  return "POST " + std::string(path) + " HTTP/1.1\r\nHost: t\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n" + std::string(extra) + "\r\n" + std::string(body);
}

}  // namespace vsup::testing
