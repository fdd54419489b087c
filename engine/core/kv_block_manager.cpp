#include "engine/core/kv_block_manager.h"

#include <algorithm>
#include <stdexcept>

#include "base/check.h"

namespace vsup::engine::core {
namespace {
const std::vector<BlockId> kNoBlocks;
}  // namespace

KvBlockManager::KvBlockManager(int32_t numBlocks, int32_t blockSize)
    : blockSize_(blockSize), refs_(size_t(std::max(numBlocks, 0)), 0) {
  if (numBlocks < 0 || blockSize <= 0) {
    throw std::invalid_argument("KV cache of " + std::to_string(numBlocks) + " blocks of " +
                                std::to_string(blockSize) + " tokens");
  }
  // Pushed highest first so that a fresh cache hands out block 0, 1, 2, ... in order.
  free_.reserve(refs_.size());
  for (BlockId b = numBlocks - 1; b >= 0; --b) free_.push_back(b);
}

int32_t KvBlockManager::blocksFor(int64_t positions) const {
  if (positions <= 0) return 0;
  return int32_t((positions + blockSize_ - 1) / blockSize_);
}

bool KvBlockManager::reserve(const std::string& seq, int64_t positions) {
  size_t need = size_t(blocksFor(positions));
  auto it = tables_.find(seq);
  size_t have = it == tables_.end() ? 0 : it->second.size();
  if (need <= have) return true;
  if (need - have > free_.size()) return false;
  std::vector<BlockId>& table = it == tables_.end() ? tables_[seq] : it->second;
  while (table.size() < need) {
    BlockId b = free_.back();
    free_.pop_back();
    refs_[size_t(b)] = 1;
    table.push_back(b);
  }
  return true;
}

const std::vector<BlockId>& KvBlockManager::table(const std::string& seq) const {
  auto it = tables_.find(seq);
  return it == tables_.end() ? kNoBlocks : it->second;
}

void KvBlockManager::release(const std::string& seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) return;
  unref(it->second);
  tables_.erase(it);
}

std::vector<BlockId> KvBlockManager::hold(const std::string& seq, const std::string& holdId,
                                          MonoNs expiresAt) {
  if (holds_.count(holdId) != 0) {
    throw std::invalid_argument("KV blocks are already held for " + holdId);
  }
  auto it = tables_.find(seq);
  if (it == tables_.end() || it->second.empty()) {
    if (it != tables_.end()) tables_.erase(it);
    return {};
  }
  // The table's references become the hold's: the counts do not change.
  Hold& h = holds_[holdId];
  h.blocks = std::move(it->second);
  h.expiresAt = expiresAt;
  tables_.erase(it);
  return h.blocks;
}

bool KvBlockManager::releaseHold(const std::string& holdId) {
  auto it = holds_.find(holdId);
  if (it == holds_.end()) return false;
  unref(it->second.blocks);
  holds_.erase(it);
  return true;
}

bool KvBlockManager::extendHold(const std::string& holdId, MonoNs expiresAt) {
  auto it = holds_.find(holdId);
  if (it == holds_.end()) return false;
  it->second.expiresAt = std::max(it->second.expiresAt, expiresAt);
  return true;
}

std::vector<std::string> KvBlockManager::expireHolds(MonoNs now) {
  std::vector<std::string> expired;
  for (auto it = holds_.begin(); it != holds_.end();) {
    if (it->second.expiresAt <= now) {
      expired.push_back(it->first);
      unref(it->second.blocks);
      it = holds_.erase(it);
    } else {
      ++it;
    }
  }
  return expired;
}

MonoNs KvBlockManager::nextExpiry() const {
  MonoNs next = kNoDeadline;
  for (const auto& [id, h] : holds_) next = std::min(next, h.expiresAt);
  return next;
}

const std::vector<BlockId>& KvBlockManager::heldBlocks(const std::string& holdId) const {
  auto it = holds_.find(holdId);
  return it == holds_.end() ? kNoBlocks : it->second.blocks;
}

int32_t KvBlockManager::refCount(BlockId block) const {
  VSUP_ASSERT(block >= 0 && size_t(block) < refs_.size(), block);
  return refs_[size_t(block)];
}

void KvBlockManager::unref(const std::vector<BlockId>& blocks) {
  // In table order, so the table's last block is on top of the stack: reused first.
  for (BlockId b : blocks) {
    int32_t& r = refs_[size_t(b)];
    VSUP_ASSERT(r > 0, b);
    if (--r == 0) free_.push_back(b);
  }
}

void KvBlockManager::checkInvariants() const {
  std::vector<int32_t> expect(refs_.size(), 0);
  auto count = [&](const std::vector<BlockId>& blocks) {
    for (BlockId b : blocks) {
      VSUP_ASSERT(b >= 0 && size_t(b) < refs_.size(), b);
      ++expect[size_t(b)];
    }
  };
  for (const auto& [seq, t] : tables_) count(t);
  for (const auto& [id, h] : holds_) count(h.blocks);
  std::vector<int32_t> onFreeList(refs_.size(), 0);
  for (BlockId b : free_) {
    VSUP_ASSERT(b >= 0 && size_t(b) < refs_.size(), b);
    ++onFreeList[size_t(b)];
  }
  for (size_t b = 0; b < refs_.size(); ++b) {
    VSUP_ASSERT(refs_[b] == expect[b], b, refs_[b], expect[b]);
    VSUP_ASSERT(onFreeList[b] == (refs_[b] == 0 ? 1 : 0), b, refs_[b], onFreeList[b]);
  }
}

}  // namespace vsup::engine::core
