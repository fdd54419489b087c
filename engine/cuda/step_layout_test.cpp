// The CUDA shard's step layout: the indices its kernels read (a token's cache slot, its
// sequence's block table, the rows whose logits are wanted), checked on the CPU.
#include "engine/cuda/step_layout.h"

#include <doctest/doctest.h>

#include <stdexcept>

using namespace vsup::engine;

namespace {

LlamaConfig tiny() {
  LlamaConfig c;
  c.vocabSize = 100;
  c.maxPositions = 1000;
  return c;
}

}  // namespace

TEST_CASE("a prompt chunk and a decode token: slots through each block table, offsets, rows") {
  std::vector<int32_t> promptTokens = {5, 6, 7, 8, 9}, promptTable = {7, 2};
  std::vector<int32_t> decodeToken = {42}, decodeTable = {3, 0, 9};
  ShardSeq prompt{promptTokens.data(), 5, 2, promptTable.data(), 2, false, false};
  ShardSeq decode{decodeToken.data(), 1, 33, decodeTable.data(), 3, true, true};
  ShardSeq last{promptTokens.data(), 2, 0, promptTable.data(), 1, true, false};
  cuda::StepLayout l = cuda::layOutStep(tiny(), 10, 16, {prompt, decode, last});
  CHECK(l.tokens == std::vector<int32_t>{5, 6, 7, 8, 9, 42, 5, 6});
  CHECK(l.positions == std::vector<int32_t>{2, 3, 4, 5, 6, 33, 0, 1});
  // Position p of a sequence: its block p / 16, slot p % 16.
  CHECK(l.slots == std::vector<int32_t>{7 * 16 + 2, 7 * 16 + 3, 7 * 16 + 4, 7 * 16 + 5,
                                        7 * 16 + 6, 9 * 16 + 1, 7 * 16, 7 * 16 + 1});
  CHECK(l.tables == std::vector<int32_t>{7, 2, 3, 0, 9, 7});
  CHECK(l.offsets == std::vector<int32_t>{0, 0, 0, 0, 0, 2, 5, 5});
  CHECK(l.rows == std::vector<int32_t>{5, 7});  // the prompt chunk wants no logits
  CHECK(l.greedy == std::vector<bool>{true, false});
  CHECK(l.sampledRows() == 1);
  std::vector<int32_t> packed = l.packed();
  CHECK(packed.size() == 8 * 4 + 6 + 2);
  CHECK(packed[8] == 2);           // positions start after the tokens
  CHECK(packed[32] == 7);          // then the tables
  CHECK(packed.back() == 7);       // and the rows last
}

TEST_CASE("a sequence outside the cache or the vocabulary is refused before anything is laid out") {
  std::vector<int32_t> tokens = {1}, table = {12};
  ShardSeq bad{tokens.data(), 1, 0, table.data(), 1, true, true};
  CHECK_THROWS_AS(cuda::layOutStep(tiny(), 10, 16, {bad}), std::invalid_argument);
  std::vector<int32_t> big = {100}, ok = {1};
  ShardSeq outOfVocab{big.data(), 1, 0, ok.data(), 1, true, true};
  CHECK_THROWS_AS(cuda::layOutStep(tiny(), 10, 16, {outOfVocab}), std::invalid_argument);
}
