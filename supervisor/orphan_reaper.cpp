#include "supervisor/orphan_reaper.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "base/check.h"
#include "base/clock.h"
#include "base/log.h"
#include "supervisor/process.h"

namespace vsup::supervisor {
namespace {

// The whole of a small /proc file; false when it cannot be opened (or read).
bool readSmallFile(const std::string& path, std::string& out) {
  out.clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[4096];
  bool ok = true;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, size_t(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    ok = n == 0;
    break;
  }
  ::close(fd);
  return ok;
}

// The decimal entries of a /proc directory (pids or tids).
std::vector<pid_t> numericEntries(const char* dirPath) {
  std::vector<pid_t> out;
  DIR* dir = ::opendir(dirPath);
  if (dir == nullptr) return out;
  while (dirent* e = ::readdir(dir)) {
    char* end = nullptr;
    long v = std::strtol(e->d_name, &end, 10);
    if (e->d_name[0] != '\0' && *end == '\0' && v > 0) out.push_back(pid_t(v));
  }
  ::closedir(dir);
  return out;
}

void appendPids(std::string_view text, std::vector<pid_t>& out) {
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && (text[i] < '0' || text[i] > '9')) ++i;
    long v = 0;
    bool any = false;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      v = v * 10 + (text[i++] - '0');
      any = true;
    }
    if (any && v > 0) out.push_back(pid_t(v));
  }
}

// The parent pid (field 4) of /proc/<pid>/stat; -1 when unreadable. The command name (field 2)
// may hold spaces and parentheses, so parse after the last ')'.
pid_t parentOf(pid_t pid) {
  std::string stat;
  if (!readSmallFile("/proc/" + std::to_string(pid) + "/stat", stat)) return -1;
  size_t close = stat.rfind(')');
  if (close == std::string::npos || close + 4 >= stat.size()) return -1;
  // ") S 123 ..."
  const char* p = stat.c_str() + close + 2;
  while (*p != '\0' && *p != ' ') ++p;  // the state
  return pid_t(std::strtol(p, nullptr, 10));
}


// State (field 3) of /proc/<pid>/stat, and whether the process is on its way out (PF_EXITING in
// its flags, field 9: it has begun exit(), its memory may already be gone); '\0' when unreadable.
char stateOf(pid_t pid, bool* exiting) {
  *exiting = false;
  std::string stat;
  if (!readSmallFile("/proc/" + std::to_string(pid) + "/stat", stat)) return '\0';
  size_t close = stat.rfind(')');
  if (close == std::string::npos || close + 2 >= stat.size()) return '\0';
  // ") S ppid pgrp session tty_nr tpgid flags ...": flags is the 7th field after the state.
  const char* p = stat.c_str() + close + 2;
  for (int field = 0; field < 6 && *p != '\0'; ++field) {
    while (*p != '\0' && *p != ' ') ++p;
    while (*p == ' ') ++p;
  }
  unsigned long flags = std::strtoul(p, nullptr, 10);
  constexpr unsigned long kPfExiting = 0x4;
  *exiting = (flags & kPfExiting) != 0;
  return stat[close + 2];
}

// Whether SIGKILL is pending for `pid` (a PR_SET_PDEATHSIG, or a group kill, on its way): it is
// dying already.
bool killPending(pid_t pid) {
  std::string status;
  if (!readSmallFile("/proc/" + std::to_string(pid) + "/status", status)) return false;
  for (const char* key : {"\nSigPnd:", "\nShdPnd:"}) {
    size_t at = status.find(key);
    if (at == std::string::npos) continue;
    unsigned long long mask = std::strtoull(status.c_str() + at + std::strlen(key), nullptr, 16);
    if (mask & (1ULL << (SIGKILL - 1))) return true;
  }
  return false;
}

// The command line of `pid`, arguments joined by spaces, at most 200 bytes; its comm in
// brackets when the command line is empty (a kernel thread, a zombie).
std::string commandLineOf(pid_t pid) {
  std::string text;
  readSmallFile("/proc/" + std::to_string(pid) + "/cmdline", text);
  while (!text.empty() && text.back() == '\0') text.pop_back();
  for (char& c : text) {
    if (c == '\0' || c == '\n') c = ' ';
  }
  if (text.empty()) {
    readSmallFile("/proc/" + std::to_string(pid) + "/comm", text);
    while (!text.empty() && text.back() == '\n') text.pop_back();
    text = "[" + text + "]";
  }
  if (text.size() > 200) text = text.substr(0, 197) + "...";
  return text;
}

std::string exeOf(pid_t pid) {
  char buf[4096];
  std::string link = pid == 0 ? std::string("/proc/self/exe")
                              : "/proc/" + std::to_string(pid) + "/exe";
  ssize_t n = ::readlink(link.c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, size_t(n)) : std::string();
}

