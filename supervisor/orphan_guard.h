// OrphanGuard: makes "no grandchild outlives its parent's supervision" hold even when the
// supervising process itself is SIGKILLed.
//
// PR_SET_PDEATHSIG kills a supervisor's direct children when it dies, but not what those
// children forked into their process groups. So each supervisor keeps one small helper,
// `vsup __guard`, in its own process group and without a death signal, connected by a socket
// (its lifeline). The supervisor registers every child's process group when it spawns it and
// unregisters it when it has reaped the child. If the lifeline closes without the goodbye
// message — the supervisor died — the guard SIGKILLs every registered group and exits.
// A registered pgid cannot be recycled while any process of that group is alive, so the kill
// only ever hits what we spawned.
//
// The guard ignores SIGTERM, SIGINT and SIGHUP: when a service manager signals every process of
// the unit at once (systemd's KillMode=control-group), the guard outlives the shutdown it
// protects and ends only with its lifeline (or its supervisor's SIGKILL, after the goodbye).
//
// Ending it: once the supervisor has reaped its children there is nothing left to protect, and
// dismiss() ends the guard at once (goodbye, lifeline closed, SIGKILL: nothing is killed but the
// guard) without waiting for it: the guard may still be loading its executable then (a
// supervisor that shuts down just after it started), and waiting for it to read the goodbye cost
// the whole shutdown that load. The destructor reaps it (dismissing it first): at once when its
// pidfd is readable already.
//
// Runs on the loop thread only. Messages are sent with MSG_NOSIGNAL | MSG_DONTWAIT: a dead
// guard never raises SIGPIPE in the host.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>

#include "base/fd.h"
#include "supervisor/process.h"

namespace vsup::supervisor {

class OrphanGuard {
 public:
  // Spawns `vsupExe __guard`. Throws vsup::Error when it cannot.
  explicit OrphanGuard(const std::string& vsupExe);
  // dismiss(), then reaps the guard (blocking: a SIGKILLed process is gone within moments).
  ~OrphanGuard();
  OrphanGuard(const OrphanGuard&) = delete;
  OrphanGuard& operator=(const OrphanGuard&) = delete;

  void add(pid_t pgid);
  void remove(pid_t pgid);
  pid_t pid() const { return process_ ? process_->pid() : 0; }

  // Ends the guard's protection and the guard (see above); returns at once. Idempotent; add()
  // and remove() are no-ops afterwards.
  void dismiss();
  // The guard's pidfd (readable once it exited): for a caller that waits for its end on its
  // loop, then destroys it (the reap does not block then).
  int pidfd() const { return process_ ? process_->pidfd() : -1; }

 private:
  void send(char op, pid_t pgid);

  OwnFd lifeline_;
  std::optional<Process> process_;
};

// The guard program itself (`vsup __guard`): reads the lifeline on fd 3 until EOF. Returns the
// exit status.
int orphanGuardMain();

}  // namespace vsup::supervisor
