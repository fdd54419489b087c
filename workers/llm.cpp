// vsup::LLM (workers/public/llm.h): engine-core and its ranks as child processes of a private
// supervisor, driven through the same EngineClient an API server uses.
//
// Everything KJ/capnp lives on the LoopThread; public calls marshal onto it with run().
//
// The drain (drain(), shutdown(), the destructor), on the loop thread: admission closes
// (draining_), the requests then running are counted in the report as they end; at the deadline
// each one still running is aborted through the engine (Engine.abort, as the API server aborts
// the request of a client that went away), so its final delta carries "abort" and the text so
// far is kept; after a short grace for those deltas the supervisor stops engine-core, whose
// shutdown hook stops its step loop at a step boundary (the step in progress finishes) and
// aborts anything left. Only then is stopping_ set: an engine that dies during the drain is
// still a failure, reported to the requests it cut.
//
// Every message that came from another process (a rejection, a delta's error, the engine's
// failure, a start failure) goes through ipc::userMessage: no "remote exception: ..." reaches
// the caller.
#include "workers/public/llm.h"

#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>

#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"
#include "engine/config.h"
#include "engine/registry.h"
#include "engine/types.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/host_checks.h"
#include "supervisor/loop_thread.h"
#include "supervisor/supervisor.h"
#include "workers/engine_client.h"
#include "workers/engine_codec.h"

namespace vsup {

using ipc::failure;

namespace {

// The LLMConfig as the engine's one typed configuration, validated here (before any process
// starts), the same way `vsup run` validates its flags. Throws vsup::Error naming the field.
engine::EngineConfig toEngineConfig(const LLMConfig& c) {
  try {
    engine::CommonConfig common;
    common.tensorParallelSize = c.tensorParallelSize;
    if (!c.model.empty()) common.model = c.model;
    engine::SimConfig sim;
    sim.tokenMs = c.simTokenMs;
    return engine::makeEngineConfig(c.engine, common, c.kvCacheMemory, "kvCacheMemory",
                                    engine::CpuConfig{}, sim, c.dtype);
  } catch (const std::invalid_argument& e) {
    throw Error(std::string("vsup::LLM: ") + e.what());
  }
}

// The grace, after the drain's deadline, for the final deltas of the requests it aborted (one
// engine step, normally a few ms); whatever is still running after it ends when engine-core
// stops.
constexpr int64_t kAbortGraceMs = 1000;

// What a generate() on the loop thread comes back with: the completions, or "shut down" (thrown
// as ShutDownError on the caller's thread: LoopThread::run carries only vsup::Error).
struct Generated {
  std::vector<Completion> completions;
  std::optional<std::string> shutDown;
};

}  // namespace

class LLM::Impl : public kj::TaskSet::ErrorHandler {
 public:
  explicit Impl(LLMConfig config) : config_(std::move(config)) {
    supervisor::requireSigchldNotIgnored("vsup::LLM");
    VSUP_REQUIRE(config_.tensorParallelSize >= 1 && config_.tensorParallelSize <= 64,
                 "vsup::LLM: tensorParallelSize must be between 1 and 64, got " +
                     std::to_string(config_.tensorParallelSize));
    engineConfig_ = toEngineConfig(config_);
    VSUP_REQUIRE(config_.startTimeout.count() > 0, "vsup::LLM: startTimeout must be positive");
    VSUP_REQUIRE(config_.shutdownTimeout.count() >= 0,
                 "vsup::LLM: shutdownTimeout must be >= 0 ms, got " +
                     std::to_string(config_.shutdownTimeout.count()));
    VSUP_REQUIRE(config_.maxTokensLimit >= 0,
                 "vsup::LLM: maxTokensLimit must be >= 0 (0: no limit), got " +
                     std::to_string(config_.maxTokensLimit));
    VSUP_REQUIRE(config_.livenessTimeout.count() == 0 || config_.livenessTimeout.count() >= 100,
                 "vsup::LLM: livenessTimeout must be 0 (off) or at least 100 ms, got " +
                     std::to_string(config_.livenessTimeout.count()) + " ms");
    setLogLevel(config_.logLevel);
    exe_ = supervisor::resolveVsupExecutable(config_.vsupExecutable);
    VSUP_REQUIRE(::access(exe_.c_str(), X_OK) == 0,
                 "vsup::LLM: the vsup executable '" + exe_ +
                     "' is missing or not executable (set LLMConfig::vsupExecutable or $VSUP_EXE)");
    loop_ = std::make_unique<supervisor::LoopThread>();
    try {
      loop_->run([this]() { return start(); });
    } catch (...) {
      // A failed start leaves nothing behind: stop what did start, then drop the thread.
      teardown(std::chrono::seconds(10));
      throw;
    }
  }

