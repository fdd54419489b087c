// The embedding API as a host program uses it: vsup::LLM and vsup::Supervisor created and
// destroyed many times, made to fail in every way we can provoke, and after each, the host is
// checked to be exactly as it was (README, "Embedding": teardown guarantees).
//
// The test process makes itself a child subreaper before its baseline: a descendant of vsup's
// that is orphaned (its parent died) is reparented to us instead of to pid 1, so the "no child
// processes" check (waitid(P_ALL) -> ECHILD) also sees grandchildren that outlived their parent.
//
// Every test case arms alarm() as a hang guard: SIGALRM's default action ends the process, so a
// destructor or a generate() that hangs fails the run in bounded time without any handler of ours.
#include <dirent.h>

#include <cctype>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "supervisor/public/supervisor.h"
#include "workers/public/llm.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace sv = vsup::supervisor;

// ----------------------------------------------------------------------------------------------
// Small helpers

std::string vsupExe() {
  const char* exe = std::getenv("VSUP_EXE");
  REQUIRE_MESSAGE(exe != nullptr, "VSUP_EXE is not set: run through `meson test` (or set it to "
                                  "build/tools/vsup)");
  REQUIRE_MESSAGE(::access(exe, X_OK) == 0, "VSUP_EXE=" << exe << " is not executable");
  return exe;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// "Key:\tvalue" from /proc/self/status.
std::string statusField(const std::string& key) {
  std::istringstream in(readFile("/proc/self/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::string v = line.substr(key.size() + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  return "";
}

// /tmp is shared with every other process on the machine (a build or a log beside the tests
// writes there at any moment). What vsup could leave there is a socket, or an entry named
// after it (its control-socket directory is /tmp/vsup-<uid>): those are what counts.
bool couldBeVsups(const std::string& name, unsigned char type) {
  return type == DT_SOCK || name.find("vsup") != std::string::npos;
}

std::set<std::string> dirEntries(const std::string& path) {
  std::set<std::string> out;
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (path == "/tmp" && !couldBeVsups(name, e->d_type)) continue;
    out.insert(name);
  }
  ::closedir(d);
  return out;
}

struct ProcInfo {
  pid_t pid;
  pid_t ppid;
  char state;
  std::string cmdline;  // NULs as spaces
};

std::optional<ProcInfo> procInfo(pid_t pid) {
  std::string stat = readFile("/proc/" + std::to_string(pid) + "/stat");
  auto close = stat.rfind(')');
  if (close == std::string::npos || close + 4 > stat.size()) return std::nullopt;
  ProcInfo p;
  p.pid = pid;
  p.state = stat[close + 2];
  p.ppid = std::atoi(stat.c_str() + close + 4);
  p.cmdline = readFile("/proc/" + std::to_string(pid) + "/cmdline");
  std::replace(p.cmdline.begin(), p.cmdline.end(), '\0', ' ');
  return p;
}

std::vector<ProcInfo> allProcesses() {
  std::vector<ProcInfo> out;
  for (const std::string& e : dirEntries("/proc")) {
    if (e.find_first_not_of("0123456789") != std::string::npos) continue;
    if (auto p = procInfo(std::atoi(e.c_str()))) out.push_back(*p);
  }
  return out;
}

// Every live descendant of `root` (not `root` itself).
std::vector<ProcInfo> descendantsOf(pid_t root) {
  auto all = allProcesses();
  std::set<pid_t> tree{root};
  bool grew = true;
  while (grew) {
    grew = false;
    for (const auto& p : all) {
      if (tree.count(p.ppid) != 0 && tree.insert(p.pid).second) grew = true;
    }
  }
  std::vector<ProcInfo> out;
  for (const auto& p : all) {
    if (p.pid != root && tree.count(p.pid) != 0) out.push_back(p);
  }
  return out;
}

std::vector<pid_t> descendantsMatching(const std::string& needle) {
  std::vector<pid_t> out;
  for (const auto& p : descendantsOf(::getpid())) {
    if (p.state != 'Z' && contains(p.cmdline, needle)) out.push_back(p.pid);
  }
  return out;
}

bool alive(pid_t pid) {
  auto p = procInfo(pid);
  return p && p->state != 'Z' && p->state != 'X';
}

template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds within) {
  auto deadline = Clock::now() + within;
  while (true) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
}

double secondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Arms alarm() for one test case (see the file comment) and disarms it at scope exit.
struct HangGuard {
  explicit HangGuard(unsigned seconds) { ::alarm(seconds); }
  ~HangGuard() { ::alarm(0); }
};

// ----------------------------------------------------------------------------------------------
// The snapshot: everything a library could leave behind in its host.

struct SigState {
  int rc = 0;  // sigaction's result (glibc refuses its two reserved signals)
  uintptr_t handler = 0;
  int flags = 0;
  std::string mask;  // sa_mask, one character per signal
  bool operator==(const SigState&) const = default;
};

// The threads of this process that are not exiting. A thread the kernel has begun to take down
// (PF_EXITING in its stat flags, set first thing in its exit, before pthread_join can return)
// still shows in /proc/self/task for a moment after it was joined; it is not counted, so a
// thread joined by an earlier case never shows as one more or one less.
int liveThreadCount() {
  constexpr unsigned long kPfExiting = 0x4;
  int n = 0;
  DIR* d = ::opendir("/proc/self/task");
  REQUIRE(d != nullptr);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(std::string("/proc/self/task/") + e->d_name + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;  // gone since the readdir
    // After the command's ')': state (field 3), then ppid, pgrp, session, tty, tpgid, flags (9).
    std::istringstream fields(stat.substr(paren + 1));
    std::string state;
    long skip = 0;
    unsigned long flags = 0;
    fields >> state >> skip >> skip >> skip >> skip >> skip >> flags;
    if ((flags & kPfExiting) == 0) ++n;
  }
  ::closedir(d);
  return n;
}

struct HostSnapshot {
  std::map<int, std::string> fds;  // fd -> readlink target
  int threads = 0;
  std::string children;            // "" when waitid says ECHILD, else what it found
  std::array<SigState, 65> actions{};
  std::string sigBlk, sigIgn, sigCgt;
  std::set<std::string> tmp, xdg, shm;
  long rssBytes = 0;

  static HostSnapshot take() {
    HostSnapshot s;
    DIR* d = ::opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    int own = ::dirfd(d);
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      int fd = std::atoi(e->d_name);
      if (fd == own) continue;
      char target[4096];
      ssize_t n = ::readlinkat(own, e->d_name, target, sizeof target - 1);
      s.fds[fd] = n < 0 ? std::string("?") : std::string(target, static_cast<size_t>(n));
    }
    ::closedir(d);

    s.threads = liveThreadCount();

    siginfo_t info;
    std::memset(&info, 0, sizeof info);
    if (::waitid(P_ALL, 0, &info, WEXITED | WSTOPPED | WCONTINUED | WNOHANG | WNOWAIT | __WALL) ==
        0) {
      std::ostringstream out;
      out << "waitid(P_ALL) found children";
      if (info.si_pid != 0) out << " (waitable: pid " << info.si_pid << ")";
      for (const auto& p : descendantsOf(::getpid())) {
        out << "\n    pid " << p.pid << " ppid " << p.ppid << " state " << p.state << ": "
            << p.cmdline;
      }
      s.children = out.str();
    } else if (errno != ECHILD) {
      s.children = std::string("waitid(P_ALL) failed: ") + std::strerror(errno);
    }

    for (int sig = 1; sig <= 64; ++sig) {
      struct sigaction sa;
      std::memset(&sa, 0, sizeof sa);
      SigState& st = s.actions[static_cast<size_t>(sig)];
      st.rc = ::sigaction(sig, nullptr, &sa);
      if (st.rc != 0) continue;
      st.handler = (sa.sa_flags & SA_SIGINFO) != 0 ? reinterpret_cast<uintptr_t>(sa.sa_sigaction)
                                                   : reinterpret_cast<uintptr_t>(sa.sa_handler);
      st.flags = sa.sa_flags;
      // Only the kernel's 64 bits: glibc copies the rest of its 1024-bit sigset_t unset.
      for (int m = 1; m <= 64; ++m) st.mask += sigismember(&sa.sa_mask, m) == 1 ? '1' : '0';
    }
    s.sigBlk = statusField("SigBlk");
    s.sigIgn = statusField("SigIgn");
    s.sigCgt = statusField("SigCgt");

    s.tmp = dirEntries("/tmp");
    if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0') {
      s.xdg = dirEntries(xdg);
    }
    s.shm = dirEntries("/dev/shm");

    ::malloc_trim(0);
    long pages = 0, resident = 0;
    std::istringstream(readFile("/proc/self/statm")) >> pages >> resident;
    s.rssBytes = resident * ::sysconf(_SC_PAGESIZE);
    return s;
  }
};

