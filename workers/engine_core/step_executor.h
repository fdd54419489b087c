// Runs one engine step on every tensor-parallel rank and collects their outputs, failing the
// step as soon as it can no longer succeed:
//  - a rank's call fails or its connection drops: at once, naming the rank;
//  - a rank stays silent `stragglerMs` after the first rank answered: ranks compute in lockstep
//    (every collective waits for all of them), so once one has answered the others are at most
//    a sampling pass behind; one still silent is hung or stopped (a stopped rank that had
//    passed the step's last collective leaves its peers nothing to time out on);
//  - the whole step takes longer than `stepTimeoutMs`.
// Waiting for every rank with a plain join would hang on a stopped rank forever. Both bounds
// share one timer, made once and re-armed per step (armed for the step timeout, moved to the
// straggler bound when the first rank answers if that comes sooner), so a step costs no timer
// handle of its own.
//
// Runs on engine-core's loop thread. One step at a time.
#pragma once

#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/clock.h"
#include "engine/engine.h"
#include "ipc/engine.capnp.h"
#include "ipc/uv_handle.h"

namespace vsup::workers {

// One rank as the executor sees it: ipc's Worker capability in engine-core, a fake in tests.
class RankClient {
 public:
  virtual ~RankClient() noexcept(false) = default;  // implementations hold KJ capabilities
  // Resolves with the rank's output; rejects when the rank failed (DISCONNECTED: it is gone).
  virtual kj::Promise<engine::StepOutput> step(const engine::StepInput& input) = 0;
};

// A rank reached through its Worker capability (its Node.service).
std::unique_ptr<RankClient> makeRpcRank(ipc::schema::Worker::Client worker);

class StepExecutor {
 public:
  struct Options {
    uint64_t stepTimeoutMs = 30000;
    int64_t stragglerMs = 10000;  // the ranks' collective timeout
  };
  // Rank r is ranks[r]; its name in errors is "worker-tp<r>".
  StepExecutor(uv_loop_t* loop, std::vector<std::unique_ptr<RankClient>> ranks, Options options);
  ~StepExecutor();

  // Every rank's output in rank order, or a FAILED exception whose description says which rank
  // failed and how.
  kj::Promise<std::vector<engine::StepOutput>> run(const engine::StepInput& input);
  bool running() const { return running_; }
  size_t rankCount() const { return ranks_.size(); }

 private:
  struct StepState;
  void rankAnswered(size_t rank);
  void fail(const std::string& why);
  void arm(MonoNs at);
  void timerFired();

  uv_loop_t* loop_;
  std::vector<std::unique_ptr<RankClient>> ranks_;
  Options options_;
  bool running_ = false;
  std::unique_ptr<StepState> current_;
  UvHandle<uv_timer_t> timer_;  // the running step's deadline (timeout or straggler bound)
};

}  // namespace vsup::workers
