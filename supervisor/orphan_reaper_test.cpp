// Tests for supervisor/orphan_reaper.h and the registry it relies on (SpawnedChildren in
// supervisor/process.h). A stranger is made the two ways a process gets a child it did not
// spawn through Process: a raw fork() here, and an orphan reparented to this process while it is
// a subreaper. Every wait is bounded; every test checks that it left no child behind, and the
// ones that make this process a subreaper (or block SIGCHLD) undo it.
#include "supervisor/orphan_reaper.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <doctest/doctest.h>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <uv.h>

#include "base/clock.h"
#include "base/fd.h"
#include "supervisor/process.h"

namespace {

using vsup::supervisor::ExitStatus;
using vsup::supervisor::OrphanReaper;
using vsup::supervisor::Process;
using vsup::supervisor::SpawnedChildren;
using vsup::supervisor::SpawnRequest;
using vsup::supervisor::Subreaper;

const std::vector<std::string> kEnv = {"PATH=/usr/bin:/bin"};

bool hasChildren() {
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT | __WALL) == 0;
}

struct NoChildLeft {
  NoChildLeft() { REQUIRE_FALSE(hasChildren()); }
  ~NoChildLeft() { CHECK_MESSAGE(!hasChildren(), "a child process was left behind"); }
};

bool readableWithin(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, ms);
  } while (rc < 0 && errno == EINTR);
  return rc == 1;
}

// (state, parent pid) of /proc/<pid>/stat; nullopt when there is no such process.
std::optional<std::pair<char, pid_t>> procStat(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = data.rfind(')');
  if (!in.good() && data.empty()) return std::nullopt;
  if (close == std::string::npos || close + 4 >= data.size()) return std::nullopt;
  char state = data[close + 2];
  pid_t ppid = pid_t(std::strtol(data.c_str() + close + 4, nullptr, 10));
  return std::make_pair(state, ppid);
}

Process spawnSh(const std::string& script, int stdoutFd = 1) {
  SpawnRequest r;
  r.argv = {"/bin/sh", "-c", script};
  r.env = kEnv;
  r.stdoutFd = stdoutFd;
  return Process::spawn(r);
}

// A child this process made without Process: exits at once with `code`.
pid_t forkStranger(int code) {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) _exit(code);
  return pid;
}

// Waits (without reaping) until the stranger `pid` has exited.
void awaitExitedUnreaped(pid_t pid) {
  siginfo_t info{};
  int rc;
  do {
    rc = ::waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT);
  } while (rc < 0 && errno == EINTR);
  REQUIRE(rc == 0);
  REQUIRE(info.si_pid == pid);
}

bool stillOurChild(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0;
}

// This process as a subreaper for the scope, as it was afterwards.
struct AsSubreaper {
  int was = 0;
  AsSubreaper() {
    REQUIRE(::prctl(PR_GET_CHILD_SUBREAPER, &was, 0, 0, 0) == 0);
    REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
  }
  ~AsSubreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, was, 0, 0, 0); }
};