std::string describeFds(const std::map<int, std::string>& a, const std::map<int, std::string>& b) {
  std::ostringstream out;
  for (const auto& [fd, target] : b) {
    auto it = a.find(fd);
    if (it == a.end()) out << "\n    opened fd " << fd << " -> " << target;
    else if (it->second != target) out << "\n    fd " << fd << " now " << target << " (was " << it->second << ")";
  }
  for (const auto& [fd, target] : a) {
    if (b.count(fd) == 0) out << "\n    closed fd " << fd << " (was " << target << ")";
  }
  return out.str();
}

std::string describeEntries(const std::set<std::string>& a, const std::set<std::string>& b) {
  std::ostringstream out;
  for (const auto& e : b) if (a.count(e) == 0) out << " +" << e;
  for (const auto& e : a) if (b.count(e) == 0) out << " -" << e;
  return out.str();
}

constexpr long kMiB = 1024 * 1024;

// Compares the host now with `before`, one CHECK per kind of trace. What the kernel finishes a
// moment after the call that caused it (a joined thread leaving the thread list, a file another
// process on the machine creates and removes) gets a short grace; a real leak stays.
void checkNoTrace(const HostSnapshot& before, long rssSlackBytes = 16 * kMiB) {
  HostSnapshot after = HostSnapshot::take();
  eventually(
      [&]() {
        after = HostSnapshot::take();
        return after.threads == before.threads && after.children.empty() &&
               after.tmp == before.tmp && after.xdg == before.xdg && after.shm == before.shm &&
               after.fds == before.fds;
      },
      1000ms);
  CHECK_MESSAGE(after.fds == before.fds, "leaked or closed file descriptors:"
                                             << describeFds(before.fds, after.fds));
  CHECK_MESSAGE(after.threads == before.threads, "leaked threads: " << after.threads << " now, "
                                                                    << before.threads << " before");
  CHECK_MESSAGE(after.children.empty(), "leaked child processes or zombies: " << after.children);
  for (int sig = 1; sig <= 64; ++sig) {
    const SigState& a = before.actions[static_cast<size_t>(sig)];
    const SigState& b = after.actions[static_cast<size_t>(sig)];
    bool same = a == b;
    std::ostringstream what;
    what << "the disposition of signal " << sig << " (" << ::strsignal(sig) << ") changed: handler "
         << std::hex << a.handler << " -> " << b.handler << ", flags " << a.flags << " -> "
         << b.flags << ", sigaction rc " << std::dec << a.rc << " -> " << b.rc
         << (a.mask == b.mask ? "" : ", sa_mask changed");
    CHECK_MESSAGE(same, what.str());
  }
  CHECK_MESSAGE(after.sigBlk == before.sigBlk,
                "the signal mask changed (SigBlk " << before.sigBlk << " -> " << after.sigBlk << ")");
  CHECK_MESSAGE(after.sigIgn == before.sigIgn,
                "ignored signals changed (SigIgn " << before.sigIgn << " -> " << after.sigIgn << ")");
  CHECK_MESSAGE(after.sigCgt == before.sigCgt,
                "caught signals changed (SigCgt " << before.sigCgt << " -> " << after.sigCgt << ")");
  CHECK_MESSAGE(after.tmp == before.tmp,
                "entries left in /tmp:" << describeEntries(before.tmp, after.tmp));
  CHECK_MESSAGE(after.xdg == before.xdg, "entries left in $XDG_RUNTIME_DIR:"
                                             << describeEntries(before.xdg, after.xdg));
  CHECK_MESSAGE(after.shm == before.shm,
                "entries left in /dev/shm:" << describeEntries(before.shm, after.shm));
  // Under a sanitizer (.ci/run sets VSUP_SANITIZER), freed memory sits in its quarantine: RSS
  // says nothing there. Every other check above still runs.
  if (std::getenv("VSUP_SANITIZER") == nullptr) {
    CHECK_MESSAGE(after.rssBytes <= before.rssBytes + rssSlackBytes,
                  "memory not back to its baseline: RSS " << after.rssBytes / 1024 << " KiB, was "
                                                          << before.rssBytes / 1024 << " KiB");
  } else {
    MESSAGE("RSS not compared under the " << std::getenv("VSUP_SANITIZER") << " sanitizer");
  }
}

