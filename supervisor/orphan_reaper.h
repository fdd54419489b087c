// OrphanReaper and Subreaper: nothing a `vsup run` tree starts outlives it, not even a process
// that left its process group (setsid, setpgid, a daemon's double fork), which the group kills
// of Process and OrphanGuard cannot reach.
//
// How: every supervisor *process* of the tree (the root of `vsup run`, engine-core, a nested
// `vsup __node`) makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) with a Subreaper. When a
// process of its subtree dies, the kernel reparents that process's children to the nearest
// subreaper above it (or, with none, to the PID namespace's init), so every orphan of the
// subtree becomes a child of a vsup supervisor. A container's PID 1 (`vsup run` without tini)
// gets every orphan of the namespace this way anyway.
//
// A pass (OrphanReaper::reapOnce) lists this process's children (/proc/self/task/*/children, or
// a scan of /proc/*/stat on a kernel without that file) and, with SpawnedChildren frozen
// (supervisor/process.h), judges every one that Process::spawn did not make (a "stranger"):
//   * exited (a zombie): reaped (waitid), logged at debug level;
//   * alive and *escaped*: its process group is neither this process's own group nor the group
//     of a child that SpawnedChildren holds. It is SIGKILLed at once, with its process group
//     when it leads one, and logged once as a warning: "[supervisor] NAME: killed process N
//     (CMD) that escaped its process group" when it made a group or a session of its own
//     (setpgid, setsid, a double fork), "..., orphaned outside the process groups of this
//     process's children" when its group's leader died with the supervisor that spawned it.
//     The pass after its death reaps it. Killing at once is the policy: a daemon double-forked
//     under `vsup run` is killed as soon as it is seen, because the tree owns everything it
//     starts and would otherwise leak it at exit;
//   * alive, but in one of those groups (a `( cmd & )` of a child that kept its group, or a fork
//     of this process's own non-Process code): left alone; the group kill of that child's
//     Process (at its reap) or of this process's parent takes it with the rest of the group;
//   * alive, already dying (SIGKILL pending: a PR_SET_PDEATHSIG of a nested supervisor's child),
//     or an orphaned `vsup __guard` of a nested supervisor that died (it kills that supervisor's
//     groups and exits by itself on its lifeline's EOF): left alone, reaped once exited.
// A child of ours is never touched, whatever its state: its Process reaps it through its pidfd
// and gets its exit status. A pass never blocks.
//
// When: a Subreaper runs a pass on every SIGCHLD (read from its own signalfd) and every
// `scanMs` (100 ms by default). The timer is needed because a live orphan sends nothing: it is
// reparented when its parent dies, and that parent's SIGCHLD goes to the parent's own parent, a
// process of the subtree, not to us; only the orphan's death would signal us. So an escaped
// process is killed within scanMs of its reparenting (a pass costs one read of a small /proc
// file per thread of this process). Before the process exits, sweep() kills every stranger left,
// whatever its group, waits (bounded, `sweepMs`, 2 s by default) until each is dead and reaped,
// repeating for the orphans that each kill reparents in turn (a killed daemon's own children),
// and logs any that outlived the bound (in uninterruptible sleep); those then go to the next
// subreaper above when this process exits.
//
// Who: only vsup's own supervisor processes, never a library host. A host process that embeds
// vsup::LLM or vsup::Supervisor keeps its process attributes and its signals as they were: it is
// never made a subreaper, no SIGCHLD is blocked or read, and no child it did not spawn through
// Process is reaped or signalled (its other children belong to its own code, and reaping them
// would steal their exit status from its waitpid). The limit that follows, documented for
// library users: in library mode a grandchild that leaves its process group is not vsup's to
// kill; it outlives the tree unless the host is a subreaper itself (or runs in a cgroup that its
// service manager kills as a whole).
//
// SIGCHLD: a Subreaper blocks SIGCHLD in the thread that makes it and reads it from a signalfd.
// The signal is process-directed, so a thread that does not block it may take it (and, with the
// default disposition, discard it): call OrphanReaper::blockChildSignal() first thing in main,
// before any thread exists, so that every thread inherits the block. A lost SIGCHLD only delays
// a pass to the next tick of the timer. Children spawned through Process start with an empty
// mask, unaffected.
//
// Thread: reapOnce may run on any thread, also concurrently with spawns and reaps of Processes
// in other threads (SpawnedChildren's gate orders them); the counters from any thread. A
// Subreaper lives on its loop's thread.
#pragma once

#include <sys/types.h>
#include <uv.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "base/fd.h"
#include "ipc/uv_handle.h"

namespace vsup::supervisor {

class Subreaper;

struct SubreaperOptions {
  int64_t scanMs = 100;    // the period of the pass that finds live orphans
  int64_t sweepMs = 2000;  // sweep()'s bound on waiting for the killed strangers to die
};

class OrphanReaper {
 public:
  // `name` prefixes the log lines (the process's tree or node name).
  explicit OrphanReaper(std::string name);

  // One pass, as described above. With `killAll` (the final sweep) every live stranger is
  // SIGKILLed, whatever its group. Returns how many it reaped.
  size_t reapOnce(bool killAll = false);

  // Strangers reaped so far, and of them (or still dying) the ones this reaper SIGKILLed.
  uint64_t reaped() const { return reaped_.load(std::memory_order_relaxed); }
  uint64_t killed() const { return killed_.load(std::memory_order_relaxed); }
  // Strangers the last pass saw and left (alive, or exited and not reapable yet).
  size_t remaining() const { return remaining_.load(std::memory_order_relaxed); }

  // This process's children, every thread's: pids as this process's namespace numbers them.
  static std::vector<pid_t> children();

  // Makes this process a child subreaper that kills and reaps its subtree's orphans on `loop`
  // (see above). For vsup's own supervisor processes only; throws vsup::Error when the prctl
  // fails. The object sweeps when destroyed (unless sweep() ran), and must be destroyed on the
  // loop's thread while the loop is still open (its handles close through the loop).
  static std::unique_ptr<Subreaper> becomeSubreaper(uv_loop_t* loop, std::string name,
                                                    SubreaperOptions options = {});
  // Blocks SIGCHLD in the calling thread (and so in every thread it starts later).
  static void blockChildSignal();
  // Whether this process is a child subreaper (PR_GET_CHILD_SUBREAPER).
  static bool isSubreaper();

 private:
  std::string name_;
  std::string selfExe_;
  std::mutex mutex_;                       // one pass at a time
  std::unordered_set<pid_t> killedPids_;  // killed, not reaped yet: logged once
  std::atomic<uint64_t> reaped_{0};
  std::atomic<uint64_t> killed_{0};
  std::atomic<size_t> remaining_{0};
};

class Subreaper {
 public:
  Subreaper(uv_loop_t* loop, std::string name, SubreaperOptions options);
  ~Subreaper();
  Subreaper(const Subreaper&) = delete;
  Subreaper& operator=(const Subreaper&) = delete;

  // The final sweep (see above): blocking, at most about options.sweepMs. Stops the loop's
  // passes first. Returns true when no stranger is left. Idempotent.
  bool sweep();

  const OrphanReaper& reaper() const { return reaper_; }
  OrphanReaper& reaper() { return reaper_; }

 private:
  void drainSignals();

  std::string name_;
  SubreaperOptions options_;
  OrphanReaper reaper_;
  OwnFd signalFd_;
  UvHandle<uv_poll_t> poll_;
  UvHandle<uv_timer_t> timer_;
  bool swept_ = false;
};

}  // namespace vsup::supervisor