  ~Impl() noexcept(false) { teardown(config_.shutdownTimeout); }

  std::vector<Completion> generate(const std::vector<std::string>& prompts,
                                   const Sampling& sampling,
                                   const std::function<void(std::string_view)>* onText) {
    engine::SamplingParams params = toParams(sampling);
    engine::SamplingLimits limits;
    limits.maxTokensLimit = config_.maxTokensLimit;
    if (auto bad = engine::checkSampling(params, limits)) {
      throw Error("vsup::LLM: " + bad->message);
    }
    Generated result = loop_->run([&]() -> kj::Promise<Generated> {
      // A stop the user asked for wins over an earlier failure: "shut down", as documented.
      if (draining_) return Generated{{}, shutDownMessage()};
      if (!failure_.empty()) return failure(failure_);
      kj::Vector<kj::Promise<Completion>> all;
      for (const std::string& prompt : prompts) all.add(submit(prompt, params, onText));
      return kj::joinPromises(all.releaseAsArray()).then([](kj::Array<Completion> done) {
        return Generated{std::vector<Completion>(std::make_move_iterator(done.begin()),
                                                 std::make_move_iterator(done.end())),
                         std::nullopt};
      });
    });
    if (result.shutDown) throw ShutDownError(*result.shutDown);
    return std::move(result.completions);
  }

  DrainReport drain(std::chrono::milliseconds timeout) {
    VSUP_REQUIRE(timeout.count() >= 0, "vsup::LLM: the drain timeout must be >= 0 ms, got " +
                                           std::to_string(timeout.count()) + " ms");
    return loop_->run([&]() -> kj::Promise<DrainReport> {
      if (drained_.get() != nullptr) {
        // Another drain runs or ran: wait for it, report nothing of ours.
        return drained_->addBranch().then([](DrainReport) { return DrainReport{}; });
      }
      draining_ = true;
      report_ = DrainReport{};
      inDrain_ = pending_.size();
      int64_t ms = timeout.count();
      kj::Promise<DrainReport> done =
          whenIdle()
              .exclusiveJoin(ipc::uvSleep(loop_->loop(), uint64_t(ms)))
              .then([this]() -> kj::Promise<void> {
                if (pending_.empty()) return kj::READY_NOW;
                // The deadline: the engine ends each one with "abort" and its text so far.
                for (const auto& [id, p] : pending_) {
                  if (engine_) engine_->abort(id);
                }
                return whenIdle().exclusiveJoin(ipc::uvSleep(loop_->loop(), kAbortGraceMs));
              })
              .then([this]() -> kj::Promise<void> {
                stopping_ = true;
                if (!sup_) return kj::READY_NOW;
                return sup_
                    ->shutdown(
                        deadlineAfterMs(supervisor::DeadlineBudget::embeddedEngineStopMs()))
                    .catch_([](kj::Exception&& e) {
                      // The tree is torn down by teardown() anyway; the callers still get
                      // their answers below.
                      vsup::log().warn("[llm] stopping engine-core: {}", ipc::userMessage(e));
                    });
              })
              .then([this]() {
                // engine-core's hook aborts what it still runs, before it goes: anything left
                // here never got its final delta (the engine died meanwhile). It still ends as
                // the drain promised, with its text so far.
                for (auto& [id, p] : pending_) {
                  p.completion.finishReason = engine::nameOf(engine::FinishReason::Abort);
                  ++report_.aborted;
                  p.done->fulfill(kj::mv(p.completion));
                }
                pending_.clear();
                inDrain_ = 0;
                return report_;
              });
      auto forked = done.fork();
      drained_ = kj::heap<kj::ForkedPromise<DrainReport>>(kj::mv(forked));
      return drained_->addBranch();
    });
  }

  void shutdown(std::chrono::milliseconds timeout) { drain(timeout); }

 private:
  struct Pending {
    Completion completion;
    const std::function<void(std::string_view)>* onText = nullptr;
    kj::Own<kj::PromiseFulfiller<Completion>> done;
  };

  static engine::SamplingParams toParams(const Sampling& s) {
    engine::SamplingParams p;
    p.maxTokens = s.maxTokens;
    p.temperature = s.temperature;
    p.topP = s.topP;
    p.topK = s.topK;
    p.seed = s.seed;
    p.stop = s.stop;
    return p;
  }

  // The same after an earlier engine failure: the caller asked for the stop, so the stop is
  // the answer (the failure was reported to the calls it cut, and logged).
  static std::string shutDownMessage() {
    return "vsup::LLM: shut down (drain() or shutdown() was called): no new requests are "
           "accepted";
  }

