// `vsup __node-agent --node-rank R --master-addr A --master-port P --nnodes N
// --tensor-parallel-size T [--connect-timeout-ms N] [--worker-start-timeout-ms N]
// [--liveness-timeout-ms N] [--liveness-interval-ms N]`: a worker node's agent, the one child
// of `vsup run --headless` (workers/node_agent/node_agent.h). Its ranks' engine configuration
// comes from the leader, never from argv: a worker node cannot disagree with its leader about
// the model.
#include <CLI/CLI.hpp>
#include <memory>

#include <kj/debug.h>

#include "supervisor/orphan_reaper.h"
#include "workers/node_agent/node_agent.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {

int nodeAgentMain(int argc, char** argv) {
  supervisor::OrphanReaper::blockChildSignal();  // before any thread: the subreaper's signalfd
  CLI::App app{"vsup node agent (started by vsup run --headless)"};
  NodeAgentOptions o;
  app.add_option("--node-rank", o.nodeRank)->required()->check(CLI::Range(1u, 63u));
  app.add_option("--master-addr", o.masterAddr)->required();
  app.add_option("--master-port", o.masterPort)->required()->check(CLI::Range(1, 65535));
  app.add_option("--nnodes", o.nnodes)->required()->check(CLI::Range(2u, 64u));
  app.add_option("--tensor-parallel-size", o.tensorParallelSize)->required();
  app.add_option("--connect-timeout-ms", o.connectTimeoutMs)->check(CLI::PositiveNumber);
  app.add_option("--worker-start-timeout-ms", o.ranks.startTimeoutMs)->check(CLI::PositiveNumber);
  app.add_option("--liveness-timeout-ms", o.ranks.livenessTimeoutMs)
      ->check(CLI::Range(int64_t(-1), int64_t(3600) * 1000));
  app.add_option("--liveness-interval-ms", o.ranks.livenessIntervalMs)->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  if (o.ranks.livenessTimeoutMs <= 0) o.ranks.livenessTimeoutMs = -1;

  return runNodeProcess("vsup __node-agent", [&](uv_loop_t* loop,
                                                 supervisor::ChildRuntime& runtime) {
    struct AgentState {
      std::unique_ptr<supervisor::Subreaper> subreaper;
      std::unique_ptr<NodeAgent> agent;  // declared last: destroyed first
    };
    auto holder = std::make_unique<AgentState>();
    holder->subreaper = supervisor::OrphanReaper::becomeSubreaper(loop, runtime.name());
    holder->agent = std::make_unique<NodeAgent>(loop, runtime, o);
    NodeAgent* agent = holder->agent.get();
    runtime.onStart([agent](const supervisor::SupervisorSpec&) { return agent->start(); });
    runtime.onStatusWithin([agent](int64_t budgetMs) { return agent->status(budgetMs); });
    runtime.addShutdownHook("leader", [agent](supervisor::ShutdownContext& ctx) {
      return agent->awaitRelease(ctx);
    });
    runtime.onStopChildren([agent](MonoNs deadline) { return agent->stopRanks(deadline); });
    return holding(std::move(holder));
  });
}

}  // namespace vsup::workers
