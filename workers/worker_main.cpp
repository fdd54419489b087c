// `vsup __worker --rank R --tp N [--collective-fd 4] <engine flags>`: one tensor-parallel rank.
//
// It serves the Worker interface (ipc/engine.capnp) as its Node.service: engine-core calls
// step() on every rank for every step. It is vsup-aware: it ignores SIGINT/SIGTERM/SIGHUP and
// stops only when engine-core tells it to, which engine-core does only at a step boundary.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <memory>

#include "engine/engine.h"
#include "kvconnector/kv_connector.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/child_runtime.h"
#include "supervisor/fault_injection.h"
#include "supervisor/supervisor.h"
#include "workers/compute_thread.h"
#include "workers/engine_codec.h"
#include "workers/engine_flags.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;

class WorkerService final : public schema::Worker::Server {
 public:
  WorkerService(uv_loop_t* loop, std::string node, engine::WorkerEngine** engine,
                ComputeThread* compute, kv::KvConnectorWorker* kv, MonoNs* kvGiveUpAt)
      : loop_(loop), node_(std::move(node)), engine_(engine), compute_(compute), kv_(kv),
        kvGiveUpAt_(kvGiveUpAt) {}

 protected:
  kj::Promise<void> step(StepContext context) override {
    engine::StepInput input = decode(context.getParams().getInput());
    supervisor::crashIfInjected(node_, "step" + std::to_string(input.step));
    if (kv_ != nullptr) {
      for (const auto& id : input.kvTransfers) kv_->startTransfer(id, monoNow());
    }
    if (input.kvGiveUpAtNs != 0) *kvGiveUpAt_ = input.kvGiveUpAtNs;
    engine::WorkerEngine* engine = *engine_;
    KJ_REQUIRE(engine != nullptr, "step before the rank finished loading");
    uint64_t cost = engine->simulatedCostMs(input);
    if (cost > 0 || input.seqs.empty()) {
      // The sim engine: instant tokens, then the simulated compute time on the loop.
      engine::StepOutput output = engine->execute(input);
      auto finish = [context, output = std::move(output)]() mutable {
        encode(output, context.getResults().initOutput());
      };
      if (cost == 0) {
        finish();
        return kj::READY_NOW;
      }
      return ipc::uvSleep(loop_, cost).then(kj::mv(finish));
    }
    // Real compute runs on the compute thread; the loop stays free for the control plane.
    return compute_
        ->run<engine::StepOutput>([engine, input = std::move(input)]() {
          return engine->execute(input);
        })
        .then(
            [context](engine::StepOutput output) mutable {
              encode(output, context.getResults().initOutput());
            },
            [node = node_, step = context.getParams().getInput().getStep()](kj::Exception&& e) {
              vsup::log().error("[engine] {}: step {} failed: {}", node, step,
                                e.getDescription().cStr());
              kj::throwFatalException(kj::mv(e));
            });
  }

 private:
  uv_loop_t* loop_;
  std::string node_;
  engine::WorkerEngine** engine_;  // set once the rank has loaded
  ComputeThread* compute_;
  kv::KvConnectorWorker* kv_;
  MonoNs* kvGiveUpAt_;  // engine-core's one KV deadline for all ranks, once it announced it
};

// The KV connector's shutdown: defer while transfers are pending, reporting progress, until
// they are done or the KV shutdown timeout passes (then say how many were abandoned).
kj::Promise<void> drainTransfers(uv_loop_t* loop, kv::KvConnectorWorker& kv,
                                 supervisor::ShutdownContext& ctx, MonoNs giveUpAt, size_t total,
                                 const std::string& node) {
  MonoNs now = monoNow();
  size_t pending = kv.pending(now);
  if (pending == 0) {
    if (total > 0) vsup::log().info("[shutdown] {}: kv: all {} transfer(s) done", node, total);
    return kj::READY_NOW;
  }
  if (now >= giveUpAt) {
    vsup::log().warn("[shutdown] {}: kv: giving up: {} transfer(s) abandoned", node, pending);
    return kj::READY_NOW;
  }
  ctx.defer("kv: " + std::to_string(pending) + " transfer(s) pending",
            std::to_string(total - pending) + " of " + std::to_string(total) + " done");
  MonoNs wakeAt = std::min({kv.nextCompletion(), giveUpAt, now + 100 * kNsPerMs});
  return ipc::uvSleep(loop, msUntil(wakeAt)).then([loop, &kv, &ctx, giveUpAt, total, node]() {
    return drainTransfers(loop, kv, ctx, giveUpAt, total, node);
  });
}

