// vsup-probe: a scriptable child process for vsup's integration tests.
//
// It behaves like a small daemon whose every behaviour the tests choose by flag (exit after a
// delay, crash, ignore SIGTERM, take time to stop, speak systemd's notify protocol, fork
// grandchildren) and logs each event it sees, with a CLOCK_MONOTONIC timestamp, to a file that
// several probes share. The tests then read the order and timing of events from that file.
//
// Log line format (one write() per line, O_APPEND, so lines from several probes never interleave):
//     <CLOCK_MONOTONIC ns> <name> <event> <pid> [extra]
// Events: start, ready, term, exit <code>, grandchild <gpid>, fds <a,b,c>, sigign <hex>,
// sigblk <hex>, pgid <pgid>, notify_socket <value or "-">, extend <usec>, crash,
// notify_failed (a READY/EXTEND datagram could not be sent; why goes to stderr).
//
// The probe depends on libc and the STL only (it must not share code with what it tests).
// Single-threaded: a SIGTERM handler only writes to a self-pipe; one poll() loop does the rest,
// with its timeout computed from the nearest pending deadline (no busy waiting).

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

using Nanos = long long;

struct Options {
  std::string name = "probe";
  std::string logPath;
  std::optional<long> exitAfterMs;
  int exitCode = 0;
  std::optional<long> crashAfterMs;
  bool ignoreTerm = false;
  long termDelayMs = 0;
  std::optional<long> readyAfterMs;
  std::optional<long long> onTermExtendUsec;
  std::string status = "busy";
  long extendEveryMs = 100;
  long extendCount = 1;
  bool neverExit = false;
  int grandchildren = 0;
  bool report = false;
};

// What the process looked like before the probe changed anything (opened its log, installed a
// handler): captured first thing in main() so --report shows what the parent handed over.
struct Inherited {
  std::string fds;
  std::string sigIgn;
  std::string sigBlk;
  pid_t pgid = 0;
  std::string notifySocket;
};

int gLogFd = -1;
int gSelfPipe[2] = {-1, -1};
Options gOpt;

Nanos nowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
}

Nanos msToNs(long ms) { return static_cast<Nanos>(ms) * 1'000'000LL; }

void logEvent(std::string_view event, std::string_view extra = {}) {
  if (gLogFd < 0) return;
  std::string line = std::to_string(nowNs());
  line += ' ';
  line += gOpt.name;
  line += ' ';
  line += event;
  line += ' ';
  line += std::to_string(getpid());
  if (!extra.empty()) {
    line += ' ';
    line += extra;
  }
  line += '\n';
  // One write() per line: with O_APPEND the kernel appends it atomically for regular files.
  ssize_t n;
  do {
    n = ::write(gLogFd, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "vsup-probe(%s): %s: %s\n", gOpt.name.c_str(), what, std::strerror(errno));
  std::_Exit(100);
}

[[noreturn]] void usage(const char* arg) {
  std::fprintf(stderr, "vsup-probe: bad or incomplete argument: %s\n", arg);
  std::_Exit(2);
}

[[noreturn]] void exitWith(int code) {
  logEvent("exit", std::to_string(code));
  std::_Exit(code);
}

long long parseNumber(const char* s, const char* flag) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < 0) usage(flag);
  return v;
}

Options parseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(argv[i]);
      return argv[++i];
    };
    if (a == "--name") o.name = value();
    else if (a == "--log") o.logPath = value();
    else if (a == "--exit-after") o.exitAfterMs = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--exit-code") o.exitCode = static_cast<int>(parseNumber(value(), argv[i - 1]));
    else if (a == "--crash-after") o.crashAfterMs = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--ignore-term") o.ignoreTerm = true;
    else if (a == "--term-delay") o.termDelayMs = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--ready-after") o.readyAfterMs = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--on-term-extend") o.onTermExtendUsec = parseNumber(value(), argv[i - 1]);
    else if (a == "--status") o.status = value();
    else if (a == "--extend-every") o.extendEveryMs = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--extend-count") o.extendCount = static_cast<long>(parseNumber(value(), argv[i - 1]));
    else if (a == "--never-exit") o.neverExit = true;
    else if (a == "--grandchildren") o.grandchildren = static_cast<int>(parseNumber(value(), argv[i - 1]));
    else if (a == "--report") o.report = true;
    else usage(argv[i]);
  }
  return o;
}

