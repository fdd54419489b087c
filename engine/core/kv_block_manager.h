// The paged KV cache's bookkeeping, for every backend: which blocks are free, which blocks each
// sequence's block table holds, and which blocks are *held* after their request finished (for a
// KV connector that still has to send them). The cache memory itself lives in the ranks; this
// class only hands out block ids, in engine-core.
//
// Every block has a reference count: a sequence's table holds one reference per block, a hold
// holds one more. A block returns to the free list when its count drops to 0, never earlier, so
// a finished request's blocks cannot be reused while a connector reads them.
//
// Holds are leases: each has an expiry (CLOCK_MONOTONIC ns). They end by id (releaseHold), or
// when expireHolds() passes their expiry; extendHold() moves the expiry later, never earlier.
//
// Single-threaded: engine-core's loop thread.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "base/clock.h"

namespace vsup::engine::core {

using BlockId = int32_t;

class KvBlockManager {
 public:
  KvBlockManager(int32_t numBlocks, int32_t blockSize);

  int32_t blockSize() const { return blockSize_; }
  int32_t totalBlocks() const { return int32_t(refs_.size()); }
  int32_t freeBlocks() const { return int32_t(free_.size()); }
  // Blocks needed to hold `positions` tokens.
  int32_t blocksFor(int64_t positions) const;

  // Grows `seq`'s table so that it covers `positions` tokens. Returns false, taking nothing,
  // when the free list is too short.
  [[nodiscard]] bool reserve(const std::string& seq, int64_t positions);
  // `seq`'s block table, in position order (empty when it has none).
  const std::vector<BlockId>& table(const std::string& seq) const;
  // Drops `seq`'s table (its references). Unknown `seq`: nothing happens.
  void release(const std::string& seq);

  // Moves `seq`'s blocks into a hold named `holdId` that lasts until `expiresAt`: the sequence
  // gives up its table, the blocks stay out of the free list. Returns the held blocks (empty,
  // and no hold made, when `seq` has no table). Throws std::invalid_argument when `holdId` is
  // already held.
  std::vector<BlockId> hold(const std::string& seq, const std::string& holdId, MonoNs expiresAt);
  // Ends a hold; false when unknown (already released or expired).
  bool releaseHold(const std::string& holdId);
  // Moves a hold's expiry to `expiresAt` if that is later; false when the hold is unknown.
  bool extendHold(const std::string& holdId, MonoNs expiresAt);
  // Ends every hold whose expiry is at or before `now`; returns their ids.
  std::vector<std::string> expireHolds(MonoNs now);
  // The earliest expiry of any hold (kNoDeadline: none).
  MonoNs nextExpiry() const;
  size_t holdCount() const { return holds_.size(); }
  // A hold's blocks (empty when unknown).
  const std::vector<BlockId>& heldBlocks(const std::string& holdId) const;

  int32_t refCount(BlockId block) const;
  // Aborts (VSUP_ASSERT) unless every block is free exactly when its count is 0 and the counts
  // equal the tables' and holds' references. For tests and debug builds.
  void checkInvariants() const;

 private:
  struct Hold {
    std::vector<BlockId> blocks;
    MonoNs expiresAt = kNoDeadline;
  };
  void unref(const std::vector<BlockId>& blocks);

  int32_t blockSize_;
  std::vector<int32_t> refs_;  // per block
  std::vector<BlockId> free_;  // a stack: recently freed blocks are reused first
  std::map<std::string, std::vector<BlockId>> tables_;
  std::map<std::string, Hold> holds_;
};

}  // namespace vsup::engine::core
