// Error channels shared by every layer: a bug aborts, bad input throws, a syscall failure throws
// naming the call and errno. Expected outcomes are values, not exceptions.
//
//   VSUP_ASSERT(cond, values...)   a bug in vsup: log the values and abort.
//   VSUP_REQUIRE(cond, values...)  bad input or a broken caller contract: throw vsup::Error.
//   VSUP_SYSCALL(call)             run a syscall, retry on EINTR, throw vsup::SysError naming the
//                                  call, file, line and errno when it fails; yields its result.
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "base/error.h"

namespace vsup {

namespace detail {

inline void appendValues(std::ostringstream&) {}
template <typename T, typename... Rest>
void appendValues(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << (os.tellp() > 0 ? "; " : "") << v;
  appendValues(os, rest...);
}

template <typename... Values>
std::string describe(const char* file, int line, const char* what, const Values&... values) {
  std::ostringstream extra;
  appendValues(extra, values...);
  std::string out = std::string(what) + " (" + file + ":" + std::to_string(line) + ")";
  if (extra.tellp() > 0) out += ": " + extra.str();
  return out;
}

[[noreturn]] inline void assertFailed(const std::string& message) {
  std::fprintf(stderr, "vsup: internal error: %s\n", message.c_str());
  std::abort();
}

[[noreturn]] inline void throwSysError(const char* call, const char* file, int line) {
  int err = errno;
  throw SysError(std::string(call) + " failed: " + std::strerror(err) + " (" + file + ":" +
                     std::to_string(line) + ")",
                 err);
}

}  // namespace detail
}  // namespace vsup

#define VSUP_ASSERT(cond, ...)                                                                 \
  do {                                                                                         \
    if (!(cond)) [[unlikely]]                                                                  \
      ::vsup::detail::assertFailed(                                                            \
          ::vsup::detail::describe(__FILE__, __LINE__, "assertion failed: " #cond __VA_OPT__(, ) \
                                       __VA_ARGS__));                                          \
  } while (0)

#define VSUP_REQUIRE(cond, message)                                 \
  do {                                                              \
    if (!(cond)) [[unlikely]] throw ::vsup::Error(std::string(message)); \
  } while (0)

#define VSUP_SYSCALL(call)                                                          \
  ([&]() {                                                                          \
    for (;;) {                                                                      \
      auto vsupResult_ = (call);                                                    \
      if (vsupResult_ >= 0) return vsupResult_;                                     \
      if (errno != EINTR) ::vsup::detail::throwSysError(#call, __FILE__, __LINE__); \
    }                                                                               \
  }())