  // Resolves when no request is running.
  kj::Promise<void> whenIdle() {
    if (pending_.empty()) return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    idle_ = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  // A request ended (`how`): counted if the drain saw it running, and the drain told when it
  // was the last.
  void ended(std::map<std::string, Pending>::iterator it, engine::FinishReason how) {
    pending_.erase(it);
    if (draining_ && inDrain_ > 0) {
      --inDrain_;
      switch (how) {
        case engine::FinishReason::Stop:
        case engine::FinishReason::Length: ++report_.completed; break;
        case engine::FinishReason::Abort: ++report_.aborted; break;
        default: ++report_.failed; break;
      }
    }
    if (pending_.empty() && idle_) {
      auto f = kj::mv(idle_);
      f->fulfill();
    }
  }

  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[llm] {}", ipc::userMessage(e));
  }

  // On the loop thread: engine-core (and its ranks) up, then our connection to it.
  kj::Promise<void> start() {
    tasks_ = kj::heap<kj::TaskSet>(*this);
    int sv[2];
    VSUP_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    OwnFd engineEnd(sv[0]);
    myEnd_.reset(sv[1]);
    supervisor::SupervisorSpec spec;
    spec.name = "llm";
    spec.intensity = 0;  // no partial restart: an engine that dies fails the LLM
    supervisor::ChildSpec core;
    core.name = "engine-core";
    core.vsupAware = true;
    core.command = {exe_, "__engine-core", "--api-fd", "4"};
    core.startConfig = workers::encodeEngineConfig(engineConfig_);  // delivered in Node.start
    core.inheritFds = {engineEnd.get()};
    core.startTimeoutMs = config_.startTimeout.count();
    if (config_.livenessTimeout.count() > 0) {
      core.livenessTimeoutMs = config_.livenessTimeout.count();
      core.livenessIntervalMs = std::min<int64_t>(1000, config_.livenessTimeout.count() / 2);
    }
    core.shutdown =
        supervisor::ShutdownPolicy::timeout(supervisor::DeadlineBudget::embeddedEngineStopMs());
    spec.children.push_back(std::move(core));
    supervisor::SupervisorOptions options;
    options.selfExe = exe_;
    sup_ = std::make_unique<supervisor::Supervisor>(loop_->loop(), spec, options);
    watchdog_ = sup_->terminated()
                    .then([this](supervisor::Outcome o) {
                      if (!stopping_) {
                        // failure() says why the supervisor stopped (and starts with the
                        // outcome's name); without one, the outcome is all there is.
                        std::string why = sup_->failure().empty()
                                              ? std::string(supervisor::nameOf(o))
                                              : ipc::userMessage(sup_->failure());
                        fail("engine-core exited unexpectedly (" + why + ")");
                      }
                    })
                    .eagerlyEvaluate(nullptr);
    return sup_->start().then(
        [this, engineEnd = kj::mv(engineEnd)]() mutable -> kj::Promise<void> {
          engineEnd.reset();  // only engine-core may hold it now: its death must reach us as EOF
          workers::EngineClient::Callbacks callbacks;
          callbacks.onDeltas = [this](const std::vector<engine::TokenDelta>& deltas) {
            for (const auto& d : deltas) onDelta(d);
          };
          callbacks.onEngineFailed = [this](const std::string& reason) {
            fail("the engine failed: " + ipc::userMessage(reason));
          };
          callbacks.onDisconnect = [this]() {
            if (!stopping_) fail("lost the connection to engine-core");
          };
          engine_ = std::make_unique<workers::EngineClient>(loop_->loop(), "[llm]",
                                                            std::move(callbacks));
          return engine_->connect(std::move(myEnd_)).ignoreResult().then([this]() {
            started_ = true;
          });
        },
        [this](kj::Exception&& e) -> kj::Promise<void> {
          return failure("vsup::LLM: the engine did not start: " +
                         (sup_->failure().empty() ? ipc::userMessage(e)
                                                  : ipc::userMessage(sup_->failure())));
        });
  }

