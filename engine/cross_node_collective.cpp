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
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include "base/error.h"

namespace vsup::engine {
namespace {

int64_t nowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

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
    const int64_t deadline = nowMs() + timeoutMs;
    for (;;) {
      std::ifstream in(path, std::ios::binary);
      if (in) return std::vector<char>(std::istreambuf_iterator<char>(in), {});
      if (nowMs() >= deadline) {
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

// Gloo's store interface over ours, every key under the group's prefix. Gloo's own get() and
// wait() calls carry Gloo's timeout; ours bounds them instead (the join's timeoutMs).
class GlooStore final : public gloo::rendezvous::Store {
 public:
  GlooStore(RendezvousStore& store, std::string prefix, int64_t timeoutMs)
      : store_(store), prefix_(std::move(prefix)), timeoutMs_(timeoutMs) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(prefix_ + "/" + key, data);
  }
  std::vector<char> get(const std::string& key) override {
    return store_.get(prefix_ + "/" + key, timeoutMs_);
  }
  void wait(const std::vector<std::string>& keys) override {
    for (const std::string& key : keys) store_.get(prefix_ + "/" + key, timeoutMs_);
  }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) override {
    wait(keys);
  }

 private:
  RendezvousStore& store_;
  std::string prefix_;
  int64_t timeoutMs_;
};

class CrossNode final : public Collective {
 public:
  CrossNode(const CrossNodeJoin& join, std::unique_ptr<Collective> local,
            std::shared_ptr<gloo::transport::Device> device,
            std::shared_ptr<gloo::rendezvous::Context> context)
      : rank_(join.rank), ranks_(join.ranks), nodeBase_(join.rank - join.rank % join.ranksPerNode),
        ranksPerNode_(join.ranksPerNode), timeout_(join.timeoutMs), local_(std::move(local)),
        device_(std::move(device)), context_(std::move(context)) {}

  ~CrossNode() override {
    // The connections first (Gloo's pairs), then its event loop thread (the device).
    context_.reset();
    device_.reset();
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
      context_->closeConnections();
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
  std::shared_ptr<gloo::rendezvous::Context> context_;
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

std::unique_ptr<Collective> joinCrossNodeCollective(const CrossNodeJoin& join,
                                                    std::unique_ptr<Collective> local,
                                                    RendezvousStore& store) {
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
  const std::string who = "rank " + std::to_string(join.rank) + " of " +
                          std::to_string(join.ranks);
  std::shared_ptr<gloo::transport::Device> device;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = join.listenAddress;
    device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    throw CollectiveError(who + ": cannot listen on \"" + join.listenAddress +
                          "\" for the ranks on other nodes: " + glooWhy(e));
  }
  auto context = std::make_shared<gloo::rendezvous::Context>(int(join.rank), int(join.ranks));
  // Gloo waits five times its timeout for a connection to come up: a fifth of ours, so that the
  // connect is bounded by the join's timeout too. The operations pass theirs explicitly.
  context->setTimeout(std::chrono::milliseconds(std::max<int64_t>(1, join.timeoutMs / 5)));
  GlooStore glooStore(store, join.groupKey, join.timeoutMs);
  try {
    context->connectFullMesh(glooStore, device);
  } catch (const CollectiveError& e) {
    throw CollectiveError(who + ": " + e.what());
  } catch (const std::exception& e) {
    throw CollectiveError(who + ": cannot connect to its peer ranks on other nodes within " +
                          std::to_string(join.timeoutMs) + " ms: " + glooWhy(e));
  }
  return std::make_unique<CrossNode>(join, std::move(local), std::move(device),
                                     std::move(context));
}

}  // namespace vsup::engine
