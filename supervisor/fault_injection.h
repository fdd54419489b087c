// Test-only fault injection (README, "Fault injection"), so that process-level tests can make a
// node fail at an exact phase, deterministically:
//
//   VSUP_TEST_FAULT="worker-tp1:crash@step5,engine-core:ignore-shutdown"
//
// Each entry is NODE:ACTION, NODE being the node's name in the tree. Actions:
//   crash@start        exit 1 when the parent asks the node to start
//   pause@start        stop (SIGSTOP itself) when the parent asks the node to start, before it
//                      starts anything; SIGCONT resumes the start: a load that takes exactly as
//                      long as the test wants
//   crash@stepN        exit 1 when engine-core or a rank reaches step N (N >= 1)
//   crash@deltaN       exit 1 when an API server receives its Nth batch of tokens
//   crash@drain        exit 1 when the node is told to stop taking requests (quiesce)
//   crash@shutdown     exit 1 when the node is asked to shut down
//   ignore-shutdown    never answer the shutdown request, keep running (the parent must kill it)
// The variable is read once per process; unset, nothing here costs anything.
#pragma once

#include <string>

namespace vsup::supervisor {

// True when `node` has `action` in $VSUP_TEST_FAULT.
bool faultInjected(const std::string& node, const std::string& action);

// Exits the process with status 1 (after a line on stderr) when `node` has "crash@" + `point`.
void crashIfInjected(const std::string& node, const std::string& point);

// Stops the process (SIGSTOP, after a line on stderr) when `node` has "pause@" + `point`;
// returns once it has been continued (SIGCONT).
void pauseIfInjected(const std::string& node, const std::string& point);

}  // namespace vsup::supervisor
