// The exceptions vsup throws: part of the public API (installed as <vsup/ipc/error.h>).
#pragma once

#include <stdexcept>
#include <string>

namespace vsup {

// Bad input or a failed operation the caller should handle; its message is meant for a person:
// it says what was wrong, where, and what is accepted.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A syscall failed; errnoValue() is kept so callers can branch on it (EAGAIN, ECHILD, ...).
class SysError final : public Error {
 public:
  SysError(const std::string& what, int err) : Error(what), errno_(err) {}
  int errnoValue() const { return errno_; }

 private:
  int errno_;
};

}  // namespace vsup
