#include "workers/engine_core/engine_core.h"

#include <algorithm>

#include <kj/debug.h>

#include "base/log.h"
#include "engine/collective.h"
#include "engine/prompt.h"
#include "ipc/engine.capnp.h"
#include "ipc/user_message.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/fault_injection.h"
#include "supervisor/process.h"
#include "workers/engine_codec.h"
#include "workers/kv_agent/kv_agent.h"

#include <sys/random.h>

namespace vsup::workers {

using ipc::failure;

namespace schema = ipc::schema;

namespace {

// Across nodes: gathers every rank's collective address, then hands each rank the whole table
// (engine/cross_node_collective.h); resolves once every rank is connected to its peers.
using WorkerList = std::vector<std::optional<schema::Worker::Client>>;
kj::Promise<void> connectAcrossNodes(std::shared_ptr<WorkerList> workers) {
  kj::Vector<kj::Promise<kj::Array<kj::byte>>> addresses;
  for (auto& w : *workers) {
    addresses.add(w->collectiveAddressRequest().send().then(
        [](capnp::Response<schema::Worker::CollectiveAddressResults> r) {
          return kj::heapArray<kj::byte>(r.getAddress());
        }));
  }
  return kj::joinPromises(addresses.releaseAsArray())
      .then([workers](kj::Array<kj::Array<kj::byte>> table) {
        kj::Vector<kj::Promise<void>> joins;
        for (auto& w : *workers) {
          auto req = w->joinCollectiveRequest();
          auto list = req.initAddresses(uint32_t(table.size()));
          for (size_t r = 0; r < table.size(); ++r) list.set(uint32_t(r), table[r]);
          joins.add(req.send().ignoreResult());
        }
        return kj::joinPromises(joins.releaseAsArray());
      });
}

// A fresh engine id for every start: a prefill instance restarted on the same port is a new
// engine, and a decode instance holding the old one's parameters is told so at once.
std::string newEngineId() {
  uint8_t raw[8];
  size_t got = 0;
  while (got < sizeof raw) {
    ssize_t n = ::getrandom(raw + got, sizeof raw - got, 0);
    if (n > 0) got += size_t(n);
  }
  static const char* hex = "0123456789abcdef";
  std::string id = "vsup-";
  for (uint8_t b : raw) {
    id += hex[b >> 4];
    id += hex[b & 15];
  }
  return id;
}

}  // namespace

// One API server's (or vsup::LLM's) connection: it serves Engine and is that session's sink.
class EngineSession final : public schema::Engine::Server, public DeltaSink {
 public:
  EngineSession(EngineCore& core, kj::TaskSet& tasks) : core_(core), tasks_(tasks) {}
  ~EngineSession() override {
    answered_->closed = true;
    answered_->response = nullptr;
  }
  size_t index = 0;

  void deltas(const std::vector<engine::TokenDelta>& list) override {
    if (!sink_) return;
    auto request = sink_->deltasRequest();
    auto out = request.initDeltas(unsigned(list.size()));
    for (unsigned i = 0; i < list.size(); ++i) encode(list[i], out[i]);
    auto answer = request.send();
    // The API server's answer to the previous call is let go only now, so its Finish message
    // follows this call instead of waking the API server on its own just after it answered.
    answered_->response = nullptr;
    tasks_.add(answer.then(
        [answered = answered_](capnp::Response<schema::TokenSink::DeltasResults>&& r) {
          if (!answered->closed) answered->response = kj::heap(kj::mv(r));
        }));
  }

  void engineFailed(const std::string& reason) override {
    if (!sink_) return;
    auto request = sink_->engineFailedRequest();
    request.setReason(reason);
    tasks_.add(request.send().ignoreResult());
  }

 protected:
  kj::Promise<void> attach(AttachContext context) override {
    sink_ = context.getParams().getSink();
    context.getResults().setMaxModelLen(core_.maxModelLen());
    context.getResults().setChatFormat(engine::nameOf(core_.chatFormat()));
    return kj::READY_NOW;
  }

  kj::Promise<void> submit(SubmitContext context) override {
    return core_.submit(index, decode(context.getParams().getRequest()))
        .then([context](std::optional<engine::Rejection> rejected) mutable {
          if (!rejected) return;
          context.getResults().setRejected(rejected->message);
          context.getResults().setRejectCode(encode(rejected->code));
        });
  }

  kj::Promise<void> submitMany(SubmitManyContext context) override {
    struct Outcome {
      std::optional<engine::Rejection> rejected;
      std::string refused;
    };
    auto requests = context.getParams().getRequests();
    auto outcomes = std::make_shared<std::vector<Outcome>>(requests.size());
    kj::Vector<kj::Promise<void>> each;
    for (unsigned i = 0; i < requests.size(); ++i) {
      each.add(core_.submit(index, decode(requests[i]))
                   .then([outcomes, i](std::optional<engine::Rejection> r) {
                           (*outcomes)[i].rejected = std::move(r);
                         },
                         [outcomes, i](kj::Exception&& e) {
                           (*outcomes)[i].refused = ipc::userMessage(e);
                         }));
    }
    return kj::joinPromises(each.releaseAsArray()).then([context, outcomes]() mutable {
      auto out = context.getResults().initOutcomes(unsigned(outcomes->size()));
      for (unsigned i = 0; i < outcomes->size(); ++i) {
        const Outcome& o = (*outcomes)[i];
        if (!o.refused.empty()) {
          out[i].setRefused(o.refused);
        } else if (o.rejected) {
          out[i].setRejected(o.rejected->message);
          out[i].setRejectCode(encode(o.rejected->code));
        }
      }
    });
  }

