#include "kvconnector/lease_table.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace vsup::kv {

const char* leaseEndName(LeaseEnd end) {
  switch (end) {
    case LeaseEnd::Done: return "done";
    case LeaseEnd::GaveUp: return "gave up";
    case LeaseEnd::Disconnected: return "disconnected";
    case LeaseEnd::Expired: return "expired";
    case LeaseEnd::Abandoned: return "abandoned";
  }
  return "unknown";
}

LeaseTable::LeaseTable(int64_t leaseNs) : leaseNs_(leaseNs) {
  if (leaseNs <= 0) throw std::invalid_argument("the lease time must be positive");
}

void LeaseTable::grant(const std::string& id, std::vector<int32_t> blocks, MonoNs now) {
  if (blocks.empty()) throw std::invalid_argument("lease " + id + ": no blocks");
  if (leases_.count(id) != 0) throw std::invalid_argument("lease " + id + " is already live");
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  leases_[id] = Lease{std::move(blocks), now + leaseNs_, 0};
  ++granted_;
}

LeaseTable::PullCheck LeaseTable::refuseMissing(const std::string& id) const {
  auto r = recent_.find(id);
  if (r != recent_.end() && r->second == LeaseEnd::Expired) {
    return {Refusal::Expired, "lease " + id + " expired; its blocks may have been reused"};
  }
  if (r != recent_.end()) {
    return {Refusal::Unknown,
            "lease " + id + " has ended (" + std::string(leaseEndName(r->second)) + ")"};
  }
  return {Refusal::Unknown, "lease " + id + " is unknown to this agent"};
}

LeaseTable::PullCheck LeaseTable::beginPull(const std::string& id,
                                            const std::vector<int32_t>& blocks, ConnId conn,
                                            MonoNs now) {
  auto it = leases_.find(id);
  if (it == leases_.end()) return refuseMissing(id);
  Lease& l = it->second;
  if (l.expiresAt <= now) {  // expire() has not run yet: it is over all the same
    finish(it, LeaseEnd::Expired);
    return refuseMissing(id);
  }
  if (l.conn != 0 && l.conn != conn) {
    return {Refusal::OtherConnection, "lease " + id + " is being pulled by another connection"};
  }
  for (int32_t b : blocks) {
    if (!std::binary_search(l.blocks.begin(), l.blocks.end(), b)) {
      return {Refusal::OutsideLease,
              "block " + std::to_string(b) + " is not one of lease " + id + "'s"};
    }
  }
  l.conn = conn;
  l.expiresAt = std::max(l.expiresAt, now + leaseNs_);
  return {};
}

bool LeaseTable::extend(const std::string& id, MonoNs until) {
  auto it = leases_.find(id);
  if (it == leases_.end()) return false;
  it->second.expiresAt = std::max(it->second.expiresAt, until);
  return true;
}

std::optional<EndedLease> LeaseTable::end(const std::string& id, LeaseEnd reason, ConnId conn,
                                          PullCheck* refusal) {
  auto it = leases_.find(id);
  if (it == leases_.end()) {
    if (refusal != nullptr) *refusal = refuseMissing(id);
    return std::nullopt;
  }
  if (it->second.conn != 0 && it->second.conn != conn) {
    if (refusal != nullptr) {
      *refusal = {Refusal::OtherConnection, "lease " + id + " is bound to another connection"};
    }
    return std::nullopt;
  }
  if (reason == LeaseEnd::Done && (conn == 0 || it->second.conn != conn)) {
    if (refusal != nullptr) {
      *refusal = {Refusal::Unknown, "lease " + id + " was not pulled on this connection"};
    }
    return std::nullopt;
  }
  return finish(it, reason);
}

std::vector<EndedLease> LeaseTable::dropConnection(ConnId conn) {
  std::vector<EndedLease> out;
  if (conn == 0) return out;
  for (auto it = leases_.begin(); it != leases_.end();) {
    auto next = std::next(it);
    if (it->second.conn == conn) out.push_back(finish(it, LeaseEnd::Disconnected));
    it = next;
  }
  return out;
}

std::vector<EndedLease> LeaseTable::expire(MonoNs now) {
  std::vector<EndedLease> out;
  for (auto it = leases_.begin(); it != leases_.end();) {
    auto next = std::next(it);
    if (it->second.expiresAt <= now) out.push_back(finish(it, LeaseEnd::Expired));
    it = next;
  }
  return out;
}

std::vector<EndedLease> LeaseTable::abandonAll() {
  std::vector<EndedLease> out;
  while (!leases_.empty()) out.push_back(finish(leases_.begin(), LeaseEnd::Abandoned));
  return out;
}

MonoNs LeaseTable::nextExpiry() const {
  MonoNs next = kNoDeadline;
  for (const auto& [id, l] : leases_) next = std::min(next, l.expiresAt);
  return next;
}

size_t LeaseTable::pulling() const {
  return size_t(std::count_if(leases_.begin(), leases_.end(),
                              [](const auto& kv) { return kv.second.conn != 0; }));
}

EndedLease LeaseTable::finish(std::map<std::string, Lease>::iterator it, LeaseEnd reason) {
  EndedLease e{it->first, reason};
  leases_.erase(it);
  ++ended_[size_t(reason)];
  if (recent_.emplace(e.id, reason).second) {
    recentOrder_.push_back(e.id);
    if (recentOrder_.size() > kRememberEnded) {
      recent_.erase(recentOrder_.front());
      recentOrder_.pop_front();
    }
  } else {
    recent_[e.id] = reason;
  }
  return e;
}

}  // namespace vsup::kv
