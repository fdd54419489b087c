#include "workers/engine_core/request_router.h"

#include <doctest/doctest.h>

namespace vsup::workers {
namespace {

struct FakeSink final : DeltaSink {
  std::vector<std::vector<engine::TokenDelta>> calls;
  std::vector<std::string> failures;
  void deltas(const std::vector<engine::TokenDelta>& d) override { calls.push_back(d); }
  void engineFailed(const std::string& reason) override { failures.push_back(reason); }
};

engine::TokenDelta delta(const std::string& id, engine::FinishReason finish = engine::FinishReason::None) {
  engine::TokenDelta d;
  d.requestId = id;
  d.text.assign(1, 'x');  // (GCC 12 -Wrestrict false positive on a literal here)
  d.finish = finish;
  return d;
}

TEST_CASE("each session gets its requests' deltas of a step in one call") {
  RequestRouter router;
  FakeSink a, b;
  size_t ia = router.addSession(&a);
  size_t ib = router.addSession(&b);
  router.own("a1", ia);
  router.own("a2", ia);
  router.own("b1", ib);
  router.route({delta("a1"), delta("b1"), delta("a2")});
  REQUIRE(a.calls.size() == 1);
  CHECK(a.calls[0].size() == 2);
  CHECK(a.calls[0][0].requestId == "a1");
  CHECK(a.calls[0][1].requestId == "a2");
  REQUIRE(b.calls.size() == 1);
  CHECK(b.calls[0].size() == 1);
}

TEST_CASE("a finishing delta ends ownership; later deltas of that id are dropped") {
  RequestRouter router;
  FakeSink a;
  router.own("r", router.addSession(&a));
  router.route({delta("r", engine::FinishReason::Stop)});
  CHECK_FALSE(router.owned("r"));
  router.route({delta("r")});
  CHECK(a.calls.size() == 1);
  CHECK(router.size() == 0);
}

TEST_CASE("a lost session's requests are returned for abort and nothing is sent to it") {
  RequestRouter router;
  FakeSink a, b;
  size_t ia = router.addSession(&a);
  size_t ib = router.addSession(&b);
  router.own("a1", ia);
  router.own("b1", ib);
  router.own("a2", ia);
  auto lost = router.sessionLost(ia);
  CHECK(lost == std::vector<std::string>{"a1", "a2"});
  router.route({delta("a1"), delta("b1")});
  CHECK(a.calls.empty());
  CHECK(b.calls.size() == 1);
  router.engineFailed("boom");
  CHECK(a.failures.empty());
  CHECK(b.failures == std::vector<std::string>{"boom"});
}

TEST_CASE("forget ends ownership without a delta, and requests() lists what is still owned") {
  RequestRouter router;
  FakeSink a;
  size_t ia = router.addSession(&a);
  router.own("x", ia);
  router.own("y", ia);
  router.forget("x");
  CHECK(router.requests() == std::vector<std::string>{"y"});
  CHECK(a.calls.empty());
}

}  // namespace
}  // namespace vsup::workers
