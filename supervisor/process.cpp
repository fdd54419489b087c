#include "supervisor/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <new>
#include <unordered_map>
#include <linux/close_range.h>

#include "base/check.h"

namespace vsup::supervisor {
namespace {

constexpr int kMaxPassFds = 16;
constexpr size_t kChildStackSize = 64 * 1024;

// Everything the child needs, prepared by the parent: between clone and exec the child shares
// the parent's memory (CLONE_VM) and may only make raw syscalls: no malloc, no locks.
struct ChildArgs {
  const char* path;
  char* const* argv;
  char* const* envp;
  int sources[kMaxPassFds];
  int targets[kMaxPassFds];
  int count;
  pid_t parentPid;
  bool deathSignal;
  const std::vector<int>* ignoreSignals;  // read only (no allocation in the child)
  // Written by the child when a step fails; read by the parent after clone returns (CLONE_VFORK
  // suspends the parent until the child has exec'd or exited).
  int error;
  const char* failedStep;
};

[[noreturn]] void childFail(ChildArgs* a, const char* step) {
  a->error = errno;
  a->failedStep = step;
  _exit(127);
}

int childMain(void* arg) {
  auto* a = static_cast<ChildArgs*>(arg);
  // 1. Own process group: a terminal's Ctrl-C reaches only the root, and escalation can kill
  //    the child together with whatever it spawned.
  if (setpgid(0, 0) < 0) childFail(a, "setpgid");
  // 2. Default dispositions for every signal (handlers would be reset by exec anyway; ignored
  //    signals would not). The parent blocked all signals before clone, so none of its handlers
  //    can run on this stack meanwhile. EINVAL for glibc's reserved signals is expected.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, nullptr);
  }
  struct sigaction ign;
  std::memset(&ign, 0, sizeof ign);
  ign.sa_handler = SIG_IGN;
  for (int sig : *a->ignoreSignals) sigaction(sig, &ign, nullptr);
  // 3. Backstop: if our parent (thread) dies, so do we.
  if (a->deathSignal) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) childFail(a, "prctl(PR_SET_PDEATHSIG)");
    if (getppid() != a->parentPid) _exit(127);
  }
  // 4. Exactly the fds asked for. First move every source above the highest target so that no
  //    dup2 can clobber a source still to be placed, then place them, then close the rest.
  int moved[kMaxPassFds];
  for (int i = 0; i < a->count; ++i) {
    moved[i] = fcntl(a->sources[i], F_DUPFD, a->count);
    if (moved[i] < 0) childFail(a, "fcntl(F_DUPFD)");
  }
  for (int i = 0; i < a->count; ++i) {
    if (dup2(moved[i], a->targets[i]) < 0) childFail(a, "dup2");
  }
  if (syscall(SYS_close_range, unsigned(a->count), ~0U, 0) < 0) childFail(a, "close_range");
  // 5. Empty signal mask, then exec.
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  execve(a->path, a->argv, a->envp);
  childFail(a, "execve");
}

// Blocks every signal on this thread for the lifetime of the object; restores the old mask.
class BlockAllSignals {
 public:
  BlockAllSignals() {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old_);
  }
  ~BlockAllSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

bool fdIsOpen(int fd) { return fcntl(fd, F_GETFD) >= 0; }

std::vector<char*> cStrings(const std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (const std::string& s : strings) out.push_back(const_cast<char*>(s.c_str()));
  out.push_back(nullptr);
  return out;
}

// SpawnedChildren's state. A count per pid, not a set: a pid freed by one thread's reap may be
// taken by another thread's spawn before the first has removed it.
struct Registry {
  std::shared_mutex gate;
  std::mutex mutex;  // guards pids (spawns and reaps add and remove concurrently, all shared)
  std::unordered_map<pid_t, unsigned> pids;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: children may be reaped during exit
  return *r;
}

}  // namespace

std::shared_mutex& SpawnedChildren::gate() { return registry().gate; }

SpawnedChildren::Freeze SpawnedChildren::freeze() { return Freeze(registry().gate); }

bool SpawnedChildren::contains(pid_t pid) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.pids.count(pid) > 0;
}

size_t SpawnedChildren::count() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  size_t n = 0;
  for (const auto& [pid, k] : r.pids) n += k;
  return n;
}

void SpawnedChildren::add(pid_t pid) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  ++r.pids[pid];
}

void SpawnedChildren::remove(pid_t pid) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.pids.find(pid);
  if (it == r.pids.end()) return;
  if (--it->second == 0) r.pids.erase(it);
}

std::string selfExecutable() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  VSUP_REQUIRE(n > 0, std::string("cannot resolve /proc/self/exe: ") + std::strerror(errno));
  return std::string(buf, size_t(n));
}

std::string findExecutable(const std::string& argv0, const std::string& pathVar) {
  auto executable = [](const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
  };
  if (argv0.find('/') != std::string::npos) return executable(argv0) ? argv0 : std::string();
  size_t start = 0;
  while (start <= pathVar.size()) {
    size_t end = pathVar.find(':', start);
    if (end == std::string::npos) end = pathVar.size();
    std::string dir = pathVar.substr(start, end - start);
    std::string candidate = (dir.empty() ? "." : dir) + "/" + argv0;
    if (executable(candidate)) return candidate;
    start = end + 1;
  }
  return {};
}

