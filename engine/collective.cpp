#include "engine/collective.h"

#include <linux/futex.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

#include "base/clock.h"
#include "base/check.h"
#include "base/error.h"
#include "base/fd.h"

namespace vsup::engine {
namespace {

constexpr uint32_t kMagic = 0x76737570;  // "vsup"
constexpr uint32_t kMaxRanks = 64;
constexpr size_t kHeaderBytes = 4096;

// The region's header. Zero-filled is the initial state; every field is accessed atomically
// (the region is shared by processes, so these are address-free lock-free atomics).
struct Header {
  std::atomic<uint32_t> magic;
  std::atomic<uint32_t> arrived;     // ranks at the current barrier
  std::atomic<uint32_t> generation;  // bumped by the last rank to arrive; the futex word
  std::atomic<int32_t> pids[kMaxRanks];
};
static_assert(sizeof(Header) <= kHeaderBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

class SingleRank final : public Collective {
 public:
  uint32_t rank() const override { return 0; }
  uint32_t size() const override { return 1; }
  void allReduceSum(float*, size_t) override {}
  void allGather(const float* mine, size_t n, float* all) override {
    std::memmove(all, mine, n * sizeof(float));
  }
  void cancel() override {}
};

class Shared final : public Collective {
 public:
  Shared(void* base, size_t bytes, uint32_t rank, uint32_t ranks, int64_t timeoutMs,
         size_t slotFloats)
      : base_(base), bytes_(bytes), rank_(rank), ranks_(ranks), timeoutMs_(timeoutMs),
        slotFloats_(slotFloats), peerPidfds_(ranks) {
    header_ = static_cast<Header*>(base);
    header_->magic.store(kMagic, std::memory_order_relaxed);
    header_->pids[rank].store(int32_t(::getpid()), std::memory_order_release);
    // Spinning only pays when every rank has a core of its own; otherwise it steals the core
    // the peer we wait for needs.
    spin_ = std::thread::hardware_concurrency() >= ranks ? 4000 : 0;
  }

  ~Shared() override { ::munmap(base_, bytes_); }

  uint32_t rank() const override { return rank_; }
  uint32_t size() const override { return ranks_; }

  void allReduceSum(float* data, size_t n) override {
    for (size_t done = 0; done < n; done += slotFloats_) {
      size_t m = std::min(slotFloats_, n - done);
      float* slots = nextSlots();
      std::memcpy(slot(slots, rank_), data + done, m * sizeof(float));
      barrier();
      // Every rank adds in rank order: bit-identical results everywhere.
      float* out = data + done;
      std::memcpy(out, slot(slots, 0), m * sizeof(float));
      for (uint32_t r = 1; r < ranks_; ++r) {
        const float* __restrict in = slot(slots, r);
        float* __restrict o = out;
        for (size_t i = 0; i < m; ++i) o[i] += in[i];
      }
    }
  }

  void allGather(const float* mine, size_t n, float* all) override {
    for (size_t done = 0; done < n; done += slotFloats_) {
      size_t m = std::min(slotFloats_, n - done);
      float* slots = nextSlots();
      std::memcpy(slot(slots, rank_), mine + done, m * sizeof(float));
      barrier();
      for (uint32_t r = 0; r < ranks_; ++r) {
        std::memcpy(all + size_t(r) * n + done, slot(slots, r), m * sizeof(float));
      }
    }
  }

  void cancel() override {
    cancelled_.store(true, std::memory_order_release);
    // Wake our own waits; peers notice through their own cancel or our exit.
    ::syscall(SYS_futex, &header_->generation, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
  }

 private:
  // Two sets of slots used alternately: a rank writes set k+1 only after the barrier of round
  // k, which every rank reaches only after it finished reading set k-1 (= k+1). One barrier per
  // round is then enough.
  float* nextSlots() {
    if (broken_) throw CollectiveError("collective is broken: " + brokenWhy_);
    float* first = reinterpret_cast<float*>(static_cast<char*>(base_) + kHeaderBytes);
    float* set = first + (round_ & 1) * size_t(ranks_) * slotFloats_;
    ++round_;
    return set;
  }
  float* slot(float* set, uint32_t r) const { return set + size_t(r) * slotFloats_; }

  void fail(const std::string& why) {
    broken_ = true;
    brokenWhy_ = why;
    throw CollectiveError(why);
  }

  void barrier() {
    uint32_t gen = header_->generation.load(std::memory_order_acquire);
    if (header_->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == ranks_) {
      header_->arrived.store(0, std::memory_order_relaxed);
      header_->generation.store(gen + 1, std::memory_order_release);
      ::syscall(SYS_futex, &header_->generation, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
      return;
    }
    for (int i = 0; i < spin_; ++i) {
      if (header_->generation.load(std::memory_order_acquire) != gen) return;
      __builtin_ia32_pause();
    }
    int64_t start = monoNow() / kNsPerMs;
    int64_t lastPeerCheck = start;
    while (header_->generation.load(std::memory_order_acquire) == gen) {
      if (cancelled_.load(std::memory_order_acquire)) fail("cancelled while waiting for peers");
      struct timespec slice {0, 20 * 1000 * 1000};
      ::syscall(SYS_futex, &header_->generation, FUTEX_WAIT, gen, &slice, nullptr, 0);
      // The barrier may have completed while we slept: then peers that exited since are no
      // failure of this collective.
      if (header_->generation.load(std::memory_order_acquire) != gen) return;
      int64_t now = monoNow() / kNsPerMs;
      if (now - lastPeerCheck >= 100) {
        lastPeerCheck = now;
        checkPeers(gen);
      }
      if (now - start > timeoutMs_ && header_->generation.load(std::memory_order_acquire) == gen) {
        fail("rank " + std::to_string(rank_) + ": timed out after " +
             std::to_string(timeoutMs_) + " ms waiting for a peer rank in a collective (" +
             std::to_string(header_->arrived.load()) + " of " + std::to_string(ranks_) +
             " arrived): a peer is hung or stopped");
      }
    }
  }

  // A peer that exited will never arrive: fail now rather than at the timeout.
  void checkPeers(uint32_t gen) {
    std::string dead = deadPeer();
    if (!dead.empty() && header_->generation.load(std::memory_order_acquire) == gen) {
      fail(dead + " during a collective");
    }
  }

  std::string deadPeer() override {
    for (uint32_t r = 0; r < ranks_; ++r) {
      if (r == rank_) continue;
      int32_t pid = header_->pids[r].load(std::memory_order_acquire);
      if (pid <= 0) continue;  // not joined yet
      const std::string who = "rank " + std::to_string(r) + " (pid " + std::to_string(pid) + ")";
      if (!peerPidfds_[r]) {
        OwnFd fd(int(::syscall(SYS_pidfd_open, pid, 0)));
        if (!fd) {
          if (errno == ESRCH) return who + " died";
          continue;
        }
        peerPidfds_[r] = std::move(fd);
      }
      struct pollfd p {peerPidfds_[r].get(), POLLIN, 0};
      if (::poll(&p, 1, 0) == 1) return who + " died";
    }
    return {};
  }

  void* base_;
  size_t bytes_;
  Header* header_ = nullptr;
  uint32_t rank_;
  uint32_t ranks_;
  int64_t timeoutMs_;
  size_t slotFloats_;
  int spin_ = 0;
  uint64_t round_ = 0;
  bool broken_ = false;
  std::string brokenWhy_;
  std::atomic<bool> cancelled_{false};
  std::vector<OwnFd> peerPidfds_;
};

}  // namespace

std::unique_ptr<Collective> makeSingleRankCollective() { return std::make_unique<SingleRank>(); }

size_t sharedCollectiveBytes(uint32_t ranks, size_t slotFloats) {
  return kHeaderBytes + 2 * size_t(ranks) * slotFloats * sizeof(float);
}

int createSharedCollective(uint32_t ranks, size_t slotFloats) {
  if (ranks == 0 || ranks > kMaxRanks) {
    throw std::invalid_argument("tensor-parallel size must be 1.." + std::to_string(kMaxRanks));
  }
  OwnFd fd(int(VSUP_SYSCALL(::syscall(SYS_memfd_create, "vsup-tp", MFD_CLOEXEC))));
  VSUP_SYSCALL(::ftruncate(fd.get(), off_t(sharedCollectiveBytes(ranks, slotFloats))));
  return fd.release();
}

std::unique_ptr<Collective> joinSharedCollective(int fd, uint32_t rank, uint32_t ranks,
                                                 int64_t timeoutMs, size_t slotFloats) {
  if (rank >= ranks || ranks > kMaxRanks) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " of " + std::to_string(ranks));
  }
  size_t bytes = sharedCollectiveBytes(ranks, slotFloats);
  off_t size = ::lseek(fd, 0, SEEK_END);
  if (size < 0 || size_t(size) != bytes) {
    throw std::runtime_error("collective region (fd " + std::to_string(fd) + ") has " +
                             std::to_string(size) + " bytes, expected " + std::to_string(bytes));
  }
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    int err = errno;
    throw SysError(std::string("mmap(vsup-tp) failed: ") + std::strerror(err), err);
  }
  return std::make_unique<Shared>(base, bytes, rank, ranks, timeoutMs, slotFloats);
}

}  // namespace vsup::engine