// The signal mask of this thread, restored at the end of the scope.
struct KeepSignalMask {
  sigset_t old;
  KeepSignalMask() { pthread_sigmask(SIG_SETMASK, nullptr, &old); }
  ~KeepSignalMask() {
    // SIGCHLDs that came while it was blocked must not be taken for new ones later.
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    timespec zero{0, 0};
    while (sigtimedwait(&chld, nullptr, &zero) > 0) {
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }
};

// Reads whitespace-separated pids from `fd` until `count` have come (bounded).
std::vector<pid_t> readPids(int fd, size_t count) {
  std::string text;
  std::vector<pid_t> pids;
  auto deadline = vsup::deadlineAfterMs(5000);
  while (vsup::msUntil(deadline) > 0) {
    pids.clear();
    size_t i = 0;
    while (i < text.size()) {
      size_t nl = text.find('\n', i);
      if (nl == std::string::npos) break;
      pids.push_back(pid_t(std::strtol(text.c_str() + i, nullptr, 10)));
      i = nl + 1;
    }
    if (pids.size() >= count) break;
    if (!readableWithin(fd, int(vsup::msUntil(deadline)))) break;
    char buf[256];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    text.append(buf, size_t(n));
  }
  return pids;
}

// Polls until `pid` is a child of this process (bounded).
bool becomesOurChild(pid_t pid, int ms) {
  auto deadline = vsup::deadlineAfterMs(ms);
  for (;;) {
    auto st = procStat(pid);
    if (st && st->second == ::getpid()) return true;
    if (!st || vsup::msUntil(deadline) <= 0) return false;
    ::usleep(2000);
  }
}

// Polls until `pid` runs `command` (its /proc cmdline's first argument), bounded. A pass skips a
// process whose command line reads empty, as it does while the process is inside execve (its old
// memory gone, the new one not yet set up): a test that wants a pass to kill must wait for that.
bool runsCommand(pid_t pid, const std::string& command, int ms) {
  auto deadline = vsup::deadlineAfterMs(ms);
  for (;;) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
    std::string first;
    if (in && std::getline(in, first, '\0') && first == command) return true;
    if (vsup::msUntil(deadline) <= 0) return false;
    ::usleep(1000);
  }
}

// Runs passes until `done()` or the bound; true when done.
template <typename Done>
bool passUntil(OrphanReaper& reaper, Done done, int ms) {
  auto deadline = vsup::deadlineAfterMs(ms);
  for (;;) {
    reaper.reapOnce();
    if (done()) return true;
    if (vsup::msUntil(deadline) <= 0) return false;
    ::usleep(2000);
  }
}

// Runs `loop` until `done()` or the bound; true when done.
template <typename Done>
bool runLoopUntil(uv_loop_t* loop, Done done, int ms) {
  uv_timer_t tick;
  uv_timer_init(loop, &tick);
  uv_timer_start(&tick, [](uv_timer_t*) {}, 5, 5);  // keeps uv_run from returning at once
  auto deadline = vsup::deadlineAfterMs(ms);
  bool ok = false;
  while (vsup::msUntil(deadline) > 0) {
    uv_run(loop, UV_RUN_ONCE);
    if (done()) {
      ok = true;
      break;
    }
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
  uv_run(loop, UV_RUN_NOWAIT);
  return ok;
}

}  // namespace

TEST_CASE("SpawnedChildren holds a spawned child from spawn until its Process reaped it") {
  NoChildLeft check;
  size_t before = SpawnedChildren::count();
  Process p = spawnSh("exit 4");
  CHECK(SpawnedChildren::contains(p.pid()));
  CHECK(SpawnedChildren::count() == before + 1);
  REQUIRE(readableWithin(p.pidfd(), 5000));
  CHECK(SpawnedChildren::contains(p.pid()));  // a zombie of ours is still ours
  pid_t pid = p.pid();
  auto status = p.tryReap();
  REQUIRE(status.has_value());
  CHECK(status->kind == ExitStatus::Kind::Exited);
  CHECK(status->code == 4);
  CHECK_FALSE(SpawnedChildren::contains(pid));
  CHECK(SpawnedChildren::count() == before);

  Process q = spawnSh("exec sleep 30");
  pid = q.pid();
  CHECK(SpawnedChildren::contains(pid));
  q.killAndReap();
  CHECK_FALSE(SpawnedChildren::contains(pid));
  CHECK(SpawnedChildren::count() == before);
}

