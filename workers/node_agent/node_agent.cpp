#include "workers/node_agent/node_agent.h"

#include <unistd.h>

#include <utility>
#include <vector>

#include <capnp/message.h>

#include "base/log.h"
#include "engine/collective.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/node_codec.h"
#include "supervisor/process.h"
#include "workers/engine_codec.h"

namespace vsup::workers {

namespace schema = ipc::schema;

using ipc::failure;

namespace {

// How long a lost leader may take this node's ranks to stop: "within a second of noticing".
constexpr int64_t kLeaderLostStopMs = 800;

}  // namespace

// NodeAgent, served to the leader over the link.
class NodeAgent::Service final : public schema::NodeAgent::Server {
 public:
  explicit Service(NodeAgent& agent) : agent_(agent) {}

 protected:
  kj::Promise<void> startRanks(StartRanksContext context) override {
    auto p = context.getParams();
    auto config = p.getConfig();
    return agent_
        .startRanks(std::string(reinterpret_cast<const char*>(config.begin()), config.size()),
                    p.getFirstRank(), p.getCount())
        .then([context](kj::Array<schema::Worker::Client> workers) mutable {
          auto list = context.getResults().initWorkers(uint32_t(workers.size()));
          for (size_t i = 0; i < workers.size(); ++i) list.set(uint32_t(i), kj::mv(workers[i]));
        });
  }
  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }
  kj::Promise<void> release(ReleaseContext context) override {
    return agent_.release(context.getParams().getStopMs(), context.getParams().getFailed());
  }
  kj::Promise<void> status(StatusContext context) override {
    return agent_.status(context.getParams().getBudgetMs())
        .then([context](supervisor::NodeStatus s) mutable {
          supervisor::encode(s, context.getResults().initStatus());
        });
  }

 private:
  NodeAgent& agent_;
};

NodeAgent::NodeAgent(uv_loop_t* loop, supervisor::ChildRuntime& runtime, NodeAgentOptions options)
    : loop_(loop), runtime_(runtime), options_(std::move(options)), tasks_(*this) {}

NodeAgent::~NodeAgent() noexcept(false) {
  released_ = true;  // tearing down: the link closing is no loss
  heartbeat_.reset();
}

void NodeAgent::taskFailed(kj::Exception&& e) {
  vsup::log().warn("[node] {}: {}", runtime_.name(), ipc::userMessage(e));
}

std::string NodeAgent::leaderName() const {
  return "the leader at " + hostPort(leaderHost_, options_.masterPort);
}

kj::Promise<void> NodeAgent::start() {
  try {
    leaderHost_ = resolveHost(options_.masterAddr, "--master-addr");
  } catch (const std::exception& e) {
    return failure(e.what());
  }
  vsup::log().info("[node] {}: node {} of {}, reaching {}", runtime_.name(), options_.nodeRank,
                   options_.nnodes, leaderName());
  return connectTcp(loop_, leaderHost_, options_.masterPort,
                    deadlineAfterMs(options_.connectTimeoutMs))
      .then([this](OwnFd fd) {
        nodeAddress_ = localAddressOf(fd.get());
        link_ = ipc::RpcLink::connect(loop_, std::move(fd));
        tasks_.add(link_->onDisconnect().then([this]() {
          leaderLost("its connection closed");
        }));
        auto req = link_->bootstrap<schema::Leader>().joinRequest();
        req.setNodeRank(options_.nodeRank);
        req.setAgent(kj::heap<Service>(*this));
        req.setHost(nodeAddress_);
        req.setLayout(std::to_string(options_.nnodes) + "x" +
                      std::to_string(options_.tensorParallelSize / options_.nnodes));
        return req.send();
      })
      .then([this](capnp::Response<schema::Leader::JoinResults> r) {
        joined_ = true;
        auto leader = std::make_shared<schema::Leader::Client>(link_->bootstrap<schema::Leader>());
        heartbeat_ = std::make_unique<Heartbeat>(
            loop_, r.getHeartbeatMs(), r.getTimeoutMs(),
            [leader]() { return leader->pingRequest().send().ignoreResult(); },
            [this](std::string why) { leaderLost(why); });
        vsup::log().info("[node] {}: joined {} as node {} ({}); waiting for its ranks' start",
                         runtime_.name(), leaderName(), options_.nodeRank, nodeAddress_);
      });
}

