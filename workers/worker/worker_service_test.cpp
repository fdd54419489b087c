// The rank's Worker service over a real RPC link in this process, with a fake ModelRunner: what
// engine-core sees of a rank (its outputs, its failures, its finished KV transfers) and what
// tearing a rank down does to a step still computing.
#include "workers/worker/worker_service.h"

#include <sys/socket.h>

#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "ipc/rpc_link.h"
#include "ipc/test_util.h"
#include "ipc/uv_kj.h"
#include "workers/engine_codec.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;
using vsup::testing::TestLoop;

// Answers token = 100 + the step's first token; fails when told; blocks until cancel() when
// told (as a rank waiting for a dead peer in a collective would).
class FakeRunner final : public engine::ModelRunner {
 public:
  enum class Mode { Answer, Throw, BlockUntilCancel };
  explicit FakeRunner(Mode mode) : mode_(mode) {}

  engine::StepOutput execute(const engine::StepInput& input) override {
    ++calls;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ranOn_ = std::this_thread::get_id();
    }
    if (mode_ == Mode::Throw) throw std::runtime_error("collective: peer rank 1 died");
    if (mode_ == Mode::BlockUntilCancel) {
      std::unique_lock<std::mutex> lock(mutex_);
      entered = true;
      wake_.wait(lock, [this] { return cancelled_; });
      throw std::runtime_error("cancelled");
    }
    engine::StepOutput out;
    out.step = input.step;
    for (const auto& q : input.seqs) out.tokens.push_back(100 + (q.tokens.empty() ? 0 : q.tokens[0]));
    return out;
  }

  void cancel() override {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_ = true;
    wake_.notify_all();
  }

  std::thread::id ranOn() {  // the thread of the last execute()
    std::lock_guard<std::mutex> lock(mutex_);
    return ranOn_;
  }
  std::atomic<int> calls{0};
  std::atomic<bool> entered{false};

 private:
  Mode mode_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool cancelled_ = false;
  std::thread::id ranOn_;
};

// A KV connector whose transfers finish when the test says so.
class FakeKv final : public kv::KvConnectorWorker {
 public:
  std::vector<std::string> started;
  std::vector<std::string> finishNext;
  void startTransfer(const std::string& id, MonoNs) override { started.push_back(id); }
  size_t pending(MonoNs) override { return started.size() - done_; }
  MonoNs nextCompletion() const override { return kNoDeadline; }
  size_t completed() const override { return done_; }
  std::vector<std::string> takeFinished() override {
    done_ += finishNext.size();
    return std::exchange(finishNext, {});
  }

 private:
  size_t done_ = 0;
};

struct Rank {
  TestLoop loop;
  std::unique_ptr<ipc::KjOnUv> kj = std::make_unique<ipc::KjOnUv>(loop.get());
  std::unique_ptr<RankState> state;
  std::unique_ptr<ipc::RpcLink> server;
  std::unique_ptr<ipc::RpcLink> client;
  FakeRunner* runner = nullptr;
  FakeKv* kv = nullptr;

  Rank(FakeRunner::Mode mode, bool withKv = false) {
    std::unique_ptr<FakeKv> fakeKv;
    if (withKv) {
      fakeKv = std::make_unique<FakeKv>();
      kv = fakeKv.get();
    }
    state = std::make_unique<RankState>("worker-tp0", std::move(fakeKv));
    auto r = std::make_unique<FakeRunner>(mode);
    runner = r.get();
    state->setRunner(std::move(r));
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    server = ipc::RpcLink::serve(loop.get(), OwnFd(sv[0]), makeWorkerService(*state),
                                 ipc::dataReaderOptions());
    client = ipc::RpcLink::connect(loop.get(), OwnFd(sv[1]), ipc::dataReaderOptions());
  }
  ~Rank() {
    client.reset();
    server.reset();
    state.reset();
    kj.reset();
  }

  kj::Promise<engine::StepOutput> step(const engine::StepInput& in) {
    auto request = client->bootstrap<schema::Worker>().stepRequest();
    encode(in, request.initInput());
    return request.send().then(
        [](capnp::Response<schema::Worker::StepResults>&& r) { return decode(r.getOutput()); });
  }
};

engine::StepInput stepOf(uint64_t step, std::vector<int32_t> firstTokens) {
  engine::StepInput in;
  in.step = step;
  for (size_t i = 0; i < firstTokens.size(); ++i) {
    engine::SeqStep q;
    q.id = "r" + std::to_string(i);
    q.tokens = {firstTokens[i]};
    in.seqs.push_back(q);
  }
  return in;
}