TEST_CASE("OrphanReaper reaps a stranger zombie and leaves a registered zombie to its Process") {
  NoChildLeft check;
  Process ours = spawnSh("exit 7");
  pid_t stranger = forkStranger(3);
  REQUIRE(readableWithin(ours.pidfd(), 5000));
  awaitExitedUnreaped(stranger);
  auto kids = OrphanReaper::children();
  CHECK(std::count(kids.begin(), kids.end(), ours.pid()) == 1);
  CHECK(std::count(kids.begin(), kids.end(), stranger) == 1);

  OrphanReaper reaper("test");
  CHECK(reaper.reapOnce() == 1);
  CHECK(reaper.reaped() == 1);
  CHECK_FALSE(stillOurChild(stranger));  // reaped
  auto st = procStat(ours.pid());
  REQUIRE(st.has_value());
  CHECK(st->first == 'Z');                  // untouched
  CHECK(reaper.reapOnce() == 0);            // nothing new: ours is never a candidate

  auto status = ours.tryReap();
  REQUIRE(status.has_value());
  CHECK(status->kind == ExitStatus::Kind::Exited);
  CHECK(status->code == 7);
  CHECK(reaper.reaped() == 1);
}

TEST_CASE("OrphanReaper leaves a running stranger in this process's own group alone and reaps it "
          "once it has exited") {
  // A raw fork() of this process's own code (not Process): it kept our process group, so it
  // has not escaped; our own parent's group kill is what ends it.
  NoChildLeft check;
  int gate[2];
  REQUIRE(::pipe2(gate, O_CLOEXEC) == 0);
  vsup::OwnFd readEnd(gate[0]);
  vsup::OwnFd writeEnd(gate[1]);
  pid_t stranger = ::fork();
  REQUIRE(stranger >= 0);
  if (stranger == 0) {
    char c;
    ::close(gate[1]);
    (void)!::read(gate[0], &c, 1);  // until the parent closes the write end
    _exit(0);
  }
  readEnd.reset();
  OrphanReaper reaper("test");
  CHECK(::getpgid(stranger) == ::getpgrp());
  CHECK(reaper.reapOnce() == 0);
  CHECK(reaper.killed() == 0);
  CHECK(stillOurChild(stranger));
  auto st = procStat(stranger);
  REQUIRE(st.has_value());
  CHECK(st->first != 'Z');
  writeEnd.reset();  // EOF: it exits
  awaitExitedUnreaped(stranger);
  CHECK(reaper.reapOnce() == 1);
  CHECK_FALSE(stillOurChild(stranger));
}

TEST_CASE("OrphanReaper kills an orphan that escaped its process group at once, then reaps it; "
          "the dead parent's status is kept") {
  NoChildLeft check;
  // As a subreaper this process adopts its descendants' orphans, as PID 1 adopts everyone's.
  AsSubreaper subreaper;
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  vsup::OwnFd readEnd(out[0]);
  vsup::OwnFd writeEnd(out[1]);
  // A daemon in the making: the background sleep outlives its parent, which exits 5 at once.
  // `setsid` puts it in its own session, out of reach of the kill of the parent's group.
  Process parent = spawnSh("setsid sleep 30 </dev/null >/dev/null & echo $!; exit 5", writeEnd.get());
  writeEnd.reset();
  auto pids = readPids(readEnd.get(), 1);
  REQUIRE_MESSAGE(pids.size() == 1, "no pid from the shell");
  pid_t orphan = pids[0];
  REQUIRE(readableWithin(parent.pidfd(), 5000));
  // Its parent has exited (a zombie of ours, unreaped): the orphan is ours now.
  REQUIRE_MESSAGE(becomesOurChild(orphan, 5000), "the orphan was not reparented to us");
  CHECK_FALSE(SpawnedChildren::contains(orphan));
  // Until setsid(1) has run, it is still in its parent's group, and a pass leaves it alone.
  auto deadline = vsup::deadlineAfterMs(5000);
  while (::getpgid(orphan) == parent.pid() && vsup::msUntil(deadline) > 0) ::usleep(1000);
  REQUIRE(::getpgid(orphan) == orphan);
  REQUIRE(runsCommand(orphan, "sleep", 5000));  // setsid(1) has exec'd it
  OrphanReaper reaper("test");
  // Alive and escaped: SIGKILLed by the first pass (once: a second pass does not kill again).
  reaper.reapOnce();
  CHECK(reaper.killed() == 1);
  REQUIRE(passUntil(reaper, [&]() { return !stillOurChild(orphan); }, 5000));
  CHECK(reaper.killed() == 1);
  CHECK(reaper.reaped() == 1);
  CHECK(reaper.remaining() == 0);

  auto status = parent.tryReap();
  REQUIRE(status.has_value());
  CHECK(status->kind == ExitStatus::Kind::Exited);
  CHECK(status->code == 5);
}

