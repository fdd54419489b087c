// Fuzz target: the control protocol as `vsup tree` reaches it, end to end. Each input is the byte
// stream a peer sends to the root's control socket: a real ControlSocket (accept, SO_PEERCRED,
// RpcLink, Cap'n Proto two-party RPC, NodeServer, node_codec) on an in-process uv loop with KJ,
// serving a NodeHandler that answers like the root's (tools/run_command.cpp RootNode).
//
// Input: one selector byte, then the stream. selector % 8 picks how the stream is written:
// 0 (and 6, 7) all at once, else in pieces of 1, 3, 8, 64 or 512 bytes with a loop turn between,
// so the server meets messages split at every boundary. The client half-closes after the last
// byte and reads (and discards) whatever the server answers.
//
// Properties checked: nothing crashes; a start() spec decodes to at most 64 MiB (footprint.h);
// after the peer hung up the server closes its end (within 5 s; a hang aborts with "watchdog"),
// and it holds no socket once the loop is idle (no leaked connection).
//
// Seeds (corpus/control/) are recorded from a real RpcLink client: see make_seeds.cpp.
#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include <kj/debug.h>

#include "base/check.h"
#include "base/fd.h"
#include "ipc/uv_handle.h"
#include "ipc/uv_kj.h"
#include "supervisor/control_socket.h"
#include "supervisor/node_service.h"
#include "tests/fuzz/footprint.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_log.h"

namespace {

using namespace vsup::supervisor;
using vsup::OwnFd;
using vsup::UvHandle;

constexpr size_t kPieces[] = {0, 1, 3, 8, 64, 512, 0, 0};  // 0: the whole stream at once
constexpr uint64_t kWatchdogMs = 5000;

// Answers like the root of a running tree: a status tree, a shutdown that reports a deferral to
// the caller's observer (a capability the peer supplied), and no second start. The spec given
// to start() is validated first, so the decoded value is exercised as a sub-supervisor would.
class FuzzRoot final : public NodeHandler {
 public:
  kj::Promise<void> start(SupervisorSpec spec, std::string config) override {
    if (vsup::fuzz::tracing()) {
      std::fprintf(stderr, "start('%s', %zu children)\n", spec.name.c_str(), spec.children.size());
    }
    const size_t bytes = vsup::fuzz::footprint(spec) + vsup::fuzz::footprint(config);
    FUZZ_CHECK(bytes <= vsup::fuzz::kMaxDecodedBytes,
               "Node.start decoded a spec of " + std::to_string(bytes >> 20) + " MiB");
    try {
      validate(spec, "control socket");
    } catch (const vsup::Error& e) {
      return KJ_EXCEPTION(FAILED, e.what());
    }
    return KJ_EXCEPTION(FAILED, "the root is already started");
  }
  kj::Promise<NodeStatus> status() override {
    NodeStatus root{"root", ::getpid(), NodeType::Supervisor, NodeState::Running, 1234, 0, {},
                    -1, {}};
    NodeStatus db{"db", 4242, NodeType::Worker, NodeState::Stopping, 99, 3,
                  {"draining", "2 in flight"}, 2, {}};
    root.children.push_back(db);
    return root;
  }
  kj::Promise<bool> shutdown(vsup::MonoNs, DeferralReporter reporter) override {
    if (vsup::fuzz::tracing()) std::fprintf(stderr, "shutdown(observer: %d)\n", bool(reporter));
    if (reporter) reporter("root/db", Deferral{"draining", "1 left"});
    return true;
  }
};

// The sockets this process has open, as "fd -> socket:[inode]" lines. Only sockets: libFuzzer
// itself opens pipes (its symbolizer) mid-run.
std::string openSockets() {
  std::string out;
  DIR* dir = ::opendir("/proc/self/fd");
  VSUP_ASSERT(dir != nullptr);
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    char target[256] = {};
    const std::string link = std::string("/proc/self/fd/") + e->d_name;
    if (::readlink(link.c_str(), target, sizeof target - 1) <= 0) continue;
    if (std::strncmp(target, "socket:", 7) == 0) {
      out += std::string(e->d_name) + " -> " + target + "\n";
    }
  }
  ::closedir(dir);
  return out;
}

// The loop, KJ and the control socket live for the whole fuzzing process (set up once: a new
// loop per input would measure setup, not the protocol). Never destroyed: the process exits.
struct Harness {
  uv_loop_t loop{};
  std::unique_ptr<vsup::ipc::KjOnUv> kj;
  std::string dir;
  std::unique_ptr<ControlSocket> control;
  FuzzRoot root;
  UvHandle<uv_timer_t> watchdog;
  std::string baselineSockets;

