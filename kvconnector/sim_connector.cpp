// The simulated KV connector: every finished request leaves a "transfer" on every rank that
// completes a fixed time later. Enough to exercise the shutdown deferral end to end.
#include <algorithm>
#include <map>
#include <utility>

#include "kvconnector/kv_connector.h"

namespace vsup::kv {
namespace {

class SimScheduler final : public KvConnectorScheduler {
 public:
  std::vector<std::string> toTransfer(const std::vector<std::string>& finished) override {
    return finished;
  }
};

class SimWorker final : public KvConnectorWorker {
 public:
  explicit SimWorker(uint64_t transferMs) : transferNs_(int64_t(transferMs) * kNsPerMs) {}

  void startTransfer(const std::string& requestId, MonoNs now) override {
    pending_.emplace(now + transferNs_, requestId);
  }

  size_t pending(MonoNs now) override {
    while (!pending_.empty() && pending_.begin()->first <= now) {
      finished_.push_back(pending_.begin()->second);
      pending_.erase(pending_.begin());
      ++completed_;
    }
    return pending_.size();
  }

  MonoNs nextCompletion() const override {
    return pending_.empty() ? kNoDeadline : pending_.begin()->first;
  }

  size_t completed() const override { return completed_; }

  std::vector<std::string> takeFinished() override { return std::exchange(finished_, {}); }

 private:
  int64_t transferNs_;
  std::multimap<MonoNs, std::string> pending_;
  size_t completed_ = 0;
  std::vector<std::string> finished_;
};

}  // namespace

std::unique_ptr<KvConnectorScheduler> makeSimScheduler() { return std::make_unique<SimScheduler>(); }

std::unique_ptr<KvConnectorWorker> makeSimWorker(uint64_t transferMs) {
  return std::make_unique<SimWorker>(transferMs);
}

}  // namespace vsup::kv