TEST_CASE("OrphanReaper kills an orphan that leads its own group together with its group") {
  NoChildLeft check;
  AsSubreaper subreaper;
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  vsup::OwnFd readEnd(out[0]);
  vsup::OwnFd writeEnd(out[1]);
  // intermediate (a raw fork: a stranger in our group) -> leader, which calls setpgid(0, 0) and
  // starts a member of its new group; then the intermediate exits and the leader is ours.
  pid_t intermediate = ::fork();
  REQUIRE(intermediate >= 0);
  if (intermediate == 0) {
    pid_t leader = ::fork();
    if (leader == 0) {
      ::setpgid(0, 0);
      pid_t member = ::fork();
      if (member == 0) {
        ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
        _exit(127);
      }
      char line[64];
      int n = std::snprintf(line, sizeof line, "%d\n%d\n", int(::getpid()), int(member));
      (void)!::write(out[1], line, size_t(n));
      ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
      _exit(127);
    }
    _exit(leader > 0 ? 0 : 1);
  }
  writeEnd.reset();
  auto pids = readPids(readEnd.get(), 2);
  REQUIRE_MESSAGE(pids.size() == 2, "no pids from the leader");
  pid_t leader = pids[0];
  pid_t member = pids[1];
  REQUIRE(becomesOurChild(leader, 5000));
  REQUIRE(::getpgid(leader) == leader);
  REQUIRE(::getpgid(member) == leader);
  REQUIRE(runsCommand(leader, "sleep", 5000));  // it wrote the pids just before its exec
  OrphanReaper reaper("test");
  reaper.reapOnce();
  CHECK(reaper.killed() == 1);
  // The member, a child of the leader, dies with its group (and, reparented to us on the way,
  // is reaped by a pass like the leader and the intermediate).
  REQUIRE(passUntil(reaper, [&]() {
    return !stillOurChild(leader) && !stillOurChild(intermediate) && !procStat(member).has_value();
  }, 5000));
  CHECK(reaper.killed() == 1);  // the member was dying already (the group kill): not killed twice
  CHECK(reaper.reaped() == 3);
}

TEST_CASE("OrphanReaper leaves an orphan in a spawned child's group to that child's group kill") {
  NoChildLeft check;
  AsSubreaper subreaper;
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  vsup::OwnFd readEnd(out[0]);
  vsup::OwnFd writeEnd(out[1]);
  // `( cmd & )`: the subshell exits, the sleep is reparented to us, but it kept the group of our
  // child (which lives on: exec sleep), so it has not escaped.
  Process child = spawnSh("( sleep 30 </dev/null >/dev/null & echo $! ); exec sleep 30",
                          writeEnd.get());
  writeEnd.reset();
  auto pids = readPids(readEnd.get(), 1);
  REQUIRE(pids.size() == 1);
  pid_t orphan = pids[0];
  REQUIRE(becomesOurChild(orphan, 5000));
  CHECK(::getpgid(orphan) == child.pid());
  OrphanReaper reaper("test");
  CHECK(reaper.reapOnce() == 0);
  CHECK(reaper.killed() == 0);
  CHECK(reaper.remaining() == 1);
  auto st = procStat(orphan);
  REQUIRE(st.has_value());
  CHECK(st->first != 'Z');
  // The child's Process kills its group when it reaps it; the orphan dies with it.
  child.killAndReap();
  REQUIRE(passUntil(reaper, [&]() { return !stillOurChild(orphan); }, 5000));
  CHECK(reaper.killed() == 0);
  // The orphan, and possibly a zombie the shell left unreaped when it exec'd (seen under ASan's
  // timing), both reparented to us when the child's group went.
  CHECK(reaper.reaped() >= 1);
}

