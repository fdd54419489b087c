// The oracle of the fuzz targets: a property every input must keep.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

// A property every input must keep. Failing is a finding: it aborts, which libFuzzer reports as
// a crash (and saves the input) and which fails the replay test.
#define FUZZ_CHECK(cond, ...)                                                            \
  do {                                                                                   \
    if (!(cond)) [[unlikely]] {                                                          \
      std::fprintf(stderr, "fuzz check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      __VA_OPT__(std::fprintf(stderr, "  %s\n", std::string(__VA_ARGS__).c_str());)     \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)
