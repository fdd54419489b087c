// One child process, done right (README, "Processes done right"):
//   * spawned with clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD): no fork() page-table copy of a
//     big host, and a pidfd from the first instant, so a recycled pid can never be signalled;
//   * in the child, before exec: its own process group, every signal disposition back to
//     SIG_DFL, an empty signal mask, PR_SET_PDEATHSIG(SIGKILL) as a backstop, exactly the fds
//     asked for (stdio + passed ones, then close_range);
//   * reaped with waitid(P_PIDFD), signalled with pidfd_send_signal. No SIGCHLD, no
//     waitpid(-1), no uv_spawn anywhere.
// Spawn only from the thread that runs the loop and outlives its children: PDEATHSIG fires when
// the *thread* that created the child exits.
//
// Every child spawn() makes is in SpawnedChildren (below) from before anything could reap it
// until its Process has reaped it, so that a supervisor process that is a subreaper (or a
// container's PID 1; OrphanReaper) can kill and reap the orphans reparented to it without ever
// touching one of ours or stealing its exit status.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cstddef>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "base/fd.h"

namespace vsup::supervisor {

struct SpawnRequest {
  std::vector<std::string> argv;  // argv[0] looked up in PATH (of `env`) when it has no '/'
  std::vector<std::string> env;   // the complete environment, "KEY=VALUE"
  int stdinFd = -1;               // -1: /dev/null
  int stdoutFd = 1;               // inherited by default; -1: /dev/null
  int stderrFd = 2;
  // Extra fds: source fd in this process → fd number in the child (3, 4, ...).
  std::vector<std::pair<int, int>> passFds;
  // PR_SET_PDEATHSIG(SIGKILL): the child dies with the spawning thread. Off only for the
  // OrphanGuard, which must outlive its parent.
  bool deathSignal = true;
  // Signals the child starts with ignored (SIG_IGN survives exec), every other one at its
  // default. For the OrphanGuard: SIGTERM, SIGINT and SIGHUP must not kill it at any instant,
  // its start included (a systemd stop signals every process of the unit at once).
  std::vector<int> ignoreSignals;
};

struct ExitStatus {
  enum class Kind { Exited, Signaled, Lost };
  Kind kind = Kind::Exited;
  int code = 0;  // exit code, or signal number
  // "code 3", "signal 9 (Killed)", or why the status was lost.
  std::string describe() const;
  bool success() const { return kind == Kind::Exited && code == 0; }
  // Shell convention: code, or 128 + signal.
  int shellCode() const;
};

class Process {
 public:
  // Throws vsup::Error naming the command when it cannot be started (not found, not executable,
  // exec failed); nothing is left behind then.
  static Process spawn(const SpawnRequest& request);

  Process() = default;
  Process(Process&& other) noexcept
      : pid_(std::exchange(other.pid_, 0)),
        pidfd_(std::move(other.pidfd_)),
        reaped_(std::exchange(other.reaped_, false)) {}
  Process& operator=(Process&& other) = delete;
  // A Process must be reaped before it is destroyed (VSUP_ASSERT): an unreaped child is a
  // zombie, or worse an orphan.
  ~Process();

  pid_t pid() const { return pid_; }
  int pidfd() const { return pidfd_.get(); }
  bool running() const { return pid_ > 0 && !reaped_; }

  // pidfd_send_signal; false when the process has already exited.
  bool signal(int sig);
  // SIGKILL to the whole process group. Safe against pid reuse as long as the child is not yet
  // reaped: its pid (= its pgid) stays reserved while it is alive or a zombie.
  void killGroup();
  // Non-blocking. After the pidfd turned readable: kills leftovers of its process group, reaps,
  // returns the status. nullopt while still running.
  std::optional<ExitStatus> tryReap();
  // Blocking reap after SIGKILL to the group: for destructors and error paths.
  ExitStatus killAndReap();

 private:
  // The final waitid() of an exited child (a zombie by then: it does not block), under the
  // registry's gate, and its removal from SpawnedChildren. -1 with errno when waitid failed.
  int reapExited(siginfo_t* info);
  pid_t pid_ = 0;
  OwnFd pidfd_;
  bool reaped_ = false;
};

// The process-wide registry of the children Process::spawn made and their Process has not reaped
// yet (any thread, any Supervisor or library instance of this process). A reaper of strangers
// (OrphanReaper, only in vsup's own supervisor processes: subreapers, or a PID namespace's init)
// tells them from ours with it, and their process groups (a child's pid is its pgid) from the
// groups that orphans escaped.
//
// The race it closes: a child may exit the instant after exec, before spawn() returns, and a
// reaper running then in another thread would see an unregistered zombie and reap it, so its
// Process would only get ECHILD (ExitStatus::Kind::Lost). So spawn() holds the registry's gate
// (shared) from before clone() until the pid is registered, and a Process holds it (shared) from
// its final waitid() until the pid is removed; a reaper holds it exclusively (freeze()) while it
// decides and reaps. While frozen, no thread is inside either window, so "a child of this
// process that is not registered" means a stranger. Spawns and reaps never wait for each other,
// only for a reaper's pass, which never blocks (waitid with WNOHANG).
//
// Thread-safe; cheap (an uncontended shared lock and a hash-map update per spawn and per reap).
class SpawnedChildren {
 public:
  using Freeze = std::unique_lock<std::shared_mutex>;
  // Holds every spawn() and every final reap of a Process in this process still until the
  // returned lock is released. Not re-entrant: never spawn or reap a Process while holding it.
  static Freeze freeze();
  // Whether `pid` is a child spawn() made and its Process has not reaped. Exact only while
  // frozen; a hint otherwise.
  static bool contains(pid_t pid);
  static size_t count();

 private:
  friend class Process;
  static std::shared_mutex& gate();
  static void add(pid_t pid);
  static void remove(pid_t pid);
};

// The absolute path of the running executable (/proc/self/exe), e.g. to re-execute vsup for
// sub-supervisors. Throws vsup::Error when it cannot be read.
std::string selfExecutable();

// Resolves argv0 through PATH as execvp would; empty when not found or not executable.
std::string findExecutable(const std::string& argv0, const std::string& pathVar);

}  // namespace vsup::supervisor
