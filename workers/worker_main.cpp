// `vsup __worker --rank R [--collective-fd 4] [--node-address A]`: one tensor-parallel rank. Its engine
// configuration arrives in Node.start; it loads its ModelRunner (from the engine registry) on
// its compute thread and serves the Worker interface as its Node.service. It is vsup-aware: it
// ignores SIGINT/SIGTERM/SIGHUP and stops only when engine-core tells it to, which engine-core
// does only at a step boundary.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <algorithm>

#include <kj/debug.h>
#include <memory>
#include <string>

#include "base/fd.h"
#include "base/log.h"
#include "engine/registry.h"
#include "workers/engine_codec.h"
#include "workers/node_process.h"
#include "workers/processes.h"
#include "workers/worker/worker_service.h"

namespace vsup::workers {

int workerMain(int argc, char** argv) {
  CLI::App app{"vsup tensor-parallel worker (started by engine-core)"};
  uint32_t rank = 0;
  int collectiveFd = -1;
  int kvCacheFd = -1;
  std::string nodeAddress;
  app.add_option("--rank", rank)->required();
  app.add_option("--node-address", nodeAddress,
                 "across nodes: the address this rank listens on for its peers on other nodes");
  app.add_option("--collective-fd", collectiveFd, "the shared region of the ranks' collectives");
  app.add_option("--kv-cache-fd", kvCacheFd, "the KV cache region shared with the rank's KV agent");
  CLI11_PARSE(app, argc, argv);
  // Test-only fault injection (README, "Fault injection"): this rank dies during start-up.
  if (const char* fail = std::getenv("VSUP_TEST_FAIL_WORKER_START");
      fail != nullptr && std::to_string(rank) == fail) {
    std::fprintf(stderr, "vsup __worker: rank %u: injected start-up failure\n", rank);
    return 3;
  }

  return runNodeProcess("vsup __worker", [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    auto holder = std::make_unique<std::unique_ptr<RankState>>();
    std::unique_ptr<RankState>* state = holder.get();
    runtime.onStart([state, rank, collectiveFd, kvCacheFd, nodeAddress, loop,
                     &runtime](const supervisor::SupervisorSpec&) {
      engine::EngineConfig config;
      try {
        config = decodeEngineConfig(runtime.startConfig());
      } catch (const std::exception& e) {
        return kj::Promise<void>(KJ_EXCEPTION(FAILED, e.what()));
      }
      std::unique_ptr<kv::KvConnectorWorker> kv;
      if (config.common.kv.connector == "sim") kv = kv::makeSimWorker(config.common.kv.simTransferMs);
      *state = std::make_unique<RankState>(runtime.name(), std::move(kv));
      RankState* st = state->get();
      runtime.setService(makeWorkerService(*st));
      if (st->kv() != nullptr) {
        double kvTimeoutS = config.common.kv.shutdownTimeoutS;
        runtime.addShutdownHook("kv", [loop, st, kvTimeoutS](supervisor::ShutdownContext& ctx) {
          // engine-core's deadline when it announced one (normal shutdown); our own otherwise
          // (engine-core gone).
          MonoNs own = st->kvGiveUpAt != 0 ? st->kvGiveUpAt
                                           : deadlineAfterMs(int64_t(kvTimeoutS * 1000));
          return drainKvTransfers(loop, *st, ctx, std::min(ctx.deadline(), own));
        });
      }
      // Loading (weights, KV cache) runs on the compute thread; the rank is ready when it is
      // done, and a loading error fails its start with the message (naming file and tensor).
      auto region = std::make_shared<OwnFd>(collectiveFd);
      // Written by the compute thread's job, read on the loop once the job is done.
      auto crossNode = std::make_shared<engine::CrossNodeCollective*>(nullptr);
      auto kvRegion = std::make_shared<OwnFd>(kvCacheFd);
      return st->compute()
          .run<std::unique_ptr<engine::ModelRunner>>([config, rank, region, kvRegion, nodeAddress,
                                                      crossNode]() {
            engine::RankFds fds;
            fds.collective = region->get();
            fds.kvCache = kvRegion->get();
            fds.nodeAddress = nodeAddress;
            fds.crossNode = crossNode.get();
            auto runner = engine::backendFor(config).makeRunner(config, rank, fds);
            region->reset();  // mapped: the fds are not needed any more
            kvRegion->reset();
            return runner;
          })
          .then([st, config, crossNode](std::unique_ptr<engine::ModelRunner> runner) {
            st->setCrossNode(*crossNode);
            for (const std::string& w : runner->warnings()) {
              vsup::log().warn("[engine] {}: {}", st->node(), w);
            }
            st->setRunner(std::move(runner));
            // The sim at token-ms 0 computes a step in microseconds and never blocks (its ranks
            // share no collective): the hop to the compute thread and back would cost more.
            const auto* sim = std::get_if<engine::SimConfig>(&config.backend);
            st->setStepsOnLoop(sim != nullptr && sim->tokenMs == 0);
            vsup::log().info("[engine] {}: loaded", st->node());
          });
    });
    return holding(std::move(holder));
  });
}

}  // namespace vsup::workers