// Reads "Key:\t<value>" from /proc/self/status.
std::string procStatusField(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  std::string prefix = std::string(key) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      std::size_t i = prefix.size();
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
      return line.substr(i);
    }
  }
  return "?";
}

// Lists open fds, leaving out the one opendir() itself uses.
std::string openFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return "?";
  int own = ::dirfd(dir);
  std::vector<int> fds;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    int fd = std::atoi(e->d_name);
    if (fd != own) fds.push_back(fd);
  }
  ::closedir(dir);
  std::sort(fds.begin(), fds.end());
  std::string out;
  for (int fd : fds) {
    if (!out.empty()) out += ',';
    out += std::to_string(fd);
  }
  return out;
}

Inherited captureInherited() {
  Inherited inh;
  inh.fds = openFds();
  inh.sigIgn = procStatusField("SigIgn");
  inh.sigBlk = procStatusField("SigBlk");
  inh.pgid = ::getpgrp();
  const char* ns = std::getenv("NOTIFY_SOCKET");
  inh.notifySocket = ns != nullptr ? std::string(ns) : std::string("-");
  return inh;
}

void onSigterm(int) {
  int saved = errno;
  char c = 'T';
  [[maybe_unused]] ssize_t n = ::write(gSelfPipe[1], &c, 1);
  errno = saved;
}

// Sends one datagram to $NOTIFY_SOCKET; an '@' prefix names the abstract namespace. Returns
// false (and logs why to stderr) when there is no socket or the send fails.
bool notify(const std::string& message) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (path == nullptr || path[0] == '\0') {
    std::fprintf(stderr, "vsup-probe(%s): NOTIFY_SOCKET is not set\n", gOpt.name.c_str());
    return false;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::size_t len = std::strlen(path);
  if (len >= sizeof(addr.sun_path)) {
    std::fprintf(stderr, "vsup-probe(%s): NOTIFY_SOCKET too long\n", gOpt.name.c_str());
    return false;
  }
  std::memcpy(addr.sun_path, path, len);
  if (path[0] == '@') addr.sun_path[0] = '\0';
  auto addrLen = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len);
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  ssize_t n = ::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL,
                       reinterpret_cast<const sockaddr*>(&addr), addrLen);
  int err = errno;
  ::close(fd);
  if (n < 0) {
    std::fprintf(stderr, "vsup-probe(%s): sendto(%s): %s\n", gOpt.name.c_str(), path,
                 std::strerror(err));
    return false;
  }
  return true;
}

