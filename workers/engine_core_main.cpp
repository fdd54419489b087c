// `vsup __engine-core --tp N <engine flags> [...] --api-fd FD ...`: the engine-core process.
//
// A child supervisor (it supervises the tensor-parallel workers with intensity 0: a rank that
// dies fails the engine, no partial restart) and the scheduler. It runs the step loop: between
// steps it admits new requests (continuous batching), then broadcasts the step to every rank and
// waits for all of them, then sends each API server the deltas of its requests in one call.
//
// Shutdown (its hook, before its workers are stopped): refuse new requests, abort whatever is
// still running (the API servers have drained by then: normally nothing), announce the last KV
// transfers, and stop the loop at a step boundary, so no rank is ever left inside a step.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include <kj/debug.h>

#include "engine/collective.h"
#include "engine/cpu_engine.h"
#include "engine/engine.h"
#include "base/fd.h"
#include "base/log.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_kj.h"
#include "kvconnector/kv_connector.h"
#include "supervisor/child_runtime.h"
#include "supervisor/fault_injection.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "workers/engine_codec.h"
#include "workers/engine_flags.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {
namespace {

namespace schema = ipc::schema;

struct Options {
  uint32_t tp = 1;
  EngineFlags engine;
  uint32_t maxNumSeqs = 256;
  uint64_t stepTimeoutMs = 30000;
  std::string kvConnector = "none";
  uint64_t simKvTransferMs = 0;
  double kvShutdownTimeout = 10;
  std::vector<int> apiFds;
};

class EngineCore;

// One API server's connection: its sink and the requests it submitted.
class Session final : public schema::Engine::Server {
 public:
  Session(EngineCore& core, size_t index) : core_(core), index_(index) {}
  std::optional<schema::TokenSink::Client> sink;

 protected:
  kj::Promise<void> attach(AttachContext context) override;
  kj::Promise<void> submit(SubmitContext context) override;
  kj::Promise<void> abort(AbortContext context) override;

 private:
  EngineCore& core_;
  size_t index_;
};

class EngineCore final : private kj::TaskSet::ErrorHandler {
 public:
  EngineCore(uv_loop_t* loop, supervisor::ChildRuntime& runtime, Options options)
      : loop_(loop), runtime_(runtime), options_(std::move(options)), tasks_(*this) {
    if (options_.kvConnector == "sim") kv_ = kv::makeSimScheduler();
  }

  // The engine's scheduler side, and for the CPU engine the shared region of the ranks'
  // collectives. Throws with a message for the user (bad model, bad sizes).
  void makeScheduler() {
    if (options_.engine.engine == "sim") {
      engine::SimOptions sim;
      sim.tokenMs = options_.engine.simTokenMs;
      sim.maxNumSeqs = options_.maxNumSeqs;
      scheduler_ = engine::makeSimScheduler(sim);
      return;
    }
    resolveEngineFlags(options_.engine);
    options_.engine.cpu.tensorParallelSize = options_.tp;
    options_.engine.cpu.maxNumSeqs = options_.maxNumSeqs;
    engine::CpuPlan plan = engine::planCpuEngine(options_.engine.cpu);
    if (!plan.model.chatFormatNote.empty()) {
      vsup::log().warn("[engine] {}: {}", runtime_.name(), plan.model.chatFormatNote);
    }
    vsup::log().info("[engine] {}: model {} ({} parameters, weights {}), context {} tokens, "
                     "KV cache {} blocks of {} tokens per rank",
                     runtime_.name(), plan.model.name, plan.model.config.parameterCount(),
                     plan.model.dummyWeights ? "dummy" : "safetensors", plan.maxModelLen,
                     plan.numBlocks, options_.engine.cpu.blockSize);
    scheduler_ = engine::makeCpuScheduler(options_.engine.cpu, plan);
    if (options_.tp > 1) collectiveRegion_ = OwnFd(engine::createSharedCollective(options_.tp));
  }

  ~EngineCore() {
    loopPromise_ = kj::READY_NOW;
    links_.clear();
  }

