#include "engine/comm_guard.h"

#include <time.h>

#include <stdexcept>

#include "base/clock.h"

namespace vsup::engine {
namespace {

// The pause between two polls: a few yields first (a decode step's collectives finish in tens
// of microseconds), then 20 µs sleeps, so that a long step does not burn a core.
void pause(int polls) {
  if (polls < 64) {
    std::this_thread::yield();
    return;
  }
  struct timespec t {0, 20 * 1000};
  ::nanosleep(&t, nullptr);
}

}  // namespace

CommGuard::CommGuard(CommDevice& device, CommGuardOptions options)
    : device_(device), options_(std::move(options)), owner_(std::this_thread::get_id()) {}

CommGuard::~CommGuard() {
  if (closed() || std::this_thread::get_id() != owner_) return;
  abortOnce();
}

void CommGuard::onOwnerThread(const char* what) {
  if (std::this_thread::get_id() != owner_) {
    throw std::logic_error(std::string("CommGuard::") + what +
                           ": NCCL is called from the rank's compute thread only");
  }
  if (aborted_) throw CollectiveError(brokenWhy_);
}

void CommGuard::abortOnce() {
  if (aborted_) return;
  aborted_ = true;
  ++aborts_;
  device_.abort();
}

void CommGuard::fail(const std::string& why) {
  brokenWhy_ = "rank " + std::to_string(options_.rank) + ": " + why;
  abortOnce();
  throw CollectiveError(brokenWhy_);
}

void CommGuard::wait(const char* what, int64_t timeoutMs, bool work, bool cancellable) {
  const int64_t start = monoNow() / 1000;
  const int64_t deadline = start + timeoutMs * 1000;
  int64_t nextPeerCheck = start;
  for (int polls = 0;; ++polls) {
    if (cancellable && options_.cancel != nullptr &&
        options_.cancel->load(std::memory_order_acquire)) {
      fail(std::string("cancelled while waiting for ") + what);
    }
    std::string why;
    CommDevice::State comm = device_.commState(why);
    if (comm == CommDevice::State::Failed) fail(std::string(what) + ": NCCL: " + why);
    CommDevice::State done = CommDevice::State::Done;
    if (work) {
      done = device_.workState(why);
      if (done == CommDevice::State::Failed) fail(std::string(what) + ": CUDA: " + why);
    }
    if (comm == CommDevice::State::Done && done == CommDevice::State::Done) return;
    const int64_t now = monoNow() / 1000;
    if (options_.deadPeer && now >= nextPeerCheck) {
      nextPeerCheck = now + 10 * 1000;
      std::string dead = options_.deadPeer();
      if (!dead.empty()) fail(dead + " while waiting for " + what);
    }
    if (now > deadline) {
      fail("timed out after " + std::to_string(timeoutMs) + " ms waiting for " + what +
           ": a peer rank is hung or stopped");
    }
    pause(polls);
  }
}

void CommGuard::awaitInit(int64_t timeoutMs) {
  onOwnerThread("awaitInit");
  wait("the communicator's initialisation", timeoutMs, /*work=*/false);
}

void CommGuard::awaitStep() {
  onOwnerThread("awaitStep");
  if (destroyed_) throw CollectiveError("rank " + std::to_string(options_.rank) +
                                        ": a step after the communicator was finalized");
  wait("a step's collectives", options_.timeoutMs, /*work=*/true);
}

void CommGuard::awaitComm() {
  onOwnerThread("awaitComm");
  wait("an NCCL call", options_.timeoutMs, /*work=*/false);
}

void CommGuard::failNow(const std::string& why) {
  onOwnerThread("failNow");
  fail(why);
}

void CommGuard::finalize() {
  onOwnerThread("finalize");
  if (destroyed_) return;
  device_.finalize();
  wait("the communicator's finalize", options_.timeoutMs, /*work=*/false, /*cancellable=*/false);
  destroyed_ = true;
  device_.destroy();
}

}  // namespace vsup::engine
