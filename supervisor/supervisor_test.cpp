// In-process tests of Supervisor: the guarantees a host program relies on (library mode).
// Process-level behaviour of `vsup run` is covered by tests/integration.
#include "supervisor/supervisor.h"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <capnp/message.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/log.h"
#include "ipc/uv_kj.h"
#include "supervisor/node_codec.h"
#include "supervisor/output_collector.h"
#include "supervisor/public/supervisor.h"
#include "supervisor/topology.h"

namespace vsup::supervisor {
namespace {

// One uv loop + KJ on the current thread, torn down completely (every handle closed).
class TestLoop {
 public:
  TestLoop() {
    uv_loop_init(&loop_);
    kj_ = std::make_unique<ipc::KjOnUv>(&loop_);
  }
  ~TestLoop() {
    kj_.reset();
    uv_run(&loop_, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&loop_);
    CHECK_MESSAGE(rc == 0, "uv loop still had open handles at teardown");
  }
  uv_loop_t* loop() { return &loop_; }
  kj::WaitScope& ws() { return kj_->waitScope(); }

 private:
  uv_loop_t loop_;
  std::unique_ptr<ipc::KjOnUv> kj_;
};

ChildSpec worker(const std::string& name, std::vector<std::string> command) {
  ChildSpec c;
  c.name = name;
  c.command = std::move(command);
  return c;
}

std::set<std::string> openFds() {
  std::set<std::string> fds;
  DIR* d = ::opendir("/proc/self/fd");
  REQUIRE(d != nullptr);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') fds.insert(e->d_name);
  }
  ::closedir(d);
  return fds;
}

// Readlink of each fd, so a leak says what leaked.
std::string describeFds(const std::set<std::string>& fds) {
  std::string out;
  for (const auto& fd : fds) {
    char buf[256] = {};
    ssize_t n = ::readlink(("/proc/self/fd/" + fd).c_str(), buf, sizeof buf - 1);
    out += fd + "->" + (n > 0 ? std::string(buf, size_t(n)) : "?") + " ";
  }
  return out;
}

std::map<std::string, std::string> signalStatus() {
  std::map<std::string, std::string> out;
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    for (const char* key : {"SigBlk:", "SigIgn:", "SigCgt:"}) {
      if (line.rfind(key, 0) == 0) out[key] = line.substr(std::strlen(key));
    }
  }
  return out;
}

// sigaction for every signal: handler address, flags and mask, as text for a readable diff.
std::vector<std::string> sigactionTable() {
  std::vector<std::string> table;
  for (int sig = 1; sig < NSIG; ++sig) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    if (::sigaction(sig, nullptr, &sa) != 0) {
      table.push_back("EINVAL");
      continue;
    }
    std::ostringstream os;
    os << sig << ":" << reinterpret_cast<void*>(sa.sa_handler) << "/" << sa.sa_flags;
    table.push_back(os.str());
  }
  return table;
}

// No child of this process exists, exited or not.
bool noChildren() {
  siginfo_t info;
  std::memset(&info, 0, sizeof info);
  return ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT | __WALL) < 0 && errno == ECHILD;
}

// The test probe (tests/probe.cpp), built beside this test.
std::string probe() {
  const char* p = std::getenv("VSUP_TEST_PROBE");
  REQUIRE_MESSAGE(p != nullptr, "VSUP_TEST_PROBE is not set: run this test through meson test");
  return p;
}

// The vsup-aware test child (tests/integration/aware_probe.cpp), built beside this test.
std::string awareProbe() {
  const char* p = std::getenv("VSUP_TEST_AWARE_PROBE");
  REQUIRE_MESSAGE(p != nullptr, "VSUP_TEST_AWARE_PROBE is not set: run this test through meson test");
  return p;
}

std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A fresh path for one test's scratch file, removed by the destructor.
struct TempPath {
  std::string path;
  TempPath(const std::string& what) {
    const char* tmp = std::getenv("TMPDIR");
    path = std::string(tmp != nullptr && *tmp == '/' ? tmp : "/tmp") + "/vsup-test-" + what + "-" +
           std::to_string(::getpid());
    ::unlink(path.c_str());
  }
  ~TempPath() { ::unlink(path.c_str()); }
};

// start() is expected to fail: its error message ("" if it started after all).
std::string startError(Supervisor& sup, TestLoop& t) {
  try {
    sup.start().wait(t.ws());
  } catch (const kj::Exception& e) {
    return e.getDescription().cStr();
  }
  return "";
}

bool pidGone(pid_t pid) { return ::kill(pid, 0) < 0 && errno == ESRCH; }

std::atomic<int> hostSigchldCount{0};
void hostSigchld(int) { hostSigchldCount.fetch_add(1); }

std::atomic<int> stolen{0};
// A host that reaps every child it can see, as many daemons' SIGCHLD handlers do.
void greedyReaper(int) {
  int saved = errno;
  while (::waitpid(-1, nullptr, WNOHANG) > 0) stolen.fetch_add(1);
  errno = saved;
}

}  // namespace

}  // namespace vsup::supervisor

namespace doctest {
template <>
struct StringMaker<vsup::supervisor::Outcome> {
  static String convert(vsup::supervisor::Outcome o) { return vsup::supervisor::nameOf(o); }
};
template <>
struct StringMaker<vsup::supervisor::NodeState> {
  static String convert(vsup::supervisor::NodeState s) { return vsup::supervisor::nameOf(s); }
};
template <>
struct StringMaker<vsup::supervisor::NodeType> {
  static String convert(vsup::supervisor::NodeType t) { return vsup::supervisor::nameOf(t); }
};
}  // namespace doctest

