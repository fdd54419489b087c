// Which API server (session) owns which request, and delivery of each step's deltas to their
// owners: one call per session per step, never one per token per request.
//
// A session is a DeltaSink: engine-core's Session (an API server's connection, or vsup::LLM's)
// or a fake in tests. Runs on engine-core's loop thread.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "engine/types.h"

namespace vsup::workers {

class DeltaSink {
 public:
  virtual ~DeltaSink() = default;
  virtual void deltas(const std::vector<engine::TokenDelta>& deltas) = 0;
  // The engine cannot serve any more; sent after the failed requests' final deltas.
  virtual void engineFailed(const std::string& reason) = 0;
};

class RequestRouter {
 public:
  // Session `index` is `sink` from now on (borrowed: it must outlive the router or be removed
  // with sessionLost()). Returns its index.
  size_t addSession(DeltaSink* sink);
  // The session is gone: nobody can receive its requests' tokens any more. Returns the ids of
  // the requests it owned (no longer routed), for the caller to abort.
  std::vector<std::string> sessionLost(size_t index);

  void own(const std::string& requestId, size_t session);
  // Ends ownership without a final delta (a request the engine refused to queue).
  void forget(const std::string& requestId) { owner_.erase(requestId); }
  bool owned(const std::string& requestId) const { return owner_.count(requestId) != 0; }
  // Every request still owned (the caller ends them at shutdown or on failure).
  std::vector<std::string> requests() const;
  size_t size() const { return owner_.size(); }

  // Sends each delta to its owner's sink, one call per session; a delta that finishes a request
  // ends its ownership. Deltas of unowned requests (their session is gone) are dropped.
  void route(const std::vector<engine::TokenDelta>& deltas);
  // Tells every live session.
  void engineFailed(const std::string& reason);

 private:
  std::vector<DeltaSink*> sessions_;  // null once lost
  std::map<std::string, size_t> owner_;
};

}  // namespace vsup::workers
