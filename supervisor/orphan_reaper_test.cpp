// Tests for supervisor/orphan_reaper.h and the registry it relies on (SpawnedChildren in
// supervisor/process.h). A stranger is made the two ways a process gets a child it did not
// spawn through Process: a raw fork() here, and an orphan reparented to this process while it is
// a subreaper (PR_SET_CHILD_SUBREAPER stands in for being PID 1). Every wait is bounded; every
// test checks that it left no child behind.
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

#include "base/clock.h"
#include "base/fd.h"
#include "supervisor/process.h"

namespace {

using vsup::supervisor::ExitStatus;
using vsup::supervisor::OrphanReaper;
using vsup::supervisor::Process;
using vsup::supervisor::SpawnedChildren;
using vsup::supervisor::SpawnRequest;

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

// Polls until `pid` is a zombie whose parent is this process (bounded).
bool becomesOurZombie(pid_t pid, int ms) {
  auto deadline = vsup::deadlineAfterMs(ms);
  for (;;) {
    auto st = procStat(pid);
    if (st && st->first == 'Z' && st->second == ::getpid()) return true;
    if (vsup::msUntil(deadline) <= 0) return false;
    ::usleep(2000);
  }
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

}  // namespace

TEST_CASE("OrphanReaper is wanted only by a PID namespace's init") {
  // tools/run_command.cpp makes a reaper exactly when wanted(getpid()): in a container, where
  // vsup run is PID 1. Anywhere else a child that Process did not spawn belongs to other code
  // (a host program's own children in library mode) and must never be reaped by vsup.
  CHECK(OrphanReaper::wanted(1));
  CHECK_FALSE(OrphanReaper::wanted(0));
  CHECK_FALSE(OrphanReaper::wanted(2));
  CHECK_FALSE(OrphanReaper::wanted(4242));
  if (::getpid() != 1) CHECK_FALSE(OrphanReaper::wanted(::getpid()));
}

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

TEST_CASE("OrphanReaper leaves a running stranger alone and reaps it once it has exited") {
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
  CHECK(reaper.reapOnce() == 0);
  CHECK(stillOurChild(stranger));
  auto st = procStat(stranger);
  REQUIRE(st.has_value());
  CHECK(st->first != 'Z');
  writeEnd.reset();  // EOF: it exits
  awaitExitedUnreaped(stranger);
  CHECK(reaper.reapOnce() == 1);
  CHECK_FALSE(stillOurChild(stranger));
}

TEST_CASE("OrphanReaper reaps an orphan reparented to this process; the dead parent's status is "
          "kept") {
  NoChildLeft check;
  // As a subreaper this process adopts its descendants' orphans, as PID 1 adopts everyone's.
  int wasSubreaper = 0;
  REQUIRE(::prctl(PR_GET_CHILD_SUBREAPER, &wasSubreaper, 0, 0, 0) == 0);
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
  struct Restore {
    int was;
    ~Restore() { ::prctl(PR_SET_CHILD_SUBREAPER, was, 0, 0, 0); }
  } restore{wasSubreaper};

  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  vsup::OwnFd readEnd(out[0]);
  vsup::OwnFd writeEnd(out[1]);
  // A daemon in the making: the background sleep outlives its parent, which exits 5 at once.
  // `setsid` puts it in its own session, out of reach of the kill of the parent's group.
  Process parent = spawnSh("setsid sleep 30 </dev/null >/dev/null & echo $!; exit 5", writeEnd.get());
  writeEnd.reset();
  std::string line;
  auto deadline = vsup::deadlineAfterMs(5000);
  while (line.find('\n') == std::string::npos && vsup::msUntil(deadline) > 0) {
    if (!readableWithin(readEnd.get(), int(vsup::msUntil(deadline)))) break;
    char buf[64];
    ssize_t n = ::read(readEnd.get(), buf, sizeof buf);
    if (n <= 0) break;
    line.append(buf, size_t(n));
  }
  pid_t orphan = pid_t(std::strtol(line.c_str(), nullptr, 10));
  REQUIRE_MESSAGE(orphan > 0, "no pid from the shell: '", line, "'");
  REQUIRE(readableWithin(parent.pidfd(), 5000));
  // Its parent has exited (a zombie of ours, unreaped): the orphan is ours now.
  auto deadline2 = vsup::deadlineAfterMs(5000);
  for (;;) {
    auto st = procStat(orphan);
    REQUIRE(st.has_value());
    if (st->second == ::getpid()) break;
    REQUIRE_MESSAGE(vsup::msUntil(deadline2) > 0, "the orphan was not reparented to us");
    ::usleep(2000);
  }
  CHECK_FALSE(SpawnedChildren::contains(orphan));
  OrphanReaper reaper("test");
  CHECK(reaper.reapOnce() == 0);  // alive: not reaped, not signalled
  ::kill(orphan, SIGTERM);
  REQUIRE(becomesOurZombie(orphan, 5000));
  CHECK(reaper.reapOnce() == 1);
  CHECK_FALSE(stillOurChild(orphan));

  auto status = parent.tryReap();
  REQUIRE(status.has_value());
  CHECK(status->kind == ExitStatus::Kind::Exited);
  CHECK(status->code == 5);
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