namespace vsup::supervisor {

TEST_CASE("a supervisor started and shut down leaves the host's signal table, fds and children as they were") {
  vsup::setLogLevel("warn");
  // The host has its own SIGCHLD and SIGTERM handlers and an ignored SIGUSR1.
  struct sigaction mine;
  std::memset(&mine, 0, sizeof mine);
  mine.sa_handler = hostSigchld;
  struct sigaction oldChld, oldTerm, oldUsr1;
  REQUIRE(::sigaction(SIGCHLD, &mine, &oldChld) == 0);
  REQUIRE(::sigaction(SIGTERM, &mine, &oldTerm) == 0);
  struct sigaction ign;
  std::memset(&ign, 0, sizeof ign);
  ign.sa_handler = SIG_IGN;
  REQUIRE(::sigaction(SIGUSR1, &ign, &oldUsr1) == 0);

  // libuv creates a process-wide lock pipe with its first loop and keeps it: warm it up so
  // the comparison below sees only what vsup itself takes.
  { TestLoop warmUp; }
  auto tableBefore = sigactionTable();
  auto statusBefore = signalStatus();
  auto fdsBefore = openFds();
  {
    TestLoop t;
    SupervisorSpec spec;
    spec.name = "lib";
    spec.children.push_back(worker("a", {"sleep", "30"}));
    spec.children.push_back(worker("b", {"sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"}));
    Supervisor sup(t.loop(), spec);
    sup.start().wait(t.ws());
    auto status = sup.status().wait(t.ws());
    REQUIRE(status.children.size() == 2);
    CHECK(status.children[0].state == NodeState::Running);
    CHECK(status.children[1].pid > 0);
    sup.shutdown(deadlineAfterMs(5000)).wait(t.ws());
    CHECK(sup.outcome() == Outcome::Clean);
  }
  CHECK_MESSAGE(sigactionTable() == tableBefore, "a signal disposition changed");
  CHECK_MESSAGE(signalStatus() == statusBefore, "SigBlk/SigIgn/SigCgt changed");
  auto fdsAfter = openFds();
  CHECK_MESSAGE(fdsAfter == fdsBefore, "fds before: " << describeFds(fdsBefore)
                                                      << " after: " << describeFds(fdsAfter));
  CHECK_MESSAGE(noChildren(), "a child process or zombie is left");

  // The host's SIGCHLD handler still runs for the host's own children.
  int before = hostSigchldCount.load();
  pid_t own = ::fork();
  if (own == 0) ::_exit(0);
  REQUIRE(own > 0);
  int st = 0;
  REQUIRE(::waitpid(own, &st, 0) == own);
  CHECK(hostSigchldCount.load() > before);

  ::sigaction(SIGCHLD, &oldChld, nullptr);
  ::sigaction(SIGTERM, &oldTerm, nullptr);
  ::sigaction(SIGUSR1, &oldUsr1, nullptr);
}

TEST_CASE("two supervisors on two loops in two threads each see exactly their own children's exits") {
  vsup::setLogLevel("warn");
  // Each supervisor has a child that exits with its own code; with intensity 0 the first exit
  // makes the supervisor give up. Each must see its own child's exit, never the other's.
  auto run = [](int code, std::string* failure, Outcome* outcome, uint32_t* restarts) {
    TestLoop t;
    SupervisorSpec spec;
    spec.name = "s" + std::to_string(code);
    spec.intensity = 2;
    spec.periodMs = 60000;
    // Exits with `code` three times (intensity 2 → the third exit exceeds it).
    spec.children.push_back(worker("c", {"sh", "-c", "sleep 0.05; exit " + std::to_string(code)}));
    spec.children.push_back(worker("idle", {"sleep", "30"}));
    Supervisor sup(t.loop(), spec);
    sup.start().wait(t.ws());
    *outcome = sup.terminated().wait(t.ws());
    *failure = sup.failure();
    auto status = sup.status().wait(t.ws());
    *restarts = status.children[0].restarts;
  };
  std::string f1, f2;
  Outcome o1 = Outcome::Clean, o2 = Outcome::Clean;
  uint32_t r1 = 0, r2 = 0;
  std::thread t1(run, 3, &f1, &o1, &r1);
  std::thread t2(run, 4, &f2, &o2, &r2);
  t1.join();
  t2.join();
  CHECK(o1 == Outcome::IntensityExceeded);
  CHECK(o2 == Outcome::IntensityExceeded);
  // Exactly two restarts each: a stolen or duplicated exit would change the count.
  CHECK(r1 == 2);
  CHECK(r2 == 2);
  CHECK(noChildren());
}

TEST_CASE("destroying a running supervisor kills and reaps every child synchronously") {
  vsup::setLogLevel("off");
  pid_t a = 0, b = 0;
  {
    TestLoop t;
    SupervisorSpec spec;
    spec.name = "backstop";
    spec.children.push_back(worker("a", {"sleep", "30"}));
    spec.children.push_back(worker("b", {"sh", "-c", "trap '' TERM; sleep 30 & wait"}));
    {
      Supervisor sup(t.loop(), spec);
      sup.start().wait(t.ws());
      auto status = sup.status().wait(t.ws());
      a = status.children[0].pid;
      b = status.children[1].pid;
      REQUIRE(a > 0);
      REQUIRE(b > 0);
    }
    CHECK(pidGone(a));
    CHECK(pidGone(b));
  }
  CHECK(noChildren());
}

TEST_CASE("a start failure stops the children already started, in reverse order, and names the child") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "sf";
  spec.children.push_back(worker("first", {"sleep", "30"}));
  ChildSpec never = worker("never-ready", {"sleep", "30"});
  never.ready = Readiness::Notify;
  never.startTimeoutMs = 100;
  spec.children.push_back(never);
  spec.children.push_back(worker("third", {"sleep", "30"}));
  Supervisor sup(t.loop(), spec);
  std::string error = startError(sup, t);
  CHECK(error.find("never-ready") != std::string::npos);
  CHECK(error.find("start_timeout") != std::string::npos);
  CHECK(sup.terminated().wait(t.ws()) == Outcome::StartFailed);
  auto status = sup.status().wait(t.ws());
  for (const auto& c : status.children) CHECK(c.pid == 0);
  CHECK(noChildren());
}

