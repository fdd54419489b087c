// Tests for supervisor/process.h. Children are /bin/sh and sleep; what they inherited is read
// from /proc/<pid>/ after spawn() returned (CLONE_VFORK: exec has happened by then). Every test
// waits with poll() timeouts, and checks that it left no child process and no fd behind.
#include "supervisor/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <doctest/doctest.h>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/clock.h"

namespace {

using vsup::supervisor::ExitStatus;
using vsup::supervisor::findExecutable;
using vsup::supervisor::Process;
using vsup::supervisor::SpawnRequest;

const std::vector<std::string> kEnv = {"PATH=/usr/bin:/bin"};

std::set<int> fdsOf(const std::string& pid) {
  std::set<int> fds;
  DIR* dir = ::opendir(("/proc/" + pid + "/fd").c_str());
  if (dir == nullptr) return fds;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') fds.insert(std::atoi(e->d_name));
  }
  int own = ::dirfd(dir);
  ::closedir(dir);
  if (pid == "self") fds.erase(own);
  return fds;
}

std::string readLink(const std::string& path) {
  char buf[256];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  return n < 0 ? std::string() : std::string(buf, size_t(n));
}

// A line "Key:\tvalue" of /proc/<pid>/status.
std::string statusField(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::string v = line.substr(key.size() + 1);
      return v.substr(v.find_first_not_of(" \t"));
    }
  }
  return "";
}

bool hasChildren() {
  siginfo_t info{};
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT | __WALL) == 0;
}

// Checked when a test ends: no child of ours is left, and the fds are those it started with.
struct NothingLeftBehind {
  std::set<int> fds = fdsOf("self");
  NothingLeftBehind() { REQUIRE_FALSE(hasChildren()); }
  ~NothingLeftBehind() {
    CHECK_MESSAGE(!hasChildren(), "a child process was left behind");
    CHECK(fdsOf("self") == fds);
  }
};

bool readableWithin(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, ms);
  } while (rc < 0 && errno == EINTR);
  return rc == 1;
}

