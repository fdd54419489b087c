// Tests for workers/engine_client.h against the in-process fake engine (fake_engine.h). One
// thread: each step waits on a KJ promise, which drives the uv loop (outside uv_run), bounded by
// a timeout so a broken case fails instead of hanging.
#include "workers/engine_client.h"

#include <capnp/message.h>
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "base/error.h"
#include "ipc/test_util.h"
#include "ipc/uv_kj.h"
#include "workers/api_server/fake_engine.h"
#include "workers/engine_codec.h"

namespace {

using vsup::engine::EngineStats;
using vsup::engine::FinishReason;
using vsup::engine::Histogram;
using vsup::engine::GenerateRequest;
using vsup::engine::Rejection;
using vsup::engine::RejectCode;
using vsup::engine::TokenDelta;
using vsup::testing::FakeEngine;
using vsup::testing::TestLoop;
using vsup::workers::EngineClient;

GenerateRequest request(const std::string& id) {
  GenerateRequest r;
  r.id = id;
  r.prompt = "hello";
  r.sampling.maxTokens = 8;
  return r;
}

// The client's callbacks, recorded; `changed` wakes a wait() after each one.
struct Recorder {
  std::vector<std::vector<TokenDelta>> batches;
  std::vector<std::string> failures;
  int disconnects = 0;
  kj::Own<kj::PromiseFulfiller<void>> changed;

  EngineClient::Callbacks callbacks() {
    EngineClient::Callbacks c;
    c.onDeltas = [this](const std::vector<TokenDelta>& d) {
      batches.push_back(d);
      poke();
    };
    c.onEngineFailed = [this](const std::string& r) {
      failures.push_back(r);
      poke();
    };
    c.onDisconnect = [this] {
      ++disconnects;
      poke();
    };
    return c;
  }
  void poke() {
    if (changed && changed->isWaiting()) changed->fulfill();
  }
  // Runs the loop until `pred` holds (false after 5 s).
  template <typename Pred>
  bool waitFor(uv_loop_t* loop, kj::WaitScope& ws, Pred pred) {
    vsup::MonoNs until = vsup::deadlineAfterMs(5000);
    while (!pred()) {
      if (vsup::monoNow() >= until) return false;
      auto paf = kj::newPromiseAndFulfiller<void>();
      changed = kj::mv(paf.fulfiller);
      kj::mv(paf.promise).exclusiveJoin(vsup::ipc::uvSleep(loop, vsup::msUntil(until))).wait(ws);
    }
    return true;
  }
  std::string text(const std::string& id) const {
    std::string out;
    for (const auto& b : batches) {
      for (const auto& d : b) {
        if (d.requestId == id) out += d.text;
      }
    }
    return out;
  }
  FinishReason finish(const std::string& id) const {
    for (const auto& b : batches) {
      for (const auto& d : b) {
        if (d.requestId == id && d.finish != FinishReason::None) return d.finish;
      }
    }
    return FinishReason::None;
  }
};

// The description a promise rejects with ("" when it resolves): what a caller would show.
template <typename T>
std::string failureOf(kj::Promise<T> promise, kj::WaitScope& ws) {
  try {
    promise.wait(ws);
  } catch (const kj::Exception& e) {
    return e.getDescription().cStr();
  }
  return "";
}

void checkSame(const Histogram& a, const Histogram& b) {
  CHECK(a.bounds == b.bounds);
  CHECK(a.counts == b.counts);
  CHECK(a.sum == b.sum);
  CHECK(a.count == b.count);
}

void checkSame(const EngineStats& a, const EngineStats& b) {
  CHECK(a.running == b.running);
  CHECK(a.waiting == b.waiting);
  CHECK(a.totalBlocks == b.totalBlocks);
  CHECK(a.freeBlocks == b.freeBlocks);
  CHECK(a.blockSize == b.blockSize);
  CHECK(a.promptTokens == b.promptTokens);
  CHECK(a.generationTokens == b.generationTokens);
  CHECK(a.preemptions == b.preemptions);
  CHECK(a.finishedStop == b.finishedStop);
  CHECK(a.finishedLength == b.finishedLength);
  CHECK(a.finishedAbort == b.finishedAbort);
  CHECK(a.finishedError == b.finishedError);
  checkSame(a.timeToFirstToken, b.timeToFirstToken);
  checkSame(a.interTokenLatency, b.interTokenLatency);
  checkSame(a.e2eLatency, b.e2eLatency);
  checkSame(a.queueTime, b.queueTime);
}

// Every field set, and different from every other one.
EngineStats sampleStats() {
  EngineStats s;
  s.running = 3;
  s.waiting = 4;
  s.totalBlocks = 500;
  s.freeBlocks = 120;
  s.blockSize = 16;
  s.promptTokens = 5000000000ull;  // past 32 bits
  s.generationTokens = 77;
  s.preemptions = 2;
  s.finishedStop = 11;
  s.finishedLength = 12;
  s.finishedAbort = 13;
  s.finishedError = 14;
  s.timeToFirstToken.observe(0.003);
  s.timeToFirstToken.observe(9000.0);  // +Inf bucket
  s.interTokenLatency.observe(0.02);
  s.e2eLatency.observe(1.5);
  s.queueTime.observe(0.25);
  s.queueTime.observe(0.3);
  return s;
}

struct Harness {
  TestLoop loop;
  vsup::ipc::KjOnUv kj{loop.get()};
  FakeEngine fake{loop.get()};
  Recorder rec;
  std::unique_ptr<EngineClient> client;