std::string ExitStatus::describe() const {
  switch (kind) {
    case Kind::Exited: return "code " + std::to_string(code);
    case Kind::Signaled: return "signal " + std::to_string(code) + " (" + strsignal(code) + ")";
    case Kind::Lost:
      return "exit status lost: another part of this process reaped the child (waitpid(-1), or "
             "SIGCHLD set to SIG_IGN)";
  }
  return "?";
}

int ExitStatus::shellCode() const {
  if (kind == Kind::Signaled) return 128 + code;
  if (kind == Kind::Lost) return 1;
  return code;
}

Process Process::spawn(const SpawnRequest& request) {
  VSUP_REQUIRE(!request.argv.empty() && !request.argv[0].empty(), "spawn: empty command");
  VSUP_REQUIRE(request.passFds.size() + 3 <= kMaxPassFds, "spawn: too many fds to pass");

  std::string pathVar = "/usr/local/bin:/usr/bin:/bin";
  for (const std::string& kv : request.env) {
    if (kv.rfind("PATH=", 0) == 0) pathVar = kv.substr(5);
  }
  std::string path = findExecutable(request.argv[0], pathVar);
  VSUP_REQUIRE(!path.empty(), "cannot start '" + request.argv[0] + "': " +
                                  (request.argv[0].find('/') != std::string::npos
                                       ? "no such executable file"
                                       : "not found in PATH (" + pathVar + ")"));

  // /dev/null stands in for stdin, and for stdout/stderr when asked or when this process has
  // them closed (a daemonized host).
  OwnFd devNull(VSUP_SYSCALL(::open("/dev/null", O_RDWR | O_CLOEXEC)));
  auto stdio = [&](int fd) { return (fd < 0 || !fdIsOpen(fd)) ? devNull.get() : fd; };

  ChildArgs args{};
  args.sources[0] = stdio(request.stdinFd);
  args.sources[1] = stdio(request.stdoutFd);
  args.sources[2] = stdio(request.stderrFd);
  for (int i = 0; i < 3; ++i) args.targets[i] = i;
  args.count = 3;
  for (auto [source, target] : request.passFds) {
    VSUP_REQUIRE(target == args.count, "spawn: passed fds must be numbered 3, 4, ... in order");
    args.sources[args.count] = source;
    args.targets[args.count] = target;
    ++args.count;
  }
  std::vector<char*> argv = cStrings(request.argv);
  std::vector<char*> envp = cStrings(request.env);
  args.path = path.c_str();
  args.argv = argv.data();
  args.envp = envp.data();
  args.parentPid = ::getpid();
  args.deathSignal = request.deathSignal;
  args.ignoreSignals = &request.ignoreSignals;

#if defined(__SANITIZE_THREAD__)
  // ThreadSanitizer cannot follow instrumented code running in our address space outside its
  // threads (a CLONE_VM child corrupts its shadow state): under TSan the child gets a copy of
  // our memory, still suspending us until it has exec'd (CLONE_VFORK), and reports a failure
  // through a shared page at the bottom of its stack.
  void* stack = ::mmap(nullptr, kChildStackSize, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) detail::throwSysError("mmap(child stack)", __FILE__, __LINE__);
  ChildArgs* shared = new (stack) ChildArgs(args);
  constexpr int kShareMemory = 0;
#else
  void* stack = ::mmap(nullptr, kChildStackSize, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) detail::throwSysError("mmap(child stack)", __FILE__, __LINE__);
  ChildArgs* shared = &args;
  constexpr int kShareMemory = CLONE_VM;
#endif
  // The gate is held from before clone until the pid is registered: a reaper of strangers
  // (OrphanReaper; see SpawnedChildren) cannot run between the child's birth, or its exit
  // right after exec, and its registration.
  int pidfd = -1;
  pid_t pid;
  int cloneErrno;
  bool registered = false;
  {
    std::shared_lock<std::shared_mutex> gate(SpawnedChildren::gate());
    {
      BlockAllSignals blocked;
      pid = ::clone(childMain, static_cast<char*>(stack) + kChildStackSize,
                    kShareMemory | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, shared, &pidfd);
      cloneErrno = errno;
    }
    if (pid > 0) {
      try {
        SpawnedChildren::add(pid);
        registered = true;
      } catch (const std::bad_alloc&) {
        // Handled below, outside the gate (the reap takes it again).
      }
    }
  }
  if (shared != &args) args = *shared;
  ::munmap(stack, kChildStackSize);
  if (pid < 0) {
    errno = cloneErrno;
    detail::throwSysError("clone", __FILE__, __LINE__);
  }

  Process p;
  p.pid_ = pid;
  p.pidfd_.reset(pidfd);
  if (!registered) {
    p.killAndReap();
    throw std::bad_alloc();
  }
  if (args.failedStep != nullptr) {
    // The child never reached exec; it has exited (CLONE_VFORK). Reap it and report.
    p.killAndReap();
    throw vsup::Error("cannot start '" + request.argv[0] + "': " + args.failedStep +
                      " failed: " + std::strerror(args.error));
  }
  return p;
}

