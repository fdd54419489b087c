// Test code only: a fake engine-core serving schema::Engine in-process over a socketpair, on the
// test's uv loop, for the EngineClient and ApiServer tests.
//
// Thread: every method except the Log accessors runs on the loop thread. The Log is what the
// engine saw (submits, aborts, calls the client answered), published under a mutex so a client
// thread can wait for an event without polling.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <kj/async.h>
#include <kj/debug.h>

#include "base/check.h"
#include "base/fd.h"
#include "engine/stats.h"
#include "engine/types.h"
#include "ipc/engine.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_kj.h"
#include "workers/engine_codec.h"

namespace vsup::testing {

class FakeEngine final : public kj::TaskSet::ErrorHandler {
 public:
  // What the fake saw, readable from any thread.
  class Log {
   public:
    std::vector<std::string> submits() const {
      std::lock_guard lock(mu_);
      return submits_;
    }
    std::vector<engine::GenerateRequest> requests() const {  // as decoded, in submit order
      std::lock_guard lock(mu_);
      return requests_;
    }
    std::vector<std::string> aborts() const {
      std::lock_guard lock(mu_);
      return aborts_;
    }
    int answered() const {  // deltas and engineFailed calls the client has answered
      std::lock_guard lock(mu_);
      return answered_;
    }
    int statsCalls() const {  // Engine.stats calls received
      std::lock_guard lock(mu_);
      return statsCalls_;
    }
    std::vector<size_t> submitManyCalls() const {  // each submitMany call's request count
      std::lock_guard lock(mu_);
      return submitManyCalls_;
    }
    // Waits (at most 5 s) until `pred` holds over this log; the predicate runs under the lock.
    bool waitUntil(const std::function<bool(const Log&)>& pred) const {
      std::unique_lock lock(mu_);
      return cv_.wait_for(lock, std::chrono::seconds(5), [&] { return pred(*this); });
    }
    // Unlocked views, for waitUntil predicates only.
    const std::vector<std::string>& submitsLocked() const { return submits_; }
    const std::vector<std::string>& abortsLocked() const { return aborts_; }
    int answeredLocked() const { return answered_; }
    int statsCallsLocked() const { return statsCalls_; }

   private:
    friend class FakeEngine;
    template <typename F>
    void update(F&& f) {
      std::lock_guard lock(mu_);
      f();
      cv_.notify_all();
    }
    mutable std::mutex mu_;
    mutable std::condition_variable cv_;
    std::vector<std::string> submits_;
    std::vector<engine::GenerateRequest> requests_;
    std::vector<std::string> aborts_;
    int answered_ = 0;
    int statsCalls_ = 0;
    std::vector<size_t> submitManyCalls_;
  };

  // How the fake answers. Set before the client submits.
  int64_t maxModelLen = 2048;
  std::string chatFormat = "chatml";
  // Non-empty: submit answers with this rejection (nothing is queued).
  std::function<std::optional<engine::Rejection>(const engine::GenerateRequest&)> reject;
  bool refuse = false;  // submit throws, as engine-core does when stopping or failed
  // Serves Engine.submitMany as engine-core does (each request as a submit, `refused` where
  // submit throws). False: it answers UNIMPLEMENTED, as an engine that predates it.
  bool serveSubmitMany = false;
  // Each accepted request plays these pieces of text, one engine step (one deltas call, a few
  // ms apart) each, the last with finish = stop. Empty: the request is held until the test
  // sends its deltas (send(), finish()).
  std::vector<std::string> script = {"Hel", "lo", "!"};
  bool answerAborts = true;  // an abort gets its final delta (finish = abort), as the real one
  // What Engine.stats answers, as set at the time of the call; or, how it fails.
  engine::EngineStats stats;
  bool statsFail = false;  // the call throws (an engine that cannot answer)
  bool statsHang = false;  // the call never answers (a stuck engine)

  explicit FakeEngine(uv_loop_t* loop) : loop_(loop), tasks_(kj::heap<kj::TaskSet>(*this)) {}
  ~FakeEngine() noexcept(false) {
    tasks_ = nullptr;
    sink_.reset();
    link_.reset();
  }

  // Serves the Engine on one end of a new socketpair; returns the other, for the client.
  OwnFd listen() {
    int sv[2];
    VSUP_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    link_ = ipc::RpcLink::serve(loop_, OwnFd(sv[0]), kj::heap<Session>(*this),
                                ipc::dataReaderOptions());
    return OwnFd(sv[1]);
  }

  // The engine process "dies": the connection closes.
  void disconnect() {
    tasks_ = kj::heap<kj::TaskSet>(*this);  // drops the playing scripts
    sink_.reset();
    link_.reset();
  }