  kj::Promise<void> abort(AbortContext context) override {
    core_.abort(context.getParams().getId());
    return kj::READY_NOW;
  }

  kj::Promise<void> stats(StatsContext context) override {
    encode(core_.stats(), context.getResults().initStats());
    return kj::READY_NOW;
  }

 private:
  EngineCore& core_;
  kj::TaskSet& tasks_;
  std::optional<schema::TokenSink::Client> sink_;
  // The last deltas call's answer, shared with the calls' continuations (which may run after
  // this session is gone: then they keep nothing).
  struct Answered {
    bool closed = false;
    kj::Own<capnp::Response<schema::TokenSink::DeltasResults>> response;
  };
  std::shared_ptr<Answered> answered_ = std::make_shared<Answered>();
};

EngineCore::EngineCore(uv_loop_t* loop, supervisor::ChildRuntime& runtime,
                       engine::EngineConfig config, std::vector<int> apiFds,
                       RankOptions ranks)
    : loop_(loop), runtime_(runtime), config_(std::move(config)), apiFds_(std::move(apiFds)),
      rankOptions_(ranks), tasks_(*this) {
  if (config_.common.kv.connector == "sim") kv_ = kv::makeSimScheduler();
}

EngineCore::~EngineCore() {
  loopPromise_ = kj::READY_NOW;
  executor_.reset();
  links_.clear();
  tokenizing_.reset();  // joins the thread; a job in flight only encodes a prompt
}

void EngineCore::taskFailed(kj::Exception&& e) {
  if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
  vsup::log().warn("[engine] {}: {}", runtime_.name(), ipc::userMessage(e));
}

int64_t EngineCore::maxModelLen() const { return scheduler_ ? scheduler_->maxModelLen() : 0; }

engine::EngineStats EngineCore::stats() const {
  if (!scheduler_) return serving_.snapshot({}, 0, beingTokenized_.size());
  engine::EngineStats s = serving_.snapshot(scheduler_->stats(), scheduler_->blocks().blockSize(),
                                            beingTokenized_.size());
  s.kv = kvStats_;
  const auto& k = kvStats_;
  uint64_t ended = k.leasesDone + k.leasesGaveUp + k.leasesDisconnected + k.leasesExpired +
                   k.leasesAbandoned;
  s.kv.leasesHeld = k.leasesGranted - std::min(k.leasesGranted, ended);
  return s;
}

kj::Promise<void> EngineCore::start() {
  const engine::Backend* backend = nullptr;
  std::string rankConfig;
  try {
    backend = &engine::backendFor(config_);
    plan_ = backend->plan(config_);
    tokenizer_ = backend->tokenizer(config_);
    scheduler_ = std::make_unique<engine::core::Scheduler>(plan_.scheduler, tokenizer_);
    if (plan_.sharedCollective) {
      collectiveRegion_ = OwnFd(engine::createSharedCollective(config_.common.ranksPerNode()));
    }
    engine::EngineConfig forRanks = config_;
    backend->prepareRanks(forRanks);  // the CUDA engine's NCCL id, say
    rankConfig = encodeEngineConfig(forRanks);
  } catch (const std::exception& e) {
    return failure(e.what());
  }
  // Across nodes: this is the leader. The other nodes' agents connect here, from the start.
  if (config_.common.nnodes > 1) {
    try {
      nodeAddress_ = resolveHost(config_.common.masterAddr, "--master-addr");
      RemoteNodes::Options o;
      o.host = nodeAddress_;
      o.port = config_.common.masterPort;
      o.nnodes = config_.common.nnodes;
      o.ranksPerNode = config_.common.ranksPerNode();
      o.joinDeadline = deadlineAfterMs(rankOptions_.startTimeoutMs);
      remote_ = std::make_unique<RemoteNodes>(loop_, o, [this](std::string why) {
        // While starting, startRanks() fails with it and so does Node.start.
        if (running_) fail(why);
      });
    } catch (const std::exception& e) {
      return failure(std::string("--master-addr/--master-port: ") + e.what());
    }
  }
  if (!plan_.chatFormatNote.empty()) {
    vsup::log().warn("[engine] {}: {}", runtime_.name(), plan_.chatFormatNote);
  }
  if (!plan_.summary.empty()) vsup::log().info("[engine] {}: {}", runtime_.name(), plan_.summary);
  tokenizing_ = std::make_unique<ComputeThread>();

  const uint32_t tp = config_.common.tensorParallelSize;
  const uint32_t localRanks = config_.common.ranksPerNode();  // this node's: 0 .. localRanks - 1
  int64_t kvMs = config_.common.kv.connector != "none"
                     ? int64_t(config_.common.kv.shutdownTimeoutS * 1000)
                     : 0;
  if (vsupKv()) {
    try {
      if (!plan_.kvLayout) {
        throw std::invalid_argument(std::string("--kv-connector vsup needs an engine whose KV "
                                                "cache can be transferred (--engine cpu), not ") +
                                    engine::engineName(config_));
      }
      for (uint32_t r = 0; r < tp; ++r) {
        kvRegions_.push_back(engine::createKvCacheRegion(plan_.kvLayout->totalBytes()));
      }
    } catch (const std::exception& e) {
      return failure(e.what());
    }
    engineId_ = newEngineId();
  }
  supervisor::SupervisorSpec spec;
  spec.name = runtime_.name();
  spec.intensity = 0;  // no partial restart: a dead rank fails the engine
  std::string exe = supervisor::selfExecutable();
  // The KV agents first: the ranks stop first, and an agent may go on serving reads of its
  // rank's blocks while it defers (the region outlives the rank: the agent maps it too).
  for (uint32_t r = 0; r < tp && vsupKv(); ++r) {
    KvAgentSettings s;
    s.rank = r;
    s.role = config_.common.kv.role;
    s.host = config_.common.kv.host;
    s.port = config_.common.kv.port;
    s.transport = config_.common.kv.transport;
    s.leaseMs = int64_t(config_.common.kv.leaseS * 1000);
    s.transferTimeoutMs = int64_t(config_.common.kv.transferTimeoutS * 1000);
    s.shutdownTimeoutMs = kvMs;
    s.engineId = engineId_;
    s.layout = *plan_.kvLayout;
    s.compat = kv::compatFor(s.layout, plan_.modelId, plan_.modelKvHeads, tp);
    supervisor::ChildSpec c;
    c.name = "kv-agent-tp" + std::to_string(r);
    c.vsupAware = true;
    c.command = {exe, "__kv-agent", "--kv-cache-fd", "4"};
    c.inheritFds.push_back(kvRegions_[r].get());
    c.startConfig = encodeKvAgentConfig(s);
    c.livenessTimeoutMs = rankOptions_.livenessTimeoutMs;
    c.livenessIntervalMs = rankOptions_.livenessIntervalMs;
    c.shutdown = supervisor::ShutdownPolicy::timeout(
        supervisor::DeadlineBudget::serving(0, kvMs).rankStopMs);
    spec.children.push_back(std::move(c));
  }
  for (uint32_t r = 0; r < localRanks; ++r) {
    supervisor::ChildSpec c = rankChildSpec(
        exe, r, rankConfig, nodeAddress_, collectiveRegion_ ? collectiveRegion_.get() : -1,
        rankOptions_, supervisor::DeadlineBudget::serving(0, kvMs).rankStopMs);
    if (!kvRegions_.empty()) {
      c.inheritFds.push_back(kvRegions_[r].get());
      c.command.insert(c.command.end(),
                       {"--kv-cache-fd", std::to_string(3 + c.inheritFds.size())});
    }
    spec.children.push_back(std::move(c));
  }
  supervisor::SupervisorOptions supOptions;
  supOptions.selfExe = exe;
  supOptions.collectOutput = true;
  supOptions.onDeferral = [this](const std::string& node, const supervisor::Deferral& d) {
    runtime_.reportDeferral(node, d);
  };
  ranks_ = std::make_unique<supervisor::Supervisor>(loop_, spec, supOptions);
  watchdog_ = ranks_->terminated()
                  .then([this](supervisor::Outcome o) {
                    // While starting, a rank's failure is the start's failure: Node.start
                    // reports it (naming the rank) and the parent then stops this process.
                    // Exiting here would race that report.
                    if (stopping_ || !running_) return;
                    // ranks_->failure() names the child: a rank, or a rank's KV agent.
                    fail(std::string(agents_.empty() ? "a tensor-parallel worker died ("
                                                     : "a tensor-parallel worker or KV agent died (") +
                         supervisor::nameOf(o) + ": " + ranks_->failure() + ")");
                  })
                  .eagerlyEvaluate(nullptr);
  return ranks_->start().then([this, tp, localRanks, rankConfig]() {
    collectiveRegion_ = OwnFd();  // every rank has it mapped
    kvRegions_.clear();           // every rank and agent has it mapped
    auto workers = std::make_shared<WorkerList>(tp);
    kj::Promise<void> all = rankWorkers(*ranks_, 0, localRanks)
                                .then([workers](kj::Array<schema::Worker::Client> local) {
                                  for (size_t r = 0; r < local.size(); ++r) {
                                    (*workers)[r] = kj::mv(local[r]);
                                  }
                                });
    if (remote_) {
      // The other nodes' ranks, then every rank connected to its peers on other nodes.
      all = all.then([this, rankConfig]() { return remote_->startRanks(rankConfig); })
                .then([this, workers, localRanks](std::vector<schema::Worker::Client> others) {
                  for (size_t i = 0; i < others.size(); ++i) {
                    (*workers)[localRanks + i] = kj::mv(others[i]);
                  }
                  if (!plan_.crossNodeCollective) return kj::Promise<void>(kj::READY_NOW);
                  return connectAcrossNodes(workers);
                });
    }
    auto clients = std::make_shared<std::vector<std::unique_ptr<RankClient>>>(tp);
    kj::Vector<kj::Promise<void>> caps;
    caps.add(all.then([workers, clients]() {
      for (size_t r = 0; r < workers->size(); ++r) (*clients)[r] = makeRpcRank(*(*workers)[r]);
    }));
    auto agents = std::make_shared<std::vector<std::optional<schema::KvAgent::Client>>>(
        vsupKv() ? tp : 0);
    for (uint32_t r = 0; r < agents->size(); ++r) {
      caps.add(ranks_->service("kv-agent-tp" + std::to_string(r))
                   .then([agents, r](capnp::Capability::Client cap) {
                     (*agents)[r] = cap.castAs<schema::KvAgent>();
                   }));
    }
    return kj::joinPromises(caps.releaseAsArray()).then([this, clients, agents, tp]() {
      for (auto& a : *agents) agents_.push_back(kj::mv(*a));
      for (size_t i = 0; i < agents_.size() && config_.common.kv.role != "decode"; ++i) {
        watchLeases(i);
      }
      if (vsupKv()) {
        vsup::log().info("[engine] {}: KV connector vsup, role {}, engine id {}, agents on "
                         "{}:{}..{}",
                         runtime_.name(), config_.common.kv.role, engineId_,
                         config_.common.kv.host, config_.common.kv.port,
                         config_.common.kv.port + tp - 1);
      }
      StepExecutor::Options o;
      o.stepTimeoutMs = config_.common.stepTimeoutMs;
      o.stragglerMs = config_.common.collectiveTimeoutMs;
      executor_ = std::make_unique<StepExecutor>(loop_, std::move(*clients), o);
      for (int fd : apiFds_) {
        auto session = kj::heap<EngineSession>(*this, tasks_);
        session->index = router_.addSession(session.get());
        sessions_.push_back(session.get());
        size_t index = session->index;
        links_.push_back(
            ipc::RpcLink::serve(loop_, OwnFd(fd), kj::mv(session), ipc::dataReaderOptions()));
        tasks_.add(links_.back()->onDisconnect().then([this, index]() { sessionLost(index); }));
      }
      apiFds_.clear();  // owned by the links now
      vsup::log().info("[engine] {}: {} rank(s) ready, serving {} API server(s)", runtime_.name(),
                       tp, sessions_.size());
      running_ = true;
      loopPromise_ = loop().eagerlyEvaluate([this](kj::Exception&& e) {
        if (ranksStopping_) {
          // A hurried shutdown (a second signal) stops the ranks while a step may still be in
          // flight: the step's end is the loop's end, not an engine failure.
          vsup::log().info("[shutdown] {}: step loop ended by the ranks' stop ({})",
                           runtime_.name(), ipc::userMessage(e));
          if (boundary_ && boundary_->isWaiting()) boundary_->fulfill();
          return;
        }
        fail(std::string("step loop failed: ") + ipc::userMessage(e));
      });
    });
  });
}

kj::Promise<supervisor::NodeStatus> EngineCore::status(int64_t budgetMs) {
  if (!ranks_) {
    supervisor::NodeStatus s;
    s.type = supervisor::NodeType::Supervisor;
    s.state = supervisor::NodeState::Starting;
    return s;
  }
  auto local = ranks_->status(budgetMs).then([this](supervisor::NodeStatus s) {
    s.inFlight = int64_t(scheduler_->inFlight() + beingTokenized_.size());
    if (!failure_.empty()) s.state = supervisor::NodeState::Failed;
    return s;
  });
  if (!remote_) return local;
  // The other nodes appear as engine-core's children, after its own ranks.
  return local.then([this, budgetMs](supervisor::NodeStatus s) {
    return remote_->status(budgetMs).then(
        [s = kj::mv(s)](std::vector<supervisor::NodeStatus> nodes) mutable {
          for (auto& n : nodes) s.children.push_back(std::move(n));
          return kj::mv(s);
        });
  });
}

kj::Promise<void> EngineCore::stopAtStepBoundary() {
  stopping_ = true;
  // One KV deadline for every rank, from now: the ranks are stopped together (stopRanks), and
  // none may start a clock of its own (a late one would wait past the bound).
  if (kv_) {
    kvGiveUpAt_ = deadlineAfterMs(int64_t(config_.common.kv.shutdownTimeoutS * 1000));
    finalKvStep_ = true;
  }
  size_t aborted = endAll(engine::FinishReason::Abort, "engine-core is shutting down");
  if (aborted > 0) {
    vsup::log().info("[shutdown] {}: aborted {} request(s) still in flight", runtime_.name(),
                     aborted);
  }
  // A shutdown while the ranks are still starting (the step loop never ran), or after the loop
  // ended: there is no step boundary to wait for.
  if (!running_ || !failure_.empty()) return kj::READY_NOW;
  bool stepRunning = executor_ && executor_->running();
  if (!stepRunning && !kvWorkLeft()) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  boundary_ = kj::mv(paf.fulfiller);
  wake();  // an idle loop with KV announcements left runs one transfer-only step
  return paf.promise.then([this]() {
    vsup::log().info("[shutdown] {}: step loop stopped at step boundary {}", runtime_.name(),
                     lastStep_);
  });
}

kj::Promise<bool> EngineCore::stopRanks(MonoNs deadline) {
  if (!ranks_) return true;
  // All at once: the ranks are peers, idle at the step boundary, and each waits for its own KV
  // transfers (under the one deadline of the last step, kvGiveUpAt_): they wait at the same
  // time, each deferring in the log and `vsup tree`, not one after another.
  ranksStopping_ = true;
  ranks_->shutdownAtOnce(deadline);
  // The other nodes at the same moment: each stops its ranks and exits, 0 only after a stop
  // that was asked for (not after an engine failure, nor when this tree lost its root).
  kj::Promise<void> released = kj::READY_NOW;
  if (remote_) {
    released = remote_->release(int64_t(msUntil(deadline)),
                                !failure_.empty() || runtime_.parentLost());
  }
  return ranks_->shutdown(deadline).then([released = kj::mv(released)]() mutable {
    return kj::mv(released);
  }).then([this]() {
    // A rank that died on its own (during the shutdown, before it while this process was
    // already stopping and no longer failing the engine for it, or while the ranks started: a
    // start the shutdown merely cut short ends Clean) is a failure of this subtree.
    auto o = ranks_->outcome();
    if (o == supervisor::Outcome::ChildFailed || o == supervisor::Outcome::IntensityExceeded ||
        o == supervisor::Outcome::StartFailed) {
      runtime_.reportChildFailure();
    }
    return ranks_->escalations() == 0;
  });
}

kj::Promise<std::optional<engine::Rejection>> EngineCore::submit(size_t session,
                                                                 engine::GenerateRequest request) {
  auto refuse = [this]() {
    return failure(failure_.empty() ? "engine-core is shutting down"
                                   : "engine failed: " + failure_);
  };
  if (stopping_ || !failure_.empty()) return refuse();
  if (router_.owned(request.id) || beingTokenized_.count(request.id) != 0) {
    return failure("duplicate request id " + request.id);
  }
  std::string id = request.id;
  router_.own(id, session);
  serving_.arrived(id, monoNow());
  // A short prompt is tokenized here and now (kInlineTokenizeBytes says why); a long one, or a
  // long chat, goes to the thread, so that it never stalls the steps of running requests.
  size_t bytes = request.prompt.size();
  for (const auto& m : request.messages) bytes += m.role.size() + m.content.size();
  if (bytes <= kInlineTokenizeBytes) {
    engine::core::TokenizedRequest t;
    t.promptTokens = engine::tokenizePrompt(request, *tokenizer_, plan_.chatFormat);
    t.request = std::move(request);
    // Admitted on the next turn of this loop (no thread involved): returning the value as a
    // ready promise trips a GCC 12 -Wmaybe-uninitialized false positive inside KJ.
    return kj::Promise<void>(kj::READY_NOW).then([this, t = std::move(t)]() mutable {
      return admitTokenized(std::move(t));
    });
  }
  beingTokenized_.insert(id);
  std::shared_ptr<const engine::Tokenizer> tokenizer = tokenizer_;
  // The request travels through the job and back, so its prompt and messages are never copied.
  return tokenizing_
      ->run<engine::core::TokenizedRequest>(
          [tokenizer, format = plan_.chatFormat, request = std::move(request)]() mutable {
            engine::core::TokenizedRequest t;
            t.promptTokens = engine::tokenizePrompt(request, *tokenizer, format);
            t.request = std::move(request);
            return t;
          })
      .then([this, id](engine::core::TokenizedRequest t) -> std::optional<engine::Rejection> {
        // Aborted (or the engine stopped or failed) while it was being tokenized: the abort
        // already sent its final delta.
        if (beingTokenized_.erase(id) == 0) return std::nullopt;
        if (stopping_ || !failure_.empty()) {
          engine::TokenDelta final;
          final.requestId = id;
          final.finish = stopping_ ? engine::FinishReason::Abort : engine::FinishReason::Error;
          final.error = failure_.empty() ? "engine-core is shutting down" : failure_;
          route({final});
          return std::nullopt;
        }
        return admitTokenized(std::move(t));
      });
}

std::optional<engine::Rejection> EngineCore::checkKvParams(const engine::GenerateRequest& r) const {
  if (!r.kv) return std::nullopt;
  const engine::KvConfig& kv = config_.common.kv;
  std::string here = "this instance runs with --kv-connector " + kv.connector +
                     (kv.connector == "vsup" ? " --kv-role " + kv.role : std::string());
  if (r.kv->doRemoteDecode && (kv.connector != "vsup" || kv.role == "decode")) {
    return engine::Rejection{engine::RejectCode::KvTransferInvalid,
                             "kv_transfer_params.do_remote_decode needs a prefill instance "
                             "(--kv-connector vsup --kv-role prefill or both); " + here};
  }
  if (r.kv->doRemotePrefill) {
    if (kv.connector != "vsup" || kv.role == "prefill") {
      return engine::Rejection{engine::RejectCode::KvTransferInvalid,
                               "kv_transfer_params.do_remote_prefill needs a decode instance "
                               "(--kv-connector vsup --kv-role decode or both); " + here};
    }
    if (r.kv->tpSize != config_.common.tensorParallelSize) {
      return engine::Rejection{
          engine::RejectCode::KvTransferInvalid,
          "kv_transfer_params.tp_size " + std::to_string(r.kv->tpSize) +
              " is not this instance's --tensor-parallel-size " +
              std::to_string(config_.common.tensorParallelSize) +
              " (prefill and decode must split the KV heads alike)"};
    }
  }
  return std::nullopt;
}

std::optional<engine::Rejection> EngineCore::admitTokenized(engine::core::TokenizedRequest t) {
  std::string id = t.request.id;
  std::optional<engine::Rejection> rejected = checkKvParams(t.request);
  std::optional<engine::KvParams> remote;
  if (t.request.kv && t.request.kv->doRemotePrefill) remote = t.request.kv;
  if (!rejected) rejected = scheduler_->admit(std::move(t));
  if (!rejected && remote) awaitingLoad_[id] = std::move(*remote);
  if (rejected) {
    router_.forget(id);  // not queued: nothing will be routed for it
    serving_.forget(id);
    return rejected;
  }
  wake();
  return std::nullopt;
}

void EngineCore::abort(const std::string& id) {
  engine::TokenDelta final;
  final.requestId = id;
  final.finish = engine::FinishReason::Abort;
  if (beingTokenized_.erase(id) != 0 || scheduler_->abort(id, &final)) {
    route({final});
    wake();  // its blocks are free: a waiting request may fit now
  }
  giveUpRemote(id);
}

void EngineCore::giveUpRemote(const std::string& id) {
  auto it = awaitingLoad_.find(id);
  if (it == awaitingLoad_.end()) return;
  sendGiveUp(it->second);
  awaitingLoad_.erase(it);
}

void EngineCore::sendGiveUp(const engine::KvParams& remote) {
  for (auto& agent : agents_) {
    auto req = agent.giveUpRequest();
    req.setRemoteEngineId(remote.remoteEngineId);
    req.setRemoteRequestId(remote.remoteRequestId);
    req.setRemoteHost(remote.remoteHost);
    req.setRemotePort(remote.remotePort);
    tasks_.add(req.send().ignoreResult());
  }
}

void EngineCore::sessionLost(size_t index) {
  // The API server is gone: nobody can receive these requests' tokens any more. They count as
  // aborted (their final deltas are recorded, with no owner left to route them to).
  std::vector<engine::TokenDelta> finals;
  for (const auto& id : router_.sessionLost(index)) {
    engine::TokenDelta final;
    final.requestId = id;
    final.finish = engine::FinishReason::Abort;
    // (One tokenized inline whose admission is still to come is neither: it is served and
    // recorded as usual, its deltas dropped by the router.)
    if (beingTokenized_.erase(id) != 0 || scheduler_->abort(id, &final)) {
      finals.push_back(std::move(final));
    }
    giveUpRemote(id);
  }
  serving_.delivered(finals, monoNow());
  if (index < sessions_.size()) sessions_[index] = nullptr;
}

void EngineCore::wake() {
  if (workAvailable_) {
    auto f = kj::mv(workAvailable_);
    f->fulfill();
  }
}

kj::Promise<void> EngineCore::loop() {
  if (!failure_.empty() || (stopping_ && !kvWorkLeft())) {
    if (boundary_ && boundary_->isWaiting()) boundary_->fulfill();
    return kj::READY_NOW;
  }
  for (const auto& id : scheduler_->expireHolds(monoNow())) kvOutstanding_.erase(id);
  if (scheduler_->inFlight() == 0 && !kvWorkLeft()) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    workAvailable_ = kj::mv(paf.fulfiller);
    return paf.promise.then([this]() { return loop(); });
  }
  // Stopping: only the last transfer announcements go out, no new tokens.
  engine::StepInput input;
  if (stopping_) {
    input.step = lastStep_ + 1;
    input.kvGiveUpAtNs = kvGiveUpAt_;
    finalKvStep_ = false;
  } else {
    input = scheduler_->nextStep();
    for (engine::core::KvLoad& load : scheduler_->takeKvLoads()) {
      awaitingLoad_.erase(load.requestId);
      startLoad(std::move(load));
    }
    if (input.seqs.empty() && kvPending_.empty()) {
      // In flight, and nothing to compute: loads still pulling, or requests waiting for blocks
      // that holds keep. A load's end, a released hold or a new request wakes the loop.
      auto paf = kj::newPromiseAndFulfiller<void>();
      workAvailable_ = kj::mv(paf.fulfiller);
      return paf.promise.then([this]() { return loop(); });
    }
  }
  supervisor::crashIfInjected(runtime_.name(), "step" + std::to_string(input.step));
  input.kvTransfers = std::move(kvPending_);
  kvPending_.clear();
  lastStep_ = input.step;
  bool generates = !input.seqs.empty();
  if (generates) serving_.scheduled(input, monoNow());
  return executor_->run(input).then(
      [this, generates](std::vector<engine::StepOutput> outputs) {
        // Transfers every rank has finished sending release their blocks.
        for (const auto& out : outputs) {
          for (const auto& id : out.kvDone) {
            auto it = kvOutstanding_.find(id);
            if (it == kvOutstanding_.end()) continue;
            if (--it->second == 0) {
              scheduler_->releaseHold(id);
              kvOutstanding_.erase(it);
            }
          }
        }
        if (generates) applyStep(std::move(outputs));
        return loop();
      });
}