Process::~Process() {
  VSUP_ASSERT(pid_ <= 0 || reaped_, "a child process was destroyed without being reaped", pid_);
}

bool Process::signal(int sig) {
  if (!running()) return false;
  // A readable pidfd means it has exited (a zombie): the kernel would accept the signal and
  // deliver it to no one.
  pollfd exited{pidfd_.get(), POLLIN, 0};
  if (::poll(&exited, 1, 0) > 0) return false;
  // Raw syscall: glibc 2.36 declares the wrapper without C linkage.
  if (::syscall(SYS_pidfd_send_signal, pidfd_.get(), sig, nullptr, 0) == 0) return true;
  if (errno == ESRCH) return false;
  detail::throwSysError("pidfd_send_signal", __FILE__, __LINE__);
}

void Process::killGroup() {
  if (!running()) return;
  // ESRCH: the group is already empty.
  if (::kill(-pid_, SIGKILL) < 0 && errno != ESRCH) {
    detail::throwSysError("kill(-pgid, SIGKILL)", __FILE__, __LINE__);
  }
}

int Process::reapExited(siginfo_t* info) {
  std::memset(info, 0, sizeof *info);
  std::shared_lock<std::shared_mutex> gate(SpawnedChildren::gate());
  int rc;
  do {
    rc = ::waitid(P_PIDFD, id_t(pidfd_.get()), info, WEXITED | WNOHANG | __WALL);
  } while (rc < 0 && errno == EINTR);
  int saved = errno;
  // Reaped (the pid is free now) or lost to someone else: either way no longer ours.
  SpawnedChildren::remove(pid_);
  errno = saved;
  return rc;
}

namespace {

ExitStatus statusOf(const siginfo_t& info) {
  if (info.si_code == CLD_EXITED) return ExitStatus{ExitStatus::Kind::Exited, info.si_status};
  return ExitStatus{ExitStatus::Kind::Signaled, info.si_status};
}

}  // namespace

std::optional<ExitStatus> Process::tryReap() {
  VSUP_ASSERT(running());
  siginfo_t info;
  std::memset(&info, 0, sizeof info);
  // WNOWAIT first: learn that it exited while keeping the zombie (and so the pgid) reserved,
  // then kill what it left in its group, then reap for real.
  int rc = ::waitid(P_PIDFD, id_t(pidfd_.get()), &info, WEXITED | WNOHANG | WNOWAIT | __WALL);
  if (rc < 0 && errno == EINTR) return std::nullopt;
  if (rc < 0 && errno == ECHILD) {
    // Someone else reaped it: the host's waitpid(-1) or SIGCHLD = SIG_IGN. Its pgid may
    // already be reused, so do not signal the group.
    reaped_ = true;
    SpawnedChildren::remove(pid_);
    pidfd_.reset();
    return ExitStatus{ExitStatus::Kind::Lost, 0};
  }
  if (rc < 0) detail::throwSysError("waitid(P_PIDFD, WNOWAIT)", __FILE__, __LINE__);
  if (info.si_pid == 0) return std::nullopt;  // still running
  killGroup();
  // A zombie now: this waitid does not wait.
  rc = reapExited(&info);
  if (rc < 0 && errno != ECHILD) detail::throwSysError("waitid(P_PIDFD)", __FILE__, __LINE__);
  reaped_ = true;
  pidfd_.reset();
  if (rc < 0 || info.si_pid == 0) return ExitStatus{ExitStatus::Kind::Lost, 0};
  return statusOf(info);
}

ExitStatus Process::killAndReap() {
  VSUP_ASSERT(running());
  killGroup();
  signal(SIGKILL);
  siginfo_t info;
  std::memset(&info, 0, sizeof info);
  int rc;
  for (;;) {
    // Wait without reaping (WNOWAIT) until it has exited; the reap itself is reapExited's. The
    // pidfd may be O_NONBLOCK (libuv's uv_poll_init sets it), so waitid can say EAGAIN while
    // the SIGKILLed child is still on its way out: wait for the pidfd to turn readable.
    rc = ::waitid(P_PIDFD, id_t(pidfd_.get()), &info, WEXITED | WNOWAIT | __WALL);
    if (rc == 0 || (errno != EINTR && errno != EAGAIN)) break;
    if (errno == EAGAIN) {
      pollfd p{pidfd_.get(), POLLIN, 0};
      ::poll(&p, 1, -1);
    }
  }
  if (rc == 0) {
    rc = reapExited(&info);
  } else {
    SpawnedChildren::remove(pid_);  // lost: no longer ours either
  }
  reaped_ = true;
  pidfd_.reset();
  if (rc < 0 || info.si_pid == 0) return ExitStatus{ExitStatus::Kind::Lost, 0};
  return statusOf(info);
}

}  // namespace vsup::supervisor
