#include "engine/cross_node_collective.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <stdexcept>
#include <utility>

#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/context.h>
#include <gloo/transport/context.h>
#include <gloo/transport/pair.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include "base/clock.h"
#include "base/error.h"

namespace vsup::engine {
namespace {

// Gloo's messages start with "[/build/.../file.cc:123] ": the reader wants what follows.
std::string glooWhy(const std::exception& e) {
  std::string what = e.what();
  if (!what.empty() && what[0] == '[') {
    size_t end = what.find("] ");
    if (end != std::string::npos) what.erase(0, end + 2);
  }
  return what;
}

class DirectoryStore final : public RendezvousStore {
 public:
  explicit DirectoryStore(std::string dir) : dir_(std::move(dir)) {}

  void set(const std::string& key, const std::vector<char>& value) override {
    const std::string path = pathOf(key);
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out.write(value.data(), std::streamsize(value.size()));
      if (!out.flush()) throw std::runtime_error("rendezvous store: cannot write " + tmp);
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      int err = errno;
      throw SysError("rendezvous store: rename(" + tmp + ", " + path + ") failed: " +
                         std::strerror(err), err);
    }
  }

  std::vector<char> get(const std::string& key, int64_t timeoutMs) override {
    const std::string path = pathOf(key);
    const int64_t deadline = monoNow() / kNsPerMs + timeoutMs;
    for (;;) {
      std::ifstream in(path, std::ios::binary);
      if (in) return std::vector<char>(std::istreambuf_iterator<char>(in), {});
      if (monoNow() / kNsPerMs >= deadline) {
        throw CollectiveError("rendezvous: no rank published \"" + key + "\" in " + dir_ +
                              " within " + std::to_string(timeoutMs) + " ms");
      }
      struct timespec slice {0, 2 * 1000 * 1000};
      ::nanosleep(&slice, nullptr);
    }
  }

 private:
  // Keys become file names: anything but [A-Za-z0-9._-] is replaced.
  std::string pathOf(const std::string& key) const {
    std::string name = key;
    for (char& c : name) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '.' || c == '-' || c == '_';
      if (!ok) c = '_';
    }
    return dir_ + "/" + name;
  }

  std::string dir_;
};

// A gloo::Context over a transport context made and connected here (two phases) rather than
// by Gloo's rendezvous (one blocking call that needs a live store).
class MeshContext final : public gloo::Context {
 public:
  MeshContext(int rank, int size) : gloo::Context(rank, size) {}
  void install(std::shared_ptr<gloo::transport::Device> device,
               std::shared_ptr<gloo::transport::Context> transport) {
    device_ = std::move(device);
    transportContext_ = std::move(transport);
  }
};