  Harness() { client = std::make_unique<EngineClient>(loop.get(), "[test]", rec.callbacks()); }
  ~Harness() {
    client.reset();
    fake.disconnect();
  }
  kj::WaitScope& ws() { return kj.waitScope(); }
  vsup::workers::EngineInfo connect() { return client->connect(fake.listen()).wait(ws()); }
};

}  // namespace

TEST_SUITE("unit") {

TEST_CASE("engine client: connect attaches and returns the model's context length and chat format") {
  Harness h;
  h.fake.maxModelLen = 64;
  h.fake.chatFormat = "llama3";
  auto info = h.connect();
  CHECK(info.maxModelLen == 64);
  CHECK(info.chatFormat == "llama3");
}

TEST_CASE("engine client: an accepted submit resolves to no rejection; its deltas arrive per batch") {
  Harness h;
  h.connect();
  CHECK_FALSE(h.client->submit(request("a")).wait(h.ws()).has_value());
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(),
                        [&] { return h.rec.finish("a") != FinishReason::None; }));
  CHECK(h.rec.text("a") == "Hello!");
  CHECK(h.rec.finish("a") == FinishReason::Stop);
  CHECK(h.rec.batches.size() == 3);  // one call per engine step
  CHECK(h.rec.batches.back().back().completionTokens == 3);
}

TEST_CASE("engine client: a rejection is a value with its code and message") {
  Harness h;
  h.fake.reject = [](const GenerateRequest&) -> std::optional<Rejection> {
    return Rejection{RejectCode::ContextLengthExceeded, "too long: 70 > 64"};
  };
  h.connect();
  auto r = h.client->submit(request("a")).wait(h.ws());
  REQUIRE(r.has_value());
  CHECK(r->code == RejectCode::ContextLengthExceeded);
  CHECK(r->message == "too long: 70 > 64");
}

TEST_CASE("engine client: a refused submit rejects the promise; so does one before connect") {
  Harness h;
  CHECK_THROWS_WITH_AS(h.client->submit(request("early")).wait(h.ws()),
                       doctest::Contains("not connected"), kj::Exception);
  h.connect();
  h.fake.refuse = true;
  // Exactly the engine's sentence: no "remote exception: " (it crossed an RPC) reaches the API
  // server's error body or vsup::LLM's caller.
  CHECK(failureOf(h.client->submit(request("a")), h.ws()) == "engine-core is stopping");
}