vsup::LLMConfig llmConfig(uint32_t tp, uint64_t simTokenMs = 0) {
  vsup::LLMConfig c;
  c.engine = "sim";
  c.tensorParallelSize = tp;
  c.simTokenMs = simTokenMs;
  c.startTimeout = 20s;
  c.vsupExecutable = vsupExe();
  // The destructor's drain: an endless stream destroyed with its LLM ends with "abort" this
  // long after (the default, 30 s, would make the cycles test take hours).
  c.shutdownTimeout = 200ms;
  return c;
}

vsup::Sampling tokens(int64_t n) {
  vsup::Sampling s;
  s.maxTokens = n;
  s.seed = 7;
  return s;
}

sv::ChildSpec sleeper(const std::string& name) {
  sv::ChildSpec c;
  c.name = name;
  c.command = {"sleep", "600"};
  c.shutdown = sv::ShutdownPolicy::timeout(2000);
  return c;
}

sv::SupervisorSpec demoTree() {
  sv::SupervisorSpec spec;
  spec.name = "host";
  spec.intensity = 3;
  spec.children.push_back(sleeper("a"));
  spec.children.push_back(sleeper("b"));
  sv::ChildSpec nested;
  nested.name = "nested";
  nested.type = sv::ChildType::Supervisor;
  nested.supervisor = sv::SupervisorSpec{};
  nested.supervisor->name = "nested";
  nested.supervisor->children.push_back(sleeper("leaf"));
  spec.children.push_back(std::move(nested));
  return spec;
}

vsup::Supervisor::Options supOptions() {
  vsup::Supervisor::Options o;
  o.vsupExecutable = vsupExe();
  return o;
}

const sv::NodeStatus* childNamed(const sv::NodeStatus& node, const std::string& name) {
  for (const auto& c : node.children) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

// The first use of libuv, KJ, capnp and spdlog allocates process-wide state that lives until
// exit (libuv's signal lock pipe, loggers, schema tables): that is not a leak of one object, so
// it is taken once, before any baseline. Also makes this process the subreaper (file comment).
void warmUpOnce() {
  static bool done = false;
  if (done) return;
  done = true;
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
  {
    vsup::LLM llm(llmConfig(2));
    auto out = llm.generate({"warm up"}, tokens(2));
    REQUIRE(out.size() == 1);
    std::atomic<int> pieces{0};
    llm.generateStream("warm up", tokens(2), [&](std::string_view) { ++pieces; });
  }
  {
    vsup::Supervisor sup(demoTree(), supOptions());
    sup.start();
    (void)sup.status();
    sup.stopChild("a");
    sup.addChild(sleeper("c"));
    sup.shutdown(5s);
  }
}

HostSnapshot baseline() {
  warmUpOnce();
  return HostSnapshot::take();
}

// Waits for a thread's work with a bound; a hang fails the whole run at once (a test that
// waits for ever is worse than one that stops).
void joinWithin(std::thread& t, std::future<void>& finished, std::chrono::seconds bound,
                const char* what) {
  if (finished.wait_for(bound) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not return within %llds\n", what,
                 static_cast<long long>(bound.count()));
    std::_Exit(3);
  }
  t.join();
}

// A generateStream() with a practically endless max_tokens on its own thread.
struct EndlessStream {
  std::atomic<int> pieces{0};
  std::atomic<bool> threw{false};
  std::atomic<bool> returned{false};
  std::string error;
  bool shutDownError = false;  // the error was a vsup::ShutDownError
  std::string finishReason;
  std::string text;      // the returned completion's
  std::string streamed;  // what the callback got, piece by piece
  int64_t completionTokens = 0;
  Clock::time_point endedAt;
  std::promise<void> done;
  std::future<void> finished = done.get_future();
  std::thread thread;

  explicit EndlessStream(vsup::LLM& llm, int64_t maxTokens = 1'000'000'000) {
    thread = std::thread([this, &llm, maxTokens]() {
      try {
        vsup::Completion c = llm.generateStream("tell me everything", tokens(maxTokens),
                                                [this](std::string_view piece) {
                                                  streamed += piece;
                                                  ++pieces;
                                                });
        finishReason = c.finishReason;
        text = c.text;
        completionTokens = c.completionTokens;
        returned = true;
      } catch (const vsup::ShutDownError& e) {
        error = e.what();
        shutDownError = true;
        threw = true;
      } catch (const vsup::Error& e) {
        error = e.what();
        threw = true;
      } catch (const std::exception& e) {
        error = std::string("not a vsup::Error: ") + e.what();
        threw = true;
      }
      endedAt = Clock::now();
      done.set_value();
    });
  }

  bool waitFlowing() {
    return eventually([&]() { return pieces.load() > 0 || finished.wait_for(0s) == std::future_status::ready; },
                      10s) &&
           pieces.load() > 0;
  }

  void join(std::chrono::seconds bound, const char* what) {
    joinWithin(thread, finished, bound, what);
  }
};

// The descendants of `pid` (engine-core's ranks and guard) that will be orphaned when it is
// killed: they are adopted by us (subreaper), must end on their own within a bound, and are
// then reaped here, since no vsup code knows them any more.
bool reapOrphans(const std::vector<pid_t>& pids, std::chrono::milliseconds within,
                 std::string* stillAlive) {
  bool gone = eventually([&]() { return std::none_of(pids.begin(), pids.end(), alive); }, within);
  for (pid_t p : pids) {
    if (alive(p)) {
      *stillAlive += " " + std::to_string(p);
      continue;
    }
    auto info = procInfo(p);
    if (info && info->ppid == ::getpid()) ::waitpid(p, nullptr, WNOHANG);
  }
  return gone;
}

}  // namespace

