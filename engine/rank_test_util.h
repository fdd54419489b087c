// Forked ranks for the collectives' tests: the test process forks the ranks (it is
// single-threaded when it forks), and they report what they saw through a MAP_SHARED page. Every
// wait is bounded: children wait with poll() timeouts and die with the test process
// (PR_SET_PDEATHSIG), and the test process waits for them through pidfds with a deadline, then
// SIGKILLs and reaps whatever is left. Header-only, for one test program each.
#pragma once

#include <dirent.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace vsup::engine::rank_test {

constexpr int64_t kChildWaitMs = 20000;  // how long a child waits for anything before giving up
constexpr int kSysFutex = SYS_futex;

inline int64_t monoNs() {
  struct timespec t {};
  ::clock_gettime(CLOCK_MONOTONIC, &t);
  return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
}

class OwnFd {
 public:
  explicit OwnFd(int fd = -1) : fd_(fd) {}
  OwnFd(OwnFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  OwnFd& operator=(OwnFd&& o) noexcept {
    reset();
    fd_ = o.fd_;
    o.fd_ = -1;
    return *this;
  }
  ~OwnFd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

struct Pipe {
  OwnFd read;
  OwnFd write;
  Pipe() {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    read = OwnFd(p[0]);
    write = OwnFd(p[1]);
  }
};

// Waits up to `timeoutMs` for one byte on `fd`; '\0' on timeout or EOF.
inline char readByte(int fd, int64_t timeoutMs) {
  int64_t deadline = monoNs() + timeoutMs * 1000000;
  for (;;) {
    int64_t left = (deadline - monoNs()) / 1000000;
    if (left < 0) return '\0';
    struct pollfd p {fd, POLLIN, 0};
    int r = ::poll(&p, 1, int(left));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return '\0';
    char c = '\0';
    ssize_t n = ::read(fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    return n == 1 ? c : '\0';
  }
}

inline void writeByte(int fd, char c) {
  while (::write(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// What one rank reports back to the test process.
struct RankReport {
  int32_t done;
  int64_t mismatches;
  int64_t startNs;
  int64_t thrownAtNs;
  int64_t secondElapsedNs;
  char what[256];
  char secondWhat[256];
};
constexpr uint32_t kMaxTestRanks = 4;

inline void copyWhat(char (&to)[256], const char* what) {
  std::strncpy(to, what, sizeof(to) - 1);
  to[sizeof(to) - 1] = '\0';
}

// A MAP_SHARED anonymous region the children inherit: reports, then room for result floats.
class SharedPage {
 public:
  explicit SharedPage(size_t floats)
      : bytes_(sizeof(RankReport) * kMaxTestRanks + floats * sizeof(float)) {
    p_ = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p_ != MAP_FAILED);
  }
  ~SharedPage() { ::munmap(p_, bytes_); }
  RankReport& report(uint32_t rank) { return static_cast<RankReport*>(p_)[rank]; }
  float* floats() {
    return reinterpret_cast<float*>(static_cast<char*>(p_) + sizeof(RankReport) * kMaxTestRanks);
  }

 private:
  size_t bytes_;
  void* p_;
};

// Forked children, each watched through a pidfd. The destructor kills and reaps any left.
class Children {
 public:
  Children() = default;
  Children(const Children&) = delete;
  ~Children() {
    for (size_t i = 0; i < pids_.size(); ++i) {
      if (pids_[i] > 0) {
        ::kill(pids_[i], SIGKILL);
        int status = 0;
        ::waitpid(pids_[i], &status, 0);
      }
    }
  }

  // Runs `body` in a child that _exits with its result: 0 for success, 90 for an exception,
  // 91 when the test process is gone.
  size_t spawn(const std::function<int()>& body) {
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(91);
      int rc = 90;
      try {
        rc = body();
      } catch (...) {
      }
      ::_exit(rc);
    }
    pids_.push_back(pid);
    int fd = int(::syscall(SYS_pidfd_open, pid, 0));
    REQUIRE(fd >= 0);
    pidfds_.emplace_back(fd);
    return pids_.size() - 1;
  }

  pid_t pid(size_t i) const { return pids_[i]; }

  // Waits up to `timeoutMs` for child i to exit and reaps it. Returns the exit code, or
  // 128 + signal when a signal killed it, or -1 when it did not exit in time (it is then
  // SIGKILLed and reaped).
  int wait(size_t i, int64_t timeoutMs) {
    REQUIRE(pids_[i] > 0);
    struct pollfd p {pidfds_[i].get(), POLLIN, 0};
    int64_t deadline = monoNs() + timeoutMs * 1000000;
    int r = 0;
    do {
      int64_t left = std::max<int64_t>(0, (deadline - monoNs()) / 1000000);
      r = ::poll(&p, 1, int(left));
    } while (r < 0 && errno == EINTR);
    bool exited = r == 1;
    if (!exited) ::kill(pids_[i], SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(pids_[i], &status, 0) == pids_[i]);
    pids_[i] = -1;
    pidfds_[i].reset();
    if (!exited) return -1;
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
  }

 private:
  std::vector<pid_t> pids_;
  std::vector<OwnFd> pidfds_;
};

// Ranks that leave together: each child says it is done and exits only when the test process
// has heard from all of them. A rank that exited while a peer was still waking from the last
// barrier would be a dead peer to it (see "a rank whose peer completed the barrier and then
// exited ..." below).
class FinishTogether {
 public:
  // In a child: returns rc once released (7 if never released).
  int leave(int rc) {
    writeByte(done_.write.get(), 'd');
    return readByte(release_.read.get(), kChildWaitMs) == 'r' ? rc : 7;
  }
  // In the test process: waits (bounded) for `n` children to be done, then releases them all.
  // Returns how many said they were done.
  int releaseAll(int n, int64_t timeoutMs) {
    int done = 0;
    for (int i = 0; i < n; ++i) done += readByte(done_.read.get(), timeoutMs) == 'd';
    for (int i = 0; i < n; ++i) writeByte(release_.write.get(), 'r');
    return done;
  }

 private:
  Pipe done_;
  Pipe release_;
};

inline int countFds() {
  DIR* d = ::opendir("/proc/self/fd");
  REQUIRE(d != nullptr);
  int n = 0;
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;  // the directory's own fd
}

inline bool noChildLeft() {
  errno = 0;
  return ::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD;
}

inline bool mapsMention(const std::string& what) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find(what) != std::string::npos) return true;
  }
  return false;
}

// The syscall a thread is blocked in (/proc/.../syscall's first field), or -2 if unreadable.
inline long blockedSyscall(const std::string& path) {
  std::ifstream f(path);
  std::string first;
  if (!(f >> first)) return -2;
  if (first == "running") return -1;
  try {
    return std::stol(first);
  } catch (...) {
    return -2;
  }
}

// Waits (bounded) until the thread at `path` sits in futex(): waiting for its peers.
inline bool waitUntilInFutex(const std::string& path, int64_t timeoutMs) {
  int64_t deadline = monoNs() + timeoutMs * 1000000;
  while (monoNs() < deadline) {
    long sc = blockedSyscall(path);
    if (sc == kSysFutex) return true;
    if (sc == -2) return false;
    struct timespec t {0, 1000000};
    ::nanosleep(&t, nullptr);
  }
  return false;
}

// Waits (bounded) until process `pid` is stopped (state T in /proc/pid/stat).
inline bool waitUntilStopped(pid_t pid, int64_t timeoutMs) {
  int64_t deadline = monoNs() + timeoutMs * 1000000;
  while (monoNs() < deadline) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(f, line);
    size_t close = line.rfind(')');
    if (close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'T') {
      return true;
    }
    struct timespec t {0, 1000000};
    ::nanosleep(&t, nullptr);
  }
  return false;
}

inline uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Rank `rank`'s i-th float in operation `op`: mixed signs and magnitudes, so that the order of
// the additions shows in the rounding.
inline float valueAt(uint32_t op, uint32_t rank, size_t i) {
  uint64_t h = mix((uint64_t(op) << 40) ^ (uint64_t(rank) << 32) ^ uint64_t(i));
  float mantissa = float(int32_t(h & 0xFFFFFF) - 0x800000) / float(0x800000);
  int exponent = int((h >> 24) % 21) - 10;
  return std::ldexp(mantissa, exponent);
}

// The sum in rank order, as every rank must compute it.
inline float expectedSum(uint32_t op, uint32_t ranks, size_t i) {
  float e = valueAt(op, 0, i);
  for (uint32_t r = 1; r < ranks; ++r) e += valueAt(op, r, i);
  return e;
}

inline bool sameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

}  // namespace vsup::engine::rank_test
