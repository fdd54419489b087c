// Tests for ipc/rpc_link.h: the Node control protocol over a socketpair, in one process (two
// links on one KjOnUv) and across a fork()ed child that serves Node on its own loop.
#include "ipc/rpc_link.h"

#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <doctest/doctest.h>
#include <kj/debug.h>
#include <memory>
#include <string>

#include "base/clock.h"
#include "ipc/test_util.h"
#include "ipc/node.capnp.h"
#include "ipc/uv_kj.h"

namespace {

using vsup::testing::elapsedMs;
using vsup::testing::openFdCount;
using vsup::testing::TestLoop;

using vsup::OwnFd;
using vsup::ipc::KjOnUv;
using vsup::ipc::RpcLink;
using vsup::ipc::uvSleep;
namespace schema = vsup::ipc::schema;

struct Outcome {
  enum Kind { Resolved, Failed, TimedOut };
  Kind kind;
  kj::Exception::Type type = kj::Exception::Type::FAILED;
  std::string description;
  explicit Outcome(Kind k) : kind(k) {}
  Outcome(Kind k, kj::Exception::Type t, std::string d)
      : kind(k), type(t), description(std::move(d)) {}
};

// Waits at most `ms` for `promise` on the loop and says how it settled.
Outcome settle(kj::Promise<void> promise, uv_loop_t* loop, kj::WaitScope& ws, uint64_t ms) {
  return promise
      .then([]() { return Outcome{Outcome::Resolved}; },
            [](kj::Exception&& e) {
              return Outcome{Outcome::Failed, e.getType(), e.getDescription().cStr()};
            })
      .exclusiveJoin(uvSleep(loop, ms).then([]() { return Outcome{Outcome::TimedOut}; }))
      .wait(ws);
}

// A Node that answers status with a small fixed tree, counts pings, fails start, and holds
// shutdown forever (a call that stays in flight).
class TestNode final : public schema::Node::Server {
 public:
  int pings = 0;
  int shutdownCalls = 0;

 protected:
  kj::Promise<void> start(StartContext context) override {
    KJ_FAIL_REQUIRE("test node refuses to start", context.getParams().getSpec().getName());
  }
  kj::Promise<void> status(StatusContext context) override {
    auto s = context.getResults().initStatus();
    s.setName("root");
    s.setPid(::getpid());
    s.setType(schema::NodeStatus::Type::SUPERVISOR);
    s.setState(schema::NodeStatus::State::RUNNING);
    s.setInFlight(-1);
    auto children = s.initChildren(2);
    children[0].setName("sub");
    children[0].setType(schema::NodeStatus::Type::SUPERVISOR);
    auto leaves = children[0].initChildren(1);
    leaves[0].setName("leaf");
    leaves[0].setRestarts(3);
    leaves[0].initDeferral().setReason("draining");
    children[1].setName("worker");
    children[1].setPid(4242);
    return kj::READY_NOW;
  }
  kj::Promise<void> shutdown(ShutdownContext context) override {
    ++shutdownCalls;
    context.allowCancellation();
    return kj::NEVER_DONE;
  }
  kj::Promise<void> ping(PingContext) override {
    ++pings;
    return kj::READY_NOW;
  }
};

struct LinkPair {
  std::unique_ptr<RpcLink> server;
  std::unique_ptr<RpcLink> client;
  TestNode* node = nullptr;  // owned by the server's RPC system
};

LinkPair makePair(uv_loop_t* loop) {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  auto node = kj::heap<TestNode>();
  LinkPair p;
  p.node = node.get();
  p.server = RpcLink::serve(loop, OwnFd(sv[0]), schema::Node::Client(kj::mv(node)));
  p.client = RpcLink::connect(loop, OwnFd(sv[1]));
  return p;
}

// The child side of the cross-process tests: serve Node on `fd` until the peer goes away. Never
// returns into doctest.
[[noreturn]] void serveInChild(int fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  ::alarm(20);  // a backstop: this child must never outlive the test
  int rc = 0;
  try {
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) ::_exit(4);
    {
      KjOnUv kj(&loop);
      auto link = RpcLink::serve(&loop, OwnFd(fd), schema::Node::Client(kj::heap<TestNode>()));
      link->onDisconnect().wait(kj.waitScope());
    }
    uv_run(&loop, UV_RUN_NOWAIT);
    if (uv_loop_close(&loop) != 0) rc = 5;
  } catch (...) {
    rc = 3;
  }
  ::_exit(rc);
}