// ----------------------------------------------------------------------------------------------

// The soak (tests/soak/soak.py) runs this same test with VSUP_SOAK_CYCLES=1000.
int llmCycles() {
  const char* soak = std::getenv("VSUP_SOAK_CYCLES");
  int n = soak != nullptr ? std::atoi(soak) : 0;
  return n > 0 ? n : 200;
}

TEST_CASE("two hundred LLMs created and destroyed, some mid-stream, leave the host as it was") {
  const int cycles = llmCycles();
  HangGuard guard(unsigned(300 * cycles / 200));
  HostSnapshot before = baseline();
  auto t0 = Clock::now();
  double longestDestroy = 0;
  int streamed = 0;
  for (int i = 0; i < cycles; ++i) {
    uint32_t tp = i % 2 == 0 ? 1 : 2;
    CAPTURE(i);
    CAPTURE(tp);
    auto llm = std::make_unique<vsup::LLM>(llmConfig(tp));
    switch (i % 4) {
      case 1: {
        auto out = llm->generate({"hello", "world"}, tokens(3));
        REQUIRE(out.size() == 2);
        CHECK(out[0].finishReason == "length");
        CHECK(out[0].completionTokens == 3);
        CHECK_FALSE(out[1].text.empty());
        break;
      }
      case 3: {
        EndlessStream stream(*llm);
        REQUIRE_MESSAGE(stream.waitFlowing(), "the endless stream produced nothing: "
                                                  << stream.error);
        auto t = Clock::now();
        llm.reset();  // while the stream is running on the other thread
        longestDestroy = std::max(longestDestroy, secondsSince(t));
        stream.join(10s, "generateStream() after its LLM was destroyed");
        // The destructor drains: the stream is not broken, it ends with "abort" and its text.
        CHECK_MESSAGE((!stream.threw && stream.finishReason == "abort"),
                      "a stream cut by the destructor's drain did not end with 'abort' (finish '"
                          << stream.finishReason << "', error '" << stream.error << "')");
        ++streamed;
        break;
      }
      default:
        break;
    }
    auto t = Clock::now();
    llm.reset();
    longestDestroy = std::max(longestDestroy, secondsSince(t));
  }
  MESSAGE(cycles, " LLM cycles (", streamed, " destroyed mid-stream) took ", secondsSince(t0),
          " s; the longest destructor ", longestDestroy, " s");
  CHECK(longestDestroy < 5.0);
  checkNoTrace(before);
}

TEST_CASE("fifty supervisors started, changed and shut down leave the host as it was") {
  HangGuard guard(300);
  HostSnapshot before = baseline();
  auto t0 = Clock::now();
  for (int i = 0; i < 50; ++i) {
    CAPTURE(i);
    vsup::Supervisor sup(demoTree(), supOptions());
    sup.start();
    sv::NodeStatus st = sup.status();
    REQUIRE(st.children.size() == 3);
    const sv::NodeStatus* a = childNamed(st, "a");
    REQUIRE(a != nullptr);
    CHECK(a->state == sv::NodeState::Running);
    CHECK(a->pid > 0);
    pid_t aPid = a->pid;
    const sv::NodeStatus* nested = childNamed(st, "nested");
    REQUIRE(nested != nullptr);
    CHECK(nested->type == sv::NodeType::Supervisor);
    CHECK(nested->state == sv::NodeState::Running);
    CHECK_MESSAGE(nested->restarts == 0, "the nested supervisor restarted " << nested->restarts
                                                                           << " times");
    const sv::NodeStatus* leaf = childNamed(*nested, "leaf");
    REQUIRE_MESSAGE(leaf != nullptr, "status() does not show the nested supervisor's child");
    CHECK(leaf->state == sv::NodeState::Running);
    CHECK(leaf->pid > 0);

    sup.stopChild("a");
    CHECK_FALSE(alive(aPid));
    sv::NodeStatus stopped = sup.status();
    const sv::NodeStatus* a2 = childNamed(stopped, "a");
    CHECK((a2 == nullptr || a2->pid == 0));

    sup.addChild(sleeper("c"));
    const sv::NodeStatus* c = nullptr;
    sv::NodeStatus added = sup.status();
    c = childNamed(added, "c");
    REQUIRE(c != nullptr);
    CHECK(c->state == sv::NodeState::Running);
    CHECK_THROWS_AS(sup.addChild(sleeper("c")), vsup::Error);  // a duplicate name

    CHECK_FALSE(sup.terminated());
    CHECK(sup.shutdown(5s));   // sleep dies of SIGTERM: nothing had to be killed
    CHECK(sup.shutdown(5s));   // idempotent
    CHECK(sup.terminated());
  }
  MESSAGE("50 supervisor cycles took ", secondsSince(t0), " s");
  checkNoTrace(before);
}

namespace {
volatile sig_atomic_t gotSigterm = 0;
volatile sig_atomic_t gotSigchld = 0;
void onSigterm(int) { gotSigterm = 1; }
void onSigchld(int) { gotSigchld = 1; }
}  // namespace