  // Node.start: start the ranks, then open the API servers' connections, then run.
  kj::Promise<void> start() {
    try {
      makeScheduler();
    } catch (const std::exception& e) {
      return KJ_EXCEPTION(FAILED, e.what());
    }
    supervisor::SupervisorSpec spec;
    spec.name = runtime_.name();
    spec.intensity = 0;  // no partial restart: a dead rank fails the engine
    std::string exe = supervisor::selfExecutable();
    for (uint32_t r = 0; r < options_.tp; ++r) {
      supervisor::ChildSpec c;
      c.name = "worker-tp" + std::to_string(r);
      c.vsupAware = true;
      c.command = {exe, "__worker", "--rank", std::to_string(r), "--tp",
                   std::to_string(options_.tp), "--kv-connector", options_.kvConnector,
                   "--sim-kv-transfer-ms", std::to_string(options_.simKvTransferMs),
                   "--kv-shutdown-timeout", std::to_string(options_.kvShutdownTimeout)};
      for (auto& a : engineFlagsArgv(options_.engine)) c.command.push_back(a);
      if (collectiveRegion_) {
        c.inheritFds.push_back(collectiveRegion_.get());  // fd 4, after the control socket
        c.command.insert(c.command.end(), {"--collective-fd", "4"});
      }
      c.startTimeoutMs = 600000;  // loading a model's weights
      // The KV deferral is bounded by --kv-shutdown-timeout; leave room for it.
      c.shutdown = supervisor::ShutdownPolicy::timeout(
          5000 + int64_t(options_.kvShutdownTimeout * 1000));
      spec.children.push_back(std::move(c));
    }
    supervisor::SupervisorOptions supOptions;
    supOptions.selfExe = exe;
    supOptions.collectOutput = true;
    supOptions.onDeferral = [this](const std::string& node, const supervisor::Deferral& d) {
      runtime_.reportDeferral(node, d);
    };
    workers_ = std::make_unique<supervisor::Supervisor>(loop_, spec, supOptions);
    watchdog_ = workers_->terminated()
                    .then([this](supervisor::Outcome o) {
                      // While starting, a rank's failure is the start's failure: Node.start
                      // reports it (naming the rank) and the parent then stops this process.
                      // Exiting here would race that report.
                      if (stopping_ || !running_) return;
                      fail("a tensor-parallel worker died (" +
                           std::string(supervisor::nameOf(o)) + ": " + workers_->failure() + ")");
                    })
                    .eagerlyEvaluate(nullptr);
    return workers_->start().then([this]() {
      collectiveRegion_ = OwnFd();  // every rank has it mapped
      kj::Vector<kj::Promise<void>> caps;
      for (uint32_t r = 0; r < options_.tp; ++r) ranks_.emplace_back(nullptr);
      for (uint32_t r = 0; r < options_.tp; ++r) {
        caps.add(workers_->service("worker-tp" + std::to_string(r))
                     .then([this, r](capnp::Capability::Client cap) {
                       ranks_[r] = cap.castAs<schema::Worker>();
                     }));
      }
      return kj::joinPromises(caps.releaseAsArray()).then([this]() {
        for (size_t i = 0; i < options_.apiFds.size(); ++i) {
          auto session = kj::heap<Session>(*this, i);
          sessions_.push_back(session.get());
          links_.push_back(ipc::RpcLink::serve(loop_, OwnFd(options_.apiFds[i]), kj::mv(session),
                                                 ipc::dataReaderOptions()));
          size_t index = i;
          tasks_.add(links_.back()->onDisconnect().then([this, index]() { sessionLost(index); }));
        }
        vsup::log().info("[engine] {}: {} rank(s) ready, serving {} API server(s)", runtime_.name(),
                         options_.tp, options_.apiFds.size());
        running_ = true;
        loopPromise_ = loop().eagerlyEvaluate([this](kj::Exception&& e) {
          fail(std::string("step loop failed: ") + e.getDescription().cStr());
        });
      });
    });
  }

  kj::Promise<supervisor::NodeStatus> status() {
    if (!workers_) {
      supervisor::NodeStatus s;
      s.type = "supervisor";
      s.state = "starting";
      return s;
    }
    return workers_->status().then([this](supervisor::NodeStatus s) {
      s.inFlight = int64_t(scheduler_->inFlight());
      if (!failure_.empty()) s.state = "failed";
      return s;
    });
  }

  // The engine's own shutdown hook: intake off, abort leftovers, stop at a step boundary.
  kj::Promise<void> stopAtStepBoundary() {
    stopping_ = true;
    // One KV deadline for every rank, from now: ranks are stopped one after another, and each
    // must not start a clock of its own (N ranks would then wait N times the bound).
    if (kv_) {
      kvGiveUpAt_ = deadlineAfterMs(int64_t(options_.kvShutdownTimeout * 1000));
      finalKvStep_ = true;
    }
    size_t aborted = endAll(engine::FinishReason::Abort, "engine-core is shutting down");
    if (aborted > 0) {
      vsup::log().info("[shutdown] {}: aborted {} request(s) still in flight", runtime_.name(),
                       aborted);
    }
    if (!stepRunning_ && kvPending_.empty() && !finalKvStep_) return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    boundary_ = kj::mv(paf.fulfiller);
    wake();  // an idle loop with KV announcements left runs one transfer-only step
    return paf.promise.then([this]() {
      vsup::log().info("[shutdown] {}: step loop stopped at step boundary {}", runtime_.name(),
                       lastStep_);
    });
  }