TEST_CASE("a command that cannot be found is a start failure with a clear message") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "nf";
  spec.children.push_back(worker("ok", {"sleep", "30"}));
  spec.children.push_back(worker("missing", {"vsup-no-such-program-xyz"}));
  Supervisor sup(t.loop(), spec);
  std::string error = startError(sup, t);
  CHECK(error.find("missing") != std::string::npos);
  CHECK(error.find("not found in PATH") != std::string::npos);
  CHECK(sup.terminated().wait(t.ws()) == Outcome::StartFailed);
  CHECK(noChildren());
}

TEST_CASE("shutdown is idempotent and a second call with an earlier deadline shortens it") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "idem";
  // Ready only once it ignores SIGTERM: no race between its set-up and our stop request.
  ChildSpec stubborn = worker("stubborn", {probe(), "--ignore-term", "--ready-after", "0"});
  stubborn.ready = Readiness::Notify;
  stubborn.shutdown = ShutdownPolicy::timeout(20000);
  spec.children.push_back(stubborn);
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  MonoNs began = monoNow();
  auto first = sup.shutdown(kNoDeadline);
  auto second = sup.shutdown(deadlineAfterMs(300));
  second.wait(t.ws());
  first.wait(t.ws());
  int64_t tookMs = (monoNow() - began) / kNsPerMs;
  CHECK(tookMs < 5000);  // not the 20 s of its own policy
  CHECK(sup.outcome() == Outcome::Escalated);
  CHECK(sup.escalations() == 1);
  sup.shutdown(kNoDeadline).wait(t.ws());  // after termination: resolves at once
  CHECK(noChildren());
}

TEST_CASE("a vsup::Supervisor on the host's loop runs when the host runs it and leaves no handle") {
  uv_loop_t loop;
  uv_loop_init(&loop);
  pid_t child = 0;
  bool shutDown = false;
  {
    SupervisorSpec spec;
    spec.name = "hosted";
    spec.children.push_back(worker("a", {"sleep", "30"}));
    vsup::Supervisor::Options options;
    options.logLevel = "off";
    vsup::Supervisor sup(&loop, spec, options);
    sup.start();  // blocking: drives the host's loop while it waits
    child = sup.status().children.at(0).pid;
    REQUIRE(child > 0);
    // From inside a libuv callback, only the asynchronous form may be used.
    uv_timer_t timer;
    uv_timer_init(&loop, &timer);
    struct Ctx {
      vsup::Supervisor* sup;
      bool* done;
    } ctx{&sup, &shutDown};
    timer.data = &ctx;
    uv_timer_start(
        &timer,
        [](uv_timer_t* t) {
          auto* c = static_cast<Ctx*>(t->data);
          c->sup->shutdownAsync(std::chrono::seconds(5), [c](std::exception_ptr error) {
            *c->done = error == nullptr;
          });
          uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr);
        },
        10, 0);
    uv_run(&loop, UV_RUN_DEFAULT);  // returns once the tree is gone: vsup holds no handle open
    CHECK(shutDown);
    CHECK(sup.terminated());
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0);
  CHECK(pidGone(child));
  CHECK(noChildren());
}

TEST_CASE("a host that reaps with waitpid(-1) still gets a working supervisor and a lost exit is reported") {
  struct sigaction greedy, old;
  std::memset(&greedy, 0, sizeof greedy);
  greedy.sa_handler = greedyReaper;
  greedy.sa_flags = SA_RESTART;
  REQUIRE(::sigaction(SIGCHLD, &greedy, &old) == 0);
  {
    SupervisorSpec spec;
    spec.name = "greedy";
    spec.children.push_back(worker("a", {"sleep", "30"}));
    spec.children.push_back(worker("b", {"sleep", "30"}));
    vsup::Supervisor::Options options;
    options.logLevel = "off";
    vsup::Supervisor sup(spec, options);
    sup.start();
    auto began = std::chrono::steady_clock::now();
    // The host steals the exits; vsup sees each pidfd turn readable and a lost status, and
    // carries on: the shutdown completes, it does not hang.
    sup.shutdown(std::chrono::seconds(5));
    CHECK(std::chrono::steady_clock::now() - began < std::chrono::seconds(4));
    CHECK(sup.terminated());
  }
  CHECK(stolen.load() >= 1);
  CHECK(noChildren());
  ::sigaction(SIGCHLD, &old, nullptr);
}

TEST_CASE("vsup::Supervisor adds a child and stops one without restarting it") {
  SupervisorSpec spec;
  spec.name = "dyn";
  spec.intensity = 5;
  spec.children.push_back(worker("a", {"sleep", "30"}));
  vsup::Supervisor::Options options;
  options.logLevel = "off";
  vsup::Supervisor sup(spec, options);
  sup.start();
  sup.addChild(worker("b", {"sleep", "30"}));
  auto status = sup.status();
  REQUIRE(status.children.size() == 2);
  pid_t a = status.children[0].pid;
  CHECK(status.children[1].state == NodeState::Running);
  sup.stopChild("a");
  status = sup.status();
  CHECK(status.children[0].state == NodeState::Stopped);
  CHECK(status.children[0].pid == 0);
  CHECK(pidGone(a));
  CHECK_THROWS_AS(sup.addChild(worker("b", {"sleep", "1"})), vsup::Error);  // duplicate name
  CHECK_THROWS_AS(sup.stopChild("nope"), vsup::Error);
  CHECK(sup.shutdown(std::chrono::seconds(5)));
  CHECK(noChildren());
}

