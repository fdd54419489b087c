#include "workers/engine_core/step_executor.h"

#include <algorithm>

#include <kj/debug.h>

#include "ipc/user_message.h"
#include "workers/engine_codec.h"

namespace vsup::workers {

using ipc::failure;
namespace {

namespace schema = ipc::schema;

class RpcRank final : public RankClient {
 public:
  explicit RpcRank(schema::Worker::Client worker) : worker_(kj::mv(worker)) {}

  kj::Promise<engine::StepOutput> step(const engine::StepInput& input) override {
    auto request = worker_.stepRequest();
    encode(input, request.initInput());
    auto answer = request.send();
    // The previous step's answer is let go only now, so its Finish message follows this call
    // into the rank's socket instead of waking the rank on its own just after it answered.
    previous_ = nullptr;
    return answer.then([this](capnp::Response<schema::Worker::StepResults>&& r) {
      engine::StepOutput out = decode(r.getOutput());
      previous_ = kj::heap(kj::mv(r));
      return out;
    });
  }

 private:
  schema::Worker::Client worker_;
  kj::Own<capnp::Response<schema::Worker::StepResults>> previous_;  // the last step's answer
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
  MonoNs timeoutAt = 0;    // the step timeout
  MonoNs stragglerAt = 0;  // 0: not armed (no rank answered yet, or one rank only)
  size_t firstRank = 0;    // the first rank that answered
};

StepExecutor::StepExecutor(uv_loop_t* loop, std::vector<std::unique_ptr<RankClient>> ranks,
                           Options options)
    : loop_(loop), ranks_(std::move(ranks)), options_(options) {
  timer_ = UvHandle<uv_timer_t>::make([loop](uv_timer_t* t) { uv_timer_init(loop, t); });
  timer_->data = this;
}

StepExecutor::~StepExecutor() = default;  // the handle's close drops the callback (data = null)

void StepExecutor::arm(MonoNs at) {
  // From now, not from the loop's cached time (which may be a whole busy turn old: the bound
  // would then end early).
  uv_update_time(loop_);
  uint64_t ms = msUntil(at);
  uv_timer_start(
      timer_.get(),
      [](uv_timer_t* t) {
        if (t->data != nullptr) static_cast<StepExecutor*>(t->data)->timerFired();
      },
      ms, 0);
}

void StepExecutor::timerFired() {
  StepState* s = current_.get();
  if (s == nullptr) return;
  bool straggler = s->stragglerAt != 0 && s->stragglerAt <= s->timeoutAt;
  MonoNs due = straggler ? s->stragglerAt : s->timeoutAt;
  if (monoNow() < due) {  // libuv's millisecond clock can fire up to 1 ms early
    arm(due);
    return;
  }
  if (straggler) {
    std::string silent;
    for (size_t r = 0; r < s->answered.size(); ++r) {
      if (s->answered[r]) continue;
      silent += (silent.empty() ? "worker-tp" : ", worker-tp") + std::to_string(r);
    }
    if (silent.empty()) return;  // all answered: the step is completing
    fail(silent + " did not answer step " + std::to_string(s->step) + " within " +
         std::to_string(options_.stragglerMs) + " ms of worker-tp" +
         std::to_string(s->firstRank) + " (hung or stopped)");
    return;
  }
  fail("step " + std::to_string(s->step) + ": a rank did not answer within " +
       std::to_string(options_.stepTimeoutMs) + " ms");
}

kj::Promise<std::vector<engine::StepOutput>> StepExecutor::run(const engine::StepInput& input) {
  KJ_REQUIRE(!running_, "a step is already running");
  running_ = true;
  current_ = std::make_unique<StepState>();
  current_->step = input.step;
  current_->answered.assign(ranks_.size(), false);
  auto failFast = kj::newPromiseAndFulfiller<void>();
  current_->failFast = kj::mv(failFast.fulfiller);
  current_->timeoutAt = deadlineAfterMs(int64_t(options_.stepTimeoutMs));
  arm(current_->timeoutAt);
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
  return kj::joinPromises(calls.releaseAsArray())
      .exclusiveJoin(
          failFast.promise.then([]() -> kj::Array<engine::StepOutput> { KJ_UNREACHABLE; }))
      .then(
          [this](kj::Array<engine::StepOutput> outputs) {
            running_ = false;
            current_.reset();
            uv_timer_stop(timer_.get());
            return std::vector<engine::StepOutput>(std::make_move_iterator(outputs.begin()),
                                                   std::make_move_iterator(outputs.end()));
          },
          [this](kj::Exception&& e) -> std::vector<engine::StepOutput> {
            running_ = false;
            current_.reset();
            uv_timer_stop(timer_.get());
            kj::throwFatalException(kj::mv(e));
          });
}

void StepExecutor::rankAnswered(size_t rank) {
  StepState* s = current_.get();
  if (s == nullptr || rank >= s->answered.size()) return;
  bool first = std::none_of(s->answered.begin(), s->answered.end(), [](bool a) { return a; });
  s->answered[rank] = true;
  if (!first || ranks_.size() == 1) return;
  s->firstRank = rank;
  s->stragglerAt = deadlineAfterMs(options_.stragglerMs);
  // The timer keeps whichever bound comes first.
  if (s->stragglerAt <= s->timeoutAt) arm(s->stragglerAt);
}

void StepExecutor::fail(const std::string& why) {
  StepState* s = current_.get();
  if (s == nullptr || !s->failFast || !s->failFast->isWaiting()) return;
  s->failFast->reject(failure(why));
}

}  // namespace vsup::workers