// Reads `fd` until `lines` newlines or EOF or `ms` elapsed; returns what it read.
std::string readLines(int fd, int lines, int ms) {
  std::string out;
  auto deadline = vsup::deadlineAfterMs(ms);
  while (std::count(out.begin(), out.end(), '\n') < lines) {
    if (!readableWithin(fd, int(vsup::msUntil(deadline)))) break;
    char buf[256];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

// True when the read end sees EOF within `ms`: every holder of the write end has died.
bool eofWithin(int fd, int ms) {
  auto deadline = vsup::deadlineAfterMs(ms);
  for (;;) {
    if (!readableWithin(fd, int(vsup::msUntil(deadline)))) return false;
    char buf[256];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

// A pidfd for a process that is not our child (a grandchild), to await its death.
vsup::OwnFd pidfdOf(pid_t pid) {
  return vsup::OwnFd(int(::syscall(SYS_pidfd_open, pid, 0)));
}

struct Pipe {
  vsup::OwnFd read, write;
  explicit Pipe(int flags = O_CLOEXEC) {
    int p[2];
    REQUIRE(::pipe2(p, flags) == 0);
    read.reset(p[0]);
    write.reset(p[1]);
  }
};

Process spawnSh(const std::string& script, int stdoutFd = 1) {
  SpawnRequest r;
  r.argv = {"/bin/sh", "-c", script};
  r.env = kEnv;
  r.stdoutFd = stdoutFd;
  return Process::spawn(r);
}

Process spawnSleep() {
  SpawnRequest r;
  r.argv = {"sleep", "30"};
  r.env = kEnv;
  return Process::spawn(r);
}

// Waits (bounded) for the child to exit, then reaps it through tryReap.
ExitStatus reapWithin(Process& p, int ms) {
  REQUIRE_MESSAGE(readableWithin(p.pidfd(), ms), "the child did not exit within ", ms, " ms");
  auto status = p.tryReap();
  REQUIRE(status.has_value());
  return *status;
}

std::string tempDir() {
  char dir[] = "/tmp/vsup-process-test-XXXXXX";
  REQUIRE(::mkdtemp(dir) != nullptr);
  return dir;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// What the child inherits.

TEST_CASE("a spawned child leads its own process group") {
  NothingLeftBehind check;
  Process p = spawnSleep();
  CHECK(p.running());
  CHECK(::getpgid(p.pid()) == p.pid());
  CHECK(::getpgid(p.pid()) != ::getpgrp());
  ExitStatus s = p.killAndReap();
  CHECK(s.kind == ExitStatus::Kind::Signaled);
  CHECK(s.code == SIGKILL);
  CHECK_FALSE(p.running());
}

TEST_CASE("a spawned child gets exactly fds 0, 1, 2 although the parent has inheritable fds") {
  NothingLeftBehind check;
  // Deliberately without O_CLOEXEC, as a careless host would open them.
  vsup::OwnFd a(::open("/dev/null", O_RDONLY));
  vsup::OwnFd b(::open("/proc/self/status", O_RDONLY));
  Pipe leaky(0);
  REQUIRE(a);
  REQUIRE(b);
  Process p = spawnSleep();
  auto fds = fdsOf(std::to_string(p.pid()));
  CHECK(fds == std::set<int>{0, 1, 2});
  CHECK(readLink("/proc/" + std::to_string(p.pid()) + "/fd/0") == "/dev/null");
  p.killAndReap();
}

TEST_CASE("passed fds land at 3 and 4 and nothing else leaks") {
  NothingLeftBehind check;
  Pipe lifeline;            // O_CLOEXEC: spawn must still pass it
  Pipe leaky(0);            // not passed, not CLOEXEC: must not leak
  vsup::OwnFd extra(::open("/dev/null", O_WRONLY | O_CLOEXEC));
  SpawnRequest r;
  r.argv = {"sleep", "30"};
  r.env = kEnv;
  r.passFds = {{lifeline.write.get(), 3}, {extra.get(), 4}};
  Process p = Process::spawn(r);
  std::string proc = "/proc/" + std::to_string(p.pid());
  CHECK(fdsOf(std::to_string(p.pid())) == std::set<int>{0, 1, 2, 3, 4});
  CHECK(readLink(proc + "/fd/3") == readLink("/proc/self/fd/" + std::to_string(lifeline.write.get())));
  CHECK(readLink(proc + "/fd/4") == "/dev/null");
  p.killAndReap();
}

TEST_CASE("a passed fd whose number is an earlier target is not clobbered before it is placed") {
  NothingLeftBehind check;
  // Source fd `f` goes to target f + 1, while another source goes to target f: placing the fds
  // in order with plain dup2 would overwrite fd f before it is read.
  Pipe a, b;
  int f = 4;
  while (f < 14 && ::fcntl(f, F_GETFD) >= 0) ++f;
  REQUIRE(f < 14);
  vsup::OwnFd atF(::dup3(a.write.get(), f, O_CLOEXEC));
  REQUIRE(atF.get() == f);
  vsup::OwnFd devNull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  SpawnRequest r;
  r.argv = {"sleep", "30"};
  r.env = kEnv;
  for (int target = 3; target < f; ++target) r.passFds.push_back({devNull.get(), target});
  r.passFds.push_back({b.write.get(), f});
  r.passFds.push_back({f, f + 1});
  Process p = Process::spawn(r);
  std::string proc = "/proc/" + std::to_string(p.pid());
  std::string pipeA = readLink("/proc/self/fd/" + std::to_string(a.write.get()));
  std::string pipeB = readLink("/proc/self/fd/" + std::to_string(b.write.get()));
  REQUIRE(pipeA != pipeB);
  CHECK(readLink(proc + "/fd/" + std::to_string(f)) == pipeB);
  CHECK(readLink(proc + "/fd/" + std::to_string(f + 1)) == pipeA);
  CHECK(fdsOf(std::to_string(p.pid())).size() == size_t(f + 2));
  p.killAndReap();
}

TEST_CASE("stdout given as a pipe reaches the parent and the environment is exactly the one given") {
  NothingLeftBehind check;
  Pipe out;
  SpawnRequest r;
  r.argv = {"sh", "-c", "echo \"$GREETING\"; echo \"${HOME-unset}\""};
  r.env = {"PATH=/bin:/usr/bin", "GREETING=hello"};
  r.stdoutFd = out.write.get();
  Process p = Process::spawn(r);
  out.write.reset();
  CHECK(readLines(out.read.get(), 2, 5000) == "hello\nunset\n");
  CHECK(reapWithin(p, 5000).success());
}

TEST_CASE("the child has default dispositions and an empty mask though the parent ignores and blocks") {
  NothingLeftBehind check;
  struct sigaction ignore {}, oldUsr1 {};
  ignore.sa_handler = SIG_IGN;
  REQUIRE(::sigaction(SIGUSR1, &ignore, &oldUsr1) == 0);
  sigset_t usr2, oldMask;
  sigemptyset(&usr2);
  sigaddset(&usr2, SIGUSR2);
  REQUIRE(::pthread_sigmask(SIG_BLOCK, &usr2, &oldMask) == 0);

  Process p = spawnSleep();
  std::string sigIgn = statusField(p.pid(), "SigIgn");
  std::string sigBlk = statusField(p.pid(), "SigBlk");

  // The parent's own state is untouched by spawn.
  struct sigaction now {};
  REQUIRE(::sigaction(SIGUSR1, nullptr, &now) == 0);
  bool stillIgnored = now.sa_handler == SIG_IGN;
  sigset_t maskNow;
  REQUIRE(::pthread_sigmask(SIG_SETMASK, nullptr, &maskNow) == 0);
  bool stillBlocked = sigismember(&maskNow, SIGUSR2) == 1;
  bool nothingElseBlocked = sigismember(&maskNow, SIGTERM) == sigismember(&oldMask, SIGTERM);

  p.killAndReap();
  ::pthread_sigmask(SIG_SETMASK, &oldMask, nullptr);
  ::sigaction(SIGUSR1, &oldUsr1, nullptr);

  CHECK(sigIgn == "0000000000000000");
  CHECK(sigBlk == "0000000000000000");
  CHECK(stillIgnored);
  CHECK(stillBlocked);
  CHECK(nothingElseBlocked);
}

TEST_CASE("a child dies with the thread that spawned it (PR_SET_PDEATHSIG)") {
  NothingLeftBehind check;
  std::optional<Process> p;
  std::thread spawner([&] { p.emplace(spawnSleep()); });
  spawner.join();
  REQUIRE(p.has_value());
  ExitStatus s = reapWithin(*p, 2000);
  CHECK(s.kind == ExitStatus::Kind::Signaled);
  CHECK(s.code == SIGKILL);
}

TEST_CASE("a child spawned with deathSignal = false outlives the spawning thread") {
  NothingLeftBehind check;
  std::optional<Process> p;
  std::thread spawner([&] {
    SpawnRequest r;
    r.argv = {"sleep", "30"};
    r.env = kEnv;
    r.deathSignal = false;
    p.emplace(Process::spawn(r));
  });
  spawner.join();
  REQUIRE(p.has_value());
  CHECK_FALSE(readableWithin(p->pidfd(), 300));
  CHECK(p->killAndReap().code == SIGKILL);
}

// ---------------------------------------------------------------------------------------------
// Exit statuses.

TEST_CASE("an exit code is reported as Exited with that code") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 3");
  ExitStatus s = reapWithin(p, 5000);
  CHECK(s.kind == ExitStatus::Kind::Exited);
  CHECK(s.code == 3);
  CHECK(s.describe() == "code 3");
  CHECK(s.shellCode() == 3);
  CHECK_FALSE(s.success());
  CHECK_FALSE(p.running());
}

TEST_CASE("exit 0 is success") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 0");
  ExitStatus s = reapWithin(p, 5000);
  CHECK(s.success());
  CHECK(s.describe() == "code 0");
  CHECK(s.shellCode() == 0);
}

TEST_CASE("death by a signal is reported as Signaled with the signal number") {
  NothingLeftBehind check;
  Process p = spawnSh("kill -TERM $$");
  ExitStatus s = reapWithin(p, 5000);
  CHECK(s.kind == ExitStatus::Kind::Signaled);
  CHECK(s.code == SIGTERM);
  CHECK(s.describe() == std::string("signal 15 (") + ::strsignal(SIGTERM) + ")");
  CHECK(s.shellCode() == 128 + SIGTERM);
  CHECK_FALSE(s.success());
}

TEST_CASE("signal() delivers through the pidfd and the status shows it") {
  NothingLeftBehind check;
  Process p = spawnSleep();
  CHECK(p.signal(SIGTERM));
  ExitStatus s = reapWithin(p, 5000);
  CHECK(s.kind == ExitStatus::Kind::Signaled);
  CHECK(s.code == SIGTERM);
}

TEST_CASE("tryReap returns nullopt while the child runs") {
  NothingLeftBehind check;
  Process p = spawnSleep();
  CHECK_FALSE(p.tryReap().has_value());
  CHECK_FALSE(p.tryReap().has_value());
  CHECK(p.running());
  CHECK(::kill(p.pid(), 0) == 0);
  p.killAndReap();
}

TEST_CASE("ExitStatus::describe for a lost status says why") {
  ExitStatus lost{ExitStatus::Kind::Lost, 0};
  CHECK(lost.describe().find("lost") != std::string::npos);
  CHECK_FALSE(lost.success());
  CHECK(lost.shellCode() != 0);
}

// ---------------------------------------------------------------------------------------------
// Process groups and leftovers.

TEST_CASE("killAndReap kills the grandchildren in the child's process group") {
  NothingLeftBehind check;
  Pipe out;
  Process p = spawnSh("sleep 100 & echo $!; sleep 100 & echo $!; wait", out.write.get());
  out.write.reset();
  std::string pids = readLines(out.read.get(), 2, 5000);
  std::istringstream in(pids);
  pid_t g1 = 0, g2 = 0;
  in >> g1 >> g2;
  REQUIRE(g1 > 0);
  REQUIRE(g2 > 0);
  CHECK(::getpgid(g1) == p.pid());
  CHECK(::getpgid(g2) == p.pid());
  vsup::OwnFd w1 = pidfdOf(g1), w2 = pidfdOf(g2);
  REQUIRE(w1);
  REQUIRE(w2);
  ExitStatus s = p.killAndReap();
  CHECK(s.code == SIGKILL);
  // A pidfd turns readable when its process has exited.
  CHECK(readableWithin(w1.get(), 2000));
  CHECK(readableWithin(w2.get(), 2000));
  // They held the pipe's write end as stdout: EOF too.
  CHECK(eofWithin(out.read.get(), 2000));
}

TEST_CASE("when the child exits on its own, tryReap kills the grandchild it left in its group") {
  NothingLeftBehind check;
  Pipe out;
  Process p = spawnSh("sleep 100 & echo $!; exit 7", out.write.get());
  out.write.reset();
  std::istringstream in(readLines(out.read.get(), 1, 5000));
  pid_t grandchild = 0;
  in >> grandchild;
  REQUIRE(grandchild > 0);
  vsup::OwnFd watch = pidfdOf(grandchild);
  REQUIRE(watch);
  CHECK(::getpgid(grandchild) == p.pid());
  ExitStatus s = reapWithin(p, 5000);
  CHECK(s.kind == ExitStatus::Kind::Exited);
  CHECK(s.code == 7);
  CHECK(readableWithin(watch.get(), 2000));
  CHECK(eofWithin(out.read.get(), 2000));
}

TEST_CASE("killGroup before reaping kills the whole group, and the status is SIGKILL") {
  NothingLeftBehind check;
  Pipe out;
  Process p = spawnSh("sleep 100 & echo $!; wait", out.write.get());
  out.write.reset();
  REQUIRE(readLines(out.read.get(), 1, 5000).size() > 1);
  p.killGroup();
  ExitStatus s = reapWithin(p, 2000);
  CHECK(s.kind == ExitStatus::Kind::Signaled);
  CHECK(s.code == SIGKILL);
  CHECK(eofWithin(out.read.get(), 2000));
}

// ---------------------------------------------------------------------------------------------
// Failures to start.

TEST_CASE("a command not found in PATH throws an Error naming it and leaves nothing behind") {
  NothingLeftBehind check;
  SpawnRequest r;
  r.argv = {"vsup-no-such-command-xyz", "--flag"};
  r.env = kEnv;
  CHECK_THROWS_WITH_AS(Process::spawn(r), doctest::Contains("vsup-no-such-command-xyz"),
                       vsup::Error);
  r.argv = {"/nonexistent/dir/prog"};
  CHECK_THROWS_WITH_AS(Process::spawn(r), doctest::Contains("/nonexistent/dir/prog"), vsup::Error);
}

TEST_CASE("a file that is not executable, or a directory, cannot be spawned") {
  NothingLeftBehind check;
  std::string dir = tempDir();
  std::string file = dir + "/data.txt";
  std::ofstream(file) << "#!/bin/sh\nexit 0\n";
  REQUIRE(::chmod(file.c_str(), 0644) == 0);
  SpawnRequest r;
  r.env = kEnv;
  r.argv = {file};
  CHECK_THROWS_WITH_AS(Process::spawn(r), doctest::Contains(file.c_str()), vsup::Error);
  r.argv = {dir};
  CHECK_THROWS_WITH_AS(Process::spawn(r), doctest::Contains(dir.c_str()), vsup::Error);
  ::unlink(file.c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE("an exec that fails in the child throws an Error and reaps the child") {
  NothingLeftBehind check;
  std::string dir = tempDir();
  std::string script = dir + "/bad-interpreter";
  std::ofstream(script) << "#!/nonexistent/interpreter\n";
  REQUIRE(::chmod(script.c_str(), 0755) == 0);
  SpawnRequest r;
  r.env = kEnv;
  r.argv = {script};
  std::string msg;
  try {
    Process p = Process::spawn(r);
    p.killAndReap();
  } catch (const vsup::Error& e) {
    msg = e.what();
  }
  INFO("message: ", msg);
  CHECK(msg.find(script) != std::string::npos);
  CHECK(msg.find("execve") != std::string::npos);
  ::unlink(script.c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE("an empty command is refused") {
  NothingLeftBehind check;
  SpawnRequest r;
  r.env = kEnv;
  CHECK_THROWS_AS(Process::spawn(r), vsup::Error);
  r.argv = {""};
  CHECK_THROWS_AS(Process::spawn(r), vsup::Error);
}

TEST_CASE("findExecutable resolves through PATH like execvp") {
  CHECK(findExecutable("sh", "/nonexistent:/bin") == "/bin/sh");
  CHECK(findExecutable("sh", "/nonexistent") == "");
  CHECK(findExecutable("/bin/sh", "") == "/bin/sh");
  CHECK(findExecutable("/etc/passwd", "/bin") == "");
  CHECK(findExecutable("bin", "/") == "");  // a directory is not an executable
}

// ---------------------------------------------------------------------------------------------
// Pid reuse and foreign reaping.

TEST_CASE("after reaping, signal() returns false and killGroup does nothing") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 0");
  reapWithin(p, 5000);
  CHECK_FALSE(p.running());
  CHECK(p.pidfd() < 0);  // the pidfd is released with the reap
  CHECK_FALSE(p.signal(SIGKILL));
  CHECK_NOTHROW(p.killGroup());
}

TEST_CASE("signal() on a child that exited but is not reaped yet reports false") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 0");
  REQUIRE(readableWithin(p.pidfd(), 5000));  // exited: a zombie until we reap it
  CHECK_FALSE(p.signal(SIGTERM));
  CHECK(reapWithin(p, 1000).success());
}

TEST_CASE("a child reaped by someone else is reported Lost, without a hang or a crash") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 4");
  REQUIRE(readableWithin(p.pidfd(), 5000));
  int status = 0;
  REQUIRE(::waitpid(p.pid(), &status, 0) == p.pid());  // the host's own waitpid steals it
  auto start = vsup::monoNow();
  auto s = p.tryReap();
  REQUIRE(s.has_value());
  CHECK(s->kind == ExitStatus::Kind::Lost);
  CHECK_FALSE(p.running());
  CHECK_FALSE(p.signal(SIGKILL));
  CHECK(vsup::monoNow() - start < 1000 * vsup::kNsPerMs);
}

TEST_CASE("killAndReap of a child reaped by someone else is Lost too") {
  NothingLeftBehind check;
  Process p = spawnSh("exit 4");
  REQUIRE(readableWithin(p.pidfd(), 5000));
  int status = 0;
  REQUIRE(::waitpid(p.pid(), &status, 0) == p.pid());
  CHECK(p.killAndReap().kind == ExitStatus::Kind::Lost);
  CHECK_FALSE(p.running());
}

TEST_CASE("a moved-from Process holds nothing and the moved-to one reaps") {
  NothingLeftBehind check;
  Process a = spawnSleep();
  pid_t pid = a.pid();
  Process b(std::move(a));
  CHECK_FALSE(a.running());
  CHECK(a.pid() == 0);
  CHECK(b.pid() == pid);
  CHECK(b.running());
  CHECK(b.killAndReap().code == SIGKILL);
}

// ---------------------------------------------------------------------------------------------
// Living inside a host process.

namespace {
int gChildPipe = -1;
void onSigchld(int, siginfo_t* info, void*) {
  int saved = errno;
  pid_t pid = info->si_pid;
  [[maybe_unused]] ssize_t n = ::write(gChildPipe, &pid, sizeof pid);
  errno = saved;
}
}  // namespace

TEST_CASE("the host's SIGCHLD handler still runs for its own fork()ed child while vsup children exist") {
  NothingLeftBehind check;
  Pipe events(O_CLOEXEC | O_NONBLOCK);
  gChildPipe = events.write.get();
  struct sigaction mine {}, old {};
  mine.sa_sigaction = onSigchld;
  mine.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&mine.sa_mask);
  REQUIRE(::sigaction(SIGCHLD, &mine, &old) == 0);

  Process vsupChild = spawnSleep();
  struct sigaction after {};
  ::sigaction(SIGCHLD, nullptr, &after);
  bool handlerKept = after.sa_sigaction == onSigchld;

  pid_t own = ::fork();
  if (own == 0) ::_exit(0);
  REQUIRE(own > 0);
  bool sawOwn = false;
  auto deadline = vsup::deadlineAfterMs(2000);
  while (!sawOwn && readableWithin(events.read.get(), int(vsup::msUntil(deadline)))) {
    pid_t pid = 0;
    while (::read(events.read.get(), &pid, sizeof pid) == sizeof pid) sawOwn |= pid == own;
  }
  int status = 0;
  bool reapedOwn = ::waitpid(own, &status, 0) == own;
  bool vsupChildAlive = vsupChild.running() && !vsupChild.tryReap().has_value();
  vsupChild.killAndReap();
  ::sigaction(SIGCHLD, &old, nullptr);
  gChildPipe = -1;

  CHECK(handlerKept);
  CHECK(sawOwn);
  CHECK(reapedOwn);
  CHECK(WIFEXITED(status));
  CHECK(vsupChildAlive);
}

TEST_CASE("spawning 100 children in a row leaks neither fds nor processes") {
  NothingLeftBehind check;
  for (int i = 0; i < 100; ++i) {
    Process p = spawnSh("exit 0");
    CHECK(reapWithin(p, 5000).success());
  }
}