// A child process serving Node on one end of a socketpair; returns its pid and the other end.
// It forks before this process has a KJ loop: the child makes its own on a clean thread state.
std::pair<pid_t, int> forkNodeServer() {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(sv[0]);
    serveInChild(sv[1]);
  }
  ::close(sv[1]);
  return {child, sv[0]};
}

}  // namespace

TEST_CASE("status over an RpcLink returns the server's nested tree") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  auto links = makePair(loop.get());
  {
    auto node = links.client->bootstrap<schema::Node>();
    auto response = node.statusRequest().send().wait(ws);
    auto s = response.getStatus();
    CHECK(std::string(s.getName().cStr()) == "root");
    CHECK(s.getPid() == ::getpid());
    CHECK(s.getInFlight() == -1);
    REQUIRE(s.getChildren().size() == 2);
    auto sub = s.getChildren()[0];
    CHECK(std::string(sub.getName().cStr()) == "sub");
    REQUIRE(sub.getChildren().size() == 1);
    auto leaf = sub.getChildren()[0];
    CHECK(std::string(leaf.getName().cStr()) == "leaf");
    CHECK(leaf.getRestarts() == 3);
    CHECK(std::string(leaf.getDeferral().getReason().cStr()) == "draining");
    CHECK(s.getChildren()[1].getPid() == 4242);
    CHECK(s.getChildren()[1].getChildren().size() == 0);
  }
}

TEST_CASE("ping over an RpcLink reaches the server") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto links = makePair(loop.get());
  {
    auto node = links.client->bootstrap<schema::Node>();
    node.pingRequest().send().wait(kj.waitScope());
  }
  CHECK(links.node->pings == 1);
}

TEST_CASE("an exception thrown by the server reaches the caller with its message") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto links = makePair(loop.get());
  {
    auto node = links.client->bootstrap<schema::Node>();
    auto request = node.startRequest();
    request.initSpec().setName("db-pool");
    Outcome o = settle(request.send().ignoreResult(), loop.get(), kj.waitScope(), 2000);
    CHECK(o.kind == Outcome::Failed);
    CHECK(o.type == kj::Exception::Type::FAILED);
    CHECK(o.description.find("test node refuses to start") != std::string::npos);
    CHECK(o.description.find("db-pool") != std::string::npos);
    // The link survives a failed call.
    node.pingRequest().send().wait(kj.waitScope());
  }
  CHECK(links.node->pings == 1);
}

TEST_CASE("1000 sequential pings over one RpcLink all succeed") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto links = makePair(loop.get());
  auto start = vsup::monoNow();
  {
    auto node = links.client->bootstrap<schema::Node>();
    for (int i = 0; i < 1000; ++i) node.pingRequest().send().wait(kj.waitScope());
  }
  double ms = elapsedMs(start);
  MESSAGE("1000 sequential pings took ", ms, " ms");
  CHECK(links.node->pings == 1000);
  CHECK(ms < 10000.0);
}

TEST_CASE("a call in flight fails with DISCONNECTED when the server's link is destroyed") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  auto links = makePair(loop.get());
  {
    auto node = links.client->bootstrap<schema::Node>();
    auto inFlight = node.shutdownRequest().send().ignoreResult();
    // Calls on one capability are delivered in order: once ping returns, shutdown has arrived.
    node.pingRequest().send().wait(ws);
    REQUIRE(links.node->shutdownCalls == 1);
    links.server.reset();
    Outcome o = settle(kj::mv(inFlight), loop.get(), ws, 1000);
    CHECK(o.kind == Outcome::Failed);
    CHECK(o.type == kj::Exception::Type::DISCONNECTED);
    // A new call on the dead link fails the same way, promptly.
    Outcome later = settle(node.pingRequest().send().ignoreResult(), loop.get(), ws, 1000);
    CHECK(later.kind == Outcome::Failed);
    CHECK(later.type == kj::Exception::Type::DISCONNECTED);
  }
}

