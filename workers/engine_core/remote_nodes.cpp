#include "workers/engine_core/remote_nodes.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <utility>

#include <capnp/message.h>

#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/node_codec.h"
#include "workers/http/http_server.h"

namespace vsup::workers {

namespace schema = ipc::schema;

using ipc::failure;

namespace {

std::string layoutOf(uint32_t nnodes, uint32_t perNode) {
  return std::to_string(nnodes) + "x" + std::to_string(perNode);
}

}  // namespace

// Leader, served to one connection (one agent).
class RemoteNodes::LeaderService final : public schema::Leader::Server {
 public:
  LeaderService(RemoteNodes& nodes, ipc::RpcLink** link) : nodes_(nodes), link_(link) {}

 protected:
  kj::Promise<void> join(JoinContext context) override {
    auto p = context.getParams();
    std::string refused = nodes_.join(p.getNodeRank(), p.getAgent(), p.getHost(), p.getLayout(),
                                      *link_);
    if (!refused.empty()) return failure(refused);
    auto r = context.getResults();
    r.setHeartbeatMs(nodes_.options_.heartbeatMs);
    r.setTimeoutMs(nodes_.options_.heartbeatTimeoutMs);
    return kj::READY_NOW;
  }
  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }

 private:
  RemoteNodes& nodes_;
  ipc::RpcLink** link_;  // set once the link exists (it is made with this service)
};

std::string RemoteNodes::nodeName(uint32_t nodeRank, const std::string& host) {
  return "node-" + std::to_string(nodeRank) + " (" + host + ")";
}

RemoteNodes::RemoteNodes(uv_loop_t* loop, Options options, std::function<void(std::string)> onLost)
    : loop_(loop), options_(std::move(options)), onLost_(std::move(onLost)), tasks_(*this) {
  nodes_.resize(options_.nnodes - 1);
  for (uint32_t i = 0; i < nodes_.size(); ++i) nodes_[i].rank = i + 1;
  listener_ = http::bindListener(options_.host, options_.port, 64);
  acceptPoll_ = UvHandle<uv_poll_t>::make(
      [&](uv_poll_t* p) { uv_poll_init_socket(loop_, p, listener_.get()); });
  acceptPoll_->data = this;
  uv_poll_start(acceptPoll_.get(), UV_READABLE, [](uv_poll_t* p, int, int) {
    if (p->data != nullptr) static_cast<RemoteNodes*>(p->data)->accept();
  });
  vsup::log().info("[nodes] listening on {} for {} other node(s) of {} rank(s) each",
                   hostPort(options_.host, options_.port), nodes_.size(), options_.ranksPerNode);
}

RemoteNodes::~RemoteNodes() noexcept(false) {
  released_ = true;  // what follows closes links: no loss to report
  for (Node& n : nodes_) n.heartbeat.reset();
}

void RemoteNodes::taskFailed(kj::Exception&& e) {
  vsup::log().warn("[nodes] {}", ipc::userMessage(e));
}

void RemoteNodes::accept() {
  for (;;) {
    int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN: all taken; anything else: the next readiness retries
    // Every step crosses this link in small messages, each answered: Nagle's algorithm would
    // hold one back for the delayed ACK of the one before (40 ms a step).
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    auto slot = kj::heap<ipc::RpcLink*>(nullptr);
    ipc::RpcLink** where = slot.get();
    auto link = ipc::RpcLink::serve(loop_, OwnFd(fd),
                                    kj::heap<LeaderService>(*this, where).attach(kj::mv(slot)));
    *where = link.get();
    ipc::RpcLink* raw = link.get();
    links_.push_back(std::move(link));
    tasks_.add(raw->onDisconnect().then([this, raw]() {
      bool aNode = false;
      for (Node& n : nodes_) {
        if (n.link == raw) {
          aNode = true;
          n.heartbeat.reset();
          if (!released_) lose(nodeName(n.rank, n.host) + " lost: its connection closed");
        }
      }
      if (aNode) return kj::Promise<void>(kj::READY_NOW);
      // A connection that never joined (refused, or not an agent at all): its socket is closed
      // now, not at the end of the engine, from a turn of its own (not inside the link's own
      // callback).
      return kj::evalLater([this, raw]() {
        for (size_t i = 0; i < links_.size(); ++i) {
          if (links_[i].get() == raw) {
            links_.erase(links_.begin() + long(i));
            break;
          }
        }
      });
    }));
  }
}