// An orphan guard (`vsup __guard`, this executable) whose supervisor died: it kills that
// supervisor's groups and exits by itself.
bool isOurGuard(pid_t pid, const std::string& selfExe) {
  if (selfExe.empty() || exeOf(pid) != selfExe) return false;
  std::string args;
  if (!readSmallFile("/proc/" + std::to_string(pid) + "/cmdline", args)) return false;
  size_t first = args.find('\0');
  if (first == std::string::npos) return false;
  size_t end = args.find('\0', first + 1);
  return args.substr(first + 1, end == std::string::npos ? std::string::npos : end - first - 1) ==
         "__guard";
}

}  // namespace

OrphanReaper::OrphanReaper(std::string name) : name_(std::move(name)), selfExe_(exeOf(0)) {}

std::vector<pid_t> OrphanReaper::children() {
  std::vector<pid_t> out;
  bool haveChildrenFiles = false;
  std::string text;
  // A child belongs to the thread that made it (or that it was reparented to): every thread's.
  for (pid_t tid : numericEntries("/proc/self/task")) {
    if (readSmallFile("/proc/self/task/" + std::to_string(tid) + "/children", text)) {
      haveChildrenFiles = true;
      appendPids(text, out);
    }
  }
  if (!haveChildrenFiles) {
    // A kernel without CONFIG_PROC_CHILDREN: every process whose parent we are.
    pid_t self = ::getpid();
    for (pid_t pid : numericEntries("/proc")) {
      if (parentOf(pid) == self) out.push_back(pid);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

size_t OrphanReaper::reapOnce(bool killAll) {
  std::vector<pid_t> candidates = children();
  // Our own children first, without the gate (a hint, but a safe one: a pid it calls ours is
  // ours, or was until its Process reaped it, and is then no child at all): the usual pass, with
  // no stranger, never holds up a spawn.
  candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                  [](pid_t pid) { return SpawnedChildren::contains(pid); }),
                   candidates.end());
  if (candidates.empty()) {
    remaining_ = 0;
    return 0;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  size_t count = 0;
  size_t left = 0;
  pid_t ownGroup = ::getpgrp();
  // Frozen: no Process in any thread is between clone() and its registration or between its
  // reap and its removal, so a child of ours that is not registered is a stranger. A pid listed
  // above that was ours and has been reaped since is no child of ours now (ECHILD) or, reused,
  // a new one that the registry or waitid judges afresh.
  SpawnedChildren::Freeze frozen = SpawnedChildren::freeze();
  for (pid_t pid : candidates) {
    if (SpawnedChildren::contains(pid)) continue;
    siginfo_t info;
    std::memset(&info, 0, sizeof info);
    int rc;
    do {
      rc = ::waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | __WALL);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) continue;  // not a child (any more)
    if (info.si_pid != 0) {
      ++count;
      killedPids_.erase(pid);
      ExitStatus status{info.si_code == CLD_EXITED ? ExitStatus::Kind::Exited
                                                   : ExitStatus::Kind::Signaled,
                        info.si_status};
      vsup::log().debug("[supervisor] {}: reaped orphan pid {} ({})", name_, pid,
                        status.describe());
      continue;
    }
    // Alive (or exiting): a stranger child of ours, so its pid (and, if it leads one, its
    // process group) cannot be reused until we reap it. Signals to it are safe.
    ++left;
    if (killedPids_.count(pid) > 0) continue;  // killed, on its way out
    bool exiting = false;
    char state = stateOf(pid, &exiting);
    // Dead or dying: reaped by the pass its SIGCHLD brings.
    if (state == 'Z' || state == 'X' || state == '\0' || exiting) continue;
    pid_t pgid = ::getpgid(pid);
    if (pgid < 0) continue;
    if (!killAll) {
      if (pgid == ownGroup || SpawnedChildren::contains(pgid)) continue;  // in a group of ours
      if (killPending(pid)) continue;               // dying already (a death signal)
      if (isOurGuard(pid, selfExe_)) continue;      // finishing its job, then exits
    }
    // No command line: its memory is gone, it has begun to exit since the look above (an
    // orphaned guard that just read its lifeline's EOF, say). Reaped by the next pass.
    std::string args;
    if (!readSmallFile("/proc/" + std::to_string(pid) + "/cmdline", args) || args.empty()) continue;
    std::string cmd = commandLineOf(pid);
    if (pgid == pid) ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);
    killedPids_.insert(pid);
    ++killed_;
    if (killAll && (pgid == ownGroup || SpawnedChildren::contains(pgid))) {
      vsup::log().warn("[supervisor] {}: killed process {} ({}), orphaned and still running as "
                       "{} exits", name_, pid, cmd, name_);
    } else if (pgid == pid || ::getsid(pid) != ::getsid(0)) {
      // It made a group or a session of its own: setpgid, setsid, a daemon's double fork.
      vsup::log().warn("[supervisor] {}: killed process {} ({}) that escaped its process group",
                       name_, pid, cmd);
    } else {
      // Its group's leader is gone with the supervisor that spawned it (SIGKILLed, say).
      vsup::log().warn("[supervisor] {}: killed process {} ({}), orphaned outside the process "
                       "groups of this process's children", name_, pid, cmd);
    }
  }
  reaped_ += count;
  remaining_ = left;
  return count;
}