TEST_CASE("a host's own SIGTERM and SIGCHLD handlers stay installed and keep running") {
  HangGuard guard(120);
  warmUpOnce();
  struct sigaction term {}, chld {}, oldTerm {}, oldChld {};
  term.sa_handler = onSigterm;
  sigemptyset(&term.sa_mask);
  chld.sa_handler = onSigchld;
  chld.sa_flags = SA_RESTART;
  sigemptyset(&chld.sa_mask);
  REQUIRE(::sigaction(SIGTERM, &term, &oldTerm) == 0);
  REQUIRE(::sigaction(SIGCHLD, &chld, &oldChld) == 0);
  HostSnapshot before = HostSnapshot::take();

  pid_t own = -1;
  {
    vsup::LLM llm(llmConfig(2));
    vsup::Supervisor sup(demoTree(), supOptions());
    sup.start();
    CHECK(llm.generate({"with handlers"}, tokens(4)).at(0).completionTokens == 4);

    // A child of the host's own while vsup's children run: the host's handler hears of it, and
    // vsup does not reap it behind the host's back.
    gotSigchld = 0;
    own = ::fork();
    REQUIRE(own >= 0);
    if (own == 0) ::_exit(7);
    CHECK_MESSAGE(eventually([]() { return gotSigchld == 1; }, 5s),
                  "the host's SIGCHLD handler did not run for its own child");
    int status = 0;
    CHECK_MESSAGE(::waitpid(own, &status, 0) == own,
                  "the host's own child was reaped by someone else: " << std::strerror(errno));
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 7));
    sup.shutdown(5s);
  }

  struct sigaction now {};
  ::sigaction(SIGTERM, nullptr, &now);
  CHECK_MESSAGE(bool(now.sa_handler == &onSigterm), "the host's SIGTERM handler was replaced");
  ::sigaction(SIGCHLD, nullptr, &now);
  CHECK_MESSAGE(bool(now.sa_handler == &onSigchld), "the host's SIGCHLD handler was replaced");

  gotSigterm = 0;
  ::raise(SIGTERM);
  CHECK_MESSAGE(gotSigterm == 1, "the host's SIGTERM handler did not run");

  gotSigchld = 0;
  own = ::fork();
  REQUIRE(own >= 0);
  if (own == 0) ::_exit(0);
  CHECK_MESSAGE(eventually([]() { return gotSigchld == 1; }, 5s),
                "the host's SIGCHLD handler did not run after vsup was gone");
  CHECK(::waitpid(own, nullptr, 0) == own);

  checkNoTrace(before);
  ::sigaction(SIGTERM, &oldTerm, nullptr);
  ::sigaction(SIGCHLD, &oldChld, nullptr);
}

TEST_CASE("a host that ignores SIGCHLD gets a clear vsup::Error naming SIGCHLD, or a working object") {
  HangGuard guard(120);
  warmUpOnce();
  struct sigaction ign {}, old {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  REQUIRE(::sigaction(SIGCHLD, &ign, &old) == 0);
  HostSnapshot before = HostSnapshot::take();

  // vsup::LLM: either it works end to end, or it refuses with the reason.
  std::optional<std::string> llmError;
  try {
    vsup::LLM llm(llmConfig(1));
    CHECK(llm.generate({"ignored SIGCHLD"}, tokens(2)).at(0).completionTokens == 2);
  } catch (const vsup::Error& e) {
    llmError = e.what();
  }
  if (llmError) {
    CHECK_MESSAGE(contains(*llmError, "SIGCHLD"), "vsup::LLM refused without naming SIGCHLD: "
                                                      << *llmError);
  }
  MESSAGE("vsup::LLM with SIGCHLD ignored: ", llmError ? "throws: " + *llmError : "works");

  std::optional<std::string> supError;
  try {
    vsup::Supervisor sup(demoTree(), supOptions());
    sup.start();
    CHECK(sup.status().children.size() == 3);
    CHECK(sup.shutdown(5s));
  } catch (const vsup::Error& e) {
    supError = e.what();
  }
  if (supError) {
    CHECK_MESSAGE(contains(*supError, "SIGCHLD"), "vsup::Supervisor refused without naming "
                                                  "SIGCHLD: " << *supError);
  }
  MESSAGE("vsup::Supervisor with SIGCHLD ignored: ", supError ? "throws: " + *supError : "works");

  // The documented contract (README, "Embedding"): refuse at construction.
  CHECK_MESSAGE(llmError.has_value(), "vsup::LLM was expected to refuse an ignored SIGCHLD");
  CHECK_MESSAGE(supError.has_value(), "vsup::Supervisor was expected to refuse an ignored SIGCHLD");

  checkNoTrace(before);
  ::sigaction(SIGCHLD, &old, nullptr);
}

TEST_CASE("failed starts throw a vsup::Error that says why and leave nothing behind") {
  HangGuard guard(120);
  HostSnapshot before = baseline();

  SUBCASE("an unknown engine name") {
    vsup::LLMConfig c = llmConfig(1);
    c.engine = "bogus";
    try {
      vsup::LLM llm(c);
      FAIL("vsup::LLM accepted the engine 'bogus'");
    } catch (const vsup::Error& e) {
      CHECK_MESSAGE(contains(e.what(), "bogus"), "the error does not name the engine: " << e.what());
    }
    checkNoTrace(before);
  }

  SUBCASE("an LLM whose model does not exist (refused by engine-core, across the RPC)") {
    vsup::LLMConfig c = llmConfig(1);
    c.engine = "cpu";
    c.model = "/nonexistent/vsup-model";
    try {
      vsup::LLM llm(c);
      FAIL("vsup::LLM started with a model that does not exist");
    } catch (const vsup::Error& e) {
      CHECK_MESSAGE(contains(e.what(), "/nonexistent/vsup-model"),
                    "the error does not name the model: " << e.what());
      CHECK_MESSAGE(!contains(e.what(), "remote exception"), "RPC noise in: " << e.what());
      CHECK_MESSAGE(!contains(e.what(), " = "), "KJ's argument rendering in: " << e.what());
    }
    checkNoTrace(before);
  }

  SUBCASE("a supervisor child whose command does not exist") {
    sv::SupervisorSpec spec;
    spec.name = "host";
    spec.children.push_back(sleeper("fine"));
    sv::ChildSpec ghost;
    ghost.name = "ghost";
    ghost.command = {"/nonexistent/vsup-no-such-command"};
    spec.children.push_back(ghost);
    spec.children.push_back(sleeper("never"));
    {
      vsup::Supervisor sup(spec, supOptions());
      try {
        sup.start();
        FAIL("start() succeeded with a child whose command does not exist");
      } catch (const vsup::Error& e) {
        CHECK_MESSAGE(contains(e.what(), "ghost"),
                      "the error does not name the child: " << e.what());
      }
      // "the started ones were stopped in reverse order" by the time start() throws.
      CHECK_MESSAGE(descendantsMatching("sleep 600").empty(),
                    "start() threw while the child started before 'ghost' was still running");
      CHECK_MESSAGE(sup.terminated(), "terminated() is false after a failed start()");
    }
    checkNoTrace(before);
  }

  SUBCASE("a supervisor child looked up in PATH that is not there") {
    sv::SupervisorSpec spec;
    spec.name = "host";
    sv::ChildSpec ghost;
    ghost.name = "pathless";
    ghost.command = {"vsup-no-such-command-in-path"};
    spec.children.push_back(ghost);
    try {
      vsup::Supervisor sup(spec, supOptions());
      sup.start();
      FAIL("start() succeeded with a command that is not in PATH");
    } catch (const vsup::Error& e) {
      CHECK_MESSAGE(contains(e.what(), "pathless"),
                    "the error does not name the child: " << e.what());
    }
    checkNoTrace(before);
  }

  SUBCASE("an LLM whose start timeout is too short") {
    vsup::LLMConfig c = llmConfig(2);
    c.startTimeout = 1ms;
    try {
      vsup::LLM llm(c);
      FAIL("vsup::LLM started within 1 ms");
    } catch (const vsup::Error& e) {
      std::string m = lower(e.what());
      CHECK_MESSAGE((contains(m, "timeout") || contains(m, "timed out")),
                    "the error does not mention the timeout: " << e.what());
    }
    checkNoTrace(before);
  }

  SUBCASE("an LLM whose worker dies during start-up") {
    // Test-only injection (README, "Fault injection"): rank 1 exits with code 3 at start-up.
    ::setenv("VSUP_TEST_FAIL_WORKER_START", "1", 1);
    try {
      vsup::LLM llm(llmConfig(2));
      FAIL("vsup::LLM started although a worker died during start-up");
    } catch (const vsup::Error& e) {
      CHECK_MESSAGE(contains(e.what(), "worker-tp1"), "the error does not name the worker: " << e.what());
      CHECK_MESSAGE(contains(e.what(), "code 3"), "the error does not say how it died: " << e.what());
      CHECK_MESSAGE(!contains(e.what(), "remote exception"), "RPC noise in: " << e.what());
    }
    ::unsetenv("VSUP_TEST_FAIL_WORKER_START");
    checkNoTrace(before);
  }

  SUBCASE("a supervisor child that never says it is ready within its start timeout") {
    sv::SupervisorSpec spec;
    spec.name = "host";
    sv::ChildSpec silent = sleeper("silent");
    silent.ready = sv::Readiness::Notify;
    silent.startTimeoutMs = 1;
    spec.children.push_back(silent);
    {
      vsup::Supervisor sup(spec, supOptions());
      try {
        sup.start();
        FAIL("start() succeeded although the child never notified readiness");
      } catch (const vsup::Error& e) {
        std::string m = lower(e.what());
        CHECK_MESSAGE(contains(e.what(), "silent"),
                      "the error does not name the child: " << e.what());
        CHECK_MESSAGE((contains(m, "timeout") || contains(m, "timed out")),
                      "the error does not mention the timeout: " << e.what());
      }
    }
    checkNoTrace(before);
  }
}

TEST_CASE("a worker killed during generate makes it throw, later calls fail fast, and the destructor cleans up") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  auto llm = std::make_unique<vsup::LLM>(llmConfig(2, 1));
  EndlessStream stream(*llm);
  REQUIRE(stream.waitFlowing());
  std::vector<pid_t> workers = descendantsMatching("__worker");
  REQUIRE_MESSAGE(workers.size() == 2, "expected two rank processes, found " << workers.size());

  auto killedAt = Clock::now();
  REQUIRE(::kill(workers[0], SIGKILL) == 0);
  stream.join(10s, "generateStream() after a rank was SIGKILLed");
  double took = std::chrono::duration<double>(stream.endedAt - killedAt).count();
  CHECK_MESSAGE(stream.threw, "generateStream() returned (finish '" << stream.finishReason
                                                                   << "') instead of throwing");
  CHECK_MESSAGE(took < 5.0, "generateStream() took " << took << " s to notice the dead rank");
  MESSAGE("the dead rank surfaced after ", took, " s as: ", stream.error);

  auto t = Clock::now();
  CHECK_THROWS_AS(llm->generate({"after the crash"}, tokens(2)), vsup::Error);
  CHECK_MESSAGE(secondsSince(t) < 1.0, "a generate() after the crash took " << secondsSince(t) << " s");
  t = Clock::now();
  CHECK_THROWS_AS(llm->generateStream("again", tokens(2), [](std::string_view) {}), vsup::Error);
  CHECK(secondsSince(t) < 1.0);

  t = Clock::now();
  llm.reset();
  CHECK_MESSAGE(secondsSince(t) < 10.0, "the destructor took " << secondsSince(t) << " s");
  checkNoTrace(before);
}

