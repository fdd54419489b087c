#include <doctest/doctest.h>

#include <stdexcept>

#include "kvconnector/lease_table.h"

namespace vsup::kv {
namespace {
constexpr int64_t kLease = 1000 * kNsPerMs;
constexpr MonoNs t0 = 1'000'000'000'000;
}  // namespace

TEST_CASE("a granted lease is pulled by one connection and ends once, when it is done") {
  LeaseTable t(kLease);
  t.grant("a", {3, 1, 2}, t0);
  CHECK(t.live() == 1);
  CHECK(t.nextExpiry() == t0 + kLease);
  CHECK(t.beginPull("a", {1, 3}, 7, t0 + 10).refusal == LeaseTable::Refusal::None);
  CHECK(t.pulling() == 1);
  auto other = t.beginPull("a", {1}, 8, t0 + 20);
  CHECK(other.refusal == LeaseTable::Refusal::OtherConnection);
  CHECK_FALSE(t.end("a", LeaseEnd::Done, 8).has_value());  // not the puller's
  auto e = t.end("a", LeaseEnd::Done, 7);
  REQUIRE(e.has_value());
  CHECK(e->reason == LeaseEnd::Done);
  CHECK(t.live() == 0);
  LeaseTable::PullCheck why;
  CHECK_FALSE(t.end("a", LeaseEnd::Done, 7, &why).has_value());
  CHECK(why.message == "lease a has ended (done)");
  CHECK(t.endedCount(LeaseEnd::Done) == 1);
  CHECK(t.granted() == 1);
}

TEST_CASE("a pull extends the lease from now; an extension never shortens it") {
  LeaseTable t(kLease);
  t.grant("a", {1}, t0);
  CHECK(t.beginPull("a", {1}, 1, t0 + 500 * kNsPerMs).refusal == LeaseTable::Refusal::None);
  CHECK(t.nextExpiry() == t0 + 1500 * kNsPerMs);
  CHECK(t.extend("a", t0 + 100));  // earlier: kept as it was
  CHECK(t.nextExpiry() == t0 + 1500 * kNsPerMs);
  CHECK(t.extend("a", t0 + 5000 * kNsPerMs));
  CHECK(t.nextExpiry() == t0 + 5000 * kNsPerMs);
  // A pull at a time whose lease would end earlier than the extension leaves it alone.
  CHECK(t.beginPull("a", {1}, 1, t0 + 600 * kNsPerMs).refusal == LeaseTable::Refusal::None);
  CHECK(t.nextExpiry() == t0 + 5000 * kNsPerMs);
  CHECK_FALSE(t.extend("nope", t0));
}

TEST_CASE("an expired lease is refused as expired, before and after expire() runs") {
  LeaseTable t(kLease);
  t.grant("a", {1}, t0);
  t.grant("b", {2}, t0 + 10);
  auto late = t.beginPull("a", {1}, 1, t0 + kLease);
  CHECK(late.refusal == LeaseTable::Refusal::Expired);
  CHECK(late.message == "lease a expired; its blocks may have been reused");
  auto ended = t.expire(t0 + kLease + 10);
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].id == "b");
  CHECK(ended[0].reason == LeaseEnd::Expired);
  CHECK(t.beginPull("b", {2}, 1, t0 + kLease + 20).refusal == LeaseTable::Refusal::Expired);
  CHECK(t.endedCount(LeaseEnd::Expired) == 2);
  CHECK(t.nextExpiry() == kNoDeadline);
  CHECK(t.beginPull("never", {2}, 1, t0).message == "lease never is unknown to this agent");
}

TEST_CASE("a pull of a block outside the lease is refused and binds nothing") {
  LeaseTable t(kLease);
  t.grant("a", {4, 5}, t0);
  auto r = t.beginPull("a", {4, 6}, 1, t0);
  CHECK(r.refusal == LeaseTable::Refusal::OutsideLease);
  CHECK(r.message == "block 6 is not one of lease a's");
  CHECK(t.pulling() == 0);
  CHECK(t.nextExpiry() == t0 + kLease);
}

TEST_CASE("a dropped connection ends only the leases it was pulling") {
  LeaseTable t(kLease);
  t.grant("a", {1}, t0);
  t.grant("b", {2}, t0);
  t.grant("c", {3}, t0);
  REQUIRE(t.beginPull("a", {1}, 1, t0).refusal == LeaseTable::Refusal::None);
  REQUIRE(t.beginPull("b", {2}, 2, t0).refusal == LeaseTable::Refusal::None);
  auto ended = t.dropConnection(1);
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].id == "a");
  CHECK(ended[0].reason == LeaseEnd::Disconnected);
  CHECK(t.dropConnection(0).empty());  // "no connection" owns nothing
  CHECK(t.live() == 2);
  auto gaveUp = t.end("c", LeaseEnd::GaveUp, 3);  // unbound: any connection may give it up
  REQUIRE(gaveUp.has_value());
  auto rest = t.abandonAll();
  REQUIRE(rest.size() == 1);
  CHECK(rest[0].id == "b");
  CHECK(rest[0].reason == LeaseEnd::Abandoned);
  CHECK(t.endedCount(LeaseEnd::Disconnected) == 1);
  CHECK(t.endedCount(LeaseEnd::GaveUp) == 1);
  CHECK(t.endedCount(LeaseEnd::Abandoned) == 1);
  CHECK(t.live() == 0);
}

TEST_CASE("grants are checked, and a re-granted id is live again") {
  LeaseTable t(kLease);
  CHECK_THROWS_AS(t.grant("a", {}, t0), std::invalid_argument);
  t.grant("a", {1}, t0);
  CHECK_THROWS_WITH_AS(t.grant("a", {2}, t0), "lease a is already live", std::invalid_argument);
  LeaseTable::PullCheck why;
  CHECK_FALSE(t.end("a", LeaseEnd::Done, 5, &why).has_value());  // never pulled: not done
  CHECK(why.message == "lease a was not pulled on this connection");
  REQUIRE(t.end("a", LeaseEnd::GaveUp, 0).has_value());
  t.grant("a", {2}, t0);
  CHECK(t.beginPull("a", {2}, 1, t0).refusal == LeaseTable::Refusal::None);
  CHECK_THROWS_AS(LeaseTable(0), std::invalid_argument);
}

TEST_CASE("ended leases are remembered up to the limit, the oldest forgotten first") {
  LeaseTable t(kLease);
  for (size_t i = 0; i <= LeaseTable::kRememberEnded; ++i) {
    std::string id = "r" + std::to_string(i);
    t.grant(id, {1}, t0);
    REQUIRE(t.end(id, LeaseEnd::GaveUp, 0).has_value());
  }
  CHECK(t.beginPull("r0", {1}, 1, t0).message == "lease r0 is unknown to this agent");
  CHECK(t.beginPull("r1", {1}, 1, t0).message == "lease r1 has ended (gave up)");
}

}  // namespace vsup::kv