  kj::Promise<bool> stopWorkers(MonoNs deadline) {
    if (!workers_) return true;
    return workers_->shutdown(deadline).then([this]() {
      if (workers_->outcome() == supervisor::Outcome::ChildFailed) runtime_.reportChildFailure();
      return workers_->escalations() == 0;
    });
  }

  engine::Scheduler& scheduler() { return *scheduler_; }

  // Queues a request; returns why it is rejected (empty: accepted).
  std::string submit(size_t session, engine::GenerateRequest request) {
    if (stopping_ || !failure_.empty()) {
      throw std::runtime_error(failure_.empty() ? "engine-core is shutting down"
                                                : "engine failed: " + failure_);
    }
    std::string id = request.id;
    try {
      scheduler_->admit(std::move(request));
    } catch (const engine::RequestRejected& e) {
      return e.what();
    }
    owner_[id] = session;
    wake();
    return {};
  }

  void abort(const std::string& id) {
    engine::TokenDelta final;
    if (scheduler_->abort(id, &final)) route({final});
  }

  void sessionLost(size_t index) {
    // The API server is gone: nobody can receive these requests' tokens any more.
    std::vector<std::string> ids;
    for (auto& [id, owner] : owner_) {
      if (owner == index) ids.push_back(id);
    }
    for (const auto& id : ids) {
      scheduler_->abort(id, nullptr);
      owner_.erase(id);
    }
    if (index < sessions_.size()) sessions_[index] = nullptr;
  }

 private:
  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[engine] {}: {}", runtime_.name(), e.getDescription().cStr());
  }

  void wake() {
    if (workAvailable_) {
      auto f = kj::mv(workAvailable_);
      f->fulfill();
    }
  }

