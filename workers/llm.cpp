// vsup::LLM (workers/public/llm.h): engine-core and its ranks as child processes of a private
// supervisor, driven through the same EngineClient an API server uses.
//
// Everything KJ/capnp lives on the LoopThread; public calls marshal onto it with run().
#include "workers/public/llm.h"

#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <optional>

#include <kj/debug.h>

#include "base/check.h"
#include "base/log.h"
#include "engine/config.h"
#include "engine/registry.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/host_checks.h"
#include "supervisor/loop_thread.h"
#include "supervisor/supervisor.h"
#include "workers/engine_client.h"
#include "workers/engine_codec.h"

namespace vsup {

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
                                    engine::CpuConfig{}, sim);
  } catch (const std::invalid_argument& e) {
    throw Error(std::string("vsup::LLM: ") + e.what());
  }
}

kj::Exception failure(const std::string& message) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(message.c_str()));
}

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

  ~Impl() noexcept(false) { teardown(std::chrono::seconds(30)); }

  std::vector<Completion> generate(const std::vector<std::string>& prompts,
                                   const Sampling& sampling,
                                   const std::function<void(std::string_view)>* onText) {
    return loop_->run([&]() -> kj::Promise<std::vector<Completion>> {
      if (!failure_.empty()) return failure(failure_);
      if (stopping_) return failure("vsup::LLM: shut down");
      kj::Vector<kj::Promise<Completion>> all;
      for (const std::string& prompt : prompts) all.add(submit(prompt, sampling, onText));
      return kj::joinPromises(all.releaseAsArray()).then([](kj::Array<Completion> done) {
        return std::vector<Completion>(std::make_move_iterator(done.begin()),
                                       std::make_move_iterator(done.end()));
      });
    });
  }

  void shutdown(std::chrono::milliseconds timeout) {
    loop_->run([&]() -> kj::Promise<void> {
      if (!sup_) return kj::READY_NOW;
      stopping_ = true;
      failPending("vsup::LLM: shut down while this request was running");
      return sup_->shutdown(deadlineAfterMs(timeout.count()));
    });
  }

 private:
  struct Pending {
    Completion completion;
    const std::function<void(std::string_view)>* onText = nullptr;
    kj::Own<kj::PromiseFulfiller<Completion>> done;
  };

  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("[llm] {}", e.getDescription().cStr());
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
    core.shutdown =
        supervisor::ShutdownPolicy::timeout(supervisor::DeadlineBudget::embeddedEngineStopMs());
    spec.children.push_back(std::move(core));
    supervisor::SupervisorOptions options;
    options.selfExe = exe_;
    sup_ = std::make_unique<supervisor::Supervisor>(loop_->loop(), spec, options);
    watchdog_ = sup_->terminated()
                    .then([this](supervisor::Outcome o) {
                      if (!stopping_) {
                        fail(std::string("engine-core exited unexpectedly (") +
                             supervisor::nameOf(o) + ")");
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
            fail("the engine failed: " + reason);
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
          return failure(std::string("vsup::LLM: the engine did not start: ") +
                         (sup_->failure().empty() ? e.getDescription().cStr() : sup_->failure()));
        });
  }

  kj::Promise<Completion> submit(const std::string& prompt, const Sampling& sampling,
                                 const std::function<void(std::string_view)>* onText) {
    engine::GenerateRequest request;
    request.id = "llm-" + std::to_string(++nextId_);
    request.prompt = prompt;
    request.sampling.maxTokens = sampling.maxTokens;
    request.sampling.temperature = sampling.temperature;
    request.sampling.topP = sampling.topP;
    request.sampling.topK = sampling.topK;
    request.sampling.seed = sampling.seed;
    request.sampling.stop = sampling.stop;
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
                      it->second.done->reject(
                          failure("vsup::LLM: request rejected: " + rejection->message));
                      pending_.erase(it);
                    })
                    .catch_([this, id](kj::Exception&& e) {
                      auto it = pending_.find(id);
                      if (it == pending_.end()) return;
                      it->second.done->reject(
                          failure(std::string("vsup::LLM: the engine refused the request: ") +
                                  e.getDescription().cStr()));
                      pending_.erase(it);
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
      p.done->reject(failure("vsup::LLM: " + (d.error.empty() ? "engine error" : d.error)));
    } else {
      p.completion.finishReason = engine::nameOf(d.finish);
      p.done->fulfill(kj::mv(p.completion));
    }
    pending_.erase(it);
  }

  void failPending(const std::string& why) {
    for (auto& [id, p] : pending_) p.done->reject(failure(why));
    pending_.clear();
  }

  // The engine cannot serve any more: pending calls throw now, later ones at once.
  void fail(const std::string& why) {
    if (!failure_.empty()) return;
    failure_ = "vsup::LLM: " + why;
    // Before the start completed, the constructor's exception says it; no second report.
    if (started_) vsup::log().error("[llm] {}", why);
    failPending(failure_);
  }

  // Bounded, idempotent, never throws: stop the tree, destroy every loop-side object on the
  // loop thread, then end the thread.
  void teardown(std::chrono::milliseconds timeout) {
    if (!loop_) return;
    try {
      shutdown(timeout);
    } catch (const std::exception&) {
      // Already failed or shut down: what is left is destroyed below.
    }
    try {
      loop_->run([this]() {
        stopping_ = true;
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
  bool stopping_ = false;
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

void LLM::shutdown(std::chrono::milliseconds timeout) { impl_->shutdown(timeout); }

}  // namespace vsup
