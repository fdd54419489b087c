// The baseline for bench/serving_bench.py: a plain HTTP/1.1 keep-alive server on one libuv loop
// with llhttp, answering every request with the same fixed JSON body. Whatever vsup spends per
// request beyond this server is the cost of its front end, the engine RPC and the engine.
//
//   build/bench/plain_http_server --port P --body-file F [--host H]
//
// F holds the bytes vsup returned for the benchmark request (the script copies one real response
// body from vsup at start), so both servers put the same number of bytes on the wire with the
// same header shape (Content-Type: application/json, Content-Length). SIGTERM/SIGINT stop it.
#include <llhttp.h>
#include <uv.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

namespace {

std::string gResponse;  // status line + headers + body, built once

struct Conn {
  uv_tcp_t tcp;
  llhttp_t parser;
  int pendingReplies = 0;  // complete requests parsed in the current read, not yet answered
  bool closeAfter = false;
  bool closing = false;
};

llhttp_settings_t gSettings;

void onClose(uv_handle_t* h) { delete static_cast<Conn*>(h->data); }

void closeConn(Conn* c) {
  if (c->closing) return;
  c->closing = true;
  uv_close(reinterpret_cast<uv_handle_t*>(&c->tcp), onClose);
}

int onMessageComplete(llhttp_t* p) {
  Conn* c = static_cast<Conn*>(p->data);
  ++c->pendingReplies;
  if (!llhttp_should_keep_alive(p)) c->closeAfter = true;
  return 0;
}

struct WriteReq {
  uv_write_t req;
  Conn* conn;
  std::string owned;  // only used when several replies are batched
};

void onWrite(uv_write_t* w, int status) {
  auto* wr = reinterpret_cast<WriteReq*>(w);
  Conn* c = wr->conn;
  if (status < 0 || c->closeAfter) closeConn(c);
  delete wr;
}

// One write for everything parsed in this read (pipelined requests get batched replies).
void reply(Conn* c) {
  int n = c->pendingReplies;
  c->pendingReplies = 0;
  if (n == 0) return;
  uv_buf_t buf;
  std::string batch;
  if (n == 1) {
    buf = uv_buf_init(gResponse.data(), static_cast<unsigned>(gResponse.size()));
  } else {
    batch.reserve(gResponse.size() * n);
    for (int i = 0; i < n; ++i) batch += gResponse;
    buf = uv_buf_init(batch.data(), static_cast<unsigned>(batch.size()));
  }
  // Fast path: the socket takes it all at once (the usual case for a few hundred bytes).
  int wrote = uv_try_write(reinterpret_cast<uv_stream_t*>(&c->tcp), &buf, 1);
  if (wrote == static_cast<int>(buf.len)) {
    if (c->closeAfter) closeConn(c);
    return;
  }
  if (wrote < 0 && wrote != UV_EAGAIN) {
    closeConn(c);
    return;
  }
  size_t off = wrote > 0 ? static_cast<size_t>(wrote) : 0;
  auto* wr = new WriteReq;
  wr->conn = c;
  wr->owned.assign(buf.base + off, buf.len - off);
  uv_buf_t rest = uv_buf_init(wr->owned.data(), static_cast<unsigned>(wr->owned.size()));
  if (uv_write(&wr->req, reinterpret_cast<uv_stream_t*>(&c->tcp), &rest, 1, onWrite) < 0) {
    delete wr;
    closeConn(c);
  }
}

void onAlloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  static char slab[64 * 1024];  // one loop, and every read is parsed before the next alloc
  *buf = uv_buf_init(slab, sizeof slab);
}

void onRead(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  Conn* c = static_cast<Conn*>(s->data);
  if (nread < 0) {
    closeConn(c);
    return;
  }
  if (nread == 0) return;
  llhttp_errno_t err = llhttp_execute(&c->parser, buf->base, static_cast<size_t>(nread));
  if (err != HPE_OK) {
    static const char kBad[] =
        "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    uv_buf_t b = uv_buf_init(const_cast<char*>(kBad), sizeof kBad - 1);
    uv_try_write(s, &b, 1);
    closeConn(c);
    return;
  }
  reply(c);
}

void onConnection(uv_stream_t* server, int status) {
  if (status < 0) return;
  auto* c = new Conn;
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, reinterpret_cast<uv_stream_t*>(&c->tcp)) != 0) {
    closeConn(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  llhttp_init(&c->parser, HTTP_REQUEST, &gSettings);
  c->parser.data = c;
  uv_read_start(reinterpret_cast<uv_stream_t*>(&c->tcp), onAlloc, onRead);
}

void onSignal(uv_signal_t* h, int) {
  uv_stop(h->loop);
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1";
  int port = -1;
  std::string bodyFile;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--port" && i + 1 < argc) port = std::atoi(argv[++i]);
    else if (a == "--body-file" && i + 1 < argc) bodyFile = argv[++i];
    else if (a == "--host" && i + 1 < argc) host = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s --port P --body-file F [--host H]\n", argv[0]);
      return 2;
    }
  }
  if (port < 0 || port > 65535 || bodyFile.empty()) {
    std::fprintf(stderr, "usage: %s --port P --body-file F [--host H]\n", argv[0]);
    return 2;
  }
  std::ifstream in(bodyFile, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "plain_http_server: cannot read %s\n", bodyFile.c_str());
    return 1;
  }
  std::string body((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gResponse = "HTTP/1.1 200 OK\r\nServer: plain\r\nContent-Type: application/json\r\n"
              "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;

  llhttp_settings_init(&gSettings);
  gSettings.on_message_complete = onMessageComplete;

  uv_loop_t* loop = uv_default_loop();
  uv_tcp_t server;
  uv_tcp_init(loop, &server);
  sockaddr_in addr;
  if (uv_ip4_addr(host.c_str(), port, &addr) != 0) {
    std::fprintf(stderr, "plain_http_server: bad host %s\n", host.c_str());
    return 1;
  }
  int rc = uv_tcp_bind(&server, reinterpret_cast<const sockaddr*>(&addr), 0);
  if (rc == 0) rc = uv_listen(reinterpret_cast<uv_stream_t*>(&server), 1024, onConnection);
  if (rc != 0) {
    std::fprintf(stderr, "plain_http_server: listen %s:%d: %s\n", host.c_str(), port,
                 uv_strerror(rc));
    return 1;
  }
  uv_signal_t sigterm, sigint;
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, onSignal, SIGTERM);
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, onSignal, SIGINT);
  uv_run(loop, UV_RUN_DEFAULT);
  return 0;
}