TEST_CASE("node states and types are named with the words `vsup tree` prints") {
  CHECK(std::string(nameOf(NodeType::Worker)) == "worker");
  CHECK(std::string(nameOf(NodeType::Supervisor)) == "supervisor");
  const std::pair<NodeState, const char*> names[] = {
      {NodeState::Starting, "starting"}, {NodeState::Running, "running"},
      {NodeState::Stopping, "stopping"}, {NodeState::Stopped, "stopped"},
      {NodeState::Restarting, "restarting"}, {NodeState::Unresponsive, "unresponsive"},
      {NodeState::Failed, "failed"}};
  for (auto [state, name] : names) CHECK(std::string(nameOf(state)) == name);
  CHECK(std::string(nameOf(static_cast<NodeState>(99))) == "?");
}

TEST_CASE("node_codec carries states, types and start configurations unchanged") {
  NodeStatus root{"root", 1, NodeType::Supervisor, NodeState::Stopping, 5, 0, {}, -1, {}, -1, false, {}};
  for (NodeState st : {NodeState::Starting, NodeState::Running, NodeState::Stopping,
                       NodeState::Stopped, NodeState::Restarting, NodeState::Unresponsive,
                       NodeState::Failed}) {
    root.children.push_back({"c", 2, NodeType::Worker, st, 0, 0, {}, -1, {}, -1, false, {}});
  }
  // An API server's request counts and rotation flag.
  root.children.push_back({"api", 3, NodeType::Worker, NodeState::Running, 0, 0, {}, 4, {}, 1234,
                           true, "leases 1 held"});
  capnp::MallocMessageBuilder m;
  encode(root, m.initRoot<ipc::schema::NodeStatus>());
  NodeStatus back = decode(m.getRoot<ipc::schema::NodeStatus>().asReader());
  CHECK(back.type == NodeType::Supervisor);
  CHECK(back.state == NodeState::Stopping);
  REQUIRE(back.children.size() == root.children.size());
  for (size_t i = 0; i < root.children.size(); ++i) {
    CHECK(back.children[i].type == NodeType::Worker);
    CHECK(back.children[i].state == root.children[i].state);
    CHECK(back.children[i].inFlight == root.children[i].inFlight);
    CHECK(back.children[i].requestsTotal == root.children[i].requestsTotal);
    CHECK(back.children[i].outOfRotation == root.children[i].outOfRotation);
    CHECK(back.children[i].detail == root.children[i].detail);
  }
  CHECK(back.requestsTotal == -1);
  CHECK_FALSE(back.outOfRotation);
  CHECK(back.children.back().requestsTotal == 1234);
  CHECK(back.children.back().outOfRotation);

  // A sub-supervisor's spec carries its children's start configurations.
  SupervisorSpec spec;
  ChildSpec leaf = worker("leaf", {"x"});
  leaf.vsupAware = true;
  leaf.startConfig = std::string("a\0b", 3) + std::string(70000, '\xff');
  leaf.startConcurrently = true;
  spec.children.push_back(leaf);
  spec.children.push_back(worker("plain", {"y"}));
  capnp::MallocMessageBuilder m2;
  encode(spec, m2.initRoot<ipc::schema::SupervisorSpec>());
  SupervisorSpec specBack = decode(m2.getRoot<ipc::schema::SupervisorSpec>().asReader());
  REQUIRE(specBack.children.size() == 2);
  CHECK(specBack.children[0].startConfig == leaf.startConfig);
  CHECK(specBack.children[1].startConfig.empty());
  // ...and which of them start concurrently.
  CHECK(specBack.children[0].startConcurrently);
  CHECK_FALSE(specBack.children[1].startConcurrently);
}

TEST_CASE("a vsup-aware child receives its start configuration byte for byte, on every start") {
  vsup::setLogLevel("off");
  TestLoop t;
  TempPath out("start-config");
  TempPath bareOut("start-config-none");
  // A NUL byte, every byte value, and more than 64 KiB (more than one capnp segment's default).
  std::string config("\0config\0", 8);
  for (int i = 0; i < 256; ++i) config.push_back(char(i));
  for (size_t i = 0; config.size() < 200 * 1024; ++i) config.push_back(char((i * 131) ^ (i >> 8)));
  SupervisorSpec spec;
  spec.name = "cfg";
  spec.intensity = 5;
  ChildSpec aware = worker("aware", {awareProbe(), "--start-config-out", out.path});
  aware.vsupAware = true;
  aware.startConfig = config;
  spec.children.push_back(aware);
  ChildSpec bare = worker("bare", {awareProbe(), "--start-config-out", bareOut.path});
  bare.vsupAware = true;
  spec.children.push_back(bare);
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  std::string got = readFile(out.path);
  CHECK(got.size() == config.size());
  CHECK(got == config);
  struct stat st{};
  CHECK(::stat(bareOut.path.c_str(), &st) == 0);  // written, and empty: it was sent none
  CHECK(st.st_size == 0);

  // A restarted child gets the same bytes again.
  auto status = sup.status().wait(t.ws());
  REQUIRE(status.children.size() == 2);
  CHECK(status.children[0].state == NodeState::Running);
  pid_t first = status.children[0].pid;
  REQUIRE(first > 0);
  ::unlink(out.path.c_str());
  ::kill(first, SIGKILL);
  for (int i = 0; i < 500; ++i) {
    ipc::uvSleep(t.loop(), 10).wait(t.ws());
    auto s = sup.status().wait(t.ws());
    if (s.children[0].state == NodeState::Running && s.children[0].pid != first) break;
  }
  CHECK(readFile(out.path) == config);
  sup.shutdown(deadlineAfterMs(5000)).wait(t.ws());
  CHECK(sup.outcome() == Outcome::Clean);
  CHECK(noChildren());
}