std::string RemoteNodes::join(uint32_t nodeRank, schema::NodeAgent::Client agent,
                              std::string host, const std::string& layout, ipc::RpcLink* link) {
  const std::string want = layoutOf(options_.nnodes, options_.ranksPerNode);
  if (nodeRank == 0 || nodeRank >= options_.nnodes) {
    return "--node-rank " + std::to_string(nodeRank) + " is not a worker node of this group " +
           "(1.." + std::to_string(options_.nnodes - 1) + "; 0 is the leader)";
  }
  if (layout != want) {
    return "node " + std::to_string(nodeRank) + " runs a layout of " + layout +
           " (nodes x ranks per node), the leader " + want +
           ": give every node the same --nnodes and --tensor-parallel-size";
  }
  Node& n = nodes_[nodeRank - 1];
  if (n.agent) {
    return "node " + std::to_string(nodeRank) + " has already joined (from " + n.host +
           "): two nodes were given the same --node-rank";
  }
  if (lost_ || released_) return "this group is ending";
  n.host = std::move(host);
  n.link = link;
  n.agent = agent;
  const std::string name = nodeName(nodeRank, n.host);
  n.heartbeat = std::make_unique<Heartbeat>(
      loop_, options_.heartbeatMs, options_.heartbeatTimeoutMs,
      [agent = std::make_shared<schema::NodeAgent::Client>(agent)]() {
        return agent->pingRequest().send().ignoreResult();
      },
      [this, name](std::string why) {
        if (!released_) lose(name + " lost: " + why);
      });
  vsup::log().info("[nodes] {} joined", name);
  if (missing().empty() && allJoined_ && allJoined_->isWaiting()) allJoined_->fulfill();
  return "";
}

std::string RemoteNodes::missing() const {
  std::string list;
  for (const Node& n : nodes_) {
    if (!n.agent) list += (list.empty() ? "" : ", ") + std::to_string(n.rank);
  }
  return list;
}

void RemoteNodes::lose(const std::string& why) {
  if (lost_) return;
  lost_ = true;
  vsup::log().error("[nodes] {}", why);
  if (lostDuringStart_ && lostDuringStart_->isWaiting()) lostDuringStart_->reject(failure(why));
  onLost_(why);
}