TEST_CASE("OrphanReaper passes on another thread never take the status of a child being spawned") {
  // The race SpawnedChildren closes: a child that exits right after exec is a zombie before
  // spawn() returns. A reaper pass running then must not see it as a stranger.
  NoChildLeft check;
  std::atomic<bool> stop{false};
  OrphanReaper reaper("test");
  std::thread passes([&]() {
    while (!stop.load()) reaper.reapOnce();
  });
  constexpr int kSpawns = 60;
  int wrong = 0;
  int strangers = 0;
  for (int i = 0; i < kSpawns; ++i) {
    Process p = spawnSh(i % 2 == 0 ? "exit 0" : "exit 9");
    if (i % 4 == 0) {
      forkStranger(1);
      ++strangers;
    }
    REQUIRE(readableWithin(p.pidfd(), 5000));
    auto status = p.tryReap();
    REQUIRE(status.has_value());
    if (status->kind != ExitStatus::Kind::Exited || status->code != (i % 2 == 0 ? 0 : 9)) {
      ++wrong;
      MESSAGE("spawn ", i, ": ", status->describe());
    }
  }
  // The strangers are reaped by the passes (the last of them may still be on its way).
  auto deadline = vsup::deadlineAfterMs(5000);
  while (reaper.reaped() < uint64_t(strangers) && vsup::msUntil(deadline) > 0) ::usleep(2000);
  stop = true;
  passes.join();
  CHECK(wrong == 0);
  CHECK(reaper.reaped() == uint64_t(strangers));
}

TEST_CASE("Subreaper finds a live escaped orphan without a SIGCHLD, kills and reaps it; its sweep "
          "leaves nothing") {
  NoChildLeft check;
  KeepSignalMask mask;
  int wasSubreaper = 0;
  REQUIRE(::prctl(PR_GET_CHILD_SUBREAPER, &wasSubreaper, 0, 0, 0) == 0);
  struct Restore {
    int was;
    ~Restore() { ::prctl(PR_SET_CHILD_SUBREAPER, was, 0, 0, 0); }
  } restore{wasSubreaper};
  uv_loop_t loop;
  uv_loop_init(&loop);
  {
    vsup::supervisor::SubreaperOptions options;
    options.scanMs = 20;
    options.sweepMs = 2000;
    std::unique_ptr<Subreaper> sub = OrphanReaper::becomeSubreaper(&loop, "test", options);
    CHECK(OrphanReaper::isSubreaper());
    sigset_t now;
    pthread_sigmask(SIG_SETMASK, nullptr, &now);
    CHECK(sigismember(&now, SIGCHLD) == 1);

    int out[2];
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    vsup::OwnFd readEnd(out[0]);
    vsup::OwnFd writeEnd(out[1]);
    // A double fork inside a child that lives on: the subshell's exit signals the child, not
    // us; the daemon is reparented to us silently, and only the scan finds it.
    Process child = spawnSh("( setsid sleep 30 </dev/null >/dev/null & echo $! ); exec sleep 30",
                            writeEnd.get());
    writeEnd.reset();
    auto pids = readPids(readEnd.get(), 1);
    REQUIRE(pids.size() == 1);
    pid_t daemon = pids[0];
    CHECK(runLoopUntil(&loop, [&]() { return sub->reaper().reaped() == 1; }, 5000));
    CHECK(sub->reaper().killed() == 1);
    CHECK_FALSE(procStat(daemon).has_value());
    CHECK(stillOurChild(child.pid()));  // ours: untouched

    // A stranger in our own group (left alone while running) is killed by the final sweep, as
    // is an orphan in a spawned child's group; our own child is not.
    pid_t stranger = ::fork();
    REQUIRE(stranger >= 0);
    if (stranger == 0) {
      ::pause();
      _exit(0);
    }
    CHECK(sub->sweep());
    CHECK_FALSE(stillOurChild(stranger));
    CHECK(sub->reaper().killed() == 2);
    CHECK(sub->reaper().reaped() == 2);
    CHECK(stillOurChild(child.pid()));
    child.killAndReap();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0);
}