kj::Promise<kj::Array<schema::Worker::Client>> NodeAgent::startRanks(std::string config,
                                                                     uint32_t firstRank,
                                                                     uint32_t count) {
  if (ranks_) return failure("this node's ranks were already started");
  if (lost_ || released_) return failure("this node is stopping");
  try {
    // Refused here, naming the cause, rather than by every rank it would be handed to.
    (void)decodeEngineConfig(config);
    if (count > 1) {
      collectiveRegion_ = OwnFd(engine::createSharedCollective(count));
    }
  } catch (const std::exception& e) {
    return failure(e.what());
  }
  supervisor::SupervisorSpec spec;
  spec.name = runtime_.name();
  spec.intensity = 0;  // no partial restart: a dead rank fails the engine
  const std::string exe = supervisor::selfExecutable();
  for (uint32_t r = firstRank; r < firstRank + count; ++r) {
    spec.children.push_back(rankChildSpec(exe, r, config, nodeAddress_,
                                          collectiveRegion_ ? collectiveRegion_.get() : -1,
                                          options_.ranks,
                                          supervisor::DeadlineBudget::serving(0, 0).rankStopMs));
  }
  supervisor::SupervisorOptions o;
  o.selfExe = exe;
  o.collectOutput = true;
  ranks_ = std::make_unique<supervisor::Supervisor>(loop_, spec, o);
  // A rank that dies is this node's failure: the leader learns it from the rank's broken
  // connection (its step fails), and this process exits non-zero.
  tasks_.add(ranks_->terminated().then([this](supervisor::Outcome o) {
    if (released_ || lost_) return;
    vsup::log().error("[node] {}: a rank died ({}: {})", runtime_.name(), supervisor::nameOf(o),
                      ranks_->failure());
    runtime_.reportChildFailure();
    runtime_.exit(supervisor::kExitError);
  }));
  return ranks_->start().then([this, firstRank, count]() {
    collectiveRegion_ = OwnFd();  // every rank has it mapped
    vsup::log().info("[node] {}: ranks {}..{} ready", runtime_.name(), firstRank,
                     firstRank + count - 1);
    return rankWorkers(*ranks_, firstRank, count);
  });
}

kj::Promise<void> NodeAgent::release(int64_t stopMs, bool failed) {
  if (released_) return kj::READY_NOW;
  released_ = true;
  heartbeat_.reset();
  if (failed) {
    vsup::log().error("[shutdown] {}: the leader's engine failed: stopping this node's ranks",
                      runtime_.name());
  } else {
    vsup::log().info("[shutdown] {}: released by the leader: stopping this node's ranks",
                     runtime_.name());
  }
  if (releasedSignal_ && releasedSignal_->isWaiting()) releasedSignal_->fulfill();
  return stopRanks(deadlineAfterMs(stopMs)).then([this, failed](bool inTime) {
    int code = failed ? supervisor::kExitError
                      : inTime ? supervisor::kExitClean : supervisor::kExitEscalated;
    // After the answer has gone out: the leader hears "released" before the link closes.
    tasks_.add(ipc::uvSleep(loop_, 0).then([this, code]() { runtime_.exit(code); }));
  });
}

void NodeAgent::leaderLost(const std::string& why) {
  if (lost_ || released_) return;
  lost_ = true;
  heartbeat_.reset();
  vsup::log().error("[node] {}: lost {}: {}; stopping this node's ranks", runtime_.name(),
                    leaderName(), why);
  if (releasedSignal_ && releasedSignal_->isWaiting()) releasedSignal_->fulfill();
  tasks_.add(stopRanks(deadlineAfterMs(kLeaderLostStopMs)).then([this](bool) {
    runtime_.exit(supervisor::kExitError);
  }));
}

kj::Promise<void> NodeAgent::awaitRelease(supervisor::ShutdownContext& ctx) {
  // Not (or not yet) part of a group: nobody waits for this node's ranks.
  if (released_ || lost_ || !joined_) return kj::READY_NOW;
  // Keep serving: the leader may still be draining, and its steps need these ranks.
  ctx.defer("serving the leader's collectives until it releases this node",
            "leader " + hostPort(leaderHost_, options_.masterPort));
  auto paf = kj::newPromiseAndFulfiller<void>();
  releasedSignal_ = kj::mv(paf.fulfiller);
  std::string name = runtime_.name();
  return paf.promise.exclusiveJoin(
      ipc::uvSleep(loop_, msUntil(ctx.deadline())).then([name]() {
        vsup::log().warn("[shutdown] {}: not released by the leader before the deadline: "
                         "stopping this node's ranks",
                         name);
      }));
}

kj::Promise<bool> NodeAgent::stopRanks(MonoNs deadline) {
  if (!ranks_) return true;
  ranks_->shutdownAtOnce(deadline);
  return ranks_->shutdown(deadline).then([this]() { return ranks_->escalations() == 0; });
}

kj::Promise<supervisor::NodeStatus> NodeAgent::status(int64_t budgetMs) {
  if (!ranks_) {
    supervisor::NodeStatus s;
    s.type = supervisor::NodeType::Supervisor;
    s.state = link_ ? supervisor::NodeState::Running : supervisor::NodeState::Starting;
    s.pid = ::getpid();
    s.detail = link_ ? "joined " + leaderName() + ", ranks not started" : "reaching " + leaderName();
    return s;
  }
  return ranks_->status(budgetMs).then([this](supervisor::NodeStatus s) {
    s.pid = ::getpid();
    s.detail = "node " + std::to_string(options_.nodeRank) + " of " +
               std::to_string(options_.nnodes) + ", leader " +
               hostPort(leaderHost_, options_.masterPort);
    return s;
  });
}

}  // namespace vsup::workers
