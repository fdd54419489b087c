#include "supervisor/orphan_guard.h"

#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <set>
#include <string>

#include "base/check.h"
#include "base/log.h"

extern char** environ;

namespace vsup::supervisor {

OrphanGuard::OrphanGuard(const std::string& vsupExe) {
  int sv[2];
  VSUP_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  lifeline_.reset(sv[0]);
  OwnFd guardEnd(sv[1]);
  SpawnRequest request;
  request.argv = {vsupExe, "__guard"};
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) request.env.emplace_back(*e);
  request.passFds.emplace_back(guardEnd.get(), 3);
  request.deathSignal = false;  // it must outlive us: that is its whole point
  // Ignored from its first instruction on, not only once it has set them itself (below).
  request.ignoreSignals = {SIGTERM, SIGINT, SIGHUP};
  process_.emplace(Process::spawn(request));
}

OrphanGuard::~OrphanGuard() {
  if (!process_) return;
  dismiss();
  if (process_->running()) process_->killAndReap();
}

void OrphanGuard::dismiss() {
  if (!lifeline_) return;
  // The goodbye first: should the SIGKILL not be delivered before the guard reads, it still
  // exits without killing anything.
  send('q', 0);
  lifeline_.reset();
  // The guard is its own process group (and the only process in it).
  process_->killGroup();
}

void OrphanGuard::add(pid_t pgid) { send('+', pgid); }
void OrphanGuard::remove(pid_t pgid) { send('-', pgid); }

void OrphanGuard::send(char op, pid_t pgid) {
  if (!lifeline_) return;  // dismissed
  char line[32];
  int n = std::snprintf(line, sizeof line, "%c%d\n", op, int(pgid));
  // A few bytes on a socket nobody else writes to: never short unless the guard is gone, and
  // then there is nothing left to protect with it.
  if (::send(lifeline_.get(), line, size_t(n), MSG_NOSIGNAL | MSG_DONTWAIT) != n) {
    vsup::log().warn("[supervisor] orphan guard unreachable: {}", std::strerror(errno));
  }
}

int orphanGuardMain() {
  // Its own process group (set at spawn): a terminal's Ctrl-C and the parent's kills of its
  // children's groups do not reach it. SIGTERM, SIGINT and SIGHUP are ignored: a service
  // manager that stops a unit by signalling every process of it at once (systemd's
  // KillMode=control-group) must not end the protection while the tree is still shutting down.
  // It exits on the lifeline's EOF, and its supervisor reaps it with SIGKILL if it lingers.
  ::signal(SIGTERM, SIG_IGN);
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGHUP, SIG_IGN);
  std::set<pid_t> groups;
  std::string buffer;
  bool goodbye = false;
  char chunk[4096];
  for (;;) {
    ssize_t n = ::read(3, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    buffer.append(chunk, size_t(n));
    size_t nl;
    while ((nl = buffer.find('\n')) != std::string::npos) {
      std::string line = buffer.substr(0, nl);
      buffer.erase(0, nl + 1);
      if (line.empty()) continue;
      pid_t pgid = pid_t(std::atoi(line.c_str() + 1));
      if (line[0] == 'q') goodbye = true;
      if (line[0] == '+' && pgid > 1) groups.insert(pgid);
      if (line[0] == '-') groups.erase(pgid);
    }
  }
  if (goodbye) return 0;
  for (pid_t pgid : groups) ::kill(-pgid, SIGKILL);
  return groups.empty() ? 0 : 1;
}

}  // namespace vsup::supervisor
