#include "workers/engine_core/step_executor.h"

#include <algorithm>

#include <kj/debug.h>

#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "workers/engine_codec.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;

kj::Exception failed(const std::string& why) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(why.c_str()));
}

class RpcRank final : public RankClient {
 public:
  explicit RpcRank(schema::Worker::Client worker) : worker_(kj::mv(worker)) {}

  kj::Promise<engine::StepOutput> step(const engine::StepInput& input) override {
    auto request = worker_.stepRequest();
    encode(input, request.initInput());
    return request.send().then(
        [](capnp::Response<schema::Worker::StepResults>&& r) { return decode(r.getOutput()); });
  }

 private:
  schema::Worker::Client worker_;
};

}  // namespace

std::unique_ptr<RankClient> makeRpcRank(schema::Worker::Client worker) {
  return std::make_unique<RpcRank>(kj::mv(worker));
}

// One step in flight. Destroying it cancels whatever is still pending.
struct StepExecutor::StepState {
  uint64_t step = 0;
  std::vector<bool> answered;
  kj::Own<kj::PromiseFulfiller<void>> failFast;
  kj::Promise<void> straggler = kj::READY_NOW;
};

StepExecutor::StepExecutor(uv_loop_t* loop, std::vector<std::unique_ptr<RankClient>> ranks,
                           Options options)
    : loop_(loop), ranks_(std::move(ranks)), options_(options) {}

StepExecutor::~StepExecutor() = default;

kj::Promise<std::vector<engine::StepOutput>> StepExecutor::run(const engine::StepInput& input) {
  KJ_REQUIRE(!running_, "a step is already running");
  running_ = true;
  current_ = std::make_unique<StepState>();
  current_->step = input.step;
  current_->answered.assign(ranks_.size(), false);
  auto failFast = kj::newPromiseAndFulfiller<void>();
  current_->failFast = kj::mv(failFast.fulfiller);
  kj::Vector<kj::Promise<engine::StepOutput>> calls;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    calls.add(ranks_[r]
                  ->step(input)
                  .then(
                      [this, r](engine::StepOutput out) {
                        rankAnswered(r);
                        return out;
                      },
                      [this, r](kj::Exception&& e) -> engine::StepOutput {
                        fail("worker-tp" + std::to_string(r) +
                             (e.getType() == kj::Exception::Type::DISCONNECTED
                                  ? std::string(" disconnected (the process died)")
                                  : std::string(": ") + ipc::userMessage(e)));
                        kj::throwFatalException(kj::mv(e));
                      })
                  // Now, not when joinPromises collects every branch (KJ runs a .then()
                  // callback lazily): the fail-fast and straggler checks need it at once.
                  .eagerlyEvaluate(nullptr));
  }
  uint64_t step = input.step;
  auto all = kj::joinPromises(calls.releaseAsArray())
                 .exclusiveJoin(failFast.promise.then(
                     []() -> kj::Array<engine::StepOutput> { KJ_UNREACHABLE; }));
  auto timeout = ipc::uvSleep(loop_, options_.stepTimeoutMs)
                     .then([this, step]() -> kj::Array<engine::StepOutput> {
                       kj::throwFatalException(failed(
                           "step " + std::to_string(step) + ": a rank did not answer within " +
                           std::to_string(options_.stepTimeoutMs) + " ms"));
                     });
  return all.exclusiveJoin(kj::mv(timeout))
      .then(
          [this](kj::Array<engine::StepOutput> outputs) {
            running_ = false;
            current_.reset();
            return std::vector<engine::StepOutput>(std::make_move_iterator(outputs.begin()),
                                                   std::make_move_iterator(outputs.end()));
          },
          [this](kj::Exception&& e) -> std::vector<engine::StepOutput> {
            running_ = false;
            current_.reset();
            kj::throwFatalException(kj::mv(e));
          });
}

void StepExecutor::rankAnswered(size_t rank) {
  StepState* s = current_.get();
  if (s == nullptr || rank >= s->answered.size()) return;
  bool first = std::none_of(s->answered.begin(), s->answered.end(), [](bool a) { return a; });
  s->answered[rank] = true;
  if (!first || ranks_.size() == 1) return;
  int64_t bound = options_.stragglerMs;
  s->straggler = ipc::uvSleep(loop_, uint64_t(bound))
                     .then([this, rank, bound]() {
                       StepState* s = current_.get();
                       if (s == nullptr) return;
                       std::string silent;
                       for (size_t r = 0; r < s->answered.size(); ++r) {
                         if (s->answered[r]) continue;
                         silent += (silent.empty() ? "worker-tp" : ", worker-tp") + std::to_string(r);
                       }
                       if (silent.empty()) return;
                       fail(silent + " did not answer step " + std::to_string(s->step) +
                            " within " + std::to_string(bound) + " ms of worker-tp" +
                            std::to_string(rank) + " (hung or stopped)");
                     })
                     .eagerlyEvaluate(nullptr);
}

void StepExecutor::fail(const std::string& why) {
  StepState* s = current_.get();
  if (s == nullptr || !s->failFast || !s->failFast->isWaiting()) return;
  s->failFast->reject(failed(why));
}

}  // namespace vsup::workers