TEST_CASE("killing engine-core mid-generate never raises SIGPIPE in the host") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  struct sigaction pipe {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &pipe) == 0);
  REQUIRE_MESSAGE(bool(pipe.sa_handler == SIG_DFL), "this test needs SIGPIPE at its default (fatal) "
                                              "disposition");
  sigset_t blocked;
  ::pthread_sigmask(SIG_BLOCK, nullptr, &blocked);
  REQUIRE_FALSE(sigismember(&blocked, SIGPIPE));

  auto llm = std::make_unique<vsup::LLM>(llmConfig(2, 1));
  EndlessStream stream(*llm);
  REQUIRE(stream.waitFlowing());
  std::vector<pid_t> cores = descendantsMatching("__engine-core");
  REQUIRE_MESSAGE(cores.size() == 1, "expected one engine-core, found " << cores.size());
  std::vector<pid_t> orphans;
  for (const auto& p : descendantsOf(cores[0])) orphans.push_back(p.pid);
  REQUIRE(::kill(cores[0], SIGKILL) == 0);

  stream.join(10s, "generateStream() after engine-core was SIGKILLed");
  CHECK_MESSAGE(stream.threw, "generateStream() returned instead of throwing");
  // Keep using it: every call must throw, none may write into the dead socket with SIGPIPE.
  for (int i = 0; i < 20; ++i) {
    CHECK_THROWS_AS(llm->generate({"still here?"}, tokens(2)), vsup::Error);
  }
  CHECK_THROWS_AS(llm->generateStream("and here?", tokens(2), [](std::string_view) {}),
                  vsup::Error);
  llm->shutdown(5s);
  llm->shutdown(5s);  // idempotent, even after a failure
  llm.reset();

  std::string survivors;
  CHECK_MESSAGE(reapOrphans(orphans, 3s, &survivors),
                "engine-core's descendants outlived it by more than 3 s:" << survivors);
  checkNoTrace(before);
}