  kj::Promise<void> loop() {
    if (!failure_.empty() || (stopping_ && kvPending_.empty() && !finalKvStep_)) {
      if (boundary_ && boundary_->isWaiting()) boundary_->fulfill();
      return kj::READY_NOW;
    }
    if (scheduler_->inFlight() == 0 && kvPending_.empty() && !finalKvStep_) {
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
    }
    supervisor::crashIfInjected(runtime_.name(), "step" + std::to_string(input.step));
    input.kvTransfers = std::move(kvPending_);
    kvPending_.clear();
    lastStep_ = input.step;
    stepRunning_ = true;
    bool generates = !input.seqs.empty();
    // The step fails as soon as one rank fails (joinPromises alone would wait for every rank,
    // and a stopped rank never answers): its error names it.
    auto failFast = kj::newPromiseAndFulfiller<kj::Array<engine::StepOutput>>();
    stepFailed_ = kj::mv(failFast.fulfiller);
    kj::Vector<kj::Promise<engine::StepOutput>> calls;
    for (size_t r = 0; r < ranks_.size(); ++r) {
      auto request = ranks_[r].stepRequest();
      encode(input, request.initInput());
      calls.add(request.send().then(
          [this, r, step = input.step](capnp::Response<schema::Worker::StepResults>&& res) {
            rankAnswered(r, step);
            return decode(res.getOutput());
          },
          [this, r](kj::Exception&& e) -> engine::StepOutput {
                      std::string why =
                          "worker-tp" + std::to_string(r) +
                          (e.getType() == kj::Exception::Type::DISCONNECTED
                               ? std::string(" disconnected (the process died)")
                               : std::string(": ") + e.getDescription().cStr());
                      if (stepFailed_ && stepFailed_->isWaiting()) {
                        stepFailed_->reject(kj::Exception(kj::Exception::Type::FAILED, __FILE__,
                                                          __LINE__, kj::str(why.c_str())));
                      }
                      kj::throwFatalException(kj::mv(e));
                    })
                    // Now, not when joinPromises collects every branch (KJ runs a .then()
                    // callback lazily): the fail-fast and straggler checks need it at once.
                    .eagerlyEvaluate(nullptr));
    }
    uint64_t step = input.step;
    answered_.assign(ranks_.size(), false);
    auto all = kj::joinPromises(calls.releaseAsArray()).exclusiveJoin(kj::mv(failFast.promise));
    auto timeout = ipc::uvSleep(loop_, options_.stepTimeoutMs)
                       .then([this, step]() -> kj::Promise<kj::Array<engine::StepOutput>> {
                         std::string why = "step " + std::to_string(step) +
                                           ": a rank did not answer within " +
                                           std::to_string(options_.stepTimeoutMs) + " ms";
                         return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                              kj::str(why.c_str()));
                       });
    return all.exclusiveJoin(kj::mv(timeout))
        .then([this, generates](kj::Array<engine::StepOutput> outputs) {
          stepRunning_ = false;
          if (generates) {
            std::vector<engine::StepOutput> outs(std::make_move_iterator(outputs.begin()),
                                                 std::make_move_iterator(outputs.end()));
            auto deltas = scheduler_->complete(outs);
            std::vector<std::string> finished;
            for (const auto& d : deltas) {
              if (d.finish == engine::FinishReason::Length ||
                  d.finish == engine::FinishReason::Stop) {
                finished.push_back(d.requestId);
              }
            }
            if (kv_) {
              for (auto& id : kv_->toTransfer(finished)) kvPending_.push_back(std::move(id));
            }
            route(deltas);
          }
          return loop();
        });
  }

  // Ranks compute a step in lockstep (every collective waits for all), so once one rank has
  // answered, the others are at most a sampling pass behind: a rank still silent after the
  // collective timeout is hung or stopped (a stopped rank that had passed the step's last
  // collective leaves its peers nothing to time out on).
  void rankAnswered(size_t rank, uint64_t step) {
    if (step != lastStep_ || rank >= answered_.size()) return;
    bool first = std::none_of(answered_.begin(), answered_.end(), [](bool a) { return a; });
    answered_[rank] = true;
    if (!first) return;
    int64_t bound = options_.engine.cpu.collectiveTimeoutMs;
    tasks_.add(ipc::uvSleep(loop_, uint64_t(bound)).then([this, rank, step, bound]() {
      if (step != lastStep_ || !stepRunning_ || !stepFailed_ || !stepFailed_->isWaiting()) return;
      std::string silent;
      for (size_t r = 0; r < answered_.size(); ++r) {
        if (!answered_[r]) silent += (silent.empty() ? "worker-tp" : ", worker-tp") + std::to_string(r);
      }
      if (silent.empty()) return;
      std::string why = silent + " did not answer step " + std::to_string(step) + " within " +
                        std::to_string(bound) + " ms of worker-tp" + std::to_string(rank) +
                        " (hung or stopped)";
      stepFailed_->reject(
          kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(why.c_str())));
    }));
  }

  // Sends every delta to the API server that owns the request: one call per server per step.
  void route(const std::vector<engine::TokenDelta>& deltas) {
    std::map<size_t, std::vector<const engine::TokenDelta*>> bySession;
    for (const auto& d : deltas) {
      auto it = owner_.find(d.requestId);
      if (it == owner_.end()) continue;
      bySession[it->second].push_back(&d);
      if (d.finish != engine::FinishReason::None) owner_.erase(it);
    }
    for (auto& [index, list] : bySession) {
      if (index >= sessions_.size() || sessions_[index] == nullptr || !sessions_[index]->sink) {
        continue;
      }
      auto request = sessions_[index]->sink->deltasRequest();
      auto out = request.initDeltas(unsigned(list.size()));
      for (unsigned i = 0; i < list.size(); ++i) encode(*list[i], out[i]);
      tasks_.add(request.send().ignoreResult());
    }
  }

  // Ends every request now with a final delta (`finish`, `error`) to its API server; returns how
  // many there were.
  size_t endAll(engine::FinishReason finish, const std::string& error) {
    std::vector<engine::TokenDelta> finals;
    std::vector<std::string> ids;
    for (auto& [id, owner] : owner_) ids.push_back(id);
    for (const auto& id : ids) {
      engine::TokenDelta final;
      if (scheduler_->abort(id, &final)) {
        final.finish = finish;
        final.error = error;
        finals.push_back(std::move(final));
      }
    }
    route(finals);
    return finals.size();
  }

  // The engine cannot go on: every request fails with a clear error, and this process exits
  // non-zero so that the root tears the tree down (no partial restart).
  void fail(const std::string& why) {
    if (!failure_.empty()) return;
    failure_ = why;
    vsup::log().error("[engine] {}: engine failed: {}", runtime_.name(), why);
    endAll(engine::FinishReason::Error, "engine failure: " + why);
    for (Session* s : sessions_) {
      if (s == nullptr || !s->sink) continue;
      auto request = s->sink->engineFailedRequest();
      request.setReason(why);
      tasks_.add(request.send().ignoreResult());
    }
    if (boundary_ && boundary_->isWaiting()) boundary_->fulfill();
    // Stop the remaining ranks, then exit with an error status.
    tasks_.add(stopWorkers(deadlineAfterMs(2000)).then([this](bool) {
      runtime_.exit(supervisor::kExitError);
    }));
  }

  uv_loop_t* loop_;
  supervisor::ChildRuntime& runtime_;
  Options options_;
  std::unique_ptr<engine::Scheduler> scheduler_;
  OwnFd collectiveRegion_;  // until every rank has mapped it
  std::unique_ptr<supervisor::Supervisor> workers_;
  std::vector<schema::Worker::Client> ranks_;
  std::vector<Session*> sessions_;  // owned by their RPC links; null once disconnected
  std::vector<std::unique_ptr<ipc::RpcLink>> links_;
  std::map<std::string, size_t> owner_;  // request id → session index
  std::unique_ptr<kv::KvConnectorScheduler> kv_;
  std::vector<std::string> kvPending_;  // announced to the ranks with the next step
  MonoNs kvGiveUpAt_ = 0;                // set when shutting down with a KV connector
  bool finalKvStep_ = false;             // the step that tells every rank kvGiveUpAt_ is due
  bool stopping_ = false;
  bool running_ = false;  // started: the step loop runs
  bool stepRunning_ = false;
  uint64_t lastStep_ = 0;
  std::string failure_;
  kj::Own<kj::PromiseFulfiller<void>> workAvailable_;
  kj::Own<kj::PromiseFulfiller<void>> boundary_;
  kj::Own<kj::PromiseFulfiller<kj::Array<engine::StepOutput>>> stepFailed_;  // this step's
  std::vector<bool> answered_;  // this step: which ranks have answered
  kj::Promise<void> loopPromise_ = kj::READY_NOW;
  kj::Promise<void> watchdog_ = kj::READY_NOW;
  kj::TaskSet tasks_;
};