  Harness() {
    vsup::fuzz::quietLogs();
    VSUP_ASSERT(uv_loop_init(&loop) == 0);
    kj = std::make_unique<vsup::ipc::KjOnUv>(&loop);
    const char* tmp = std::getenv("TMPDIR");
    const std::string base = tmp != nullptr && *tmp == '/' ? tmp : "/tmp";
    removeStaleDirectories(base);
    dir = base + "/" + kDirPrefix + std::to_string(::getpid());
    VSUP_ASSERT(::mkdir(dir.c_str(), 0700) == 0, dir, std::strerror(errno));
    control = std::make_unique<ControlSocket>(&loop, dir + "/root.sock", root);
    watchdog = UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(&loop, t); });
    baselineSockets = openSockets();
    // The socket file and its directory go when the process ends normally; after a crash, the
    // next run removes them.
    std::atexit([] {
      if (instance != nullptr) removeDirectory(instance->dir);
    });
  }

  static constexpr const char* kDirPrefix = "vsup-fuzz-control-";

  static void removeDirectory(const std::string& path) {
    ::unlink((path + "/root.sock").c_str());
    ::rmdir(path.c_str());
  }

  // Directories of fuzzing processes that died (crashes abort, -fork workers are killed), and
  // one left by an earlier process with this pid.
  static void removeStaleDirectories(const std::string& base) {
    DIR* d = ::opendir(base.c_str());
    if (d == nullptr) return;
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (!name.starts_with(kDirPrefix)) continue;
      const long pid = std::atol(name.c_str() + std::strlen(kDirPrefix));
      const bool dead = pid == ::getpid() || (::kill(pid_t(pid), 0) != 0 && errno == ESRCH);
      if (pid > 0 && dead) removeDirectory(base + "/" + name);
    }
    ::closedir(d);
  }

  static Harness* instance;
};
Harness* Harness::instance = nullptr;

// The peer: a plain socket on the same loop, reading until the server closes its end.
struct Peer {
  OwnFd fd;
  UvHandle<uv_poll_t> poll;
  bool eof = false;
  size_t received = 0;

  Peer(uv_loop_t* loop, const std::string& path) {
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    VSUP_ASSERT(fd, std::strerror(errno));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    VSUP_ASSERT(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0,
                std::strerror(errno));
    poll = UvHandle<uv_poll_t>::make([&](uv_poll_t* p) { uv_poll_init(loop, p, fd.get()); });
    poll->data = this;
    uv_poll_start(poll.get(), UV_READABLE, [](uv_poll_t* p, int, int) {
      if (p->data != nullptr) static_cast<Peer*>(p->data)->drain();
    });
  }

  void drain() {
    char buf[64 * 1024];
    for (;;) {
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        received += size_t(n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      eof = true;  // EOF, or ECONNRESET: the server is done with us
      uv_poll_stop(poll.get());
      return;
    }
  }

  // Sends all of `data` unless the server closed; false once it did.
  bool send(uv_loop_t* loop, const uint8_t* data, size_t size) {
    while (size > 0) {
      ssize_t n = ::send(fd.get(), data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        data += n;
        size -= size_t(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        uv_run(loop, UV_RUN_NOWAIT);  // let the server read
      } else {
        return false;  // EPIPE / ECONNRESET: the server dropped the connection
      }
    }
    return true;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  if (Harness::instance == nullptr) Harness::instance = new Harness();
  Harness& h = *Harness::instance;
  const size_t piece = kPieces[data[0] % 8];
  ++data;
  --size;

  bool timedOut = false;
  h.watchdog->data = &timedOut;
  uv_timer_start(
      h.watchdog.get(), [](uv_timer_t* t) { *static_cast<bool*>(t->data) = true; }, kWatchdogMs,
      0);
  size_t answered = 0;
  {
    Peer peer(&h.loop, h.control->path());
    bool open = true;
    if (piece == 0) {
      open = peer.send(&h.loop, data, size);
    } else {
      for (size_t at = 0; open && at < size; at += piece) {
        open = peer.send(&h.loop, data + at, std::min(piece, size - at));
        uv_run(&h.loop, UV_RUN_NOWAIT);
      }
    }
    if (open) ::shutdown(peer.fd.get(), SHUT_WR);
    while (!peer.eof && !timedOut) uv_run(&h.loop, UV_RUN_ONCE);
    answered = peer.received;
    FUZZ_CHECK(!timedOut, "watchdog: the control socket did not close a connection whose peer "
                          "hung up");
  }
  uv_timer_stop(h.watchdog.get());
  if (vsup::fuzz::tracing()) std::fprintf(stderr, "the server answered %zu bytes\n", answered);
  // The peer is closed: let the server notice and tear its side down completely.
  uv_run(&h.loop, UV_RUN_DEFAULT);
  const std::string sockets = openSockets();
  FUZZ_CHECK(sockets == h.baselineSockets,
             "the control socket holds a connection after the peer hung up and the loop went "
             "idle; sockets now:\n" + sockets + "at the start:\n" + h.baselineSockets);
  return 0;
}
