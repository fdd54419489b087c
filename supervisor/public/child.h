// vsup::Child — write a vsup-aware child program (installed as <vsup/child.h>).
//
// A vsup-aware child is started by a vsup supervisor with `vsup_aware = true` (or is a
// vsup::Supervisor child with ChildSpec::vsupAware). It is stopped over RPC instead of by
// signal, tells its parent when it is really ready, and may defer its shutdown while it
// finishes work, saying why ("flushing: 2 of 5 files") — which `vsup tree` shows.
//
//   int main() {
//     vsup::Child child;                       // connects to the parent ($VSUP_CONTROL_FD)
//     std::thread worker([&] { warmUp(); child.ready(); serve(); });
//     child.onShutdown([&](vsup::ShutdownRequest& stop) {
//       stopServing();
//       stop.defer("flushing", "0 of 2 files");
//       flushAsync([stop]() mutable { stop.done(); });   // done() from any thread
//     });
//     int code = child.run();                  // until the parent says stop and we are done
//     worker.join();
//     return code;
//   }
//
// Threading: construct the Child, set onShutdown() and call run() on one thread (the one that
// runs vsup's loop); the shutdown handler runs on it. ready(), ShutdownRequest::defer() and
// ShutdownRequest::done() may be called from any thread.
// The child ignores nothing by itself: a vsup-aware program usually ignores SIGINT/SIGTERM so
// that only its parent stops it (the `vsup` processes do).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "base/error.h"

namespace vsup {

class ShutdownRequest {
 public:
  // The instant by which this process must be done (its parent SIGKILLs it after).
  std::chrono::steady_clock::time_point deadline() const;
  // Report why the shutdown is not done yet; shown by `vsup tree`, logged by vsup.
  void defer(const std::string& reason, const std::string& progress = "");
  // The program finished its shutdown work: vsup stops this process's own children, then
  // run() returns. Call it once; copies of the request share the call.
  void done();

  struct State;
  explicit ShutdownRequest(std::shared_ptr<State> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<State> state_;
};

class Child {
 public:
  // True when this process was started by vsup as a vsup-aware child.
  static bool launchedByVsup();
  // Throws vsup::Error when this process was not started as a vsup-aware child.
  Child();
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  // The name the parent gave this child.
  const std::string& name() const;
  // The parent's start request returns, and the next sibling starts. Any thread, any time.
  void ready();
  // Called (on the run() thread) when the parent asks this process to stop. Without a handler
  // the shutdown is done at once.
  void onShutdown(std::function<void(ShutdownRequest&)> handler);
  // Serves the parent until the shutdown is done; returns the exit status to return from main
  // (0 clean; non-zero when the deadline was missed or the parent vanished).
  int run();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup
