// The serving-stats recorder driven alone, with explicit times: each figure against values
// computed by hand, preemption and aborts, and the histogram's bucket edges.
#include "engine/core/serving_stats.h"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace vsup::engine::core {
namespace {

constexpr MonoNs kSec = 1'000'000'000;
constexpr MonoNs kMs = 1'000'000;
constexpr double kInf = std::numeric_limits<double>::infinity();

StepInput step(std::vector<std::string> ids) {
  StepInput in;
  for (auto& id : ids) {
    SeqStep s;
    s.id = std::move(id);
    in.seqs.push_back(std::move(s));
  }
  return in;
}

TokenDelta delta(const std::string& id, int64_t prompt, int64_t completion,
                 FinishReason finish = FinishReason::None) {
  TokenDelta d;
  d.requestId = id;
  d.text = "x";
  d.promptTokens = prompt;
  d.completionTokens = completion;
  d.finish = finish;
  return d;
}

// The non-empty buckets of `h`: upper bound (+Inf for the last) → observations.
std::map<double, uint64_t> filled(const Histogram& h) {
  std::map<double, uint64_t> out;
  for (size_t i = 0; i < h.counts.size(); ++i) {
    if (h.counts[i] != 0) out[i < h.bounds.size() ? h.bounds[i] : kInf] = h.counts[i];
  }
  return out;
}

EngineStats snap(const ServingStats& s) { return s.snapshot(SchedulerStats{}, 16, 0); }

}  // namespace

