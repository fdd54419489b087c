// A worker node's agent (`vsup __node-agent`, the one child of `vsup run --headless`;
// docs/architecture.md, "Across nodes"): this node's part of an engine whose engine-core runs on
// the leader.
//
// Its start connects to the leader (retrying until the start deadline: the leader's pod may
// come up later), joins with its node rank and serves the leader NodeAgent over that TCP link.
// The leader then has it start this node's ranks (a child supervisor, intensity 0, as
// engine-core's own ranks are; their Workers go back to the leader, which drives them through
// this process). Both sides keep a heartbeat.
//
// Ends:
//   - release (the leader's normal stop): stop the ranks, exit 0;
//   - its own shutdown (SIGTERM to this node's root, e.g. a LeaderWorkerSet rollout that signals
//     every pod at once): defer, serving the ranks' collectives, until the leader releases this
//     node or the shutdown's deadline passes; then stop the ranks;
//   - the leader lost (its connection closed, or a heartbeat unanswered): stop the ranks at once
//     and exit non-zero, so that nothing is left waiting in a collective for a leader that is
//     gone.
//
// Runs on the process's loop thread.
#pragma once

#include <uv.h>

#include <memory>
#include <optional>
#include <string>

#include <kj/async.h>

#include "base/clock.h"
#include "ipc/engine.capnp.h"
#include "ipc/rpc_link.h"
#include "supervisor/child_runtime.h"
#include "supervisor/supervisor.h"
#include "workers/node_link.h"
#include "workers/rank_spec.h"

namespace vsup::workers {

struct NodeAgentOptions {
  uint32_t nodeRank = 1;
  std::string masterAddr;
  uint16_t masterPort = 0;
  uint32_t nnodes = 2;
  uint32_t tensorParallelSize = 2;
  int64_t connectTimeoutMs = 600000;  // how long the start keeps trying to reach the leader
  EngineRankOptions ranks;
};

class NodeAgent final : private kj::TaskSet::ErrorHandler {
 public:
  NodeAgent(uv_loop_t* loop, supervisor::ChildRuntime& runtime, NodeAgentOptions options);
  ~NodeAgent() noexcept(false);

  // Node.start: reach the leader and join.
  kj::Promise<void> start();
  kj::Promise<supervisor::NodeStatus> status(int64_t budgetMs);
  // The shutdown hook: wait for the leader's release (or the deadline), keeping the ranks up.
  kj::Promise<void> awaitRelease(supervisor::ShutdownContext& ctx);
  kj::Promise<bool> stopRanks(MonoNs deadline);

 private:
  class Service;
  void taskFailed(kj::Exception&& e) override;
  kj::Promise<kj::Array<ipc::schema::Worker::Client>> startRanks(std::string config,
                                                                 uint32_t firstRank,
                                                                 uint32_t count);
  kj::Promise<void> release(int64_t stopMs, bool failed);
  void leaderLost(const std::string& why);
  std::string leaderName() const;

  uv_loop_t* loop_;
  supervisor::ChildRuntime& runtime_;
  NodeAgentOptions options_;
  std::string leaderHost_;   // the resolved --master-addr
  std::string nodeAddress_;  // this node's address toward the leader: where its ranks listen
  std::unique_ptr<ipc::RpcLink> link_;
  std::unique_ptr<Heartbeat> heartbeat_;
  std::unique_ptr<supervisor::Supervisor> ranks_;
  OwnFd collectiveRegion_;  // until every rank has mapped it
  bool joined_ = false;  // the leader accepted this node: from then on, it counts on its ranks
  bool released_ = false;
  bool lost_ = false;
  kj::Own<kj::PromiseFulfiller<void>> releasedSignal_;  // the shutdown hook waits on it
  kj::TaskSet tasks_;
};

}  // namespace vsup::workers