kj::Promise<void> Session::attach(AttachContext context) {
  sink = context.getParams().getSink();
  context.getResults().setMaxModelLen(core_.scheduler().maxModelLen());
  context.getResults().setChatFormat(core_.scheduler().chatFormat());
  return kj::READY_NOW;
}

kj::Promise<void> Session::submit(SubmitContext context) {
  try {
    context.getResults().setRejected(core_.submit(index_, decode(context.getParams().getRequest())));
  } catch (const std::exception& e) {
    return KJ_EXCEPTION(FAILED, e.what());
  }
  return kj::READY_NOW;
}

kj::Promise<void> Session::abort(AbortContext context) {
  core_.abort(context.getParams().getId());
  return kj::READY_NOW;
}

}  // namespace

int engineCoreMain(int argc, char** argv) {
  CLI::App app{"vsup engine-core (started by vsup run)"};
  Options options;
  app.add_option("--tp", options.tp)->check(CLI::Range(1u, 64u));
  addEngineFlags(app, options.engine, false);
  app.add_option("--max-num-seqs", options.maxNumSeqs)->check(CLI::Range(1u, 65536u));
  app.add_option("--step-timeout-ms", options.stepTimeoutMs);
  app.add_option("--api-fd", options.apiFds);
  app.add_option("--kv-connector", options.kvConnector)->check(CLI::IsMember({"none", "sim"}));
  app.add_option("--sim-kv-transfer-ms", options.simKvTransferMs);
  app.add_option("--kv-shutdown-timeout", options.kvShutdownTimeout);
  CLI11_PARSE(app, argc, argv);

  return runNodeProcess("vsup __engine-core",
                        [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    auto core = std::make_unique<EngineCore>(loop, runtime, options);
    EngineCore* c = core.get();
    runtime.onStart([c](const supervisor::SupervisorSpec&) { return c->start(); });
    runtime.onStatus([c]() { return c->status(); });
    runtime.addShutdownHook("engine",
                            [c](supervisor::ShutdownContext&) { return c->stopAtStepBoundary(); });
    runtime.onStopChildren([c](MonoNs deadline) { return c->stopWorkers(deadline); });
    return holding(std::move(core));
  });
}

}  // namespace vsup::workers
