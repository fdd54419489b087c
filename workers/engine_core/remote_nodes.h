// The other nodes of an engine that spans machines, as the leader's engine-core sees them
// (docs/architecture.md, "Across nodes"). engine-core owns every rank: its own node's as
// children, as on one machine, and each other node's through that node's agent (`vsup
// __node-agent` under `vsup run --headless`), which starts, stops and reaps them there.
//
// It listens on the leader's address (TCP) and serves `Leader` to every agent that connects.
// Each agent joins with its node rank; once every node has joined, startRanks() has each start
// its ranks and answers their Worker capabilities, which the step executor then drives exactly
// like local ranks (the agent forwards the calls). Both sides keep a heartbeat: a node whose
// connection closes, or that leaves a ping unanswered for heartbeatTimeoutMs, is lost, and the
// engine fails (onLost). release() is the normal end: every node stops its ranks and exits 0;
// a node that leaves after its release is no loss.
//
// Runs on engine-core's loop thread.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/clock.h"
#include "base/fd.h"
#include "ipc/engine.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_handle.h"
#include "supervisor/status.h"
#include "workers/node_link.h"

namespace vsup::workers {

class RemoteNodes final : private kj::TaskSet::ErrorHandler {
 public:
  struct Options {
    std::string host;  // an address literal of this node (the resolved --master-addr)
    uint16_t port = 0;
    uint32_t nnodes = 2;
    uint32_t ranksPerNode = 1;
    MonoNs joinDeadline = kNoDeadline;  // every node has joined by then, or the start fails
    int64_t heartbeatMs = 500;
    int64_t heartbeatTimeoutMs = 2000;
  };

  // Listens at once: throws vsup::SysError / vsup::Error naming the address when it cannot.
  // onLost(why) is called once, for the first node lost ("node 1 (10.0.0.2) lost: ...").
  RemoteNodes(uv_loop_t* loop, Options options, std::function<void(std::string)> onLost);
  ~RemoteNodes() noexcept(false);

  // Waits (until joinDeadline) for every other node, then has each start its ranks with
  // `rankConfig` (an EngineConfig message). Resolves with their Workers in rank order
  // (ranksPerNode .. nnodes * ranksPerNode - 1). Fails naming the nodes that never joined, the
  // node whose ranks did not start, or the node lost meanwhile.
  kj::Promise<std::vector<ipc::schema::Worker::Client>> startRanks(std::string rankConfig);
  // The end: every node stops its ranks and exits (0 after a normal stop; non-zero when
  // `failed`: the engine failed), each within stopMs. Resolves when every node answered (or
  // failed to). No node is lost after this.
  kj::Promise<void> release(int64_t stopMs, bool failed);
  // Each node's agent with its ranks, for engine-core's status; a node that does not answer
  // within budgetMs is shown unresponsive.
  kj::Promise<std::vector<supervisor::NodeStatus>> status(int64_t budgetMs);

  // A node's name in logs, errors and `vsup tree`: "node-1 (10.0.0.2)".
  static std::string nodeName(uint32_t nodeRank, const std::string& host);

 private:
  class LeaderService;
  struct Node {
    uint32_t rank = 0;
    std::string host;
    ipc::RpcLink* link = nullptr;  // owned by links_
    std::optional<ipc::schema::NodeAgent::Client> agent;
    std::unique_ptr<Heartbeat> heartbeat;
  };

  void taskFailed(kj::Exception&& e) override;
  void accept();
  // Leader.join from the agent on connection `link`: empty, or why it is refused.
  std::string join(uint32_t nodeRank, ipc::schema::NodeAgent::Client agent, std::string host,
                   const std::string& layout, ipc::RpcLink* link);
  void lose(const std::string& why);
  std::string missing() const;

  uv_loop_t* loop_;
  Options options_;
  std::function<void(std::string)> onLost_;
  OwnFd listener_;
  UvHandle<uv_poll_t> acceptPoll_;
  std::vector<std::unique_ptr<ipc::RpcLink>> links_;  // every accepted connection
  std::vector<Node> nodes_;                           // index nodeRank - 1
  bool released_ = false;
  bool lost_ = false;
  kj::Own<kj::PromiseFulfiller<void>> allJoined_;
  kj::Own<kj::PromiseFulfiller<void>> lostDuringStart_;
  kj::TaskSet tasks_;
};

}  // namespace vsup::workers