class CrossNode final : public CrossNodeCollective {
 public:
  CrossNode(const CrossNodeJoin& join, std::unique_ptr<Collective> local)
      : rank_(join.rank), ranks_(join.ranks), nodeBase_(join.rank - join.rank % join.ranksPerNode),
        ranksPerNode_(join.ranksPerNode), timeout_(join.timeoutMs), local_(std::move(local)) {
    const std::string who = "rank " + std::to_string(rank_) + " of " + std::to_string(ranks_);
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = join.listenAddress;
      device_ = gloo::transport::tcp::CreateDevice(attr);
      transport_ = device_->createContext(int(rank_), int(ranks_));
      // Gloo waits five times its timeout for a connection to come up: a fifth of ours, so
      // that the connect is bounded by ours. The operations pass theirs explicitly.
      transport_->setTimeout(std::chrono::milliseconds(std::max<int64_t>(1, timeout_ / 5)));
      for (uint32_t r = 0; r < ranks_; ++r) {
        if (r == rank_) continue;
        std::vector<char> bytes = transport_->createPair(int(r))->address().bytes();
        if (pairBytes_ == 0) pairBytes_ = bytes.size();
        address_.insert(address_.end(), bytes.begin(), bytes.end());
      }
    } catch (const std::exception& e) {
      transport_.reset();
      device_.reset();
      throw CollectiveError(who + ": cannot listen on \"" + join.listenAddress +
                            "\" for the ranks on other nodes: " + glooWhy(e));
    }
  }

  ~CrossNode() override {
    // The connections first (Gloo's pairs), then its event loop thread (the device).
    context_.reset();
    transport_.reset();
    device_.reset();
  }

  const std::vector<char>& address() const override { return address_; }

  void connect(const std::vector<std::vector<char>>& addresses) override {
    const std::string who = "rank " + std::to_string(rank_) + " of " + std::to_string(ranks_);
    if (context_ || !transport_) throw CollectiveError(who + ": connect() called twice");
    if (addresses.size() != ranks_) {
      throw CollectiveError(who + ": connect() needs " + std::to_string(ranks_) +
                            " addresses, got " + std::to_string(addresses.size()));
    }
    for (uint32_t r = 0; r < ranks_; ++r) {
      if (r == rank_) continue;
      if (addresses[r].size() != address_.size()) {
        throw CollectiveError(who + ": rank " + std::to_string(r) + "'s address has " +
                              std::to_string(addresses[r].size()) + " bytes, expected " +
                              std::to_string(address_.size()) +
                              " (a rank of a different vsup build?)");
      }
    }
    // In rank order on every rank, as Gloo's own full-mesh rendezvous does: a pair's two ends
    // agree on which side listens from the addresses themselves.
    for (uint32_t r = 0; r < ranks_; ++r) {
      if (r == rank_) continue;
      if (cancelled_.load(std::memory_order_acquire)) {
        throw CollectiveError(who + ": cancelled while connecting to its peers");
      }
      // Rank r's list has no entry for itself: ours is at our rank, one lower above r.
      const size_t at = size_t(rank_ > r ? rank_ - 1 : rank_) * pairBytes_;
      std::vector<char> mine(addresses[r].begin() + long(at),
                             addresses[r].begin() + long(at + pairBytes_));
      try {
        transport_->getPair(int(r))->connect(mine);
      } catch (const std::exception& e) {
        throw CollectiveError(who + ": cannot connect to rank " + std::to_string(r) +
                              " within " + std::to_string(timeout_) + " ms: " + glooWhy(e));
      }
    }
    auto context = std::make_shared<MeshContext>(int(rank_), int(ranks_));
    context->setTimeout(std::chrono::milliseconds(timeout_));
    context->install(device_, transport_);
    context_ = std::move(context);
  }

  uint32_t rank() const override { return rank_; }
  uint32_t size() const override { return ranks_; }

  void allReduceSum(float* data, size_t n) override {
    if (n == 0) return checkBroken();
    gathered_.resize(size_t(ranks_) * n);
    allGather(data, n, gathered_.data());
    // Rank order, as the shared-memory collective adds: the same bits on every rank.
    std::memcpy(data, gathered_.data(), n * sizeof(float));
    for (uint32_t r = 1; r < ranks_; ++r) {
      const float* __restrict in = gathered_.data() + size_t(r) * n;
      float* __restrict out = data;
      for (size_t i = 0; i < n; ++i) out[i] += in[i];
    }
  }

  void allGather(const float* mine, size_t n, float* all) override {
    checkBroken();
    if (n == 0) return;
    const size_t bytes = n * sizeof(float);
    std::unique_ptr<gloo::transport::UnboundBuffer> into;
    std::unique_ptr<gloo::transport::UnboundBuffer> from;
    uint32_t remote = 0;
    try {
      into = context_->createUnboundBuffer(all, size_t(ranks_) * bytes);
      // Gloo only reads a buffer it sends from.
      from = context_->createUnboundBuffer(const_cast<float*>(mine), bytes);
      const uint64_t slot = uint64_t(context_->nextSlot());
      for (uint32_t r = 0; r < ranks_; ++r) {
        if (sameNode(r)) continue;
        into->recv(int(r), slot, size_t(r) * bytes, bytes);
        from->send(int(r), slot, 0, bytes);
        ++remote;
      }
    } catch (const gloo::Exception& e) {
      fail("rank " + std::to_string(rank_) + ": a collective could not start: " +
                             glooWhy(e));
    } catch (const gloo::EnforceNotMet& e) {
      fail("rank " + std::to_string(rank_) + ": a collective could not start: " +
                             glooWhy(e));
    }
    publish(into.get(), from.get());
    try {
      // This node's part over shared memory while the network part is in flight.
      local_->allGather(mine, n, all + size_t(nodeBase_) * n);
      for (uint32_t i = 0; i < remote; ++i) awaitDone(*into, /*receive=*/true);
      for (uint32_t i = 0; i < remote; ++i) awaitDone(*from, /*receive=*/false);
    } catch (const CollectiveError& e) {
      fail(e.what());
    } catch (const gloo::Exception& e) {
      fail(describe(e));
    }
    publish(nullptr, nullptr);
  }

  void cancel() override {
    cancelled_.store(true, std::memory_order_release);
    local_->cancel();
    std::lock_guard<std::mutex> lock(inFlightMutex_);
    if (inFlightInto_ != nullptr) inFlightInto_->abortWaitRecv();
    if (inFlightFrom_ != nullptr) inFlightFrom_->abortWaitSend();
  }

  // A peer on this node, through its pidfd. A peer on another node has no pidfd here: its
  // death shows as a broken connection in the operation itself.
  std::string deadPeer() override { return local_->deadPeer(); }

 private:
  bool sameNode(uint32_t r) const { return r >= nodeBase_ && r < nodeBase_ + ranksPerNode_; }

  void checkBroken() const {
    if (broken_) throw CollectiveError("collective is broken: " + brokenWhy_);
    if (!context_) {
      throw CollectiveError("rank " + std::to_string(rank_) +
                            ": the collective is not connected to its peers yet");
    }
  }

  // Makes the operation's buffers reachable to cancel(), and honours a cancel() that came first.
  void publish(gloo::transport::UnboundBuffer* into, gloo::transport::UnboundBuffer* from) {
    std::lock_guard<std::mutex> lock(inFlightMutex_);
    inFlightInto_ = into;
    inFlightFrom_ = from;
    if (into != nullptr && cancelled_.load(std::memory_order_acquire)) {
      into->abortWaitRecv();
      from->abortWaitSend();
    }
  }

  void awaitDone(gloo::transport::UnboundBuffer& buffer, bool receive) {
    const auto timeout = std::chrono::milliseconds(timeout_);
    bool done = receive ? buffer.waitRecv(nullptr, timeout) : buffer.waitSend(nullptr, timeout);
    if (!done || cancelled_.load(std::memory_order_acquire)) {
      throw CollectiveError("cancelled while waiting for peers");
    }
  }

  std::string describe(const gloo::Exception& e) const {
    std::string why = glooWhy(e);
    if (why.find("Timed out") != std::string::npos) {
      return "rank " + std::to_string(rank_) + ": timed out after " + std::to_string(timeout_) +
             " ms waiting for a peer rank on another node in a collective: a peer is hung or "
             "stopped, or its node is unreachable";
    }
    return "rank " + std::to_string(rank_) +
           ": lost the connection to a peer rank on another node during a collective: " + why;
  }

  // Breaks the collective for good. The connections close before the caller's buffers go away:
  // Gloo never writes into them again.
  [[noreturn]] void fail(const std::string& why) {
    publish(nullptr, nullptr);
    if (!broken_) {
      broken_ = true;
      brokenWhy_ = why;
      local_->cancel();
      if (context_) context_->closeConnections();
    }
    throw CollectiveError(why);
  }

  uint32_t rank_;
  uint32_t ranks_;
  uint32_t nodeBase_;
  uint32_t ranksPerNode_;
  int64_t timeout_;
  std::unique_ptr<Collective> local_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::transport::Context> transport_;
  std::shared_ptr<gloo::Context> context_;  // once connected
  std::vector<char> address_;
  size_t pairBytes_ = 0;
  std::vector<float> gathered_;
  bool broken_ = false;
  std::string brokenWhy_;
  std::atomic<bool> cancelled_{false};
  std::mutex inFlightMutex_;
  gloo::transport::UnboundBuffer* inFlightInto_ = nullptr;
  gloo::transport::UnboundBuffer* inFlightFrom_ = nullptr;
};

}  // namespace

