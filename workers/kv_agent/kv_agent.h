// A KV agent: `vsup __kv-agent`, one per tensor-parallel rank beside worker-tpR under
// engine-core (docs/architecture.md, "KV transfer"). It maps its rank's KV cache region (the
// memfd engine-core made and handed to both at spawn) and moves blocks between instances:
//
//   prefill role: holds leases engine-core grants on finished requests' blocks and serves them
//     to decode instances (a KvServer on TCP port + rank and on an abstract Unix socket for
//     shared memory), telling engine-core when each lease ends (nextEnded) so the blocks are
//     freed; its shutdown defers while leases are held, up to the KV deadline.
//   decode role: pulls a request's blocks from the prefill instance's agent of the same rank
//     into its own rank's blocks, on a transfer thread of its own (pull).
//
// It is a separate process so that a fault in it cannot take the rank down with it, and it
// keeps serving reads after the rank has stopped at shutdown.
//
// Threads: the loop thread serves KvAgent (engine-core's calls); the KvServer's threads serve
// peers; one transfer thread runs this agent's pulls, one at a time.
#pragma once

#include <uv.h>

#include <kj/async.h>

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "engine/kv_cache.h"
#include "engine/types.h"
#include "ipc/engine.capnp.h"
#include "kvconnector/kv_transport.h"
#include "supervisor/child_runtime.h"
#include "workers/compute_thread.h"

namespace vsup::workers {

struct KvAgentSettings {
  uint32_t rank = 0;
  std::string role = "both";  // prefill, decode, both
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  std::string transport = "auto";
  int64_t leaseMs = 30000;
  int64_t transferTimeoutMs = 10000;
  int64_t shutdownTimeoutMs = 10000;
  std::string engineId;
  engine::KvCacheLayout layout;
  kv::KvCompat compat;

  bool serves() const { return role != "decode"; }
  bool pulls() const { return role != "prefill"; }
};

KvAgentSettings decodeKvAgentConfig(const std::string& bytes);  // throws vsup::Error
std::string encodeKvAgentConfig(const KvAgentSettings& settings);

class KvAgent {
 public:
  // Maps `regionFd` (borrowed) and, when it serves, starts listening. Throws vsup::SysError
  // naming the address when a port is taken.
  KvAgent(uv_loop_t* loop, std::string node, KvAgentSettings settings, int regionFd);
  ~KvAgent();
  KvAgent(const KvAgent&) = delete;
  KvAgent& operator=(const KvAgent&) = delete;

  const std::string& node() const { return node_; }
  const KvAgentSettings& settings() const { return settings_; }

  // engine-core's calls.
  void grant(const std::string& id, std::vector<int32_t> blocks);
  kj::Promise<std::vector<kv::EndedLease>> nextEnded();
  struct PullResult {
    std::string error;  // empty: done
    std::string code;   // the peer's refusal, when it refused
    uint64_t bytes = 0;
  };
  kj::Promise<PullResult> pull(const engine::KvParams& remote, std::vector<int32_t> localBlocks);
  kj::Promise<void> giveUp(const engine::KvParams& remote);
  void fillStats(ipc::schema::KvAgentStats::Builder out) const;
  // One line for `vsup tree`: "leases 2 held (1 pulling), 7 done, 1 expired; sent 12.0 MiB" /
  // "pulls 9 done, 1 failed; pulled 40.5 MiB".
  std::string summary() const;

  // The "kv" shutdown hook: defers while leases are held, until they end or `giveUpAt`.
  kj::Promise<void> drain(uv_loop_t* loop, supervisor::ShutdownContext& ctx, MonoNs giveUpAt);

 private:
  void ended(const std::vector<kv::EndedLease>& e);  // from any thread
  kj::Promise<void> expireEvery100ms();
  kv::KvPuller& peer(const engine::KvParams& remote, MonoNs deadline);  // transfer thread
  kj::Promise<void> drainFrom(uv_loop_t* loop, supervisor::ShutdownContext& ctx, MonoNs giveUpAt,
                              uint64_t total);

  uv_loop_t* loop_;
  std::string node_;
  KvAgentSettings settings_;
  kj::Promise<void> expiry_ = nullptr;  // expires overdue leases every 100 ms
  OwnFd region_;  // kept for Shm peers (the memfd they are sent)
  OwnFd digestLog_;  // VSUP_KV_DIGEST_LOG (a test hook), or none
  void logDigest(const char* what, const std::string& lease, uint64_t digest);
  engine::KvCacheMapping map_;
  std::unique_ptr<kv::LeaseBook> leases_;
  std::unique_ptr<kv::KvServer> server_;

  mutable std::mutex mu_;  // the ended queue and its waiter
  std::deque<kv::EndedLease> endedQueue_;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> endedWaiter_;

  std::unique_ptr<ComputeThread> transfers_;
  std::map<std::string, std::unique_ptr<kv::KvPuller>> peers_;  // transfer thread only
  std::atomic<uint64_t> pullsDone_{0}, pullsFailed_{0}, bytesPulled_{0};
  std::atomic<bool> cancelPulls_{false};  // shutting down: pulls in flight end within 50 ms
};

kj::Own<ipc::schema::KvAgent::Server> makeKvAgentService(KvAgent& agent);

int kvAgentMain(int argc, char** argv);

}  // namespace vsup::workers
