// How a GPU rank waits on its work and its NCCL communicator without ever hanging, and how the
// communicator ends: the CUDA engine's state machine, written against an interface (CommDevice)
// so that it is tested on the CPU against a scripted fake.
//
// Every wait is one loop over: the step's completion (cudaEventQuery), the communicator's
// asynchronous error (ncclCommGetAsyncError), the cancel flag (ModelRunner::cancel, set from the
// rank's loop thread), the peer ranks' liveness (pidfds, through Collective::deadPeer) and a
// deadline. Any failure aborts the communicator, once, and the guard is broken from then on:
// every later call throws CollectiveError at once and nothing calls the device again. A clean
// end finalizes (non-blocking, in the final step all ranks take together), waits for that
// within the timeout, then destroys locally; a finalize that fails or times out aborts instead.
//
// Thread: every call, the destructor's included, on the rank's compute thread (the only thread
// that touches NCCL); a call from another thread throws std::logic_error. Only `cancel` and
// `deadPeer` are read across threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "engine/collective.h"

namespace vsup::engine {

// What the guard calls. In the CUDA engine: the CUDA runtime and NCCL; in tests: a fake.
class CommDevice {
 public:
  enum class State { Done, Pending, Failed };
  virtual ~CommDevice() = default;
  // The communicator: Done (ncclSuccess), Pending (ncclInProgress: a non-blocking init or
  // finalize still running), Failed (an asynchronous error, described in `why`).
  virtual State commState(std::string& why) = 0;
  // The work the current step enqueued: Done, Pending, Failed (a CUDA error, in `why`).
  virtual State workState(std::string& why) = 0;
  // ncclCommFinalize: starts the collective end of the communicator (non-blocking).
  virtual void finalize() = 0;
  // ncclCommDestroy, after a finalize that completed: local only.
  virtual void destroy() = 0;
  // ncclCommAbort: frees the communicator whatever its peers do. Bounded.
  virtual void abort() = 0;
};

struct CommGuardOptions {
  uint32_t rank = 0;
  int64_t timeoutMs = 10000;                  // a step's collectives (--collective-timeout-ms)
  const std::atomic<bool>* cancel = nullptr;  // set: fail now
  std::function<std::string()> deadPeer;      // a peer that exited, or empty
};

class CommGuard {
 public:
  CommGuard(CommDevice& device, CommGuardOptions options);
  // A guard neither finalized nor aborted (a runner torn down mid-step, or never used) aborts:
  // a communicator is never left behind, nor destroyed while peers may still need it.
  ~CommGuard();
  CommGuard(const CommGuard&) = delete;
  CommGuard& operator=(const CommGuard&) = delete;

  // The communicator's non-blocking init, within `timeoutMs` (the rank's start timeout).
  void awaitInit(int64_t timeoutMs);
  // The current step's work and the communicator. Throws CollectiveError (after aborting).
  void awaitStep();
  // A non-blocking NCCL call that returned ncclInProgress: waits until the communicator is
  // ready for the next call. Throws CollectiveError (after aborting).
  void awaitComm();
  // Fails now for a reason found outside the guard (a kernel launch that failed): aborts, then
  // throws CollectiveError.
  [[noreturn]] void failNow(const std::string& why);
  // The clean end: finalize, wait within the timeout, destroy. Throws CollectiveError after
  // aborting when that fails. Idempotent once it succeeded. Not cancellable (a rank being torn
  // down has cancelled already): bounded by the timeout and the peers' liveness instead.
  void finalize();

  bool broken() const { return aborted_; }
  bool closed() const { return aborted_ || destroyed_; }
  int aborts() const { return aborts_; }  // for tests: 0 or 1, ever

 private:
  void onOwnerThread(const char* what);
  void wait(const char* what, int64_t timeoutMs, bool work, bool cancellable = true);
  [[noreturn]] void fail(const std::string& why);
  void abortOnce();

  CommDevice& device_;
  CommGuardOptions options_;
  std::thread::id owner_;
  bool aborted_ = false;
  bool destroyed_ = false;
  int aborts_ = 0;
  std::string brokenWhy_;
};

}  // namespace vsup::engine