std::unique_ptr<RendezvousStore> makeDirectoryStore(const std::string& dir) {
  return std::make_unique<DirectoryStore>(dir);
}

std::unique_ptr<CrossNodeCollective> listenCrossNode(const CrossNodeJoin& join,
                                                     std::unique_ptr<Collective> local) {
  if (join.ranks == 0 || join.ranksPerNode == 0 || join.ranks % join.ranksPerNode != 0 ||
      join.rank >= join.ranks) {
    throw std::invalid_argument("cross-node collective: rank " + std::to_string(join.rank) +
                                " of " + std::to_string(join.ranks) + " ranks, " +
                                std::to_string(join.ranksPerNode) +
                                " per node: needs rank < ranks and ranks a multiple of the "
                                "ranks per node");
  }
  if (!local || local->size() != join.ranksPerNode ||
      local->rank() != join.rank % join.ranksPerNode) {
    throw std::invalid_argument("cross-node collective: rank " + std::to_string(join.rank) +
                                " needs its node's collective as local rank " +
                                std::to_string(join.rank % join.ranksPerNode) + " of " +
                                std::to_string(join.ranksPerNode));
  }
  if (join.timeoutMs <= 0) {
    throw std::invalid_argument("cross-node collective: the timeout must be positive");
  }
  return std::make_unique<CrossNode>(join, std::move(local));
}

std::unique_ptr<Collective> joinCrossNodeCollective(const CrossNodeJoin& join,
                                                    std::unique_ptr<Collective> local,
                                                    RendezvousStore& store) {
  auto mine = listenCrossNode(join, std::move(local));
  const std::string prefix = join.groupKey + "/";
  store.set(prefix + std::to_string(join.rank), mine->address());
  std::vector<std::vector<char>> addresses(join.ranks);
  for (uint32_t r = 0; r < join.ranks; ++r) {
    if (r == join.rank) continue;
    try {
      addresses[r] = store.get(prefix + std::to_string(r), join.timeoutMs);
    } catch (const CollectiveError& e) {
      throw CollectiveError("rank " + std::to_string(join.rank) + " of " +
                            std::to_string(join.ranks) + ": " + e.what());
    }
  }
  mine->connect(addresses);
  return mine;
}

}  // namespace vsup::engine
