#include "supervisor/host_checks.h"

#include <signal.h>

#include <cstdlib>
#include <cstring>

#include "base/check.h"

#ifndef VSUP_INSTALLED_EXE
#define VSUP_INSTALLED_EXE "/usr/local/bin/vsup"
#endif

namespace vsup::supervisor {

void requireSigchldNotIgnored(const std::string& who) {
  struct sigaction current;
  std::memset(&current, 0, sizeof current);
  ::sigaction(SIGCHLD, nullptr, &current);  // a query: the host's disposition stays as it is
  bool ignored = current.sa_handler == SIG_IGN || (current.sa_flags & SA_NOCLDWAIT) != 0;
  VSUP_REQUIRE(!ignored, who +
                             ": SIGCHLD is ignored in this process (SIG_IGN or SA_NOCLDWAIT), so "
                             "the kernel would reap vsup's children and lose their exit status; "
                             "set SIGCHLD back to SIG_DFL or to a handler first");
}

std::string resolveVsupExecutable(const std::string& configured) {
  if (!configured.empty()) return configured;
  if (const char* env = std::getenv("VSUP_EXE"); env != nullptr && *env != '\0') return env;
  return VSUP_INSTALLED_EXE;
}

}  // namespace vsup::supervisor
