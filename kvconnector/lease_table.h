// A prefill KV agent's leases (docs/architecture.md, "KV transfer"): the finished requests whose
// blocks its rank keeps for a decode instance to pull. engine-core holds the blocks
// (core::KvBlockManager holds) and grants the agent a lease on them; the agent serves pulls of
// leased blocks only, and tells engine-core when a lease ends, so that engine-core releases the
// hold (a block is never reused while a lease on it is live).
//
// A lease ends, exactly once, for one of these reasons:
//   Done          the decode side pulled it and said so
//   GaveUp        the decode side will not pull it (its request was aborted or failed)
//   Disconnected  the connection that was pulling it closed before Done
//   Expired       nobody finished it within the lease time (a pull extends it; never shortens)
//   Abandoned     the agent shut down with it still held
// An ended lease is remembered (the most recent kRememberEnded of them) so that a late pull is
// told why it is refused ("expired", not just "unknown").
//
// Single-threaded; the agent serializes access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/clock.h"

namespace vsup::kv {

enum class LeaseEnd { Done, GaveUp, Disconnected, Expired, Abandoned };
const char* leaseEndName(LeaseEnd end);

struct EndedLease {
  std::string id;
  LeaseEnd reason = LeaseEnd::Done;
};

class LeaseTable {
 public:
  static constexpr size_t kRememberEnded = 4096;
  using ConnId = uint64_t;  // 0: no connection

  // `leaseNs`: how long a lease lasts after its grant, and after each pull starts.
  explicit LeaseTable(int64_t leaseNs);

  // A new lease on `blocks` until now + leaseNs. Throws std::invalid_argument for an id that is
  // live or an empty block list.
  void grant(const std::string& id, std::vector<int32_t> blocks, MonoNs now);

  enum class Refusal { None, Unknown, Expired, OutsideLease, OtherConnection };
  struct PullCheck {
    Refusal refusal = Refusal::None;
    std::string message;  // why, for the peer, when refused
  };
  // A pull of `blocks` of lease `id` by connection `conn`: refused unless the lease is live,
  // every block is one of its own, and no other connection pulls it. On success the lease is
  // bound to `conn` and extended to now + leaseNs.
  PullCheck beginPull(const std::string& id, const std::vector<int32_t>& blocks, ConnId conn,
                      MonoNs now);
  // Moves the expiry to `until` if that is later; false when the lease is not live.
  bool extend(const std::string& id, MonoNs until);
  // Ends a live lease (Done or GaveUp) on behalf of `conn`; nullopt when it is not live (the
  // refusal says why) or bound to another connection. Done needs the lease bound to `conn` (a
  // pull of it succeeded there); GaveUp is accepted from any connection for an unbound lease.
  std::optional<EndedLease> end(const std::string& id, LeaseEnd reason, ConnId conn,
                                PullCheck* refusal = nullptr);
  // Ends every lease bound to `conn` (Disconnected).
  std::vector<EndedLease> dropConnection(ConnId conn);
  // Ends every lease whose expiry is at or before `now` (Expired).
  std::vector<EndedLease> expire(MonoNs now);
  // Ends every live lease (Abandoned), at shutdown.
  std::vector<EndedLease> abandonAll();

  MonoNs nextExpiry() const;  // kNoDeadline: none live
  size_t live() const { return leases_.size(); }
  size_t pulling() const;  // live leases bound to a connection
  bool isLive(const std::string& id) const { return leases_.count(id) != 0; }
  // The connection a live lease is bound to (0: none, or not live).
  ConnId boundTo(const std::string& id) const {
    auto it = leases_.find(id);
    return it == leases_.end() ? 0 : it->second.conn;
  }
  // How many leases ended for each reason, since construction.
  uint64_t endedCount(LeaseEnd reason) const { return ended_[size_t(reason)]; }
  uint64_t granted() const { return granted_; }

 private:
  struct Lease {
    std::vector<int32_t> blocks;  // sorted, for the subset check
    MonoNs expiresAt = 0;
    ConnId conn = 0;
  };
  EndedLease finish(std::map<std::string, Lease>::iterator it, LeaseEnd reason);
  PullCheck refuseMissing(const std::string& id) const;

  int64_t leaseNs_;
  std::map<std::string, Lease> leases_;
  std::unordered_map<std::string, LeaseEnd> recent_;
  std::deque<std::string> recentOrder_;
  uint64_t ended_[5] = {};
  uint64_t granted_ = 0;
};

}  // namespace vsup::kv