TEST_CASE("engine client: requests submitted in one turn go in one submitMany call, each "
          "answered in its own slot") {
  Harness h;
  h.fake.serveSubmitMany = true;
  h.fake.reject = [](const GenerateRequest& r) -> std::optional<Rejection> {
    if (r.id != "b") return std::nullopt;
    return Rejection{RejectCode::ContextLengthExceeded, "b is too long"};
  };
  h.connect();
  auto a = h.client->submit(request("a"));
  auto b = h.client->submit(request("b"));
  auto c = h.client->submit(request("c"));
  CHECK_FALSE(a.wait(h.ws()).has_value());
  auto rb = b.wait(h.ws());
  REQUIRE(rb.has_value());
  CHECK(rb->code == RejectCode::ContextLengthExceeded);
  CHECK(rb->message == "b is too long");
  CHECK_FALSE(c.wait(h.ws()).has_value());
  // The probe at connect (empty), then the three in one call; none went as a plain submit.
  CHECK(h.fake.log.submitManyCalls() == std::vector<size_t>{0, 3});
  CHECK(h.fake.log.submits() == std::vector<std::string>{"a", "b", "c"});
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(), [&] {
    return h.rec.finish("a") == FinishReason::Stop && h.rec.finish("c") == FinishReason::Stop;
  }));
  CHECK(h.rec.text("a") == "Hello!");
  CHECK(h.rec.text("c") == "Hello!");
  CHECK(h.rec.finish("b") == FinishReason::None);  // rejected: never played
  // One request alone in its turn: no batch of one.
  CHECK_FALSE(h.client->submit(request("d")).wait(h.ws()).has_value());
  CHECK(h.fake.log.submitManyCalls() == std::vector<size_t>{0, 3});
  CHECK(h.fake.log.submits().back() == "d");
}

TEST_CASE("engine client: a batch the engine refuses rejects every request with its sentence") {
  Harness h;
  h.fake.serveSubmitMany = true;
  h.connect();
  h.fake.refuse = true;
  auto a = h.client->submit(request("a"));
  auto b = h.client->submit(request("b"));
  CHECK(failureOf(kj::mv(a), h.ws()) == "engine-core is stopping");
  CHECK(failureOf(kj::mv(b), h.ws()) == "engine-core is stopping");
  CHECK(h.fake.log.submitManyCalls() == std::vector<size_t>{0, 2});
}

TEST_CASE("engine client: an engine without submitMany gets one submit per request of a turn") {
  Harness h;  // the fake answers submitMany UNIMPLEMENTED, as an engine that predates it
  h.connect();
  auto a = h.client->submit(request("a"));
  auto b = h.client->submit(request("b"));
  CHECK_FALSE(a.wait(h.ws()).has_value());
  CHECK_FALSE(b.wait(h.ws()).has_value());
  CHECK(h.fake.log.submitManyCalls().empty());
  CHECK(h.fake.log.submits() == std::vector<std::string>{"a", "b"});
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(), [&] {
    return h.rec.finish("a") == FinishReason::Stop && h.rec.finish("b") == FinishReason::Stop;
  }));
}

TEST_CASE("engine client: abort reaches the engine, and its final delta comes back") {
  Harness h;
  h.fake.script = {};  // held until aborted
  h.connect();
  h.client->abort("nobody");  // unknown ids are the engine's to ignore
  CHECK_FALSE(h.client->submit(request("a")).wait(h.ws()).has_value());
  h.client->abort("a");
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(),
                        [&] { return h.rec.finish("a") == FinishReason::Abort; }));
  auto aborts = h.fake.log.aborts();
  CHECK(aborts == std::vector<std::string>{"nobody", "a"});
}

TEST_CASE("engine client: engineFailed and a lost connection reach the callbacks; later submits "
          "reject") {
  Harness h;
  h.connect();
  h.fake.engineFailed("rank 1 died");
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(), [&] { return !h.rec.failures.empty(); }));
  CHECK(h.rec.failures == std::vector<std::string>{"rank 1 died"});
  CHECK(h.rec.disconnects == 0);
  h.fake.disconnect();
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(), [&] { return h.rec.disconnects > 0; }));
  CHECK(h.rec.disconnects == 1);
  CHECK_THROWS_AS(h.client->submit(request("late")).wait(h.ws()), kj::Exception);
}

