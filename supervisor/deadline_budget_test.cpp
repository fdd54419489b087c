// Tests for supervisor/deadline_budget.h: the reserve's clamp at both ends, deadlines that never
// move later, kNoDeadline passed through without overflow, and the serving tree's arithmetic.
#include "supervisor/deadline_budget.h"

#include <doctest/doctest.h>

#include <initializer_list>
#include <limits>

namespace vsup::supervisor {
namespace {

constexpr int64_t kMs = kNsPerMs;
constexpr int64_t kS = 1000 * kNsPerMs;

TEST_CASE("the reserve is a tenth of the time left, between 20 and 250 ms") {
  CHECK(DeadlineBudget::reserveNs(1 * kS) == 100 * kMs);
  CHECK(DeadlineBudget::reserveNs(2500 * kMs) == 250 * kMs);
  CHECK(DeadlineBudget::reserveNs(200 * kMs) == 20 * kMs);
  // Low end: a short or passed deadline still leaves 20 ms.
  CHECK(DeadlineBudget::reserveNs(100 * kMs) == 20 * kMs);
  CHECK(DeadlineBudget::reserveNs(0) == 20 * kMs);
  CHECK(DeadlineBudget::reserveNs(-5 * kS) == 20 * kMs);
  CHECK(DeadlineBudget::reserveNs(std::numeric_limits<int64_t>::min()) == 20 * kMs);
  // High end: a long shutdown keeps at most 250 ms.
  CHECK(DeadlineBudget::reserveNs(60 * kS) == 250 * kMs);
  CHECK(DeadlineBudget::reserveNs(std::numeric_limits<int64_t>::max()) == 250 * kMs);
}

TEST_CASE("a child's deadline is its parent's less the reserve, never later") {
  const MonoNs now = 1000 * kS;
  CHECK(DeadlineBudget::forChildren(now + 1 * kS, now) == now + 900 * kMs);
  CHECK(DeadlineBudget::forChildren(now + 10 * kS, now) == now + 10 * kS - 250 * kMs);
  CHECK(DeadlineBudget::forChildren(now + 50 * kMs, now) == now + 30 * kMs);
  CHECK(DeadlineBudget::forChildren(now - 1 * kS, now) == now - 1 * kS - 20 * kMs);
  for (int64_t left : {int64_t(0), 1 * kMs, 199 * kMs, 1 * kS, 3 * kS, 3600 * kS, -1 * kS}) {
    CAPTURE(left);
    MonoNs own = now + left;
    MonoNs child = DeadlineBudget::forChildren(own, now);
    CHECK(child < own);
    CHECK(own - child >= DeadlineBudget::kReserveMinNs);
    CHECK(own - child <= DeadlineBudget::kReserveMaxNs);
    // Each level of a tree finishes before the one above.
    CHECK(DeadlineBudget::forChildren(child, now) < child);
  }
}

TEST_CASE("kNoDeadline stays kNoDeadline, and extreme deadlines saturate") {
  CHECK(DeadlineBudget::forChildren(kNoDeadline, 0) == kNoDeadline);
  CHECK(DeadlineBudget::forChildren(kNoDeadline, 1000 * kS) == kNoDeadline);
  CHECK(DeadlineBudget::forHooks(kNoDeadline, 1000 * kS) == kNoDeadline);
  // The largest real deadline: the time left overflows nothing.
  CHECK(DeadlineBudget::forChildren(kNoDeadline - 1, -1000 * kS) == kNoDeadline - 1 - 250 * kMs);
  // A deadline at the bottom of the range cannot go below it.
  const MonoNs lowest = std::numeric_limits<int64_t>::min();
  CHECK(DeadlineBudget::forChildren(lowest, 1000 * kS) == lowest);
  CHECK(DeadlineBudget::forChildren(lowest + 5 * kMs, 0) == lowest);
  CHECK(DeadlineBudget::forHooks(lowest, 1000 * kS) == lowest);
}

TEST_CASE("shutdown hooks leave the children a fifth of the time left, at most 1 s") {
  const MonoNs now = 1000 * kS;
  CHECK(DeadlineBudget::childrenShareNs(2 * kS) == 400 * kMs);
  CHECK(DeadlineBudget::childrenShareNs(30 * kS) == 1 * kS);
  CHECK(DeadlineBudget::childrenShareNs(0) == 0);
  CHECK(DeadlineBudget::childrenShareNs(-1 * kS) == 0);
  CHECK(DeadlineBudget::forHooks(now + 2 * kS, now) == now + 1600 * kMs);
  CHECK(DeadlineBudget::forHooks(now + 30 * kS, now) == now + 29 * kS);
  CHECK(DeadlineBudget::forHooks(now - 1 * kS, now) == now - 1 * kS);  // passed: not later
}

TEST_CASE("the serving tree's budgets: the Kubernetes example") {
  // --shutdown-timeout 30, no KV connector: 30 + 3 + 10 + 2 = 45 s.
  ServingBudget b = DeadlineBudget::serving(30000, 0);
  CHECK(b.drainMs == 30000);
  CHECK(b.apiServerStopMs == 33000);
  CHECK(b.engineCoreStopMs == 10000);
  CHECK(b.rankStopMs == 5000);
  CHECK(b.totalMs == 45000);
  // With a KV connector whose shutdown timeout is 10 s: a rank 15 s, engine-core 20 s.
  ServingBudget kv = DeadlineBudget::serving(30000, 10000);
  CHECK(kv.apiServerStopMs == 33000);
  CHECK(kv.rankStopMs == 15000);
  CHECK(kv.engineCoreStopMs == 20000);
  CHECK(kv.totalMs == 55000);
  // No drain at all.
  CHECK(DeadlineBudget::serving(0, 0).totalMs == 15000);
  // Absurd inputs saturate rather than wrap.
  CHECK(DeadlineBudget::serving(std::numeric_limits<int64_t>::max(), 0).totalMs ==
        std::numeric_limits<int64_t>::max());
}

TEST_CASE("engine-core embedded by vsup::LLM stops within 10 s") {
  CHECK(DeadlineBudget::embeddedEngineStopMs() == 10000);
}

}  // namespace
}  // namespace vsup::supervisor
