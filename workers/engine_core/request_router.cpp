#include "workers/engine_core/request_router.h"

namespace vsup::workers {

size_t RequestRouter::addSession(DeltaSink* sink) {
  sessions_.push_back(sink);
  return sessions_.size() - 1;
}

std::vector<std::string> RequestRouter::sessionLost(size_t index) {
  std::vector<std::string> ids;
  for (auto it = owner_.begin(); it != owner_.end();) {
    if (it->second == index) {
      ids.push_back(it->first);
      it = owner_.erase(it);
    } else {
      ++it;
    }
  }
  if (index < sessions_.size()) sessions_[index] = nullptr;
  return ids;
}

void RequestRouter::own(const std::string& requestId, size_t session) {
  owner_[requestId] = session;
}

std::vector<std::string> RequestRouter::requests() const {
  std::vector<std::string> ids;
  for (const auto& [id, owner] : owner_) ids.push_back(id);
  return ids;
}

void RequestRouter::route(const std::vector<engine::TokenDelta>& deltas) {
  std::map<size_t, std::vector<engine::TokenDelta>> bySession;
  for (const auto& d : deltas) {
    auto it = owner_.find(d.requestId);
    if (it == owner_.end()) continue;
    bySession[it->second].push_back(d);
    if (d.finish != engine::FinishReason::None) owner_.erase(it);
  }
  for (auto& [index, list] : bySession) {
    if (index < sessions_.size() && sessions_[index] != nullptr) sessions_[index]->deltas(list);
  }
}

void RequestRouter::engineFailed(const std::string& reason) {
  for (DeltaSink* s : sessions_) {
    if (s != nullptr) s->engineFailed(reason);
  }
}

}  // namespace vsup::workers