void EngineCore::applyStep(std::vector<engine::StepOutput> outputs) {
  engine::core::StepResult result = scheduler_->complete(outputs);
  if (!result.held.empty() && vsupKv()) {
    // Remote-decode requests: their final deltas go out once every agent holds the lease, so
    // that no decode instance can ask for blocks before they are leased.
    std::set<std::string> heldIds;
    for (const auto& h : result.held) heldIds.insert(h.requestId);
    std::vector<engine::TokenDelta> now, finals;
    for (auto& d : result.deltas) {
      (heldIds.count(d.requestId) != 0 ? finals : now).push_back(std::move(d));
    }
    route(now);
    grantLeases(std::move(result.held), std::move(finals));
    return;
  }
  if (!result.held.empty()) {
    std::vector<std::string> finished;
    for (const auto& h : result.held) finished.push_back(h.requestId);
    std::vector<std::string> chosen = kv_ ? kv_->toTransfer(finished) : std::vector<std::string>{};
    std::set<std::string> send(chosen.begin(), chosen.end());
    for (auto& h : result.held) {
      if (send.count(h.requestId) == 0) {
        scheduler_->releaseHold(h.requestId);
        continue;
      }
      kvOutstanding_[h.requestId] = executor_->rankCount();
      kvPending_.push_back(std::move(h));
    }
  }
  route(result.deltas);
}

