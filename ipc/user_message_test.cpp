// Tests for ipc/user_message.h: real KJ exceptions (KJ_REQUIRE, KJ_FAIL_REQUIRE with an
// expression argument, a std::exception thrown inside a promise) and real RPC crossings (one
// hop, and two hops through a forwarding server) come out as the sentence that was written.
#include "ipc/user_message.h"

#include <sys/socket.h>

#include <doctest/doctest.h>
#include <kj/debug.h>
#include <memory>
#include <stdexcept>
#include <string>

#include "ipc/node.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/test_util.h"
#include "ipc/uv_kj.h"

namespace {

using vsup::OwnFd;
using vsup::ipc::KjOnUv;
using vsup::ipc::RpcLink;
using vsup::ipc::userMessage;
using vsup::testing::TestLoop;
namespace schema = vsup::ipc::schema;

kj::Exception caught(void (*thrower)()) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions(thrower)) { return kj::mv(*e); }
  FAIL("the thrower did not throw");
  return KJ_EXCEPTION(FAILED, "unreachable");
}

kj::Exception takeOrFail(kj::Maybe<kj::Exception>& failure) {
  KJ_IF_MAYBE(e, failure) { return kj::mv(*e); }
  FAIL("nothing failed");
  return KJ_EXCEPTION(FAILED, "unreachable");
}

bool has(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

// A Node whose start fails as a node's start does: KJ_REQUIRE on bad input, naming it.
class RefusingNode final : public schema::Node::Server {
 protected:
  kj::Promise<void> start(StartContext context) override {
    std::string name = context.getParams().getSpec().getName();
    KJ_REQUIRE(name.size() < 3, "the node name is too long", name);
    return kj::READY_NOW;
  }
};

// A Node that forwards start to another Node (a parent asking its child), so the failure
// crosses two RPC hops.
class ForwardingNode final : public schema::Node::Server {
 public:
  explicit ForwardingNode(schema::Node::Client next) : next_(kj::mv(next)) {}

 protected:
  kj::Promise<void> start(StartContext context) override {
    auto request = next_.startRequest();
    request.setSpec(context.getParams().getSpec());
    return request.send().ignoreResult();
  }

 private:
  schema::Node::Client next_;
};

std::pair<std::unique_ptr<RpcLink>, std::unique_ptr<RpcLink>> link(uv_loop_t* loop,
                                                                    capnp::Capability::Client s) {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  auto server = RpcLink::serve(loop, OwnFd(sv[0]), kj::mv(s));
  auto client = RpcLink::connect(loop, OwnFd(sv[1]));
  return {std::move(server), std::move(client)};
}

}  // namespace

TEST_CASE("userMessage: KJ_REQUIRE's condition and argument names are removed") {
  kj::Exception e = caught([]() {
    int tokens = 5;
    KJ_REQUIRE(tokens < 4, "too many stop strings", tokens);
  });
  std::string raw = e.getDescription().cStr();
  MESSAGE("KJ_REQUIRE renders: ", raw);
  CHECK(has(raw, "expected "));  // what is being removed really is there
  CHECK(userMessage(e) == "too many stop strings: 5");
}

TEST_CASE("userMessage: KJ_FAIL_REQUIRE with e.what() reads as one sentence") {
  kj::Exception e = caught([]() {
    std::runtime_error inner("block 7 is out of range");
    const std::exception& e = inner;
    KJ_FAIL_REQUIRE("the engine's stats are malformed", e.what());
  });
  std::string raw = e.getDescription().cStr();
  MESSAGE("KJ_FAIL_REQUIRE renders: ", raw);
  CHECK(has(raw, "e.what() = "));
  CHECK(userMessage(e) == "the engine's stats are malformed: block 7 is out of range");
}

TEST_CASE("userMessage: a std::exception thrown inside a promise keeps only its what()") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  kj::Promise<void> p = kj::Promise<void>(kj::READY_NOW).then([]() {
    throw std::invalid_argument("'top_p' must be a number greater than 0 and at most 1, got 2");
  });
  kj::Maybe<kj::Exception> failure;
  p.then([]() { FAIL("did not throw"); }, [&](kj::Exception&& x) { failure = kj::mv(x); })
      .wait(kj.waitScope());
  kj::Exception e = takeOrFail(failure);
  MESSAGE("a std::exception in a promise renders: ", std::string(e.getDescription().cStr()));
  CHECK(userMessage(e) == "'top_p' must be a number greater than 0 and at most 1, got 2");
}

TEST_CASE("userMessage: one and two RPC hops leave no 'remote exception' behind") {
  TestLoop loop;
  KjOnUv kj(loop.get());
  auto& ws = kj.waitScope();
  auto [leafServer, leafClient] = link(loop.get(), kj::heap<RefusingNode>());
  auto [midServer, midClient] = link(
      loop.get(), kj::heap<ForwardingNode>(leafClient->bootstrap<schema::Node>()));

  auto failureOf = [&](schema::Node::Client node) {
    auto request = node.startRequest();
    request.initSpec().setName("engine-core");
    kj::Maybe<kj::Exception> failure;
    request.send().ignoreResult().then(
        []() { FAIL("start succeeded"); }, [&](kj::Exception&& x) { failure = kj::mv(x); })
        .wait(ws);
    return takeOrFail(failure);
  };
  {
    kj::Exception one = failureOf(leafClient->bootstrap<schema::Node>());
    std::string raw = one.getDescription().cStr();
    MESSAGE("one hop: ", raw);
    CHECK(has(raw, "remote exception: "));
    CHECK(userMessage(one) == "the node name is too long: engine-core");
  }
  {
    kj::Exception two = failureOf(midClient->bootstrap<schema::Node>());
    std::string raw = two.getDescription().cStr();
    MESSAGE("two hops: ", raw);
    CHECK(has(raw, "remote exception: remote exception: "));
    CHECK(userMessage(two) == "the node name is too long: engine-core");
  }
}

TEST_CASE("userMessage on text: prefixes in the middle, locations, stacks") {
  CHECK(userMessage("vsup::LLM: the engine did not start: remote exception: remote exception: "
                    "worker-tp1 exited with code 3") ==
        "vsup::LLM: the engine did not start: worker-tp1 exited with code 3");
  CHECK(userMessage("supervisor/supervisor.cpp:206: failed: remote exception: "
                    "engine-core: bad model") == "engine-core: bad model");
  CHECK(userMessage("(remote):0: failed: remote exception: no such model") == "no such model");
  CHECK(userMessage("ipc/rpc_link.cpp:40: disconnected: peer closed; stack: 7f12 7f3a") ==
        "peer closed");
  CHECK(userMessage("engine refused the request: remote exception: expected !stopping_; "
                    "engine-core is shutting down") ==
        "engine refused the request: engine-core is shutting down");
}

TEST_CASE("userMessage leaves a person's sentences alone") {
  // Words that look like KJ's decorations but are prose.
  CHECK(userMessage("expected 3 tokens; got 2") == "expected 3 tokens; got 2");
  CHECK(userMessage("x = 3 is not allowed") == "x = 3 is not allowed");
  CHECK(userMessage("'stop' must be a non-empty string, got \"\"") ==
        "'stop' must be a non-empty string, got \"\"");
  CHECK(userMessage("model: /models/llama-3.cpp:7b is missing") ==
        "model: /models/llama-3.cpp:7b is missing");
  CHECK(userMessage("") == "");
  CHECK(userMessage(KJ_EXCEPTION(DISCONNECTED, "")) == "the connection was lost");
}
