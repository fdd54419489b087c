// DeadlineBudget: how a vsup tree splits one shutdown deadline between its nodes. Every margin a
// node keeps for itself, and every stop budget the serving tree gives its nodes, is decided here
// and nowhere else, so the numbers below are the whole rule.
//
// Deadlines are absolute CLOCK_MONOTONIC instants (MonoNs), the same clock in every process of a
// host, so a deadline passed down the tree means the same instant everywhere. kNoDeadline means
// "none" and stays "none" through every function here.
//
// 1. What a node keeps for itself (reserveNs, forChildren). A node that stops its children must
//    still do its own cleanup after the last one is gone: reap it, answer its own parent, exit.
//    So it gives its children its own deadline less a reserve: a tenth of the time left, at least
//    20 ms (a process exit and a reply on a socket need a few ms even on a loaded host), at most
//    250 ms (a long shutdown must not waste seconds: the cleanup never takes longer). Each level
//    of a tree applies it again, so a deeper node always finishes before its parent has to kill
//    it. A node that must answer something itself when its time is nearly up (an API server that
//    stops waiting for the engine and answers its clients) acts at the same instant.
//
// 2. Where a vsup-aware node's shutdown hooks must end (childrenShareNs, forHooks). Its hooks (a
//    drain, say) run first, while its own children still serve them; the children then need time
//    to stop. The hooks get the deadline less a fifth of the time left, at most 1 s: a short
//    deadline is shared, a long drain keeps nearly all of its time.
//
// 3. The serving tree's stop budgets (serving, embeddedEngineStopMs), from `--shutdown-timeout`
//    (the drain) and the KV connector's shutdown timeout (0 without a connector):
//      API server   drain + 3 s    drain in-flight requests, then tell the clients whose requests
//                                  were cut and close the connections;
//      engine-core  10 s + kv      stop at a step boundary, wait for KV transfers, stop its ranks;
//      a rank       5 s + kv       finish its step, wait for its KV transfers, exit;
//      root margin  2 s            its own cleanup (point 1) and the exit status;
//      total        drain + 3 s + 10 s + kv + 2 s  (the API servers stop first, then engine-core).
//    For Kubernetes: drain 30 s without a connector gives 30 + 3 + 10 + 2 = 45 s; after a
//    `preStop` sleep of 5 s that is 50 s, so terminationGracePeriodSeconds must exceed 50.
//    Engine-core embedded by vsup::LLM (no drain, no API server) gets 10 s.
#pragma once

#include <cstdint>

#include "base/clock.h"

namespace vsup::supervisor {

// The serving tree's stop budgets, in ms (DeadlineBudget::serving).
struct ServingBudget {
  int64_t drainMs;           // how long the API servers keep serving in-flight requests
  int64_t apiServerStopMs;   // an API server's shutdown timeout: drain + 3 s
  int64_t engineCoreStopMs;  // engine-core's shutdown timeout: 10 s + kv
  int64_t rankStopMs;        // each rank's shutdown timeout (under engine-core): 5 s + kv
  int64_t totalMs;           // the root's whole shutdown deadline: drain + 3 s + 10 s + kv + 2 s
};

class DeadlineBudget {
 public:
  static constexpr int64_t kReserveMinNs = 20 * kNsPerMs;
  static constexpr int64_t kReserveMaxNs = 250 * kNsPerMs;
  static constexpr int64_t kChildrenShareMaxNs = 1000 * kNsPerMs;
  static constexpr int64_t kApiServerCloseMs = 3000;
  static constexpr int64_t kEngineCoreStopMs = 10000;
  static constexpr int64_t kRankStopMs = 5000;
  static constexpr int64_t kRootMarginMs = 2000;

  // What a node keeps for its own cleanup out of `leftNs` ns: a tenth, at least 20 ms, at most
  // 250 ms (also when `leftNs` is negative: the deadline has passed).
  static int64_t reserveNs(int64_t leftNs);

  // The deadline a node gives its children, and the instant it must act locally:
  // own - reserveNs(own - now). Never after `own`; kNoDeadline for kNoDeadline. Saturating.
  static MonoNs forChildren(MonoNs own, MonoNs now);

  // What a vsup-aware node's children keep out of `leftNs` while its shutdown hooks run: a
  // fifth, at most 1 s (0 when nothing is left).
  static int64_t childrenShareNs(int64_t leftNs);

  // Where the shutdown hooks of a node whose deadline is `own` must end, measured from `now`:
  // own - childrenShareNs(own - now). Never after `own`; kNoDeadline for kNoDeadline.
  static MonoNs forHooks(MonoNs own, MonoNs now);

  // The serving tree's budgets from the drain (`--shutdown-timeout`, ms) and the KV connector's
  // shutdown timeout (ms, 0 when none). Sums saturate instead of overflowing.
  static ServingBudget serving(int64_t drainMs, int64_t kvMs);

  // Engine-core's shutdown timeout under vsup::LLM (no drain, no API server): 10 s.
  static int64_t embeddedEngineStopMs();
};

}  // namespace vsup::supervisor