  // One engine step: these deltas in one call.
  void sendDeltas(const std::vector<engine::TokenDelta>& deltas) {
    KJ_REQUIRE(sink_ != std::nullopt, "no sink attached");
    auto call = sink_->deltasRequest();
    auto list = call.initDeltas(deltas.size());
    for (size_t i = 0; i < deltas.size(); ++i) workers::encode(deltas[i], list[i]);
    tasks_->add(call.send().ignoreResult().then([this] { log.update([&] { ++log.answered_; }); }));
  }
  void send(const std::string& id, const std::string& text,
            engine::FinishReason finish = engine::FinishReason::None) {
    if (finish != engine::FinishReason::None) done_.insert(id);
    int64_t& n = produced_[id];
    if (!text.empty()) ++n;
    engine::TokenDelta d;
    d.requestId = id;
    d.text = text;
    d.promptTokens = 3;
    d.completionTokens = n;
    d.finish = finish;
    sendDeltas({d});
  }
  void engineFailed(const std::string& reason) {
    KJ_REQUIRE(sink_ != std::nullopt, "no sink attached");
    auto call = sink_->engineFailedRequest();
    call.setReason(reason);
    tasks_->add(call.send().ignoreResult().then([this] { log.update([&] { ++log.answered_; }); }));
  }

  Log log;

 private:
  class Session final : public ipc::schema::Engine::Server {
   public:
    explicit Session(FakeEngine& fake) : fake_(fake) {}

   protected:
    kj::Promise<void> attach(AttachContext context) override {
      fake_.sink_ = context.getParams().getSink();
      context.getResults().setMaxModelLen(fake_.maxModelLen);
      context.getResults().setChatFormat(fake_.chatFormat);
      return kj::READY_NOW;
    }
    kj::Promise<void> submit(SubmitContext context) override {
      engine::GenerateRequest r = workers::decode(context.getParams().getRequest());
      if (fake_.refuse) {
        take(r);
        return KJ_EXCEPTION(FAILED, "engine-core is stopping");
      }
      if (auto rejection = take(r)) {
        context.getResults().setRejected(rejection->message);
        context.getResults().setRejectCode(workers::encode(rejection->code));
      }
      return kj::READY_NOW;
    }
    kj::Promise<void> submitMany(SubmitManyContext context) override {
      if (!fake_.serveSubmitMany) return KJ_EXCEPTION(UNIMPLEMENTED, "submitMany");
      auto requests = context.getParams().getRequests();
      fake_.log.update([&] { fake_.log.submitManyCalls_.push_back(requests.size()); });
      auto out = context.getResults().initOutcomes(requests.size());
      for (unsigned i = 0; i < requests.size(); ++i) {
        engine::GenerateRequest r = workers::decode(requests[i]);
        if (fake_.refuse) {
          take(r);
          out[i].setRefused("engine-core is stopping");
        } else if (auto rejection = take(r)) {
          out[i].setRejected(rejection->message);
          out[i].setRejectCode(workers::encode(rejection->code));
        }
      }
      return kj::READY_NOW;
    }
    kj::Promise<void> abort(AbortContext context) override {
      std::string id = context.getParams().getId();
      fake_.log.update([&] { fake_.log.aborts_.push_back(id); });
      // Like the real engine: only a request still running gets a final delta.
      bool running = fake_.done_.count(id) == 0;
      if (running && fake_.answerAborts) fake_.send(id, "", engine::FinishReason::Abort);
      fake_.done_.insert(id);
      return kj::READY_NOW;
    }

    kj::Promise<void> stats(StatsContext context) override {
      fake_.log.update([&] { ++fake_.log.statsCalls_; });
      if (fake_.statsHang) return kj::NEVER_DONE;
      if (fake_.statsFail) return KJ_EXCEPTION(FAILED, "the engine cannot report its stats");
      workers::encode(fake_.stats, context.getResults().initStats());
      return kj::READY_NOW;
    }

   private:
    // Logs a submitted request and, unless refused or rejected, plays its script.
    std::optional<engine::Rejection> take(const engine::GenerateRequest& r) {
      fake_.log.update([&] {
        fake_.log.submits_.push_back(r.id);
        fake_.log.requests_.push_back(r);
      });
      if (fake_.refuse) return std::nullopt;
      if (fake_.reject) {
        if (auto rejection = fake_.reject(r)) return rejection;
      }
      fake_.play(r.id, 0);
      return std::nullopt;
    }

    FakeEngine& fake_;
  };

  void taskFailed(kj::Exception&& e) override {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    KJ_LOG(WARNING, "fake engine task failed", e);
  }

  // Step `i` of request `id`'s script, after a step's time.
  void play(const std::string& id, size_t i) {
    if (i >= script.size()) return;
    tasks_->add(ipc::uvSleep(loop_, 2).then([this, id, i] {
      if (sink_ == std::nullopt || done_.count(id) != 0) return;
      bool last = i + 1 == script.size();
      send(id, script[i], last ? engine::FinishReason::Stop : engine::FinishReason::None);
      play(id, i + 1);
    }));
  }

  uv_loop_t* loop_;
  std::unique_ptr<ipc::RpcLink> link_;
  std::optional<ipc::schema::TokenSink::Client> sink_;
  std::map<std::string, int64_t> produced_;
  std::set<std::string> done_;  // finished or aborted: no more deltas
  kj::Own<kj::TaskSet> tasks_;
};

}  // namespace vsup::testing
