// Collectives between the tensor-parallel ranks of one engine: all-reduce (sum) and all-gather
// over one shared-memory region (a memfd that engine-core creates and every worker inherits at
// spawn), synchronised with a futex barrier in that region.
//
// Never stuck: every wait is bounded. A rank waiting for its peers gives up with
// CollectiveError when a peer process has died (checked through pidfds while it waits), when
// the wait exceeds the timeout (a hung or stopped peer), or when cancel() is called; after a
// failure the collective is broken and every later call fails at once. Results are identical on
// every rank (each sums the ranks' contributions in rank order), so ranks sample the same token.
//
// Thread: one compute thread per rank calls the collective ops; cancel() may be called from any
// thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace vsup::engine {

class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Interface.
class Collective {
 public:
  virtual ~Collective() = default;
  virtual uint32_t rank() const = 0;
  virtual uint32_t size() const = 0;
  // data[i] = sum over ranks of data[i], i < n.
  virtual void allReduceSum(float* data, size_t n) = 0;
  // all[r * n + i] = rank r's mine[i], for every rank r (all has size() * n floats).
  virtual void allGather(const float* mine, size_t n, float* all) = 0;
  virtual void cancel() = 0;
  // A peer rank that has exited ("rank 1 (pid 4242) died"), or empty. Never blocks: for a
  // backend whose ranks wait on their collectives elsewhere (the CUDA engine polls it while an
  // NCCL step runs). One rank alone has no peer to lose.
  virtual std::string deadPeer() { return {}; }
};

// TP = 1: the identity.
std::unique_ptr<Collective> makeSingleRankCollective();

// The shared region's size for `ranks` ranks, each exchanging at most `slotFloats` floats per
// round (larger operations run in rounds).
size_t sharedCollectiveBytes(uint32_t ranks, size_t slotFloats);
constexpr size_t kDefaultSlotFloats = 256 * 1024;  // 1 MiB per rank and round

// Creates the region (memfd "vsup-tp", close-on-exec; zero-filled, which is its initial state).
// Returns the fd, owned by the caller (wrap it in an OwnFd). Throws vsup::SysError.
int createSharedCollective(uint32_t ranks, size_t slotFloats = kDefaultSlotFloats);

// Joins the region as `rank`. Borrows `fd` only during the call (the mapping stays).
std::unique_ptr<Collective> joinSharedCollective(int fd, uint32_t rank, uint32_t ranks,
                                                 int64_t timeoutMs,
                                                 size_t slotFloats = kDefaultSlotFloats);

}  // namespace vsup::engine