// ----------------------------------------------------------------------------------------------
// The drain (workers/public/llm.h: "Stopping drains").

TEST_CASE("drain: a request that finishes in time completes, the endless one ends with 'abort' and its text, new calls fail with ShutDownError") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  {
    // 5 ms a step: the short request (40 tokens) needs about 200 ms, the drain gives 1.5 s.
    vsup::LLM llm(llmConfig(2, 5));
    EndlessStream endless(llm);
    EndlessStream shortOne(llm, 40);
    REQUIRE(endless.waitFlowing());
    REQUIRE(shortOne.waitFlowing());
    CHECK_FALSE(shortOne.finished.wait_for(0s) == std::future_status::ready);

    // A caller that keeps submitting while the drain runs: its calls succeed until admission
    // closes, then fail with ShutDownError, while the drain is still waiting for the endless one.
    std::atomic<bool> drainReturned{false};
    std::atomic<bool> refusedDuringDrain{false};
    std::string refusal;
    std::atomic<int> lateCompleted{0};
    std::promise<void> lateDone;
    std::future<void> lateFinished = lateDone.get_future();
    std::thread late([&]() {
      auto until = Clock::now() + 10s;
      while (Clock::now() < until) {
        try {
          llm.generate({"late"}, tokens(1));
          ++lateCompleted;
        } catch (const vsup::ShutDownError& e) {
          refusal = e.what();
          refusedDuringDrain = !drainReturned.load();
          break;
        } catch (const vsup::Error& e) {
          refusal = std::string("not a ShutDownError: ") + e.what();
          break;
        }
      }
      lateDone.set_value();
    });

    REQUIRE(eventually([&]() { return lateCompleted > 0 || lateFinished.wait_for(0s) ==
                                                          std::future_status::ready; },
                       5s));
    auto t0 = Clock::now();
    vsup::DrainReport report = llm.drain(1500ms);
    double took = secondsSince(t0);
    drainReturned = true;
    joinWithin(late, lateFinished, 10s, "the late caller");
    endless.join(10s, "the endless stream after the drain");
    shortOne.join(10s, "the short stream after the drain");

    MESSAGE("drain took ", took, " s: completed ", report.completed, ", aborted ", report.aborted,
            ", failed ", report.failed, "; the late caller completed ", lateCompleted.load(),
            " call(s) first, then: ", refusal);
    CHECK_MESSAGE(shortOne.returned, "the short request did not complete: " << shortOne.error);
    CHECK(shortOne.finishReason == "length");
    CHECK(shortOne.completionTokens == 40);
    CHECK_MESSAGE(endless.returned, "the endless request threw instead of ending with 'abort': "
                                        << endless.error);
    CHECK(endless.finishReason == "abort");
    CHECK_MESSAGE(endless.completionTokens > 40, "the endless request ran only "
                                                     << endless.completionTokens << " tokens");
    CHECK_FALSE(endless.text.empty());
    CHECK_MESSAGE(endless.text == endless.streamed,
                  "the aborted completion's text is not what was streamed");
    // The report counts what was running when the drain began (and the late caller's
    // one-token request, if one was in flight then: it completes).
    CHECK(report.completed >= 1);
    CHECK(report.completed <= 2);
    CHECK(report.aborted == 1);
    CHECK(report.failed == 0);
    CHECK(report.kvTransfersAbandoned == 0);
    CHECK_MESSAGE(took >= 1.4, "the drain returned after " << took << " s, before its deadline");
    CHECK_MESSAGE(took < 4.0, "the drain took " << took << " s");
    CHECK_MESSAGE(lateCompleted > 0, "the late caller never got an answer before the drain");
    CHECK_MESSAGE(refusedDuringDrain, "the late caller was not refused while the drain ran: "
                                          << refusal);
    CHECK(contains(refusal, "shut down"));

    // After the drain: "shut down", fast, for every kind of call; drain and shutdown no-ops.
    auto t = Clock::now();
    try {
      llm.generate({"after"}, tokens(2));
      FAIL("generate() after drain() succeeded");
    } catch (const vsup::ShutDownError& e) {
      CHECK(contains(e.what(), "shut down"));
    }
    CHECK_THROWS_AS(llm.generateStream("after", tokens(2), [](std::string_view) {}),
                    vsup::ShutDownError);
    CHECK(secondsSince(t) < 1.0);
    vsup::DrainReport again = llm.drain(5s);
    CHECK((again.completed == 0 && again.aborted == 0 && again.failed == 0));
    llm.shutdown(5s);
    CHECK(secondsSince(t) < 1.0);
    CHECK_MESSAGE(descendantsMatching("__engine-core").empty(),
                  "engine-core is still running after drain() returned");
  }
  checkNoTrace(before);
}

TEST_CASE("drain(0) aborts every running request at once, each with its text so far") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  {
    vsup::LLM llm(llmConfig(2, 5));
    EndlessStream a(llm);
    EndlessStream b(llm);
    REQUIRE(a.waitFlowing());
    REQUIRE(b.waitFlowing());
    auto t0 = Clock::now();
    vsup::DrainReport report = llm.drain(0ms);
    double took = secondsSince(t0);
    a.join(10s, "the first stream after drain(0)");
    b.join(10s, "the second stream after drain(0)");
    for (EndlessStream* s : {&a, &b}) {
      CHECK_MESSAGE(s->returned, "a stream threw: " << s->error);
      CHECK(s->finishReason == "abort");
      CHECK(s->completionTokens > 0);
      CHECK(s->text == s->streamed);
    }
    CHECK(report.aborted == 2);
    CHECK(report.completed == 0);
    CHECK(report.failed == 0);
    CHECK_MESSAGE(took < 3.0, "drain(0) took " << took << " s");
  }
  checkNoTrace(before);
}

