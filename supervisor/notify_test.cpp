// Tests for supervisor/notify.h: the systemd notify message parser, and the abstract-namespace
// socket that attributes each datagram to its sender's kernel-checked pid.
#include "supervisor/notify.h"

#include <dirent.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <doctest/doctest.h>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "base/fd.h"
#include "ipc/test_util.h"
#include "ipc/uv_handle.h"

namespace {

using vsup::testing::elapsedMs;
using vsup::testing::openFdCount;
using vsup::testing::TestLoop;

using vsup::supervisor::NotifyMessage;
using vsup::supervisor::NotifySocket;

// Sends `text` as one datagram to a $NOTIFY_SOCKET-style address ("@name" is abstract).
bool sendNotify(const std::string& address, const std::string& text) {
  vsup::OwnFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (address.size() >= sizeof addr.sun_path) return false;
  std::memcpy(addr.sun_path, address.data(), address.size());
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';
  auto len = socklen_t(offsetof(sockaddr_un, sun_path) + address.size());
  return ::sendto(fd.get(), text.data(), text.size(), MSG_NOSIGNAL,
                  reinterpret_cast<sockaddr*>(&addr), len) == ssize_t(text.size());
}

struct Received {
  pid_t sender;
  NotifyMessage message;
};

// Runs the loop until `count` datagrams arrived or 2 s passed (the notify socket alone does not
// keep a loop alive, so a guard timer does, and is stopped when enough has arrived).
void runUntil(uv_loop_t* loop, const std::vector<Received>& got, size_t count,
              vsup::UvHandle<uv_timer_t>& guard) {
  guard = vsup::UvHandle<uv_timer_t>::make([&](uv_timer_t* t) { uv_timer_init(loop, t); });
  uv_timer_start(guard.get(), [](uv_timer_t* t) { uv_stop(t->loop); }, 2000, 0);
  while (got.size() < count) {
    if (uv_run(loop, UV_RUN_ONCE) == 0) break;
    if (!uv_is_active(reinterpret_cast<uv_handle_t*>(guard.get()))) break;  // timed out
  }
  guard.reset();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// NotifyMessage::parse

TEST_CASE("READY=1 is parsed") {
  auto m = NotifyMessage::parse("READY=1");
  CHECK(m.ready);
  CHECK_FALSE(m.stopping);
  CHECK(m.status.empty());
  CHECK(m.extendTimeoutUs == -1);
}

TEST_CASE("STOPPING=1 is parsed") {
  auto m = NotifyMessage::parse("STOPPING=1\n");
  CHECK(m.stopping);
  CHECK_FALSE(m.ready);
}

TEST_CASE("STATUS keeps the whole text after the first '='") {
  CHECK(NotifyMessage::parse("STATUS=loading model: 50% (a=b)").status ==
        "loading model: 50% (a=b)");
  CHECK(NotifyMessage::parse("STATUS=").status.empty());
}

TEST_CASE("EXTEND_TIMEOUT_USEC is parsed as microseconds") {
  CHECK(NotifyMessage::parse("EXTEND_TIMEOUT_USEC=5000000").extendTimeoutUs == 5000000);
  CHECK(NotifyMessage::parse("EXTEND_TIMEOUT_USEC=0").extendTimeoutUs == 0);
}

TEST_CASE("a multi-line datagram sets every field it names") {
  auto m = NotifyMessage::parse("STATUS=warming up\nEXTEND_TIMEOUT_USEC=250000\nREADY=1\n");
  CHECK(m.ready);
  CHECK(m.status == "warming up");
  CHECK(m.extendTimeoutUs == 250000);
  CHECK_FALSE(m.stopping);
}

TEST_CASE("garbage and malformed values are ignored") {
  auto m = NotifyMessage::parse(
      "FOO=bar\nREADY=0\nREADY=1x\nready=1\n READY=1\nEXTEND_TIMEOUT_USEC=abc\n"
      "EXTEND_TIMEOUT_USEC=-5\nEXTEND_TIMEOUT_USEC=12x\nEXTEND_TIMEOUT_USEC=\n\n\x01\xff");
  CHECK_FALSE(m.ready);
  CHECK_FALSE(m.stopping);
  CHECK(m.status.empty());
  CHECK(m.extendTimeoutUs == -1);
  auto empty = NotifyMessage::parse("");
  CHECK_FALSE(empty.ready);
  CHECK(empty.extendTimeoutUs == -1);
}

TEST_CASE("a valid line among garbage still counts") {
  auto m = NotifyMessage::parse("MAINPID=1\nnonsense\nREADY=1\nWATCHDOG=1");
  CHECK(m.ready);
}

// ---------------------------------------------------------------------------------------------
// NotifySocket

TEST_CASE("the notify address is abstract: it starts with '@' and no file is created") {
  TestLoop loop;
  std::string address;
  {
    NotifySocket socket(loop.get(), [](pid_t, const NotifyMessage&) {});
    address = socket.address();
    REQUIRE(address.size() > 1);
    CHECK(address[0] == '@');
    struct stat st;
    CHECK(::stat(address.c_str(), &st) < 0);
    CHECK(::stat(address.substr(1).c_str(), &st) < 0);
    // The kernel lists it among the abstract Unix sockets ("@name" in /proc/net/unix).
    std::ifstream unix("/proc/net/unix");
    std::string line;
    bool listed = false;
    while (std::getline(unix, line)) {
      if (line.size() >= address.size() &&
          line.compare(line.size() - address.size(), address.size(), address) == 0) {
        listed = true;
      }
    }
    CHECK(listed);
  }
}

TEST_CASE("two notify sockets in one process have different addresses") {
  TestLoop loop;
  NotifySocket a(loop.get(), [](pid_t, const NotifyMessage&) {});
  NotifySocket b(loop.get(), [](pid_t, const NotifyMessage&) {});
  CHECK(a.address() != b.address());
}

TEST_CASE("a datagram sent from this process is delivered with sender == getpid()") {
  int fdsBefore = openFdCount();
  {
    TestLoop loop;
    std::vector<Received> got;
    vsup::UvHandle<uv_timer_t> guard;
    {
      NotifySocket socket(loop.get(),
                          [&](pid_t sender, const NotifyMessage& m) { got.push_back({sender, m}); });
      REQUIRE(sendNotify(socket.address(), "READY=1\nSTATUS=up"));
      runUntil(loop.get(), got, 1, guard);
    }
    REQUIRE(got.size() == 1);
    CHECK(got[0].sender == ::getpid());
    CHECK(got[0].message.ready);
    CHECK(got[0].message.status == "up");
  }
  CHECK(openFdCount() == fdsBefore);
}

TEST_CASE("several datagrams queued before the loop runs are all delivered, in order") {
  TestLoop loop;
  std::vector<Received> got;
  vsup::UvHandle<uv_timer_t> guard;
  {
    NotifySocket socket(loop.get(),
                        [&](pid_t sender, const NotifyMessage& m) { got.push_back({sender, m}); });
    REQUIRE(sendNotify(socket.address(), "STATUS=one"));
    REQUIRE(sendNotify(socket.address(), "STATUS=two"));
    REQUIRE(sendNotify(socket.address(), "READY=1"));
    runUntil(loop.get(), got, 3, guard);
  }
  REQUIRE(got.size() == 3);
  CHECK(got[0].message.status == "one");
  CHECK(got[1].message.status == "two");
  CHECK(got[2].message.ready);
}

TEST_CASE("a datagram from a forked child is attributed to the child's pid") {
  TestLoop loop;
  std::vector<Received> got;
  vsup::UvHandle<uv_timer_t> guard;
  pid_t child = -1;
  {
    NotifySocket socket(loop.get(),
                        [&](pid_t sender, const NotifyMessage& m) { got.push_back({sender, m}); });
    std::string address = socket.address();
    child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) ::_exit(sendNotify(address, "READY=1") ? 0 : 1);
    runUntil(loop.get(), got, 1, guard);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  REQUIRE(got.size() == 1);
  CHECK(got[0].sender == child);
  CHECK(got[0].sender != ::getpid());
  CHECK(got[0].message.ready);
}

TEST_CASE("a handler that throws does not stop later datagrams") {
  TestLoop loop;
  std::vector<Received> got;
  vsup::UvHandle<uv_timer_t> guard;
  {
    bool first = true;
    NotifySocket socket(loop.get(), [&](pid_t sender, const NotifyMessage& m) {
      got.push_back({sender, m});
      if (std::exchange(first, false)) throw std::runtime_error("handler failed");
    });
    REQUIRE(sendNotify(socket.address(), "STATUS=first"));
    REQUIRE(sendNotify(socket.address(), "STATUS=second"));
    runUntil(loop.get(), got, 2, guard);
  }
  REQUIRE(got.size() == 2);
  CHECK(got[1].message.status == "second");
}

TEST_CASE("a NotifySocket does not keep the loop alive") {
  TestLoop loop;
  NotifySocket socket(loop.get(), [](pid_t, const NotifyMessage&) {});
  CHECK(uv_run(loop.get(), UV_RUN_NOWAIT) == 0);
}

TEST_CASE("the address is refused once the NotifySocket is destroyed") {
  TestLoop loop;
  std::string address;
  {
    NotifySocket socket(loop.get(), [](pid_t, const NotifyMessage&) {});
    address = socket.address();
  }
  uv_run(loop.get(), UV_RUN_NOWAIT);
  CHECK_FALSE(sendNotify(address, "READY=1"));
}