void OrphanReaper::blockChildSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  VSUP_SYSCALL(::sigprocmask(SIG_BLOCK, &set, nullptr));  // this thread's mask (glibc)
}

bool OrphanReaper::isSubreaper() {
  int on = 0;
  return ::prctl(PR_GET_CHILD_SUBREAPER, &on, 0, 0, 0) == 0 && on != 0;
}

std::unique_ptr<Subreaper> OrphanReaper::becomeSubreaper(uv_loop_t* loop, std::string name,
                                                         SubreaperOptions options) {
  return std::make_unique<Subreaper>(loop, std::move(name), options);
}

// --------------------------------------------------------------------------------------------

Subreaper::Subreaper(uv_loop_t* loop, std::string name, SubreaperOptions options)
    : name_(name), options_(options), reaper_(std::move(name)) {
  VSUP_SYSCALL(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0));
  OrphanReaper::blockChildSignal();
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  signalFd_.reset(VSUP_SYSCALL(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)));
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) { uv_poll_init(loop, h, signalFd_.get()); });
  poll_->data = this;
  uv_poll_start(poll_.get(), UV_READABLE, [](uv_poll_t* h, int, int) {
    auto* self = static_cast<Subreaper*>(h->data);
    if (self == nullptr) return;
    self->drainSignals();
    self->reaper_.reapOnce();
  });
  timer_ = UvHandle<uv_timer_t>::make([&](uv_timer_t* h) { uv_timer_init(loop, h); });
  timer_->data = this;
  uint64_t period = uint64_t(std::max<int64_t>(1, options_.scanMs));
  uv_timer_start(timer_.get(), [](uv_timer_t* h) {
    auto* self = static_cast<Subreaper*>(h->data);
    if (self != nullptr) self->reaper_.reapOnce();
  }, period, period);
  // Neither keeps the loop alive: the process runs for its supervisor, not for its orphans.
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_.get()));
  uv_unref(reinterpret_cast<uv_handle_t*>(timer_.get()));
  vsup::log().debug("[supervisor] {}: child subreaper: orphans of this subtree are killed and "
                    "reaped here (scan every {}ms)", name_, period);
  // Orphans reparented before now (none, when made first thing) are seen by the first pass.
  reaper_.reapOnce();
}

Subreaper::~Subreaper() {
  if (!swept_) sweep();
}

void Subreaper::drainSignals() {
  signalfd_siginfo info;
  while (::read(signalFd_.get(), &info, sizeof info) == sizeof info) {
  }
}

bool Subreaper::sweep() {
  if (swept_) return reaper_.remaining() == 0;
  swept_ = true;
  poll_.reset();
  timer_.reset();
  MonoNs deadline = deadlineAfterMs(options_.sweepMs);
  for (;;) {
    drainSignals();
    reaper_.reapOnce(/*killAll=*/true);
    if (reaper_.remaining() == 0) {
      // The children files can miss a child that was being reparented while they were read:
      // one more look, after the SIGCHLDs so far.
      drainSignals();
      reaper_.reapOnce(true);
      if (reaper_.remaining() == 0) return true;
    }
    if (msUntil(deadline) == 0) break;
    // SIGCHLD says one has died; 10 ms bounds a wait for one lost to another thread.
    pollfd p{signalFd_.get(), POLLIN, 0};
    ::poll(&p, 1, int(std::min<uint64_t>(10, msUntil(deadline))));
  }
  std::string left;
  for (pid_t pid : OrphanReaper::children()) {
    if (SpawnedChildren::contains(pid)) continue;
    left += (left.empty() ? "" : ", ") + std::to_string(pid) + " (" + commandLineOf(pid) + ")";
  }
  vsup::log().warn("[supervisor] {}: {} orphaned process{} still not dead {}ms after SIGKILL "
                   "(uninterruptible sleep?): {}; the next subreaper above gets them",
                   name_, reaper_.remaining(), reaper_.remaining() == 1 ? "" : "es",
                   options_.sweepMs, left);
  return false;
}

}  // namespace vsup::supervisor