TEST_SUITE("unit") {

TEST_CASE("histogram: a value equal to a bound is in that bound's bucket; above all, +Inf; NaN "
          "is ignored") {
  Histogram h({1.0, 2.0});
  CHECK(h.counts == std::vector<uint64_t>{0, 0, 0});
  h.observe(1.0);
  h.observe(-1.0);
  h.observe(1.0000001);
  h.observe(2.0);
  h.observe(3.0);
  h.observe(std::nan(""));
  CHECK(h.counts == std::vector<uint64_t>{2, 2, 1});
  CHECK(h.count == 5);
  CHECK(h.sum == doctest::Approx(1.0 - 1.0 + 1.0000001 + 2.0 + 3.0));
}

TEST_CASE("histogram: a default-made one counts everything in +Inf") {
  Histogram h;
  h.observe(5.0);
  CHECK(h.counts == std::vector<uint64_t>{1});
  CHECK(h.count == 1);
}

TEST_CASE("the bucket lists are vLLM's, and EngineStats' histograms use them") {
  const auto& ttft = timeToFirstTokenBuckets();
  const auto& itl = interTokenLatencyBuckets();
  const auto& req = requestLatencyBuckets();
  CHECK(ttft == std::vector<double>{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                    0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                    20.0,  40.0,  80.0, 160.0, 640.0, 2560.0});
  CHECK(itl == std::vector<double>{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0});
  CHECK(req == std::vector<double>{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                                   7680.0});
  for (const auto* list : {&ttft, &itl, &req}) {
    for (size_t i = 1; i < list->size(); ++i) CHECK((*list)[i - 1] < (*list)[i]);
  }
  EngineStats s;
  CHECK(s.timeToFirstToken.bounds == ttft);
  CHECK(s.interTokenLatency.bounds == itl);
  CHECK(s.e2eLatency.bounds == req);
  CHECK(s.queueTime.bounds == req);
  CHECK(s.e2eLatency.counts.size() == req.size() + 1);
}

TEST_CASE("serving stats: one request's queue time, TTFT, ITL, e2e latency and token counts") {
  ServingStats s;
  s.arrived("a", 10 * kSec);
  s.scheduled(step({"a"}), 10 * kSec + 500 * kMs);  // queue 0.5 s
  s.delivered({delta("a", 5, 1)}, 11 * kSec);       // TTFT 1.0 s
  s.delivered({delta("a", 5, 2)}, 11 * kSec + 250 * kMs);  // ITL 0.25 s
  s.scheduled(step({"a"}), 11 * kSec + 300 * kMs);  // a later step: not queue time again
  s.delivered({delta("a", 5, 3, FinishReason::Length)}, 11 * kSec + 350 * kMs);  // ITL 0.1 s

  EngineStats st = snap(s);
  CHECK(st.promptTokens == 5);
  CHECK(st.generationTokens == 3);
  CHECK(st.finishedLength == 1);
  CHECK(st.finishedStop + st.finishedAbort + st.finishedError == 0);
  CHECK(filled(st.queueTime) == std::map<double, uint64_t>{{0.5, 1}});
  CHECK(st.queueTime.sum == doctest::Approx(0.5));
  CHECK(filled(st.timeToFirstToken) == std::map<double, uint64_t>{{1.0, 1}});
  CHECK(st.timeToFirstToken.sum == doctest::Approx(1.0));
  CHECK(filled(st.interTokenLatency) == std::map<double, uint64_t>{{0.1, 1}, {0.3, 1}});
  CHECK(st.interTokenLatency.count == 2);
  CHECK(st.interTokenLatency.sum == doctest::Approx(0.35));
  CHECK(filled(st.e2eLatency) == std::map<double, uint64_t>{{1.5, 1}});
  CHECK(st.e2eLatency.sum == doctest::Approx(1.35));
  CHECK(s.tracked() == 0);
}

TEST_CASE("serving stats: requests in one batch are timed each on its own") {
  ServingStats s;
  s.arrived("a", 0);
  s.arrived("b", 1 * kSec);
  s.scheduled(step({"a", "b"}), 2 * kSec);  // queue: a 2 s, b 1 s
  s.delivered({delta("a", 4, 1), delta("b", 6, 1)}, 3 * kSec);  // TTFT: a 3 s, b 2 s
  // A delta without a new token (a stop string held back): no ITL, no tokens.
  s.delivered({delta("a", 4, 1), delta("b", 6, 2)}, 3 * kSec + 20 * kMs);  // ITL b 0.02 s
  s.delivered({delta("a", 4, 2, FinishReason::Stop), delta("b", 6, 3, FinishReason::Stop)},
              3 * kSec + 70 * kMs);  // ITL a 0.07 s, b 0.05 s
  EngineStats st = snap(s);
  CHECK(st.promptTokens == 10);
  CHECK(st.generationTokens == 5);
  CHECK(st.finishedStop == 2);
  CHECK(filled(st.queueTime) == std::map<double, uint64_t>{{1.0, 1}, {2.0, 1}});
  CHECK(filled(st.timeToFirstToken) == std::map<double, uint64_t>{{2.5, 1}, {5.0, 1}});
  CHECK(st.timeToFirstToken.sum == doctest::Approx(5.0));
  CHECK(filled(st.interTokenLatency) ==
        std::map<double, uint64_t>{{0.025, 1}, {0.05, 1}, {0.075, 1}});
  CHECK(st.interTokenLatency.sum == doctest::Approx(0.14));
  CHECK(filled(st.e2eLatency) == std::map<double, uint64_t>{{2.5, 1}, {5.0, 1}});
  CHECK(st.e2eLatency.sum == doctest::Approx(3.07 + 2.07));
}

TEST_CASE("serving stats: a preempted request's recompute counts no prompt, queue time or "
          "token twice") {
  ServingStats s;
  s.arrived("a", 0);
  s.scheduled(step({"a"}), 1 * kSec);
  s.delivered({delta("a", 5, 1)}, 2 * kSec);
  s.delivered({delta("a", 5, 2)}, 3 * kSec);
  // Preempted, then recomputed from its first position: the prompt and both tokens again.
  s.scheduled(step({"a"}), 4 * kSec);
  s.scheduled(step({"a"}), 4 * kSec + 100 * kMs);
  s.delivered({delta("a", 5, 3, FinishReason::Stop)}, 5 * kSec);

  SchedulerStats sched;
  sched.preemptions = 1;
  EngineStats st = s.snapshot(sched, 16, 0);
  CHECK(st.preemptions == 1);
  CHECK(st.promptTokens == 5);
  CHECK(st.generationTokens == 3);
  CHECK(st.queueTime.count == 1);
  CHECK(st.queueTime.sum == doctest::Approx(1.0));
  CHECK(st.timeToFirstToken.count == 1);
  CHECK(filled(st.interTokenLatency) == std::map<double, uint64_t>{{1.0, 1}, {2.5, 1}});
  CHECK(st.finishedStop == 1);
  CHECK(s.tracked() == 0);
}

TEST_CASE("serving stats: an abort before scheduling counts the abort and its latency only") {
  ServingStats s;
  s.arrived("a", 0);
  // The scheduler's final delta for a waiting request carries its prompt length.
  s.delivered({delta("a", 7, 0, FinishReason::Abort)}, 2 * kSec);
  EngineStats st = snap(s);
  CHECK(st.finishedAbort == 1);
  CHECK(filled(st.e2eLatency) == std::map<double, uint64_t>{{2.0, 1}});
  CHECK(st.promptTokens == 0);
  CHECK(st.generationTokens == 0);
  CHECK(st.queueTime.count == 0);
  CHECK(st.timeToFirstToken.count == 0);
  CHECK(st.interTokenLatency.count == 0);
  CHECK(s.tracked() == 0);
}

TEST_CASE("serving stats: an abort and an engine failure after scheduling count the prompt") {
  ServingStats s;
  s.arrived("a", 0);
  s.arrived("b", 0);
  s.scheduled(step({"a", "b"}), 1 * kSec);  // a prompt chunk: no delta
  s.delivered({delta("a", 9, 0, FinishReason::Abort)}, 2 * kSec);
  s.delivered({delta("b", 4, 0, FinishReason::Error)}, 3 * kSec);
  EngineStats st = snap(s);
  CHECK(st.promptTokens == 13);
  CHECK(st.finishedAbort == 1);
  CHECK(st.finishedError == 1);
  CHECK(st.generationTokens == 0);
  CHECK(st.timeToFirstToken.count == 0);
  CHECK(st.e2eLatency.count == 2);
  CHECK(st.e2eLatency.sum == doctest::Approx(5.0));
}

TEST_CASE("serving stats: a forgotten request, and ids it never saw, count nothing") {
  ServingStats s;
  s.arrived("a", 0);
  s.forget("a");
  CHECK(s.tracked() == 0);
  s.scheduled(step({"a", "ghost"}), 1 * kSec);
  s.delivered({delta("a", 5, 1), delta("ghost", 5, 1, FinishReason::Stop)}, 2 * kSec);
  EngineStats st = snap(s);
  CHECK(st.promptTokens == 0);
  CHECK(st.generationTokens == 0);
  CHECK(st.finishedStop == 0);
  CHECK(st.queueTime.count == 0);
  CHECK(st.timeToFirstToken.count == 0);
  CHECK(st.e2eLatency.count == 0);
  CHECK(s.tracked() == 0);
}

TEST_CASE("serving stats: finished requests are not kept (memory bounded by those in flight)") {
  ServingStats s;
  const FinishReason reasons[] = {FinishReason::Stop, FinishReason::Length, FinishReason::Abort,
                                  FinishReason::Error};
  for (int i = 0; i < 1000; ++i) {
    std::string id = "r" + std::to_string(i);
    MonoNs t = i * kSec;
    s.arrived(id, t);
    s.arrived("open" + std::to_string(i % 3), t);  // three stay in flight (re-arrivals restart)
    s.scheduled(step({id}), t + 1);
    s.delivered({delta(id, 2, 1, reasons[i % 4])}, t + 2);
  }
  CHECK(s.tracked() == 3);
  EngineStats st = snap(s);
  CHECK(st.finishedStop == 250);
  CHECK(st.finishedLength == 250);
  CHECK(st.finishedAbort == 250);
  CHECK(st.finishedError == 250);
  CHECK(st.promptTokens == 2000);
  CHECK(st.generationTokens == 1000);
  CHECK(st.e2eLatency.count == 1000);
}

TEST_CASE("serving stats: the snapshot's gauges are the scheduler's, plus those being tokenized") {
  ServingStats s;
  SchedulerStats sched;
  sched.totalBlocks = 64;
  sched.freeBlocks = 48;
  sched.waiting = 2;
  sched.running = 3;
  sched.holds = 1;
  sched.preemptions = 4;
  EngineStats st = s.snapshot(sched, 16, 5);
  CHECK(st.running == 3);
  CHECK(st.waiting == 7);
  CHECK(st.totalBlocks == 64);
  CHECK(st.freeBlocks == 48);
  CHECK(st.blockSize == 16);
  CHECK(st.preemptions == 4);
  CHECK(st.kvCacheUsage() == doctest::Approx(0.25));
}

}  // TEST_SUITE

}  // namespace vsup::engine::core