TEST_CASE("engine client: destroying it calls no callback and leaves nothing open") {
  int before = vsup::testing::openFdCount();
  {
    Harness h;
    h.connect();
    CHECK_FALSE(h.client->submit(request("a")).wait(h.ws()).has_value());
    h.client.reset();
    // The engine's side sees the connection go; a few loop turns deliver that.
    h.fake.script = {};
    for (int i = 0; i < 5; ++i) vsup::ipc::uvSleep(h.loop.get(), 1).wait(h.ws());
    CHECK(h.rec.disconnects == 0);
  }
  CHECK(vsup::testing::openFdCount() == before);
}

TEST_CASE("engine codec: EngineStats round-trips every field and histogram bucket") {
  EngineStats in = sampleStats();
  capnp::MallocMessageBuilder message;
  vsup::workers::encode(in, message.initRoot<vsup::ipc::schema::EngineStats>());
  EngineStats out =
      vsup::workers::decode(message.getRoot<vsup::ipc::schema::EngineStats>().asReader());
  checkSame(out, in);
  CHECK(out.timeToFirstToken.counts.back() == 1);
  CHECK(out.queueTime.counts[0] == 2);  // 0.25 and 0.3 (le 0.3)
}

TEST_CASE("engine codec: unset histograms decode to vLLM's empty ones; malformed ones are "
          "refused with what was wrong") {
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<vsup::ipc::schema::EngineStats>().setRunning(1);
    EngineStats out =
        vsup::workers::decode(message.getRoot<vsup::ipc::schema::EngineStats>().asReader());
    CHECK(out.running == 1);
    checkSame(out.e2eLatency, Histogram(vsup::engine::requestLatencyBuckets()));
  }
  {
    capnp::MallocMessageBuilder message;
    auto h = message.initRoot<vsup::ipc::schema::Histogram>();
    h.initBounds(2);
    h.initCounts(2);
    CHECK_THROWS_WITH_AS(vsup::workers::decode(h.asReader()),
                         "engine stats: a histogram with 2 bucket counts for 2 bounds "
                         "(expected one count per bound, plus +Inf)",
                         vsup::Error);
  }
  {
    capnp::MallocMessageBuilder message;
    auto h = message.initRoot<vsup::ipc::schema::Histogram>();
    auto bounds = h.initBounds(2);
    bounds.set(0, 2.0);
    bounds.set(1, 1.0);
    h.initCounts(3);
    CHECK_THROWS_WITH_AS(vsup::workers::decode(h.asReader()),
                         doctest::Contains("bounds not strictly ascending"), vsup::Error);
  }
}

TEST_CASE("engine client: stats() returns what the engine answered, every field, over the RPC") {
  Harness h;
  h.connect();
  h.fake.stats = sampleStats();
  EngineStats got = h.client->stats().wait(h.ws());
  checkSame(got, sampleStats());
  CHECK(h.fake.log.statsCalls() == 1);
  // Asked again, it answers the engine's figures of that moment.
  h.fake.stats.finishedStop = 99;
  h.fake.stats.timeToFirstToken.observe(0.5);
  got = h.client->stats().wait(h.ws());
  CHECK(got.finishedStop == 99);
  CHECK(got.timeToFirstToken.count == 3);
  CHECK(h.fake.log.statsCalls() == 2);
}

TEST_CASE("engine client: stats() rejects before connect, when the engine fails it, and once the "
          "connection is gone") {
  Harness h;
  CHECK_THROWS_WITH_AS(h.client->stats().wait(h.ws()), doctest::Contains("not connected"),
                       kj::Exception);
  h.connect();
  h.fake.statsFail = true;
  CHECK(failureOf(h.client->stats(), h.ws()) == "the engine cannot report its stats");
  h.fake.disconnect();
  REQUIRE(h.rec.waitFor(h.loop.get(), h.ws(), [&] { return h.rec.disconnects > 0; }));
  CHECK_THROWS_AS(h.client->stats().wait(h.ws()), kj::Exception);
}

}  // TEST_SUITE
