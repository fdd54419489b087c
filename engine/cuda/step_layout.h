// How the CUDA shard lays out one step's integer inputs for its kernels: per token its id,
// position, cache slot and block-table offset; the block tables back to back; the row of each
// sequence's last token whose logits are wanted. Plain C++ (no CUDA), so that the CPU tests
// check the indexing the kernels rely on.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/shard_weights.h"

namespace vsup::engine::cuda {

struct StepLayout {
  std::vector<int32_t> tokens, positions;
  std::vector<int32_t> slots;    // blockTable[pos / blockSize] * blockSize + pos % blockSize
  std::vector<int32_t> offsets;  // where the token's sequence's block table starts in `tables`
  std::vector<int32_t> tables;
  std::vector<int32_t> rows;     // the token index of each wantLogits sequence's last token
  std::vector<bool> greedy;      // per row
  size_t sampledRows() const;    // rows that are not greedy
  // tokens, positions, slots, offsets, tables, rows: one buffer, in that order (one copy).
  std::vector<int32_t> packed() const;
};

// Checks every sequence (checkShardInput) and lays the step out. Throws std::invalid_argument.
StepLayout layOutStep(const LlamaConfig& config, int32_t numBlocks, int32_t blockSize,
                      const std::vector<ShardSeq>& batch);

}  // namespace vsup::engine::cuda
