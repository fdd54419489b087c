#include "engine/core/kv_block_manager.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace vsup::engine::core {
namespace {

int32_t referenced(const KvBlockManager& m) {
  int32_t n = 0;
  for (BlockId b = 0; b < m.totalBlocks(); ++b) n += m.refCount(b) > 0 ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("reserve grows a table in whole blocks and keeps the blocks it already has") {
  KvBlockManager m(8, 4);
  CHECK(m.blocksFor(0) == 0);
  CHECK(m.blocksFor(1) == 1);
  CHECK(m.blocksFor(4) == 1);
  CHECK(m.blocksFor(5) == 2);
  REQUIRE(m.reserve("a", 5));
  CHECK(m.table("a") == std::vector<BlockId>{0, 1});  // a fresh cache hands out 0, 1, ...
  CHECK(m.freeBlocks() == 6);
  REQUIRE(m.reserve("a", 8));  // still two blocks
  CHECK(m.table("a").size() == 2);
  REQUIRE(m.reserve("a", 9));
  CHECK(m.table("a") == std::vector<BlockId>{0, 1, 2});
  CHECK(m.refCount(2) == 1);
  CHECK(m.freeBlocks() == 5);
  m.checkInvariants();
}

TEST_CASE("reserve refuses when the free list is too short and takes nothing") {
  KvBlockManager m(4, 4);
  REQUIRE(m.reserve("a", 12));
  CHECK_FALSE(m.reserve("b", 8));
  CHECK(m.table("b").empty());
  CHECK(m.freeBlocks() == 1);
  CHECK_FALSE(m.reserve("a", 20));  // needs two more
  CHECK(m.table("a").size() == 3);
  CHECK(m.freeBlocks() == 1);
  CHECK(m.reserve("b", 4));
  CHECK(m.freeBlocks() == 0);
  m.checkInvariants();
}

TEST_CASE("release returns a table's blocks so that the last freed is the first reused") {
  KvBlockManager m(6, 2);
  REQUIRE(m.reserve("a", 6));  // 0, 1, 2
  REQUIRE(m.reserve("b", 2));  // 3
  m.release("a");
  CHECK(m.table("a").empty());
  CHECK(m.freeBlocks() == 5);
  for (BlockId b : {0, 1, 2}) CHECK(m.refCount(b) == 0);
  // The stack top is the released table's last block, then the ones before it.
  REQUIRE(m.reserve("c", 4));
  CHECK(m.table("c") == std::vector<BlockId>{2, 1});
  m.release("unknown");  // nothing happens
  CHECK(m.freeBlocks() == 3);
  m.checkInvariants();
}

TEST_CASE("a hold keeps a finished sequence's blocks out of the free list") {
  KvBlockManager m(4, 4);
  REQUIRE(m.reserve("a", 8));
  std::vector<BlockId> held = m.hold("a", "h", 1000);
  CHECK(held == std::vector<BlockId>{0, 1});
  CHECK(m.table("a").empty());
  CHECK(m.heldBlocks("h") == held);
  CHECK(m.holdCount() == 1);
  CHECK(m.freeBlocks() == 2);
  CHECK(m.refCount(0) == 1);
  // The held blocks are not handed out, however much is asked.
  CHECK_FALSE(m.reserve("b", 12));
  REQUIRE(m.reserve("b", 8));
  for (BlockId b : m.table("b")) CHECK(std::find(held.begin(), held.end(), b) == held.end());
  m.checkInvariants();
}

TEST_CASE("releaseHold frees the held blocks once and forgets the hold") {
  KvBlockManager m(4, 4);
  REQUIRE(m.reserve("a", 8));
  m.hold("a", "h", 1000);
  CHECK(m.releaseHold("h"));
  CHECK(m.freeBlocks() == 4);
  CHECK(m.holdCount() == 0);
  CHECK(m.heldBlocks("h").empty());
  CHECK_FALSE(m.releaseHold("h"));
  CHECK(m.freeBlocks() == 4);
  m.checkInvariants();
}

TEST_CASE("extendHold moves the expiry later and never earlier") {
  KvBlockManager m(4, 4);
  REQUIRE(m.reserve("a", 4));
  m.hold("a", "h", 1000);
  CHECK(m.nextExpiry() == 1000);
  CHECK(m.extendHold("h", 2000));
  CHECK(m.nextExpiry() == 2000);
  CHECK(m.extendHold("h", 500));  // known, but not shortened
  CHECK(m.nextExpiry() == 2000);
  CHECK(m.expireHolds(1999).empty());
  CHECK(m.holdCount() == 1);
  CHECK_FALSE(m.extendHold("other", 5000));
}

TEST_CASE("expireHolds frees exactly the holds at or past their expiry and returns their ids") {
  KvBlockManager m(8, 4);
  for (const char* s : {"a", "b", "c"}) REQUIRE(m.reserve(s, 8));
  m.hold("a", "ha", 100);
  m.hold("b", "hb", 200);
  m.hold("c", "hc", 300);
  CHECK(m.nextExpiry() == 100);
  CHECK(m.expireHolds(99).empty());
  std::vector<std::string> gone = m.expireHolds(200);
  std::sort(gone.begin(), gone.end());
  CHECK(gone == std::vector<std::string>{"ha", "hb"});
  CHECK(m.holdCount() == 1);
  CHECK(m.heldBlocks("hc").size() == 2);
  CHECK(m.freeBlocks() == 6);
  CHECK(m.nextExpiry() == 300);
  CHECK(m.expireHolds(1000) == std::vector<std::string>{"hc"});
  CHECK(m.nextExpiry() == kNoDeadline);
  CHECK(m.freeBlocks() == 8);
  m.checkInvariants();
}

TEST_CASE("holding under an id that is already held throws and changes nothing") {
  KvBlockManager m(8, 4);
  REQUIRE(m.reserve("a", 4));
  REQUIRE(m.reserve("b", 4));
  m.hold("a", "h", 100);
  CHECK_THROWS_AS(m.hold("b", "h", 100), std::invalid_argument);
  CHECK(m.table("b").size() == 1);  // b keeps its table
  CHECK(m.heldBlocks("h") == std::vector<BlockId>{0});
  m.checkInvariants();
}

TEST_CASE("holding a sequence that has no table makes no hold") {
  KvBlockManager m(4, 4);
  CHECK(m.hold("nobody", "h", 100).empty());
  CHECK(m.holdCount() == 0);
  CHECK_FALSE(m.releaseHold("h"));
  CHECK(m.freeBlocks() == 4);
}

TEST_CASE("every block is free or referenced, exactly, after any sequence of operations") {
  for (uint32_t seed : {1u, 2u, 3u, 4u, 5u}) {
    CAPTURE(seed);
    std::mt19937 rng(seed);
    KvBlockManager m(24, 3);
    std::set<std::string> holds;
    MonoNs now = 0;
    int holdsMade = 0;
    int refusals = 0;
    for (int op = 0; op < 2000; ++op) {
      std::string seq = "s" + std::to_string(rng() % 6);
      switch (rng() % 5) {
        case 0:
        case 1: {
          int64_t positions = int64_t(m.table(seq).size()) * 3 + int64_t(rng() % 10);
          int32_t before = m.freeBlocks();
          size_t had = m.table(seq).size();
          if (!m.reserve(seq, positions)) {
            ++refusals;
            CHECK(m.freeBlocks() == before);
            CHECK(m.table(seq).size() == had);
          } else {
            CHECK(int64_t(m.table(seq).size()) * 3 >= positions);
          }
          break;
        }
        case 2:
          m.release(seq);
          CHECK(m.table(seq).empty());
          break;
        case 3: {
          std::string id = "h" + std::to_string(holdsMade);
          if (!m.hold(seq, id, now + MonoNs(rng() % 50)).empty()) {
            holds.insert(id);
            ++holdsMade;
          }
          break;
        }
        case 4:
          if (rng() % 2 == 0 && !holds.empty()) {
            auto it = holds.begin();
            std::advance(it, rng() % holds.size());
            CHECK(m.releaseHold(*it));
            holds.erase(it);
          } else {
            now += MonoNs(rng() % 20);
            for (const std::string& id : m.expireHolds(now)) CHECK(holds.erase(id) == 1);
          }
          break;
      }
      m.checkInvariants();
      REQUIRE(m.totalBlocks() == m.freeBlocks() + referenced(m));
      REQUIRE(m.holdCount() == holds.size());
    }
    CHECK(holdsMade > 0);
    CHECK(refusals > 0);
  }
}

}  // namespace vsup::engine::core