TEST_CASE("every running vsup-aware child receives leaveRotation from its parent; a slow one is skipped") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "lb";
  ChildSpec first = worker("first", {awareProbe(), "--rotation"});
  first.vsupAware = true;
  ChildSpec slow = worker("slow", {awareProbe(), "--rotation", "--leave-rotation-ms", "30000"});
  slow.vsupAware = true;
  ChildSpec plain = worker("plain", {"sleep", "30"});  // generic: not asked
  ChildSpec second = worker("second", {awareProbe(), "--rotation"});
  second.vsupAware = true;
  spec.children = {first, slow, plain, second};
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());

  auto before = sup.status().wait(t.ws());
  REQUIRE(before.children.size() == 4);
  for (const auto& c : before.children) CHECK_FALSE(c.outOfRotation);
  CHECK(before.children[0].requestsTotal == 0);  // the probe reports its count...
  CHECK(before.children[2].requestsTotal == -1);  // ...a generic child has none

  MonoNs began = monoNow();
  sup.leaveRotationChildren().wait(t.ws());
  double tookS = double(monoNow() - began) / 1e9;
  // Bounded: the slow child (30 s) does not hold the call up past about a second.
  CHECK(tookS >= 0.9);
  CHECK(tookS < 5.0);

  auto after = sup.status().wait(t.ws());
  REQUIRE(after.children.size() == 4);
  CHECK(after.children[0].outOfRotation);
  CHECK_FALSE(after.children[1].outOfRotation);  // still sleeping on it
  CHECK_FALSE(after.children[2].outOfRotation);
  CHECK(after.children[3].outOfRotation);
  for (const auto& c : after.children) CHECK(c.state == NodeState::Running);

  // Idempotent: a second call answers as well.
  sup.leaveRotationChildren().wait(t.ws());
  CHECK(sup.status().wait(t.ws()).children[0].outOfRotation);

  sup.shutdown(deadlineAfterMs(10000)).wait(t.ws());
  CHECK(sup.outcome() == Outcome::Clean);
  CHECK(noChildren());
}

TEST_CASE("leaveRotation with no vsup-aware child resolves at once") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "plain";
  spec.children = {worker("a", {"sleep", "30"})};
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  MonoNs began = monoNow();
  sup.leaveRotationChildren().wait(t.ws());
  CHECK(monoNow() - began < 500 * kNsPerMs);
  sup.shutdown(deadlineAfterMs(5000)).wait(t.ws());
  CHECK(noChildren());
}

// Feeds `input` through an OutputCollector (child "child", pid 4242) and returns what it wrote.
std::string collect(TestLoop& t, const std::string& input) {
  int in[2];
  int out[2];
  REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(::write(in[1], input.data(), input.size()) == ssize_t(input.size()));
  ::close(in[1]);
  bool eof = false;
  {
    OutputCollector collector(t.loop(), OwnFd(in[0]), out[1], "child", 4242, [&]() { eof = true; });
    for (int i = 0; i < 500 && !eof; ++i) ipc::uvSleep(t.loop(), 10).wait(t.ws());
  }
  CHECK(eof);
  ::close(out[1]);
  std::string written;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) written.append(buf, size_t(n));
  ::close(out[0]);
  return written;
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST_CASE("in the json log format every collected line is one JSON object; other lines are wrapped") {
  TestLoop t;
  const std::string already = R"({"time":"x","level":"info","process":"deeper","pid":7,"message":"m"})";
  const std::string input = "plain words\n" + already + "\nbad \xff bytes\n{not json\nno newline";
  vsup::setLogFormat("json");
  std::string written = collect(t, input);
  vsup::setLogFormat("text");
  auto got = lines(written);
  REQUIRE(got.size() == 5);
  CHECK(got[1] == already);  // a vsup process's JSON line passes unchanged
  const char* messages[] = {"plain words", nullptr, "bad \xef\xbf\xbd bytes", "{not json", "no newline"};
  for (size_t i : {0, 2, 3, 4}) {
    CAPTURE(got[i]);
    auto j = nlohmann::json::parse(got[i]);  // throws (fails the test) when not JSON
    REQUIRE(j.is_object());
    CHECK(j["message"] == messages[i]);
    CHECK(j["process"] == "child");
    CHECK(j["pid"] == 4242);
    CHECK(j["stream"] == "stdout");
    CHECK(j["level"] == "info");
    CHECK(j["time"].get<std::string>().size() == std::string("2026-01-02T12:00:01.234Z").size());
  }

  // The text format prefixes the same lines instead.
  auto text = lines(collect(t, "plain words\n" + already + "\n"));
  REQUIRE(text.size() == 2);
  CHECK(text[0] == "(child pid=4242) plain words");
  CHECK(text[1] == "(child pid=4242) " + already);
}

TEST_CASE("a supervisor hands its log format to every child") {
  vsup::setLogLevel("off");
  TestLoop t;
  TempPath out("log-format");
  SupervisorSpec spec;
  spec.name = "fmt";
  spec.children = {worker("env", {"/bin/sh", "-c", "printf %s \"$VSUP_LOG_FORMAT\" > " + out.path})};
  spec.children[0].restart = Restart::Temporary;
  vsup::setLogFormat("json");
  {
    Supervisor sup(t.loop(), spec);
    sup.start().wait(t.ws());
    for (int i = 0; i < 500 && readFile(out.path).empty(); ++i) ipc::uvSleep(t.loop(), 10).wait(t.ws());
    sup.shutdown(deadlineAfterMs(5000)).wait(t.ws());
  }
  vsup::setLogFormat("text");
  CHECK(readFile(out.path) == "json");
  CHECK(noChildren());
}

