#include "supervisor/orphan_reaper.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "base/check.h"
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

}  // namespace

bool OrphanReaper::wanted(pid_t self) { return self == 1; }

OrphanReaper::OrphanReaper(std::string name) : name_(std::move(name)) {}

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

size_t OrphanReaper::reapOnce() {
  std::vector<pid_t> candidates = children();
  if (candidates.empty()) return 0;
  size_t count = 0;
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
    if (rc < 0 || info.si_pid == 0) continue;  // not a child (any more), or still running
    ++count;
    ExitStatus status{info.si_code == CLD_EXITED ? ExitStatus::Kind::Exited
                                                 : ExitStatus::Kind::Signaled,
                      info.si_status};
    vsup::log().debug("[supervisor] {}: reaped orphan pid {} ({})", name_, pid,
                      status.describe());
  }
  reaped_ += count;
  return count;
}

}  // namespace vsup::supervisor