void EngineCore::grantLeases(std::vector<engine::KvTransfer> held,
                             std::vector<engine::TokenDelta> finals) {
  kj::Vector<kj::Promise<void>> grants;
  for (auto& agent : agents_) {
    auto req = agent.grantRequest();
    auto list = req.initLeases(unsigned(held.size()));
    for (unsigned i = 0; i < held.size(); ++i) {
      list[i].setId(held[i].requestId);
      auto blocks = list[i].initBlocks(unsigned(held[i].blocks.size()));
      for (unsigned b = 0; b < held[i].blocks.size(); ++b) blocks.set(b, held[i].blocks[b]);
    }
    grants.add(req.send().ignoreResult());
  }
  auto shared = std::make_shared<std::pair<std::vector<engine::KvTransfer>,
                                           std::vector<engine::TokenDelta>>>(std::move(held),
                                                                             std::move(finals));
  tasks_.add(kj::joinPromises(grants.releaseAsArray())
                 .then(
                     [this, shared]() {
                       std::map<std::string, const engine::KvTransfer*> byId;
                       for (const auto& h : shared->first) byId[h.requestId] = &h;
                       kvStats_.leasesGranted += shared->first.size();
                       for (auto& d : shared->second) {
                         const engine::KvTransfer* h = byId.at(d.requestId);
                         engine::KvParams p;
                         p.doRemotePrefill = true;
                         p.remoteEngineId = engineId_;
                         p.remoteRequestId = h->requestId;
                         p.remoteBlockIds = h->blocks;
                         p.remoteHost = config_.common.kv.host;
                         p.remotePort = config_.common.kv.port;
                         p.tpSize = config_.common.tensorParallelSize;
                         d.kvParams = std::move(p);
                       }
                       route(shared->second);
                     },
                     [this, shared](kj::Exception&& e) {
                       // An agent would not hold them: the blocks are of no use to anyone.
                       std::string why = "the KV agents could not lease the blocks: " +
                                         ipc::userMessage(e);
                       for (const auto& h : shared->first) scheduler_->releaseHold(h.requestId);
                       for (auto& d : shared->second) {
                         d.finish = engine::FinishReason::Error;
                         d.error = why;
                       }
                       route(shared->second);
                       wake();
                     }));
}