// Runs the loop until `ready()` holds or `timeoutMs` passed; true when it holds.
template <typename Pred>
bool waitUntil(TestLoop& t, Pred ready, int64_t timeoutMs) {
  MonoNs until = deadlineAfterMs(timeoutMs);
  while (!ready()) {
    if (monoNow() >= until) return false;
    ipc::uvSleep(t.loop(), 5).wait(t.ws());
  }
  return true;
}

ChildSpec pinged(const std::string& name, int64_t timeoutMs, int64_t intervalMs) {
  ChildSpec c = worker(name, {awareProbe()});
  c.vsupAware = true;
  c.livenessTimeoutMs = timeoutMs;
  c.livenessIntervalMs = intervalMs;
  return c;
}

TEST_CASE("a vsup-aware child that stops answering liveness pings is killed within interval + timeout and restarted, then intensity stops the tree") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "live";
  spec.intensity = 1;
  spec.periodMs = 60000;
  constexpr int64_t kTimeoutMs = 300;
  constexpr int64_t kIntervalMs = 200;
  spec.children.push_back(pinged("hangs", kTimeoutMs, kIntervalMs));
  spec.children.push_back(pinged("healthy", kTimeoutMs, kIntervalMs));
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  auto status = sup.status().wait(t.ws());
  pid_t first = status.children[0].pid;
  pid_t healthy = status.children[1].pid;
  REQUIRE(first > 0);

  // Answering children are left alone for many intervals.
  ipc::uvSleep(t.loop(), uint64_t(3 * (kTimeoutMs + kIntervalMs))).wait(t.ws());
  status = sup.status().wait(t.ws());
  CHECK(status.children[0].pid == first);
  CHECK(status.children[0].restarts == 0);

  // Hung: killed and restarted (permanent) within interval + timeout (+ scheduling slack).
  REQUIRE(::kill(first, SIGSTOP) == 0);
  MonoNs hungAt = monoNow();
  pid_t second = 0;
  bool restarted = waitUntil(t, [&]() {
    auto s = sup.status().wait(t.ws());
    if (s.children[0].pid != first && s.children[0].state == NodeState::Running) {
      second = s.children[0].pid;
      return true;
    }
    return false;
  }, 5000);
  int64_t tookMs = (monoNow() - hungAt) / kNsPerMs;
  REQUIRE(restarted);
  MESSAGE("hung child detected, killed and restarted in " << tookMs << " ms");
  CHECK(tookMs <= kIntervalMs + kTimeoutMs + 100 + 400);  // + the grace, + scheduling slack
  CHECK(pidGone(first));
  status = sup.status().wait(t.ws());
  CHECK(status.children[0].restarts == 1);
  CHECK(status.children[1].pid == healthy);  // one_for_one: the other one is untouched

  // Hung again: a second restart within the period exceeds intensity 1: the tree stops.
  REQUIRE(::kill(second, SIGSTOP) == 0);
  auto outcome = sup.terminated().wait(t.ws());
  CHECK(outcome == Outcome::IntensityExceeded);
  CHECK(sup.failure().find("intensity exceeded") != std::string::npos);
  CHECK(pidGone(second));
  CHECK(pidGone(healthy));
  CHECK(noChildren());
}

TEST_CASE("a child whose liveness pings are off is not killed when it hangs") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "nolive";
  ChildSpec c = pinged("quiet", -1, 50);
  c.shutdown = ShutdownPolicy::timeout(200);
  spec.children.push_back(c);
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  pid_t pid = sup.status().wait(t.ws()).children[0].pid;
  REQUIRE(::kill(pid, SIGSTOP) == 0);
  // Twenty intervals and more: with pings, it would have been killed long ago.
  ipc::uvSleep(t.loop(), 1000).wait(t.ws());
  CHECK(!pidGone(pid));
  auto status = sup.status(200).wait(t.ws());
  CHECK(status.children[0].pid == pid);
  CHECK(status.children[0].state == NodeState::Unresponsive);  // its status request timed out
  CHECK(status.children[0].restarts == 0);
  sup.shutdown(deadlineAfterMs(2000)).wait(t.ws());
  CHECK(sup.outcome() == Outcome::Escalated);  // killed at its stop deadline, not before
  CHECK(noChildren());
}

TEST_CASE("a status request answers within its budget and names the hung child") {
  vsup::setLogLevel("off");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "budget";
  ChildSpec hung = pinged("hung", -1, 1000);
  hung.shutdown = ShutdownPolicy::brutalKill();
  spec.children.push_back(hung);
  ChildSpec fine = pinged("fine", -1, 1000);
  spec.children.push_back(fine);
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  pid_t pid = sup.status().wait(t.ws()).children[0].pid;
  REQUIRE(::kill(pid, SIGSTOP) == 0);
  MonoNs began = monoNow();
  auto status = sup.status(300).wait(t.ws());
  int64_t tookMs = (monoNow() - began) / kNsPerMs;
  CHECK(tookMs >= 290);
  CHECK(tookMs < 300 + 200);
  CHECK(status.children[0].state == NodeState::Unresponsive);
  CHECK(status.children[1].state == NodeState::Running);
  // The child's own share of the budget is less than ours (its children time out first).
  CHECK(statusBudgetForChildren(1000) == 750);
  CHECK(statusBudgetForChildren(1) == 1);
  sup.shutdown(deadlineAfterMs(2000)).wait(t.ws());
  CHECK(noChildren());
}

