#include "workers/worker/worker_service.h"

#include <algorithm>

#include <kj/debug.h>

#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/fault_injection.h"
#include "workers/engine_codec.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;

// A step's answer: the runner's output and the KV transfers finished by now.
void answer(capnp::CallContext<schema::Worker::StepParams, schema::Worker::StepResults>& context,
            RankState& state, engine::StepOutput output) {
  if (kv::KvConnectorWorker* kv = state.kv()) {
    kv->pending(monoNow());  // retires what has finished by now
    output.kvDone = kv->takeFinished();
  }
  encode(output, context.getResults().initOutput());
}

class WorkerService final : public schema::Worker::Server {
 public:
  explicit WorkerService(RankState& state) : state_(state) {}

 protected:
  kj::Promise<void> step(StepContext context) override {
    engine::StepInput input = decode(context.getParams().getInput());
    supervisor::crashIfInjected(state_.node(), "step" + std::to_string(input.step));
    if (kv::KvConnectorWorker* kv = state_.kv()) {
      for (const auto& t : input.kvTransfers) kv->startTransfer(t.requestId, monoNow());
    }
    if (input.kvGiveUpAtNs != 0) state_.kvGiveUpAt = input.kvGiveUpAtNs;
    engine::ModelRunner* runner = state_.runner();
    KJ_REQUIRE(runner != nullptr, "step before the rank finished loading");
    RankState* state = &state_;
    uint64_t step = input.step;
    if (state_.stepsOnLoop()) {
      // No hop: the answer goes out from this very dispatch.
      try {
        answer(context, state_, runner->execute(input));
        return kj::READY_NOW;
      } catch (const std::exception& e) {
        vsup::log().error("[engine] {}: step {} failed: {}", state_.node(), step, e.what());
        return KJ_EXCEPTION(FAILED, e.what());
      }
    }
    return state_.compute()
        .run<engine::StepOutput>([runner, input = std::move(input)]() {
          return runner->execute(input);
        })
        .then(
            [context, state](engine::StepOutput output) mutable {
              answer(context, *state, std::move(output));
            },
            [node = state_.node(), step](kj::Exception&& e) {
              vsup::log().error("[engine] {}: step {} failed: {}", node, step,
                                ipc::userMessage(e));
              kj::throwFatalException(kj::mv(e));
            });
  }

  kj::Promise<void> collectiveAddress(CollectiveAddressContext context) override {
    engine::CrossNodeCollective* c = state_.crossNode();
    KJ_REQUIRE(c != nullptr, "this rank has no peers on other nodes (one node)");
    const std::vector<char>& a = c->address();
    context.getResults().setAddress(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(a.data()), a.size()));
    return kj::READY_NOW;
  }

  kj::Promise<void> joinCollective(JoinCollectiveContext context) override {
    engine::CrossNodeCollective* c = state_.crossNode();
    KJ_REQUIRE(c != nullptr, "this rank has no peers on other nodes (one node)");
    std::vector<std::vector<char>> table;
    for (capnp::Data::Reader d : context.getParams().getAddresses()) {
      table.emplace_back(reinterpret_cast<const char*>(d.begin()),
                         reinterpret_cast<const char*>(d.end()));
    }
    // Connecting blocks (until every peer's connection is up, or the timeout): off the loop.
    return state_.compute()
        .run<bool>([c, table = std::move(table)]() {
          c->connect(table);
          return true;
        })
        .then([node = state_.node()](bool) {
          vsup::log().info("[engine] {}: connected to its peers on other nodes", node);
        });
  }

 private:
  RankState& state_;
};

kj::Promise<void> drainFrom(uv_loop_t* loop, RankState& state, supervisor::ShutdownContext& ctx,
                            MonoNs giveUpAt, size_t total) {
  kv::KvConnectorWorker& kv = *state.kv();
  MonoNs now = monoNow();
  size_t pending = kv.pending(now);
  if (pending == 0) {
    if (total > 0) {
      vsup::log().info("[shutdown] {}: kv: all {} transfer(s) done", state.node(), total);
    }
    return kj::READY_NOW;
  }
  if (now >= giveUpAt) {
    vsup::log().warn("[shutdown] {}: kv: giving up: {} transfer(s) abandoned", state.node(),
                     pending);
    return kj::READY_NOW;
  }
  ctx.defer("kv: " + std::to_string(pending) + " transfer(s) pending",
            std::to_string(total - pending) + " of " + std::to_string(total) + " done");
  MonoNs wakeAt = std::min({kv.nextCompletion(), giveUpAt, now + 100 * kNsPerMs});
  return ipc::uvSleep(loop, msUntil(wakeAt)).then([loop, &state, &ctx, giveUpAt, total]() {
    return drainFrom(loop, state, ctx, giveUpAt, total);
  });
}

}  // namespace

RankState::RankState(std::string node, std::unique_ptr<kv::KvConnectorWorker> kv)
    : node_(std::move(node)), kv_(std::move(kv)), compute_(std::make_unique<ComputeThread>()) {}

RankState::~RankState() {
  if (runner_) runner_->cancel();
  compute_.reset();
}

kj::Own<schema::Worker::Server> makeWorkerService(RankState& state) {
  return kj::heap<WorkerService>(state);
}

kj::Promise<void> drainKvTransfers(uv_loop_t* loop, RankState& state,
                                   supervisor::ShutdownContext& ctx, MonoNs giveUpAt) {
  if (state.kv() == nullptr) return kj::READY_NOW;
  size_t total = state.kv()->pending(monoNow());
  return drainFrom(loop, state, ctx, giveUpAt, total);
}

}  // namespace vsup::workers