void EngineCore::watchLeases(size_t agent) {
  tasks_.add(agents_[agent].nextEndedRequest().send().then(
      [this, agent](capnp::Response<schema::KvAgent::NextEndedResults> r) {
        bool freed = false;
        for (auto e : r.getEnded()) {
          std::string id = e.getId();
          // A lease ends on every rank's agent; its blocks are free once the last one says so.
          if (++leaseEnds_[id] < agents_.size()) continue;
          leaseEnds_.erase(id);
          std::string reason = e.getReason();
          (reason == "done"           ? kvStats_.leasesDone
           : reason == "gave up"      ? kvStats_.leasesGaveUp
           : reason == "disconnected" ? kvStats_.leasesDisconnected
           : reason == "expired"      ? kvStats_.leasesExpired
                                      : kvStats_.leasesAbandoned)++;
          freed = scheduler_->releaseHold(id) || freed;
        }
        if (freed) wake();
        watchLeases(agent);
      }));
}

void EngineCore::startLoad(engine::core::KvLoad load) {
  kj::Vector<kj::Promise<std::pair<std::string, uint64_t>>> pulls;
  for (auto& agent : agents_) {
    auto req = agent.pullRequest();
    req.setRemoteEngineId(load.remote.remoteEngineId);
    req.setRemoteRequestId(load.remote.remoteRequestId);
    req.setRemoteHost(load.remote.remoteHost);
    req.setRemotePort(load.remote.remotePort);
    auto remote = req.initRemoteBlocks(unsigned(load.remote.remoteBlockIds.size()));
    for (unsigned i = 0; i < load.remote.remoteBlockIds.size(); ++i) {
      remote.set(i, load.remote.remoteBlockIds[i]);
    }
    auto local = req.initLocalBlocks(unsigned(load.blocks.size()));
    for (unsigned i = 0; i < load.blocks.size(); ++i) local.set(i, load.blocks[i]);
    pulls.add(req.send().then(
        [](capnp::Response<schema::KvAgent::PullResults> r) {
          return std::pair<std::string, uint64_t>(r.getError(), r.getBytes());
        },
        [](kj::Exception&& e) {
          return std::pair<std::string, uint64_t>("the KV agent failed: " + ipc::userMessage(e),
                                                  0);
        }));
  }
  auto remote = std::make_shared<engine::KvParams>(std::move(load.remote));
  uint64_t token = load.token;
  tasks_.add(kj::joinPromises(pulls.releaseAsArray())
                 .then([this, token, remote](
                           kj::Array<std::pair<std::string, uint64_t>> results) {
                   std::string error;
                   for (const auto& [e, bytes] : results) {
                     if (!e.empty()) error = e;
                     kvStats_.pullBytes += bytes;
                   }
                   ++(error.empty() ? kvStats_.pullsOk : kvStats_.pullsFailed);
                   if (error.empty()) {
                     scheduler_->kvLoaded(token);
                     wake();
                     return;
                   }
                   // Tell the prefill side at once, so its blocks need not wait for the lease.
                   sendGiveUp(*remote);
                   bool recompute = config_.common.kv.loadFailure == "recompute";
                   std::string why = "KV transfer from " + remote->remoteHost + ":" +
                                     std::to_string(remote->remotePort) + " failed: " + error;
                   vsup::log().warn("[engine] {}: {}{}", runtime_.name(), why,
                                    recompute ? "; computing the prompt here" : "");
                   if (auto final = scheduler_->kvLoadFailed(token, recompute, why)) {
                     route({*final});
                   }
                   wake();
                 }));
}