TEST_CASE("liveness settings are validated, naming the child and the field") {
  auto error = [](int64_t timeoutMs, int64_t intervalMs, bool aware) {
    SupervisorSpec spec;
    spec.name = "v";
    ChildSpec c = worker("w", {"sleep", "1"});
    c.vsupAware = aware;
    c.livenessTimeoutMs = timeoutMs;
    c.livenessIntervalMs = intervalMs;
    spec.children.push_back(c);
    try {
      validate(spec, "spec");
    } catch (const vsup::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(error(-1, 1000, false) == "");
  CHECK(error(500, 100, true) == "");
  std::string zero = error(0, 1000, true);
  CHECK(zero.find("child 'v/w'") != std::string::npos);
  CHECK(zero.find("liveness_timeout") != std::string::npos);
  CHECK(error(-5, 1000, true).find("liveness_timeout") != std::string::npos);
  CHECK(error(500, 0, true).find("liveness_interval") != std::string::npos);
  CHECK(error(-1, -3, true).find("liveness_interval") != std::string::npos);
  CHECK(error(500, 100, false).find("vsup-aware") != std::string::npos);
}

TEST_CASE("vsup::Supervisor follows OTP: a failed addChild adds nothing; restartChild and deleteChild") {
  SupervisorSpec spec;
  spec.name = "otp";
  spec.intensity = 5;
  spec.children.push_back(worker("a", {"sleep", "30"}));
  vsup::Supervisor::Options options;
  options.logLevel = "off";
  vsup::Supervisor sup(spec, options);
  sup.start();

  // A child that fails to start is not added: the tree is as before, the name is free.
  CHECK_THROWS_WITH_AS(sup.addChild(worker("b", {"/nonexistent/vsup-test-command"})),
                       doctest::Contains("'b'"), vsup::Error);
  CHECK(sup.status().children.size() == 1);
  sup.addChild(worker("b", {"sleep", "30"}));
  auto status = sup.status();
  REQUIRE(status.children.size() == 2);
  CHECK(status.children[1].name == "b");
  CHECK(status.children[1].state == NodeState::Running);

  // restartChild: only a stopped child.
  pid_t a = status.children[0].pid;
  CHECK_THROWS_WITH_AS(sup.restartChild("a"), doctest::Contains("running"), vsup::Error);
  CHECK_THROWS_WITH_AS(sup.restartChild("nope"), doctest::Contains("no child 'nope'"),
                       vsup::Error);
  sup.stopChild("a");
  CHECK(pidGone(a));
  sup.restartChild("a");
  status = sup.status();
  CHECK(status.children[0].state == NodeState::Running);
  CHECK(status.children[0].pid != a);
  CHECK(status.children[0].pid > 0);

  // A temporary child is never restarted.
  ChildSpec once = worker("once", {"sleep", "30"});
  once.restart = Restart::Temporary;
  sup.addChild(once);
  sup.stopChild("once");
  CHECK_THROWS_WITH_AS(sup.restartChild("once"), doctest::Contains("temporary"), vsup::Error);

  // deleteChild: only a stopped child; then its name can be added again.
  CHECK_THROWS_WITH_AS(sup.deleteChild("b"), doctest::Contains("only a stopped child"),
                       vsup::Error);
  sup.stopChild("b");
  sup.deleteChild("b");
  status = sup.status();
  REQUIRE(status.children.size() == 2);
  CHECK(status.children[0].name == "a");
  CHECK(status.children[1].name == "once");
  CHECK_THROWS_WITH_AS(sup.deleteChild("b"), doctest::Contains("no child 'b'"), vsup::Error);
  sup.addChild(worker("b", {"sleep", "30"}));
  CHECK(sup.status().children.size() == 3);

  CHECK(sup.shutdown(std::chrono::seconds(5)));
  CHECK(sup.terminated());
  // Every call on a terminated tree fails, saying so.
  for (auto& call : std::vector<std::function<void()>>{
           [&]() { sup.start(); },
           [&]() { sup.addChild(worker("c", {"sleep", "1"})); },
           [&]() { sup.stopChild("a"); },
           [&]() { sup.restartChild("a"); },
           [&]() { sup.deleteChild("a"); },
       }) {
    CHECK_THROWS_WITH_AS(call(), doctest::Contains("has terminated"), vsup::Error);
  }
  CHECK(noChildren());
}

}  // namespace vsup::supervisor

namespace vsup::supervisor {
namespace {

// The probe's event log ("<ns> <name> <event> <pid>" lines): when `name` logged `event`
// (0: never).
int64_t eventAt(const std::string& log, const std::string& name, const std::string& event) {
  std::istringstream in(log);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    int64_t ns = 0;
    std::string who, what;
    fields >> ns >> who >> what;
    if (who == name && what == event) return ns;
  }
  return 0;
}

ChildSpec notifyProbe(const std::string& name, const std::string& log,
                      std::vector<std::string> extra) {
  ChildSpec c = worker(name, {probe(), "--name", name, "--log", log});
  c.command.insert(c.command.end(), extra.begin(), extra.end());
  c.ready = Readiness::Notify;
  return c;
}

}  // namespace

TEST_CASE("start_concurrently: the next child starts before this one is ready; the start ends "
          "when all are ready; the stop order is the reverse of the spec order") {
  vsup::setLogLevel("off");
  TempPath log("concurrent");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "cs";
  ChildSpec slow = notifyProbe("slow", log.path, {"--ready-after", "400"});
  slow.startConcurrently = true;
  spec.children.push_back(slow);
  spec.children.push_back(notifyProbe("fast", log.path, {"--ready-after", "0"}));
  spec.children.push_back(notifyProbe("plain", log.path, {"--ready-after", "0"}));
  Supervisor sup(t.loop(), spec);
  sup.start().wait(t.ws());
  MonoNs startedAt = monoNow();
  std::string events = readFile(log.path);
  int64_t slowReady = eventAt(events, "slow", "ready");
  int64_t fastStart = eventAt(events, "fast", "start");
  int64_t plainStart = eventAt(events, "plain", "start");
  REQUIRE(slowReady != 0);
  REQUIRE(fastStart != 0);
  REQUIRE(plainStart != 0);
  CHECK_MESSAGE(fastStart < slowReady, events);   // not held back by slow's readiness
  CHECK_MESSAGE(plainStart < slowReady, events);  // nor is the one after it
  CHECK(eventAt(events, "fast", "ready") < plainStart);  // fast is serial: plain waited for it
  CHECK(startedAt >= eventAt(events, "plain", "ready"));
  CHECK(startedAt >= slowReady);  // start() waited for every child, slow included
  auto status = sup.status().wait(t.ws());
  REQUIRE(status.children.size() == 3);
  for (const auto& c : status.children) CHECK(c.state == NodeState::Running);
  sup.shutdown(kNoDeadline).wait(t.ws());
  CHECK(sup.outcome() == Outcome::Clean);
  events = readFile(log.path);
  int64_t plainExit = eventAt(events, "plain", "exit");
  int64_t fastTerm = eventAt(events, "fast", "term");
  int64_t fastExit = eventAt(events, "fast", "exit");
  int64_t slowTerm = eventAt(events, "slow", "term");
  REQUIRE(plainExit != 0);
  REQUIRE(fastExit != 0);
  REQUIRE(slowTerm != 0);
  // Reverse spec order, one at a time.
  CHECK_MESSAGE(plainExit < fastTerm, events);
  CHECK_MESSAGE(fastExit < slowTerm, events);
  CHECK(noChildren());
}

TEST_CASE("start_concurrently: a concurrently started child that dies before it is ready fails "
          "the start at once, naming it, and nothing is left running") {
  vsup::setLogLevel("off");
  TempPath log("concurrent-dies");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "cd";
  ChildSpec dies = notifyProbe("dies", log.path, {"--exit-after", "150", "--exit-code", "7"});
  dies.startConcurrently = true;
  spec.children.push_back(dies);
  // Never ready: a serial start would wait here for its whole start timeout.
  ChildSpec waiting = notifyProbe("waiting", log.path, {});
  waiting.startTimeoutMs = 60000;
  spec.children.push_back(waiting);
  Supervisor sup(t.loop(), spec);
  MonoNs t0 = monoNow();
  std::string error = startError(sup, t);
  CHECK_MESSAGE(error.find("'dies'") != std::string::npos, error);
  CHECK_MESSAGE(error.find("exited before it was ready (code 7)") != std::string::npos, error);
  CHECK(monoNow() - t0 < 10000 * kNsPerMs);  // at once, not at waiting's start timeout
  CHECK(sup.terminated().wait(t.ws()) == Outcome::StartFailed);
  // waiting had been started (while dies was starting) and was stopped by the failure.
  std::string events = readFile(log.path);
  CHECK_MESSAGE(eventAt(events, "waiting", "start") != 0, events);
  CHECK_MESSAGE(eventAt(events, "waiting", "term") != 0, events);
  CHECK(noChildren());
}

TEST_CASE("start_concurrently: a concurrently started child that misses its start timeout fails "
          "the start, naming it and start_timeout") {
  vsup::setLogLevel("off");
  TempPath log("concurrent-late");
  TestLoop t;
  SupervisorSpec spec;
  spec.name = "cl";
  ChildSpec late = notifyProbe("late", log.path, {});
  late.startConcurrently = true;
  late.startTimeoutMs = 200;
  spec.children.push_back(late);
  spec.children.push_back(notifyProbe("after", log.path, {"--ready-after", "0"}));
  Supervisor sup(t.loop(), spec);
  std::string error = startError(sup, t);
  CHECK_MESSAGE(error.find("'late' did not become ready within 200ms (start_timeout)") !=
                    std::string::npos,
                error);
  CHECK(sup.terminated().wait(t.ws()) == Outcome::StartFailed);
  CHECK(noChildren());
}

TEST_CASE("start_concurrently is validated: a child with no readiness is refused naming the "
          "child and the field, at any depth") {
  auto error = [](bool notify, bool nested) {
    SupervisorSpec spec;
    spec.name = "v";
    ChildSpec c = worker("w", {"sleep", "1"});
    c.startConcurrently = true;
    if (notify) c.ready = Readiness::Notify;
    if (nested) {
      ChildSpec sub;
      sub.name = "sub";
      sub.type = ChildType::Supervisor;
      sub.supervisor.emplace();
      sub.supervisor->name = "sub";
      sub.supervisor->children.push_back(c);
      spec.children.push_back(sub);
    } else {
      spec.children.push_back(c);
    }
    try {
      validate(spec, "spec");
    } catch (const vsup::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(error(true, false) == "");
  std::string plain = error(false, false);
  CHECK(plain.find("child 'v/w'") != std::string::npos);
  CHECK(plain.find("field 'start_concurrently'") != std::string::npos);
  CHECK(plain.find("no readiness") != std::string::npos);
  CHECK(error(true, true) == "");  // below the root too: its node gets the field
  std::string nested = error(false, true);
  CHECK(nested.find("child 'v/sub/w'") != std::string::npos);
  CHECK(nested.find("no readiness") != std::string::npos);
}

TEST_CASE("start_concurrently in a topology file") {
  SupervisorSpec spec = parseTopology(R"(
name = "t"
[[children]]
name = "a"
command = ["sleep", "1"]
ready = "notify"
start_concurrently = true
[[children]]
name = "b"
command = ["sleep", "1"]
)",
                                      "t.toml");
  REQUIRE(spec.children.size() == 2);
  CHECK(spec.children[0].startConcurrently);
  CHECK_FALSE(spec.children[1].startConcurrently);
  std::string error;
  try {
    parseTopology("[[children]]\nname = \"a\"\ncommand = [\"x\"]\nstart_concurrently = 1\n",
                  "t.toml");
  } catch (const vsup::Error& e) {
    error = e.what();
  }
  CHECK(error.find("start_concurrently") != std::string::npos);
}

}  // namespace vsup::supervisor