TEST_CASE("after shutdown() calls say 'shut down', never 'worker died', even after a failure") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  SUBCASE("a healthy LLM") {
    vsup::LLM llm(llmConfig(2));
    CHECK(llm.generate({"before"}, tokens(2)).at(0).completionTokens == 2);
    llm.shutdown(5s);
    try {
      llm.generate({"after"}, tokens(2));
      FAIL("generate() after shutdown() succeeded");
    } catch (const vsup::ShutDownError& e) {
      std::string m = lower(e.what());
      CHECK(contains(m, "shut down"));
      CHECK_FALSE(contains(m, "died"));
      CHECK_FALSE(contains(m, "unexpected"));
    }
  }
  SUBCASE("an LLM whose rank had died") {
    vsup::LLM llm(llmConfig(2, 1));
    std::vector<pid_t> workers = descendantsMatching("__worker");
    REQUIRE(workers.size() == 2);
    REQUIRE(::kill(workers[1], SIGKILL) == 0);
    // The failure is noticed: calls fail with it (not a ShutDownError) ...
    bool failed = eventually(
        [&]() {
          try {
            llm.generate({"probe"}, tokens(1));
            return false;
          } catch (const vsup::ShutDownError&) {
            FAIL("a ShutDownError before any shutdown");
            return true;
          } catch (const vsup::Error&) {
            return true;
          }
        },
        5s);
    REQUIRE(failed);
    // ... until the user shuts down: from then on, "shut down".
    llm.shutdown(5s);
    try {
      llm.generate({"after"}, tokens(2));
      FAIL("generate() after shutdown() succeeded");
    } catch (const vsup::ShutDownError& e) {
      std::string m = lower(e.what());
      CHECK(contains(m, "shut down"));
      CHECK_FALSE(contains(m, "died"));
      CHECK_FALSE(contains(m, "unexpected"));
      MESSAGE("after a failure and a shutdown: ", std::string(e.what()));
    }
  }
  checkNoTrace(before);
}

TEST_CASE("generate() refuses out-of-range sampling with the API server's message, and the LLM goes on") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  {
    vsup::LLM llm(llmConfig(1));
    struct Bad {
      const char* what;
      void (*set)(vsup::Sampling&);
      const char* message;  // as workers/api_server/openai_test.cpp expects for the same value
    };
    const Bad cases[] = {
        {"max_tokens 0", [](vsup::Sampling& s) { s.maxTokens = 0; },
         "'max_tokens' must be an integer >= 1, got 0"},
        {"temperature 2.01", [](vsup::Sampling& s) { s.temperature = 2.01; },
         "'temperature' must be a number between 0 and 2, got 2.01"},
        {"temperature -0.1", [](vsup::Sampling& s) { s.temperature = -0.1; },
         "'temperature' must be a number between 0 and 2, got -0.1"},
        {"temperature NaN", [](vsup::Sampling& s) { s.temperature = std::nan(""); },
         "'temperature' must be a number between 0 and 2, got nan"},
        {"top_p 0", [](vsup::Sampling& s) { s.topP = 0; },
         "'top_p' must be a number greater than 0 and at most 1, got 0"},
        {"top_p 1.5", [](vsup::Sampling& s) { s.topP = 1.5; },
         "'top_p' must be a number greater than 0 and at most 1, got 1.5"},
        {"top_k -2", [](vsup::Sampling& s) { s.topK = -2; },
         "'top_k' must be an integer >= -1 (-1 or 0: off), got -2"},
        {"five stop strings", [](vsup::Sampling& s) { s.stop = {"a", "b", "c", "d", "e"}; },
         "'stop' must be a non-empty string or an array of at most 4 non-empty strings, got an "
         "array of 5 items"},
        {"an empty stop string", [](vsup::Sampling& s) { s.stop = {"x", ""}; },
         "'stop[1]' must be a non-empty string, got \"\""},
    };
    for (const Bad& c : cases) {
      CAPTURE(c.what);
      vsup::Sampling s = tokens(2);
      c.set(s);
      try {
        llm.generate({"bad"}, s);
        FAIL("generate() accepted it");
      } catch (const vsup::ShutDownError& e) {
        FAIL("a ShutDownError: " << e.what());
      } catch (const vsup::Error& e) {
        CHECK(std::string(e.what()) == std::string("vsup::LLM: ") + c.message);
      }
      CHECK_THROWS_AS(llm.generateStream("bad", s, [](std::string_view) {}), vsup::Error);
    }
    // The edges are accepted (top_k -1 is "off", as on the HTTP path).
    vsup::Sampling edges = tokens(2);
    edges.temperature = 0;
    edges.topK = -1;
    edges.stop = {"a", "b", "c", "d"};
    CHECK(llm.generate({"edges"}, edges).at(0).completionTokens >= 1);
  }
  checkNoTrace(before);
}

TEST_CASE("a SIGSTOPped engine-core makes generate() throw within the liveness bound") {
  HangGuard guard(120);
  HostSnapshot before = baseline();
  vsup::LLMConfig c = llmConfig(1, 1);
  c.livenessTimeout = 1000ms;
  auto llm = std::make_unique<vsup::LLM>(c);
  EndlessStream stream(*llm);
  REQUIRE(stream.waitFlowing());
  std::vector<pid_t> cores = descendantsMatching("__engine-core");
  REQUIRE(cores.size() == 1);
  std::vector<pid_t> orphans;
  for (const auto& p : descendantsOf(cores[0])) orphans.push_back(p.pid);
  auto stoppedAt = Clock::now();
  REQUIRE(::kill(cores[0], SIGSTOP) == 0);
  bool ended = stream.finished.wait_for(8s) == std::future_status::ready;
  if (!ended) ::kill(cores[0], SIGKILL);  // the test failed: end it without a hang
  CHECK_MESSAGE(ended, "generateStream() still running 8 s after engine-core was stopped "
                       "(liveness timeout 1 s)");
  stream.join(10s, "generateStream() after engine-core was SIGSTOPped");
  double took = std::chrono::duration<double>(stream.endedAt - stoppedAt).count();
  MESSAGE("the hung engine-core surfaced after ", took, " s as: ", stream.error);
  CHECK(stream.threw);
  CHECK_FALSE(stream.shutDownError);
  CHECK_MESSAGE(took < 4.0, "took " << took << " s (liveness timeout 1 s, interval 0.5 s)");
  CHECK_THROWS_AS(llm->generate({"after"}, tokens(1)), vsup::Error);
  llm.reset();
  std::string survivors;
  CHECK_MESSAGE(reapOrphans(orphans, 3s, &survivors),
                "engine-core's descendants outlived it by more than 3 s:" << survivors);
  checkNoTrace(before);
}