  kj::Promise<Completion> submit(const std::string& prompt, const engine::SamplingParams& params,
                                 const std::function<void(std::string_view)>* onText) {
    engine::GenerateRequest request;
    request.id = "llm-" + std::to_string(++nextId_);
    request.prompt = prompt;
    request.sampling = params;
    auto paf = kj::newPromiseAndFulfiller<Completion>();
    Pending& p = pending_[request.id];
    p.onText = onText;
    p.done = kj::mv(paf.fulfiller);
    std::string id = request.id;
    tasks_->add(engine_->submit(request)
                    .then([this, id](std::optional<engine::Rejection> rejection) {
                      if (!rejection) return;
                      auto it = pending_.find(id);
                      if (it == pending_.end()) return;
                      // A bad request, not a broken engine: this call fails, the LLM goes on.
                      it->second.done->reject(failure("vsup::LLM: request rejected: " +
                                                      ipc::userMessage(rejection->message)));
                      ended(it, engine::FinishReason::Error);
                    })
                    .catch_([this, id](kj::Exception&& e) {
                      auto it = pending_.find(id);
                      if (it == pending_.end()) return;
                      it->second.done->reject(failure(
                          "vsup::LLM: the engine refused the request: " + ipc::userMessage(e)));
                      ended(it, engine::FinishReason::Error);
                    }));
    return kj::mv(paf.promise);
  }

  void onDelta(const engine::TokenDelta& d) {
    auto it = pending_.find(d.requestId);
    if (it == pending_.end()) return;
    Pending& p = it->second;
    p.completion.text += d.text;
    p.completion.promptTokens = d.promptTokens;
    p.completion.completionTokens = d.completionTokens;
    if (!d.text.empty() && p.onText != nullptr && *p.onText) (*p.onText)(d.text);
    if (d.finish == engine::FinishReason::None) return;
    if (d.finish == engine::FinishReason::Error) {
      p.done->reject(
          failure("vsup::LLM: " + (d.error.empty() ? "engine error" : ipc::userMessage(d.error))));
    } else {
      p.completion.finishReason = engine::nameOf(d.finish);
      p.done->fulfill(kj::mv(p.completion));
    }
    ended(it, d.finish);
  }

  void failPending(const std::string& why) {
    while (!pending_.empty()) {
      auto it = pending_.begin();
      it->second.done->reject(failure(why));
      ended(it, engine::FinishReason::Error);
    }
  }

  // The engine cannot serve any more: pending calls throw now, later ones at once.
  void fail(const std::string& why) {
    if (!failure_.empty()) return;
    failure_ = "vsup::LLM: " + why;
    // Before the start completed, the constructor's exception says it; no second report.
    if (started_) vsup::log().error("[llm] {}", why);
    failPending(failure_);
  }

  // Bounded, idempotent, never throws: drain and stop the tree, destroy every loop-side object
  // on the loop thread, then end the thread.
  void teardown(std::chrono::milliseconds timeout) {
    if (!loop_) return;
    try {
      drain(timeout);
    } catch (const std::exception&) {
      // What is left is destroyed below.
    }
    try {
      loop_->run([this]() {
        draining_ = true;
        stopping_ = true;
        drained_ = nullptr;
        idle_ = nullptr;
        watchdog_ = kj::READY_NOW;
        tasks_ = nullptr;
        engine_.reset();
        sup_.reset();  // backstop: kills and reaps anything still running
        myEnd_.reset();
      });
    } catch (const std::exception&) {
    }
    loop_.reset();
  }

  LLMConfig config_;
  engine::EngineConfig engineConfig_;  // validated from config_ in the constructor
  std::string exe_;
  std::unique_ptr<supervisor::LoopThread> loop_;
  // Everything below lives on loop_'s thread.
  std::unique_ptr<supervisor::Supervisor> sup_;
  std::unique_ptr<workers::EngineClient> engine_;
  OwnFd myEnd_;
  std::map<std::string, Pending> pending_;
  uint64_t nextId_ = 0;
  bool draining_ = false;  // admission closed: drain() began
  bool stopping_ = false;  // the drain is stopping the tree: its exit is expected
  size_t inDrain_ = 0;     // requests running when the drain began, not yet ended
  DrainReport report_;
  kj::Own<kj::PromiseFulfiller<void>> idle_;        // whenIdle()'s
  kj::Own<kj::ForkedPromise<DrainReport>> drained_;  // the drain, once begun
  bool started_ = false;
  std::string failure_;
  kj::Promise<void> watchdog_ = kj::READY_NOW;
  kj::Own<kj::TaskSet> tasks_;
};

LLM::LLM(LLMConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
LLM::~LLM() = default;

std::vector<Completion> LLM::generate(const std::vector<std::string>& prompts,
                                      const Sampling& sampling) {
  return impl_->generate(prompts, sampling, nullptr);
}

Completion LLM::generateStream(const std::string& prompt, const Sampling& sampling,
                               const std::function<void(std::string_view text)>& onText) {
  return impl_->generate({prompt}, sampling, &onText).at(0);
}

DrainReport LLM::drain(std::chrono::milliseconds timeout) { return impl_->drain(timeout); }

void LLM::shutdown(std::chrono::milliseconds timeout) { impl_->shutdown(timeout); }

}  // namespace vsup
