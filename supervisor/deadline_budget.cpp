#include "supervisor/deadline_budget.h"

#include <algorithm>
#include <limits>

namespace vsup::supervisor {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

int64_t saturatingSub(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_sub_overflow(a, b, &out)) return b < 0 ? kMax : kMin;
  return out;
}

int64_t saturatingAdd(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out)) return b > 0 ? kMax : kMin;
  return out;
}

}  // namespace

int64_t DeadlineBudget::reserveNs(int64_t leftNs) {
  return std::clamp<int64_t>(leftNs / 10, kReserveMinNs, kReserveMaxNs);
}

MonoNs DeadlineBudget::forChildren(MonoNs own, MonoNs now) {
  if (own == kNoDeadline) return kNoDeadline;
  return saturatingSub(own, reserveNs(saturatingSub(own, now)));
}

int64_t DeadlineBudget::childrenShareNs(int64_t leftNs) {
  return std::clamp<int64_t>(leftNs / 5, 0, kChildrenShareMaxNs);
}

MonoNs DeadlineBudget::forHooks(MonoNs own, MonoNs now) {
  if (own == kNoDeadline) return kNoDeadline;
  return saturatingSub(own, childrenShareNs(saturatingSub(own, now)));
}

ServingBudget DeadlineBudget::serving(int64_t drainMs, int64_t kvMs) {
  ServingBudget b{};
  b.drainMs = drainMs;
  b.apiServerStopMs = saturatingAdd(drainMs, kApiServerCloseMs);
  b.engineCoreStopMs = saturatingAdd(kEngineCoreStopMs, kvMs);
  b.rankStopMs = saturatingAdd(kRankStopMs, kvMs);
  b.totalMs = saturatingAdd(saturatingAdd(b.apiServerStopMs, b.engineCoreStopMs), kRootMarginMs);
  return b;
}

int64_t DeadlineBudget::embeddedEngineStopMs() { return kEngineCoreStopMs; }

}  // namespace vsup::supervisor