void EngineCore::route(const std::vector<engine::TokenDelta>& deltas) {
  if (deltas.empty()) return;
  serving_.delivered(deltas, monoNow());
  router_.route(deltas);
}

size_t EngineCore::endAll(engine::FinishReason finish, const std::string& error) {
  std::vector<engine::TokenDelta> finals;
  for (const auto& id : router_.requests()) {
    engine::TokenDelta final;
    final.requestId = id;
    bool known = beingTokenized_.erase(id) != 0;
    if (!known && scheduler_) known = scheduler_->abort(id, &final);
    giveUpRemote(id);
    if (!known) continue;
    final.finish = finish;
    final.error = error;
    finals.push_back(std::move(final));
  }
  route(finals);
  return finals.size();
}

void EngineCore::fail(const std::string& why) {
  if (!failure_.empty()) return;
  failure_ = why;
  vsup::log().error("[engine] {}: engine failed: {}", runtime_.name(), why);
  // The API servers learn that the engine failed before their clients get the errors: a
  // client told "engine failure" that asks /health at once must not hear "ready".
  router_.engineFailed(why);
  endAll(engine::FinishReason::Error, "engine failure: " + why);
  if (boundary_ && boundary_->isWaiting()) boundary_->fulfill();
  // Stop the remaining ranks, then exit with an error status.
  tasks_.add(stopRanks(deadlineAfterMs(2000)).then([this](bool) {
    runtime_.exit(supervisor::kExitError);
  }));
}

}  // namespace vsup::workers
