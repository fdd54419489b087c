// KV connector: moves a finished request's KV blocks to a peer instance. Two
// roles, as in vLLM: the scheduler side (engine-core) decides which finished requests transfer;
// the worker side (each rank) runs the transfers. On shutdown a rank defers until its pending
// transfers are done, or gives up at a bounded deadline and says how many it abandoned.
//
// Plain values and time only: the worker process drives it from its loop with timers, and
// reports its deferral through ChildRuntime.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/clock.h"

namespace vsup::kv {

// Scheduler side.
class KvConnectorScheduler {
 public:
  virtual ~KvConnectorScheduler() = default;
  // Of the requests that finished in a step, the ones whose KV blocks must be sent.
  virtual std::vector<std::string> toTransfer(const std::vector<std::string>& finished) = 0;
};

// Worker side (one per rank). Single-threaded: the rank's loop thread.
class KvConnectorWorker {
 public:
  virtual ~KvConnectorWorker() = default;
  // Starts sending this request's blocks.
  virtual void startTransfer(const std::string& requestId, MonoNs now) = 0;
  // Transfers still running at `now` (finished ones are retired).
  virtual size_t pending(MonoNs now) = 0;
  // When the next pending transfer completes (kNoDeadline: none pending).
  virtual MonoNs nextCompletion() const = 0;
  virtual size_t completed() const = 0;
  // The requests whose transfers were retired (by pending()) since the last call: engine-core
  // releases a request's held blocks once every rank has reported it.
  virtual std::vector<std::string> takeFinished() = 0;
};

std::unique_ptr<KvConnectorScheduler> makeSimScheduler();
// Every transfer takes `transferMs`.
std::unique_ptr<KvConnectorWorker> makeSimWorker(uint64_t transferMs);

}  // namespace vsup::kv