// What a rank keeps while it runs. Destroyed in reverse: the engine is cancelled first (a step
// waiting for peers in a collective returns at once), then the compute thread is joined, then
// the engine is freed.
struct WorkerState final : NodeState {
  std::unique_ptr<kv::KvConnectorWorker> kv;
  MonoNs kvGiveUpAt = 0;
  std::unique_ptr<engine::WorkerEngine> engine;
  engine::WorkerEngine* ready = nullptr;  // engine, once loaded
  std::unique_ptr<ComputeThread> compute = std::make_unique<ComputeThread>();
  ~WorkerState() override {
    if (engine) engine->cancel();
    compute.reset();
  }
};

}  // namespace

int workerMain(int argc, char** argv) {
  CLI::App app{"vsup tensor-parallel worker (started by engine-core)"};
  uint32_t rank = 0;
  uint32_t tp = 1;
  int collectiveFd = -1;
  EngineFlags flags;
  std::string kvName = "none";
  uint64_t simKvTransferMs = 0;
  double kvShutdownTimeout = 10;
  app.add_option("--rank", rank)->required();
  app.add_option("--tp", tp)->check(CLI::Range(1u, 64u));
  app.add_option("--collective-fd", collectiveFd);
  app.add_option("--kv-connector", kvName)->check(CLI::IsMember({"none", "sim"}));
  app.add_option("--sim-kv-transfer-ms", simKvTransferMs);
  app.add_option("--kv-shutdown-timeout", kvShutdownTimeout);
  addEngineFlags(app, flags, false);
  CLI11_PARSE(app, argc, argv);
  // Test-only fault injection (README, "Fault injection"): this rank dies during start-up.
  if (const char* fail = std::getenv("VSUP_TEST_FAIL_WORKER_START");
      fail != nullptr && std::to_string(rank) == fail) {
    std::fprintf(stderr, "vsup __worker: rank %u: injected start-up failure\n", rank);
    return 3;
  }

  return runNodeProcess("vsup __worker", [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    auto state = std::make_unique<WorkerState>();
    if (kvName == "sim") state->kv = kv::makeSimWorker(simKvTransferMs);
    WorkerState* st = state.get();
    runtime.setService(kj::heap<WorkerService>(loop, runtime.name(), &st->ready, st->compute.get(),
                                               state->kv.get(), &state->kvGiveUpAt));
    if (flags.engine == "sim") {
      engine::SimOptions options;
      options.tokenMs = flags.simTokenMs;
      st->engine = engine::makeSimWorker(options, rank);
      st->ready = st->engine.get();
    } else {
      // Loading (weights, KV cache) runs on the compute thread; the rank is ready when it is
      // done, and a loading error fails its start with the message (naming file and tensor).
      std::string node = runtime.name();
      runtime.onStart([st, rank, tp, collectiveFd, flags, node](const supervisor::SupervisorSpec&) mutable {
        return st->compute
            ->run<std::unique_ptr<engine::WorkerEngine>>([rank, tp, collectiveFd, flags]() mutable {
              resolveEngineFlags(flags);
              flags.cpu.tensorParallelSize = tp;
              engine::CpuPlan plan = engine::planCpuEngine(flags.cpu);
              std::unique_ptr<engine::Collective> collective =
                  tp == 1 ? engine::makeSingleRankCollective()
                          : engine::joinSharedCollective(collectiveFd, rank, tp,
                                                         flags.cpu.collectiveTimeoutMs);
              if (collectiveFd >= 0) ::close(collectiveFd);  // mapped: the fd is not needed
              return engine::makeCpuWorker(flags.cpu, plan, rank, std::move(collective));
            })
            .then([st, node](std::unique_ptr<engine::WorkerEngine> engine) {
              st->engine = std::move(engine);
              st->ready = st->engine.get();
              vsup::log().info("[engine] {}: loaded", node);
            });
      });
    }
    if (state->kv) {
      std::string node = runtime.name();
      kv::KvConnectorWorker* connector = state->kv.get();
      MonoNs* announced = &state->kvGiveUpAt;
      runtime.addShutdownHook("kv", [=](supervisor::ShutdownContext& ctx) {
        // engine-core's deadline when it announced one (normal shutdown); our own otherwise
        // (engine-core gone).
        MonoNs own = *announced != 0 ? *announced
                                     : deadlineAfterMs(int64_t(kvShutdownTimeout * 1000));
        MonoNs giveUpAt = std::min(ctx.deadline(), own);
        size_t total = connector->pending(monoNow());
        return drainTransfers(loop, *connector, ctx, giveUpAt, total, node);
      });
    }
    return std::unique_ptr<NodeState>(std::move(state));
  });
}

}  // namespace vsup::workers