void forkGrandchildren(int count) {
  for (int i = 0; i < count; ++i) {
    pid_t pid = ::fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      // Stays in the probe's process group; default SIGTERM disposition, so only a signal
      // ends it. The self-pipe and log fds are closed so they cannot keep anything alive.
      ::close(gSelfPipe[0]);
      ::close(gSelfPipe[1]);
      if (gLogFd >= 0) ::close(gLogFd);
      struct sigaction sa{};
      sa.sa_handler = SIG_DFL;
      ::sigaction(SIGTERM, &sa, nullptr);
      for (;;) ::pause();
    }
    logEvent("grandchild", std::to_string(pid));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Inherited inherited = captureInherited();
  gOpt = parseArgs(argc, argv);

  if (!gOpt.logPath.empty()) {
    gLogFd = ::open(gOpt.logPath.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (gLogFd < 0) die("open --log");
  }
  if (::pipe2(gSelfPipe, O_CLOEXEC | O_NONBLOCK) != 0) die("pipe2");

  struct sigaction sa{};
  sa.sa_handler = onSigterm;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  if (::sigaction(SIGTERM, &sa, nullptr) != 0) die("sigaction");

  logEvent("start");
  if (gOpt.report) {
    logEvent("fds", inherited.fds);
    logEvent("sigign", inherited.sigIgn);
    logEvent("sigblk", inherited.sigBlk);
    logEvent("pgid", std::to_string(inherited.pgid));
    logEvent("notify_socket", inherited.notifySocket);
  }
  forkGrandchildren(gOpt.grandchildren);

  const Nanos started = nowNs();
  std::optional<Nanos> exitAt;
  std::optional<Nanos> crashAt;
  std::optional<Nanos> readyAt;
  std::optional<Nanos> termExitAt;  // set when a SIGTERM asks the probe to exit later
  std::optional<Nanos> extendAt;    // next EXTEND_TIMEOUT_USEC message
  long extendsLeft = 0;
  if (gOpt.exitAfterMs) exitAt = started + msToNs(*gOpt.exitAfterMs);
  if (gOpt.crashAfterMs) crashAt = started + msToNs(*gOpt.crashAfterMs);
  if (gOpt.readyAfterMs) readyAt = started + msToNs(*gOpt.readyAfterMs);
  bool stopping = false;

  for (;;) {
    Nanos now = nowNs();
    if (crashAt && now >= *crashAt) {
      logEvent("crash");
      std::abort();
    }
    if (exitAt && now >= *exitAt) exitWith(gOpt.exitCode);
    if (termExitAt && now >= *termExitAt) exitWith(0);
    if (readyAt && now >= *readyAt) {
      readyAt.reset();
      // Logged before sending: once the datagram is out, the supervisor may start the next
      // child, whose "start" line must come after this one.
      logEvent("ready");
      if (!notify("READY=1")) logEvent("notify_failed");
    }
    if (extendAt && now >= *extendAt) {
      logEvent("extend", std::to_string(*gOpt.onTermExtendUsec));
      if (!notify("STATUS=" + gOpt.status + "\nEXTEND_TIMEOUT_USEC=" +
                  std::to_string(*gOpt.onTermExtendUsec))) {
        logEvent("notify_failed");
      }
      --extendsLeft;
      if (extendsLeft > 0) {
        extendAt = now + msToNs(gOpt.extendEveryMs);
      } else {
        extendAt.reset();
        // The last message keeps the deferral visible for one more interval, then the
        // probe finishes its "work".
        if (!gOpt.neverExit) termExitAt = now + msToNs(gOpt.extendEveryMs);
      }
    }

    std::optional<Nanos> next;
    for (const auto& d : {exitAt, crashAt, readyAt, termExitAt, extendAt}) {
      if (d && (!next || *d < *next)) next = d;
    }
    int timeoutMs = -1;
    if (next) {
      Nanos wait = *next - nowNs();
      timeoutMs = wait <= 0 ? 0 : static_cast<int>((wait + 999'999) / 1'000'000);
    }
    pollfd pfd{gSelfPipe[0], POLLIN, 0};
    int r = ::poll(&pfd, 1, timeoutMs);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (r == 0 || (pfd.revents & POLLIN) == 0) continue;

    char buf[64];
    ssize_t n = ::read(gSelfPipe[0], buf, sizeof buf);
    for (ssize_t i = 0; i < n; ++i) {
      logEvent("term");
      if (gOpt.ignoreTerm || stopping) continue;
      stopping = true;
      if (gOpt.onTermExtendUsec) {
        extendsLeft = std::max(gOpt.extendCount, 1L);
        extendAt = nowNs();
      } else if (gOpt.termDelayMs > 0) {
        termExitAt = nowNs() + msToNs(gOpt.termDelayMs);
      } else {
        exitWith(0);
      }
    }
  }
}
