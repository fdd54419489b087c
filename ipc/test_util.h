// Helpers shared by the doctest suites of every layer (ipc is the bottom layer, so any test may
// include this). Test code only: it uses doctest's REQUIRE/CHECK.
#pragma once

#include <dirent.h>
#include <uv.h>

#include <doctest/doctest.h>

#include "base/clock.h"

namespace vsup::testing {

// Open fds of this process (not counting the one used to list them).
inline int openFdCount() {
  DIR* dir = ::opendir("/proc/self/fd");
  REQUIRE(dir != nullptr);
  int n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the directory's own fd
}

inline double elapsedMs(MonoNs since) { return double(monoNow() - since) / 1e6; }

// A uv loop owned by one test. Declare it before the objects that use it, so they are destroyed
// first; the destructor then delivers the close callbacks and checks that nothing is left open.
struct TestLoop {
  uv_loop_t raw{};
  TestLoop() { REQUIRE(uv_loop_init(&raw) == 0); }
  ~TestLoop() {
    for (int i = 0; i < 10 && uv_run(&raw, UV_RUN_NOWAIT) != 0; ++i) {
    }
    CHECK_MESSAGE(uv_loop_close(&raw) == 0, "a uv handle was left open on the loop");
  }
  uv_loop_t* get() { return &raw; }
};

}  // namespace vsup::testing
