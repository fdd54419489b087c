// vsup::Supervisor — supervise a tree of OS processes from inside your program
// (installed as <vsup/supervisor.h>; README, "Embedding": the teardown guarantees).
//
// Guarantees: creating and destroying a Supervisor leaves the host process as it was — no
// signal handler, disposition or mask changed, same fds, no child processes, no zombies, no
// extra threads once destroyed, nothing left in /tmp, $XDG_RUNTIME_DIR or /dev/shm, no SIGPIPE
// ever raised. Children are watched through pidfds, never through SIGCHLD.
//
// Threading, two modes:
//  * Private thread (the default constructor): the Supervisor runs its own thread with a libuv
//    loop; every method may be called from any thread, blocks until done, and throws
//    vsup::Error on failure. Never call it from inside a callback vsup runs on its thread.
//  * Host loop (the constructor taking a uv_loop_t*): the Supervisor lives on the host's loop
//    and runs whenever the host runs it. Call it only from that loop's thread. The blocking
//    methods drive the host's loop while they wait, so call them only when that thread is not
//    inside uv_run (e.g. before or between uv_run calls); from inside libuv callbacks use the
//    *Async methods, whose `done` is called on the loop thread with nullptr or the error.
//
// The host's signals stay the host's: to stop on SIGTERM, catch it yourself and call
// shutdown() (see README, "Embedding").
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <string>

#include "base/error.h"
#include "supervisor/spec.h"
#include "supervisor/status.h"

struct uv_loop_s;

namespace vsup {

class Supervisor {
 public:
  struct Options {
    // The `vsup` executable, needed only for children of type "supervisor" (it is re-executed
    // as the sub-supervisor) and for the orphan guard. Empty: $VSUP_EXE, else the installed one.
    std::string vsupExecutable;
    // vsup's own log lines (on stderr): "trace" … "off".
    std::string logLevel = "warn";
  };

  // Validates the spec (throws vsup::Error naming the child and field); starts nothing yet.
  explicit Supervisor(supervisor::SupervisorSpec spec);
  Supervisor(supervisor::SupervisorSpec spec, Options options);
  // The same, on the host's libuv loop (see "Threading" above). The loop must outlive this
  // object; after destruction, run the loop once more so the closed handles are freed.
  Supervisor(uv_loop_s* hostLoop, supervisor::SupervisorSpec spec);
  Supervisor(uv_loop_s* hostLoop, supervisor::SupervisorSpec spec, Options options);
  // shutdown(std::chrono::seconds(30)) if still running, then releases everything.
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts the children in order, each after the previous is ready. Throws vsup::Error naming
  // the child when one fails to start (the started ones were stopped in reverse order).
  void start();
  // The tree, as `vsup tree` shows it.
  supervisor::NodeStatus status();
  // The calls below follow OTP's supervisor module. Each throws vsup::Error for an unknown
  // child, and, saying so, once the tree has terminated (shutdown, start failure, intensity
  // exceeded) or while it shuts down.
  // Stops one child (its shutdown policy) and does not restart it (OTP terminate_child).
  void stopChild(const std::string& name);
  // Adds a child at the end and starts it (OTP start_child). Throws on a duplicate name or a
  // failed start; a child that failed to start is not added.
  void addChild(supervisor::ChildSpec spec);
  // Starts a stopped child again (OTP restart_child). Throws for a running child and for a
  // temporary one (never restarted: add it again).
  void restartChild(const std::string& name);
  // Removes a stopped child (OTP delete_child). Throws for a child that is not stopped.
  void deleteChild(const std::string& name);
  // Ordered shutdown, bounded by `timeout` (children past it are SIGKILLed with their process
  // groups). Idempotent. True when nothing had to be killed.
  bool shutdown(std::chrono::milliseconds timeout);
  // True once the tree has terminated (shutdown, start failure, intensity exceeded).
  bool terminated();

  // Host-loop mode only: the same operations without blocking. `done` runs on the loop thread.
  using Done = std::function<void(std::exception_ptr error)>;
  void startAsync(Done done);
  void shutdownAsync(std::chrono::milliseconds timeout, Done done);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup
