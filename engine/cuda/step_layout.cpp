#include "engine/cuda/step_layout.h"

#include <algorithm>

namespace vsup::engine::cuda {

size_t StepLayout::sampledRows() const {
  return size_t(std::count(greedy.begin(), greedy.end(), false));
}

std::vector<int32_t> StepLayout::packed() const {
  std::vector<int32_t> out;
  out.reserve(tokens.size() * 4 + tables.size() + rows.size());
  for (const auto* v : {&tokens, &positions, &slots, &offsets, &tables, &rows}) {
    out.insert(out.end(), v->begin(), v->end());
  }
  return out;
}

StepLayout layOutStep(const LlamaConfig& config, int32_t numBlocks, int32_t blockSize,
                      const std::vector<ShardSeq>& batch) {
  StepLayout l;
  for (const ShardSeq& q : batch) {
    checkShardInput(config, numBlocks, blockSize, q);
    const int32_t offset = int32_t(l.tables.size());
    l.tables.insert(l.tables.end(), q.blockTable, q.blockTable + q.blockCount);
    for (int32_t i = 0; i < q.count; ++i) {
      const int32_t pos = q.startPos + i;
      l.tokens.push_back(q.tokens[i]);
      l.positions.push_back(pos);
      l.slots.push_back(q.blockTable[pos / blockSize] * blockSize + pos % blockSize);
      l.offsets.push_back(offset);
    }
    if (q.wantLogits) {
      l.rows.push_back(int32_t(l.tokens.size()) - 1);
      l.greedy.push_back(q.greedy);
    }
  }
  return l;
}

}  // namespace vsup::engine::cuda