kj::Promise<std::vector<schema::Worker::Client>> RemoteNodes::startRanks(std::string rankConfig) {
  auto lost = kj::newPromiseAndFulfiller<void>();
  lostDuringStart_ = kj::mv(lost.fulfiller);
  kj::Promise<void> joined = kj::READY_NOW;
  if (!missing().empty()) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    allJoined_ = kj::mv(paf.fulfiller);
    MonoNs deadline = options_.joinDeadline;
    joined = paf.promise.exclusiveJoin(
        ipc::uvSleep(loop_, msUntil(deadline)).then([this, deadline]() -> kj::Promise<void> {
          return failure("node(s) " + missing() + " did not join the leader at " +
                         hostPort(options_.host, options_.port) + " in time: start `vsup run "
                         "--headless --node-rank N --master-addr " + options_.host +
                         " --master-port " + std::to_string(options_.port) +
                         "` with the same model flags on each");
        }));
  }
  auto started =
      joined.then([this, rankConfig = std::move(rankConfig)]() {
        kj::Vector<kj::Promise<kj::Array<schema::Worker::Client>>> each;
        for (Node& n : nodes_) {
          auto req = n.agent->startRanksRequest();
          req.setConfig(kj::arrayPtr(reinterpret_cast<const kj::byte*>(rankConfig.data()),
                                     rankConfig.size()));
          req.setFirstRank(n.rank * options_.ranksPerNode);
          req.setCount(options_.ranksPerNode);
          std::string name = nodeName(n.rank, n.host);
          each.add(req.send().then(
              [](capnp::Response<schema::NodeAgent::StartRanksResults> r) {
                auto list = r.getWorkers();
                auto out = kj::heapArrayBuilder<schema::Worker::Client>(list.size());
                for (auto w : list) out.add(w);
                return out.finish();
              },
              [name](kj::Exception&& e) -> kj::Array<schema::Worker::Client> {
                kj::throwFatalException(
                    failure(name + ": its ranks did not start: " + ipc::userMessage(e)));
              }));
        }
        return kj::joinPromises(each.releaseAsArray());
      })
          .then([](kj::Array<kj::Array<schema::Worker::Client>> perNode) {
            std::vector<schema::Worker::Client> all;
            for (auto& node : perNode) {
              for (auto& w : node) all.push_back(kj::mv(w));
            }
            return all;
          });
  return started.exclusiveJoin(lost.promise.then([]() -> std::vector<schema::Worker::Client> {
    KJ_UNREACHABLE;  // the fulfiller only ever rejects
  }));
}

kj::Promise<void> RemoteNodes::release(int64_t stopMs, bool failed) {
  released_ = true;
  kj::Vector<kj::Promise<void>> each;
  for (Node& n : nodes_) {
    n.heartbeat.reset();
    if (!n.agent) continue;
    auto req = n.agent->releaseRequest();
    req.setStopMs(stopMs);
    req.setFailed(failed);
    std::string name = nodeName(n.rank, n.host);
    auto answered = req.send().ignoreResult().then(
        [name]() { vsup::log().info("[shutdown] {}: released, its ranks stopped", name); },
        [name](kj::Exception&& e) {
          vsup::log().warn("[shutdown] {}: release not confirmed: {}", name,
                           ipc::userMessage(e));
        });
    // Bounded: a node that does not answer is given up on (its own deadline stops it).
    each.add(answered.exclusiveJoin(
        ipc::uvSleep(loop_, uint64_t(stopMs + 500)).then([name]() {
          vsup::log().warn("[shutdown] {}: no answer to its release in time", name);
        })));
  }
  return kj::joinPromises(each.releaseAsArray());
}

kj::Promise<std::vector<supervisor::NodeStatus>> RemoteNodes::status(int64_t budgetMs) {
  kj::Vector<kj::Promise<supervisor::NodeStatus>> each;
  for (Node& n : nodes_) {
    supervisor::NodeStatus unknown;
    unknown.name = nodeName(n.rank, n.host.empty() ? "not joined" : n.host);
    unknown.type = supervisor::NodeType::Supervisor;
    unknown.state = n.agent ? supervisor::NodeState::Unresponsive : supervisor::NodeState::Starting;
    if (!n.agent) {
      each.add(kj::Promise<supervisor::NodeStatus>(unknown));
      continue;
    }
    auto req = n.agent->statusRequest();
    req.setBudgetMs(budgetMs * 3 / 4);
    std::string name = nodeName(n.rank, n.host);
    auto answered = req.send().then(
        [name](capnp::Response<schema::NodeAgent::StatusResults> r) {
          supervisor::NodeStatus s = supervisor::decode(r.getStatus());
          s.name = name;
          return s;
        },
        [unknown](kj::Exception&&) { return unknown; });
    each.add(answered.exclusiveJoin(
        ipc::uvSleep(loop_, uint64_t(budgetMs)).then([unknown]() { return unknown; })));
  }
  return kj::joinPromises(each.releaseAsArray())
      .then([](kj::Array<supervisor::NodeStatus> all) {
        return std::vector<supervisor::NodeStatus>(std::make_move_iterator(all.begin()),
                                                   std::make_move_iterator(all.end()));
      });
}

}  // namespace vsup::workers
