// OrphanReaper: the one duty of a PID namespace's init that no other process has. When a
// process's parent dies, the kernel makes it a child of the nearest subreaper, or else of the
// namespace's PID 1. In a container `vsup run` is PID 1, so every daemon that double-forked
// inside the container (a shell's `( cmd & )`, a health-check script's helper, a library's
// forked helper) becomes vsup's child when its parent exits, and stays a zombie, holding a pid,
// until vsup reaps it.
//
// A pass (reapOnce) lists this process's children (/proc/self/task/*/children, or a scan of
// /proc/*/stat on a kernel without that file) and, with SpawnedChildren frozen
// (supervisor/process.h), reaps with waitid(P_PID, pid, WEXITED | WNOHANG) every one that
// Process::spawn did not make. A child of ours is never touched, whatever its state: its Process
// reaps it through its pidfd and gets its exit status. A stranger still running is left alone
// (it is reaped by the pass after it has exited). A pass never blocks and never signals.
//
// Who runs one: only a process for which wanted(getpid()) is true, a namespace's PID 1. The CLI
// root (tools/run_command.cpp) then adds SIGCHLD to its signalfd, runs a pass on each SIGCHLD
// and a last one before it exits. Library code never makes one: a host process's other children
// are the host's, and reaping them would steal their exit status from its own waitpid.
//
// Thread: reapOnce may run on any thread, also concurrently with spawns and reaps of Processes
// in other threads (SpawnedChildren's gate orders them); reaped() from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vsup::supervisor {

class OrphanReaper {
 public:
  // Whether a process whose pid is `self` must reap strangers: only a PID namespace's init
  // (pid 1). Everywhere else orphans go to someone else, and the children this process did not
  // spawn through Process belong to its other code.
  static bool wanted(pid_t self);

  // `name` prefixes the log lines (the tree's name): one debug line per stranger reaped.
  explicit OrphanReaper(std::string name);

  // One pass: reaps every exited child of this process that is not in SpawnedChildren. Returns
  // how many it reaped.
  size_t reapOnce();

  // Strangers reaped so far, by every pass.
  uint64_t reaped() const { return reaped_.load(std::memory_order_relaxed); }

  // This process's children, every thread's: pids as this process's namespace numbers them.
  static std::vector<pid_t> children();

 private:
  std::string name_;
  std::atomic<uint64_t> reaped_{0};
};

}  // namespace vsup::supervisor
