// One tensor-parallel rank's service (its Node.service, the Worker interface): engine-core calls
// step() on every rank for every step. The rank's ModelRunner computes on the rank's compute
// thread, so the loop thread keeps answering the parent (status, shutdown, liveness) meanwhile;
// a rank whose steps cost next to nothing (RankState::stepsOnLoop: the sim engine at token-ms 0)
// computes them on the loop thread instead, since the two thread hops would cost more than the
// step.
// The rank's KV connector (if any) starts the transfers a step announces, reports the finished
// ones back with each answer, and defers the rank's shutdown while transfers are pending.
//
// Runs on the rank's loop thread.
#pragma once

#include <uv.h>

#include <memory>
#include <string>

#include <kj/async.h>

#include "base/clock.h"
#include "engine/core/model_runner.h"
#include "engine/cross_node_collective.h"
#include "ipc/engine.capnp.h"
#include "kvconnector/kv_connector.h"
#include "supervisor/child_runtime.h"
#include "workers/compute_thread.h"

namespace vsup::workers {

// What a rank keeps while it runs. Destroyed in this order: the runner is cancelled first (a
// step waiting for peers in a collective returns at once), then the compute thread is joined,
// then the runner and the connector are freed.
class RankState {
 public:
  explicit RankState(std::string node, std::unique_ptr<kv::KvConnectorWorker> kv = nullptr);
  ~RankState();
  RankState(const RankState&) = delete;
  RankState& operator=(const RankState&) = delete;

  const std::string& node() const { return node_; }
  ComputeThread& compute() { return *compute_; }
  // The runner, once loaded (null before).
  engine::ModelRunner* runner() const { return runner_.get(); }
  void setRunner(std::unique_ptr<engine::ModelRunner> runner) { runner_ = std::move(runner); }
  kv::KvConnectorWorker* kv() const { return kv_.get(); }
  // Across nodes: the runner's cross-node collective (borrowed from the runner), which
  // Worker.joinCollective connects. Null on one node.
  engine::CrossNodeCollective* crossNode() const { return crossNode_; }
  void setCrossNode(engine::CrossNodeCollective* c) { crossNode_ = c; }
  // Steps run on the loop thread, not the compute thread. Only for a runner whose execute()
  // never blocks and takes microseconds (no collective, no simulated compute time).
  bool stepsOnLoop() const { return stepsOnLoop_; }
  void setStepsOnLoop(bool onLoop) { stepsOnLoop_ = onLoop; }
  // engine-core's one KV deadline for all ranks, once it announced it (0 before).
  MonoNs kvGiveUpAt = 0;

 private:
  std::string node_;
  std::unique_ptr<kv::KvConnectorWorker> kv_;
  std::unique_ptr<engine::ModelRunner> runner_;
  std::unique_ptr<ComputeThread> compute_;
  bool stepsOnLoop_ = false;
  engine::CrossNodeCollective* crossNode_ = nullptr;
};

// The Worker capability over `state` (borrowed: it outlives the service).
kj::Own<ipc::schema::Worker::Server> makeWorkerService(RankState& state);

// The KV connector's shutdown hook: defers while transfers are pending, reporting progress,
// until they are done or `giveUpAt` passes (then it says how many it abandoned).
kj::Promise<void> drainKvTransfers(uv_loop_t* loop, RankState& state,
                                   supervisor::ShutdownContext& ctx, MonoNs giveUpAt);

}  // namespace vsup::workers
