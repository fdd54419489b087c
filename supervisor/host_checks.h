// What the embedding API (vsup::Supervisor, vsup::LLM) checks about its host process and how it
// finds the vsup executable. Internal: not installed.
#pragma once

#include <string>

namespace vsup::supervisor {

// Throws vsup::Error when the host ignores SIGCHLD (SIG_IGN or SA_NOCLDWAIT): the kernel would
// then reap vsup's children itself and their exit status would be lost. Only reads the
// disposition; never changes it.
void requireSigchldNotIgnored(const std::string& who);

// `configured` if set, else $VSUP_EXE, else the installed vsup (bindir at build time).
std::string resolveVsupExecutable(const std::string& configured);

}  // namespace vsup::supervisor
