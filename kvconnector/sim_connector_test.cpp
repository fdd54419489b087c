#include <doctest/doctest.h>

#include "kvconnector/kv_connector.h"

namespace vsup::kv {

TEST_CASE("a sim transfer is pending until its transfer time has passed, then completed") {
  auto w = makeSimWorker(100);
  MonoNs t0 = 1'000'000'000;
  w->startTransfer("a", t0);
  w->startTransfer("b", t0 + 50 * kNsPerMs);
  CHECK(w->pending(t0) == 2);
  CHECK(w->nextCompletion() == t0 + 100 * kNsPerMs);
  CHECK(w->pending(t0 + 100 * kNsPerMs) == 1);
  CHECK(w->completed() == 1);
  CHECK(w->pending(t0 + 150 * kNsPerMs) == 0);
  CHECK(w->nextCompletion() == kNoDeadline);
  CHECK(w->completed() == 2);
}

TEST_CASE("finished transfers are reported once each, in completion order") {
  auto w = makeSimWorker(100);
  MonoNs t0 = 1'000'000'000;
  w->startTransfer("a", t0);
  w->startTransfer("b", t0 + 10 * kNsPerMs);
  CHECK(w->takeFinished().empty());
  (void)w->pending(t0 + 100 * kNsPerMs);
  CHECK(w->takeFinished() == std::vector<std::string>{"a"});
  CHECK(w->takeFinished().empty());
  (void)w->pending(t0 + 200 * kNsPerMs);
  CHECK(w->takeFinished() == std::vector<std::string>{"b"});
}

TEST_CASE("the sim scheduler side transfers every finished request") {
  auto s = makeSimScheduler();
  CHECK(s->toTransfer({"a", "b"}) == std::vector<std::string>{"a", "b"});
}

}  // namespace vsup::kv