TEST_CASE("a step runs on the runner and its output comes back to engine-core") {
  Rank rank(FakeRunner::Mode::Answer);
  engine::StepOutput out = rank.step(stepOf(7, {1, 2})).wait(rank.kj->waitScope());
  CHECK(out.step == 7);
  CHECK(out.tokens == std::vector<int32_t>{101, 102});
  CHECK(rank.runner->calls == 1);
}

TEST_CASE("steps compute on the compute thread, or on the loop thread when stepsOnLoop is set") {
  Rank rank(FakeRunner::Mode::Answer, true);
  engine::StepOutput out = rank.step(stepOf(1, {1})).wait(rank.kj->waitScope());
  CHECK(out.tokens == std::vector<int32_t>{101});
  CHECK(rank.runner->ranOn() != std::this_thread::get_id());

  rank.state->setStepsOnLoop(true);
  rank.kv->finishNext = {"a"};
  out = rank.step(stepOf(2, {4, 5})).wait(rank.kj->waitScope());
  CHECK(rank.runner->ranOn() == std::this_thread::get_id());
  // The same answer as from the compute thread, finished KV transfers included.
  CHECK(out.step == 2);
  CHECK(out.tokens == std::vector<int32_t>{104, 105});
  CHECK(out.kvDone == std::vector<std::string>{"a"});
  CHECK(rank.runner->calls == 2);
}

TEST_CASE("a runner that throws on the loop thread fails the step with its message") {
  Rank rank(FakeRunner::Mode::Throw);
  rank.state->setStepsOnLoop(true);
  std::string why;
  rank.step(stepOf(1, {1}))
      .then([](engine::StepOutput) {}, [&why](kj::Exception&& e) { why = e.getDescription().cStr(); })
      .wait(rank.kj->waitScope());
  CHECK(why.find("collective: peer rank 1 died") != std::string::npos);
  CHECK(rank.runner->ranOn() == std::this_thread::get_id());
}

TEST_CASE("a runner that throws fails the step with its message") {
  Rank rank(FakeRunner::Mode::Throw);
  std::string why;
  rank.step(stepOf(1, {1}))
      .then([](engine::StepOutput) {}, [&why](kj::Exception&& e) { why = e.getDescription().cStr(); })
      .wait(rank.kj->waitScope());
  CHECK(why.find("collective: peer rank 1 died") != std::string::npos);
}

TEST_CASE("announced KV transfers start on the connector and finished ones come back with a step") {
  Rank rank(FakeRunner::Mode::Answer, true);
  engine::StepInput in = stepOf(1, {1});
  in.kvTransfers = {{"a", {3, 4}}, {"b", {5}}};
  engine::StepOutput out = rank.step(in).wait(rank.kj->waitScope());
  CHECK(rank.kv->started == std::vector<std::string>{"a", "b"});
  CHECK(out.kvDone.empty());
  rank.kv->finishNext = {"b"};
  // A transfer-only step (no sequences) still reports what finished.
  out = rank.step(stepOf(2, {})).wait(rank.kj->waitScope());
  CHECK(out.tokens.empty());
  CHECK(out.kvDone == std::vector<std::string>{"b"});
}

TEST_CASE("engine-core's KV deadline is remembered from the step that announces it") {
  Rank rank(FakeRunner::Mode::Answer, true);
  engine::StepInput in = stepOf(1, {});
  in.kvGiveUpAtNs = 123456789;
  (void)rank.step(in).wait(rank.kj->waitScope());
  CHECK(rank.state->kvGiveUpAt == 123456789);
}

TEST_CASE("tearing a rank down cancels a step blocked in its runner, so the compute thread joins") {
  Rank rank(FakeRunner::Mode::BlockUntilCancel);
  auto pending = rank.step(stepOf(1, {1})).then([](engine::StepOutput) {}, [](kj::Exception&&) {});
  // Until the runner is inside execute(), there is nothing to cancel yet.
  MonoNs deadline = deadlineAfterMs(5000);
  while (!rank.runner->entered && monoNow() < deadline) {
    ipc::uvSleep(rank.loop.get(), 1).wait(rank.kj->waitScope());
  }
  REQUIRE(rank.runner->entered);
  MonoNs t0 = monoNow();
  rank.client.reset();
  rank.server.reset();
  rank.state.reset();  // cancel(), then join: returns only once execute() has returned
  CHECK(vsup::testing::elapsedMs(t0) < 2000);
}

TEST_CASE("a step before the runner is loaded is refused, not crashed on") {
  Rank rank(FakeRunner::Mode::Answer);
  rank.state->setRunner(nullptr);
  std::string why;
  rank.step(stepOf(1, {1}))
      .then([](engine::StepOutput) {}, [&why](kj::Exception&& e) { why = e.getDescription().cStr(); })
      .wait(rank.kj->waitScope());
  CHECK(why.find("before the rank finished loading") != std::string::npos);
}

}  // namespace
}  // namespace vsup::workers
