// engine-core: the serving tree's engine process (docs/architecture.md, "engine-core").
//
// A child supervisor of the tensor-parallel ranks (intensity 0: a rank that dies, or that its
// liveness pings find hung and kill, fails the engine, no partial restart) and the owner of the backend-agnostic core::Scheduler. Its step
// loop: between steps it admits new requests (continuous batching), then the StepExecutor runs
// the step on every rank, then the RequestRouter sends each API server the deltas of its
// requests in one call. Prompts are tokenized (a chat rendered first, engine/prompt.h) on a thread
// of their own, so a long prompt never stalls the steps of other requests. It records the
// serving figures (core::ServingStats: each request's arrival, first step and deltas) that
// Engine.stats answers every session with, for the whole engine.
//
// Shutdown (its hook, before its ranks are stopped): refuse new requests, abort whatever is
// still running (the API servers have drained by then: normally nothing), announce the last KV
// transfers and their one deadline, and stop the loop at a step boundary, so no rank is ever
// left inside a step. Then all ranks are stopped at once (each defers for its own pending KV
// transfers, at the same time as the others, under that deadline).
//
// Runs on the process's loop thread.
#pragma once

#include <uv.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/fd.h"
#include "engine/config.h"
#include "engine/core/scheduler.h"
#include "engine/core/serving_stats.h"
#include "engine/registry.h"
#include "engine/stats.h"
#include "ipc/engine.capnp.h"
#include "ipc/rpc_link.h"
#include "kvconnector/kv_connector.h"
#include "supervisor/child_runtime.h"
#include "supervisor/supervisor.h"
#include "workers/compute_thread.h"
#include "workers/engine_core/remote_nodes.h"
#include "workers/engine_core/request_router.h"
#include "workers/rank_spec.h"
#include "workers/engine_core/step_executor.h"

namespace vsup::workers {

class EngineSession;

class EngineCore final : private kj::TaskSet::ErrorHandler {
 public:
  // Prompts up to this many bytes of text are tokenized on the loop: encoding a few hundred
  // bytes costs less than the hand-off to the tokenizing thread and back (which the serving
  // benchmark showed as about 10% of a short request's CPU), and is far too short to delay a
  // step. Anything longer goes to the thread.
  static constexpr size_t kInlineTokenizeBytes = 512;

  using RankOptions = EngineRankOptions;

  // `apiFds`: one connected socket per API server (or vsup::LLM), served the Engine interface.
  EngineCore(uv_loop_t* loop, supervisor::ChildRuntime& runtime, engine::EngineConfig config,
             std::vector<int> apiFds, RankOptions ranks = {});
  ~EngineCore();

  // Node.start: plan the engine, start the ranks, then serve the API servers and run.
  kj::Promise<void> start();
  // This node and its ranks, answered within `budgetMs` (Supervisor::status).
  kj::Promise<supervisor::NodeStatus> status(int64_t budgetMs = supervisor::kStatusBudgetMs);
  // The shutdown hook: intake off, abort leftovers, stop at a step boundary.
  kj::Promise<void> stopAtStepBoundary();
  kj::Promise<bool> stopRanks(MonoNs deadline);

  // For the sessions.
  kj::Promise<std::optional<engine::Rejection>> submit(size_t session,
                                                       engine::GenerateRequest request);
  void abort(const std::string& id);
  void sessionLost(size_t index);
  int64_t maxModelLen() const;
  engine::ChatFormat chatFormat() const { return plan_.chatFormat; }
  // Engine.stats: the serving figures of every session's requests, with the scheduler's gauges.
  engine::EngineStats stats() const;

 private:
  void taskFailed(kj::Exception&& e) override;
  std::optional<engine::Rejection> admitTokenized(engine::core::TokenizedRequest t);
  void wake();
  kj::Promise<void> loop();
  void applyStep(std::vector<engine::StepOutput> outputs);
  // Every delta engine-core sends goes through here: recorded, then routed to its owner.
  void route(const std::vector<engine::TokenDelta>& deltas);
  size_t endAll(engine::FinishReason finish, const std::string& error);
  void fail(const std::string& why);
  bool kvWorkLeft() const { return !kvPending_.empty() || finalKvStep_; }
  // The vsup KV connector (docs/architecture.md, "KV transfer").
  bool vsupKv() const { return config_.common.kv.connector == "vsup"; }
  std::optional<engine::Rejection> checkKvParams(const engine::GenerateRequest& r) const;
  void grantLeases(std::vector<engine::KvTransfer> held, std::vector<engine::TokenDelta> finals);
  void watchLeases(size_t agent);
  void startLoad(engine::core::KvLoad load);

  uv_loop_t* loop_;
  supervisor::ChildRuntime& runtime_;
  engine::EngineConfig config_;
  std::vector<int> apiFds_;
  RankOptions rankOptions_;
  engine::EnginePlan plan_;
  std::shared_ptr<const engine::Tokenizer> tokenizer_;
  std::unique_ptr<engine::core::Scheduler> scheduler_;
  std::unique_ptr<ComputeThread> tokenizing_;  // prompts are encoded here, off the loop
  std::set<std::string> beingTokenized_;       // submitted, not yet admitted
  OwnFd collectiveRegion_;                     // until every rank has mapped it
  std::vector<OwnFd> kvRegions_;               // one per rank, until rank and agent have it
  std::string engineId_;                       // drawn at every start: a peer's remote_engine_id
  std::vector<ipc::schema::KvAgent::Client> agents_;  // one per rank (vsup connector)
  std::map<std::string, size_t> leaseEnds_;    // lease → agents that reported its end
  engine::EngineStats::Kv kvStats_;            // what /metrics reports of the KV connector
  // Admitted remote-prefill requests whose pull has not started: one that ends now tells the
  // prefill side to give its lease up (a pull that started ends the lease itself).
  std::map<std::string, engine::KvParams> awaitingLoad_;
  void giveUpRemote(const std::string& id);
  void sendGiveUp(const engine::KvParams& remote);  // through every rank's agent
  std::unique_ptr<supervisor::Supervisor> ranks_;
  // Across nodes (nnodes > 1): the other nodes, and this node's address for its ranks' peers.
  std::unique_ptr<RemoteNodes> remote_;
  std::string nodeAddress_;
  std::unique_ptr<StepExecutor> executor_;
  RequestRouter router_;
  engine::core::ServingStats serving_;  // what Engine.stats reports
  std::vector<EngineSession*> sessions_;  // owned by their RPC links; null once disconnected
  std::vector<std::unique_ptr<ipc::RpcLink>> links_;
  std::unique_ptr<kv::KvConnectorScheduler> kv_;
  std::vector<engine::KvTransfer> kvPending_;  // announced to the ranks with the next step
  std::map<std::string, size_t> kvOutstanding_;  // held request → ranks yet to finish sending
  MonoNs kvGiveUpAt_ = 0;                         // set when shutting down with a KV connector
  bool finalKvStep_ = false;  // the step that tells every rank kvGiveUpAt_ is due
  bool stopping_ = false;
  bool ranksStopping_ = false;  // stopRanks() ran: a step cut by it is the end, not a failure
  bool running_ = false;  // started: the step loop runs
  uint64_t lastStep_ = 0;
  std::string failure_;
  kj::Own<kj::PromiseFulfiller<void>> workAvailable_;
  kj::Own<kj::PromiseFulfiller<void>> boundary_;
  kj::Promise<void> loopPromise_ = kj::READY_NOW;
  kj::Promise<void> watchdog_ = kj::READY_NOW;
  kj::TaskSet tasks_;
};

}  // namespace vsup::workers