TEST_CASE("onDisconnect resolves on both ends when the other end's link is destroyed") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  SUBCASE("the server goes away") {
    auto links = makePair(loop.get());
    links.client->bootstrap<schema::Node>().pingRequest().send().wait(ws);
    auto gone = links.client->onDisconnect();
    CHECK(settle(links.client->onDisconnect(), loop.get(), ws, 50).kind == Outcome::TimedOut);
    links.server.reset();
    CHECK(settle(kj::mv(gone), loop.get(), ws, 1000).kind == Outcome::Resolved);
  }
  SUBCASE("the client goes away") {
    auto links = makePair(loop.get());
    links.client->bootstrap<schema::Node>().pingRequest().send().wait(ws);
    auto gone = links.server->onDisconnect();
    links.client.reset();
    CHECK(settle(kj::mv(gone), loop.get(), ws, 1000).kind == Outcome::Resolved);
  }
}

TEST_CASE("creating and destroying 200 RpcLink pairs keeps the fd count flat") {
  int before = openFdCount();
  {
    TestLoop loop;
    KjOnUv kj(loop.get());
    for (int i = 0; i < 200; ++i) {
      auto links = makePair(loop.get());
      {
        auto node = links.client->bootstrap<schema::Node>();
        node.pingRequest().send().wait(kj.waitScope());
      }
      links.client.reset();
      links.server.reset();
      kj.waitScope().poll();
    }
  }
  CHECK(openFdCount() == before);
}

TEST_CASE("a Node served by a forked child answers, and its death fails a pending call") {
  int before = openFdCount();
  auto [child, parentEnd] = forkNodeServer();
  bool childReaped = false;
  {
    TestLoop loop;
    KjOnUv kj(loop.get());
    auto& ws = kj.waitScope();
    auto link = RpcLink::connect(loop.get(), OwnFd(parentEnd));
    {
      auto node = link->bootstrap<schema::Node>();
      auto status = node.statusRequest().send().wait(ws);
      CHECK(status.getStatus().getPid() == child);
      node.pingRequest().send().wait(ws);

      auto inFlight = node.shutdownRequest().send().ignoreResult();
      auto disconnected = link->onDisconnect();
      node.pingRequest().send().wait(ws);  // shutdown has reached the child
      REQUIRE(::kill(child, SIGKILL) == 0);
      auto killedAt = vsup::monoNow();
      Outcome call = settle(kj::mv(inFlight), loop.get(), ws, 1000);
      CHECK(call.kind == Outcome::Failed);
      CHECK(call.type == kj::Exception::Type::DISCONNECTED);
      Outcome gone = settle(kj::mv(disconnected), loop.get(), ws, 1000);
      CHECK(gone.kind == Outcome::Resolved);
      CHECK(elapsedMs(killedAt) < 1000.0);
    }
  }
  int status = 0;
  childReaped = ::waitpid(child, &status, 0) == child;
  CHECK(childReaped);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  CHECK(openFdCount() == before);
}

TEST_CASE("a forked child serving Node exits cleanly when the parent closes its link") {
  auto [child, parentEnd] = forkNodeServer();
  {
    TestLoop loop;
    KjOnUv kj(loop.get());
    auto link = RpcLink::connect(loop.get(), OwnFd(parentEnd));
    for (int i = 0; i < 10; ++i) {
      link->bootstrap<schema::Node>().pingRequest().send().wait(kj.waitScope());
    }
  }
  // Bounded wait for the child's exit: its onDisconnect must fire on our close.
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 200 && r == 0; ++i) {
    r = ::waitpid(child, &status, WNOHANG);
    if (r == 0) ::usleep(10 * 1000);
  }
  if (r == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  REQUIRE_MESSAGE(r == child, "the child did not exit within 2 s of the link closing");
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
