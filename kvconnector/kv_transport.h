// The KV agents' data plane over real sockets (docs/architecture.md, "KV transfer"): the prefill
// side serves pulls of leased blocks from its rank's cache region, the decode side pulls them
// into its own. Blocking calls with deadlines, meant for an agent's transfer threads: one
// serving thread per accepted connection, one pulling thread per peer.
//
// Same host (Transport::Shm): a Unix socket in the abstract namespace (no file to leave
// behind), the prefill's cache memfd passed once with Welcome (SCM_RIGHTS); the puller maps it
// read-only and copies each chunk from the peer's blocks to its own. Only a peer of the same
// uid (SO_PEERCRED) is served this way: the memfd is the whole cache.
// Across hosts (Transport::Tcp): each pull's chunks go out with sendmsg straight from the
// mapping and come in with recvmsg straight into the destination chunks.
//
// Every socket call uses MSG_NOSIGNAL: a peer that goes away is an error, never a SIGPIPE.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "base/fd.h"
#include "engine/kv_cache.h"
#include "kvconnector/kv_protocol.h"
#include "kvconnector/lease_table.h"

namespace vsup::kv {

// The abstract Unix socket name of prefill rank `rank` whose agents listen on TCP port `port`.
std::string shmSocketName(uint16_t port, uint32_t rank);

// Whether `host` names this machine: a loopback address, or one of its interfaces' addresses
// (what --kv-transport auto uses shared memory for). False when it does not resolve.
bool isLocalHost(const std::string& host);

// Listening sockets (close-on-exec, non-blocking accept). Throw vsup::SysError naming the address.
OwnFd listenTcp(const std::string& host, uint16_t port);
OwnFd listenUnixAbstract(const std::string& name);
// The port a listening TCP socket is bound to (after listening on port 0).
uint16_t boundPort(int fd);
// Connects before `deadline`; throws KvTransferError saying what failed and where.
OwnFd connectTcp(const std::string& host, uint16_t port, MonoNs deadline);
OwnFd connectUnixAbstract(const std::string& name, MonoNs deadline);

// A failed transfer, for the request it served. `code` is set when the peer refused (an
// ErrorMsg), else it is a transport failure (timeout, EOF, a reset).
class KvTransferError : public std::runtime_error {
 public:
  KvTransferError(const std::string& what, std::optional<ErrorCode> code = std::nullopt)
      : std::runtime_error(what), code_(code) {}
  std::optional<ErrorCode> code() const { return code_; }

 private:
  std::optional<ErrorCode> code_;
};

// While one is alive on a thread, every blocking call of this file made on that thread (connect,
// handshake, pull) also ends, with KvTransferError "cancelled", within 50 ms of `flag` becoming
// true: how an agent that is shutting down gets its transfer thread back from a peer that does
// not answer. Scopes do not nest.
class KvCancelScope {
 public:
  explicit KvCancelScope(const std::atomic<bool>& flag);
  ~KvCancelScope();
  KvCancelScope(const KvCancelScope&) = delete;
  KvCancelScope& operator=(const KvCancelScope&) = delete;
};

// One rank's cache as the serving side sees it.
struct KvSource {
  engine::KvCacheLayout layout;
  const std::byte* base = nullptr;  // layout.totalBytes() mapped
  int regionFd = -1;                // the memfd, for Shm peers
  std::string engineId;
  uint32_t rank = 0;
  KvCompat compat;
  // A test hook: told (on a connection's thread) of the digest of every pull's blocks as they
  // are served (engine::kvBlocksDigest). Empty: not computed.
  std::function<void(const std::string& leaseId, uint64_t digest)> servedDigest = nullptr;
};

// The serving side's leases, shared by its connection threads: a LeaseTable under a mutex, and
// a callback told of every lease that ends (engine-core releases its hold then).
class LeaseBook {
 public:
  using OnEnded = std::function<void(const std::vector<EndedLease>&)>;
  LeaseBook(int64_t leaseNs, OnEnded onEnded);
  void grant(const std::string& id, std::vector<int32_t> blocks);
  // Expires what is overdue now; returns the next expiry (kNoDeadline: none).
  MonoNs expireOverdue();
  void abandonAll();
  // Refuse new pulls from now on (shutdown); leases already pulling may finish.
  void stopAdmitting() { admitting_ = false; }
  struct Counts {
    size_t live = 0, pulling = 0;
    uint64_t granted = 0, done = 0, gaveUp = 0, disconnected = 0, expired = 0, abandoned = 0;
    uint64_t bytesSent = 0, pullsServed = 0, pullsRefused = 0;
  };
  Counts counts() const;

  // For the connection threads.
  LeaseTable::PullCheck beginPull(const std::string& id, const std::vector<int32_t>& blocks,
                                  LeaseTable::ConnId conn);
  std::optional<EndedLease> end(const std::string& id, LeaseEnd reason, LeaseTable::ConnId conn,
                                LeaseTable::PullCheck* refusal);
  void dropConnection(LeaseTable::ConnId conn);
  // Whether lease `id` is live (past expiries ended first) and bound to `conn`.
  bool stillLive(const std::string& id, LeaseTable::ConnId conn);
  void countSent(uint64_t bytes);
  void countRefused();
  bool admitting() const { return admitting_; }
  LeaseTable::ConnId newConnId() { return nextConn_.fetch_add(1) + 1; }

 private:
  void tell(std::vector<EndedLease> ended);
  mutable std::mutex mu_;
  LeaseTable table_;
  OnEnded onEnded_;
  std::atomic<bool> admitting_{true};
  std::atomic<uint64_t> nextConn_{0};
  uint64_t bytesSent_ = 0, pullsServed_ = 0, pullsRefused_ = 0;
};

// Serves one accepted connection until the peer closes it, a frame is malformed, or `stop` is
// set (checked every 100 ms); then ends the leases it was pulling (Disconnected) and returns.
// `fd` is the connection; `transport` what it is (Shm only on a Unix socket). `ioTimeoutMs`:
// how long a send may stall before the peer is given up.
void serveKvConnection(OwnFd fd, Transport transport, const KvSource& source, LeaseBook& leases,
                       const std::atomic<bool>& stop, int64_t ioTimeoutMs = 5000);

// A prefill rank's server: accepts on its listening sockets (a Unix one for Shm peers, a TCP one
// for the rest; either may be absent) on a thread of its own, and serves each connection on a
// thread of its own with serveKvConnection. stop() (or the destructor) closes the listeners,
// ends every connection within 100 ms and joins every thread.
class KvServer {
 public:
  KvServer(KvSource source, LeaseBook& leases, OwnFd unixListener, OwnFd tcpListener,
           int64_t ioTimeoutMs = 5000);
  ~KvServer();
  KvServer(const KvServer&) = delete;
  KvServer& operator=(const KvServer&) = delete;
  void stop();
  const KvSource& source() const { return source_; }
  size_t connections() const;  // open now

 private:
  void acceptLoop();
  KvSource source_;
  LeaseBook& leases_;
  OwnFd unix_, tcp_;
  int64_t ioTimeoutMs_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> finished;
  };
  std::vector<Worker> workers_;  // finished ones are joined at the next accept
  size_t open_ = 0;
  std::thread acceptor_;
};

// The decode side of one connection to one prefill rank.
class KvPuller {
 public:
  // Says Hello on `fd` (connected with the functions above) and reads the Welcome before
  // `deadline`. `ownLayout` is this rank's cache: the peer's has the same chunks, and as many
  // blocks as its Welcome's region size says. Throws KvTransferError: a refusal (Incompatible
  // names the field), the wrong engine ("remote engine restarted" when `expectEngineId` is set
  // and differs), a timeout.
  KvPuller(OwnFd fd, Transport transport, const KvCompat& compat, uint32_t rank,
           const std::string& expectEngineId, const engine::KvCacheLayout& ownLayout,
           MonoNs deadline);
  ~KvPuller();
  KvPuller(const KvPuller&) = delete;
  KvPuller& operator=(const KvPuller&) = delete;

  const std::string& peerEngineId() const { return peerEngineId_; }

  // Copies lease `leaseId`'s blocks `remoteBlocks` into `localBlocks` (same count) of the
  // cache at `dst` laid out as `dstLayout` (same chunk size as the peer's), and ends the lease
  // (Done). One round trip (kv_protocol.h says how): succeeds only once the peer has confirmed
  // that the lease was live during the whole copy, so bytes of a lease that expired mid-pull are
  // never used. Throws KvTransferError (the peer's refusal, a timeout at `deadline`, the
  // connection lost); the destination blocks' contents are then undefined. Returns the bytes
  // moved.
  uint64_t pull(const std::string& leaseId, const std::vector<int32_t>& remoteBlocks,
                const std::vector<int32_t>& localBlocks, std::byte* dst,
                const engine::KvCacheLayout& dstLayout, MonoNs deadline);
  // Tells the peer this lease will not be pulled (best effort: errors are swallowed).
  void giveUp(const std::string& leaseId, MonoNs deadline);
  // Waits until the peer has answered every Done sent so far (a TCP pull and giveUp do not wait
  // for it). Throws KvTransferError at `deadline`.
  void flush(MonoNs deadline);

 private:
  // The next message that is not the answer to an earlier Done.
  Message receive(MonoNs deadline);
  Message receiveAny(MonoNs deadline);
  void send(const Message& m, MonoNs deadline);

  OwnFd fd_;
  Transport transport_;
  engine::KvCacheLayout peerLayout_;
  std::string peerEngineId_;
  FrameDecoder decoder_;
  const std::byte* peerBase_ = nullptr;  // Shm: the peer's region, mapped read-only
  int64_t peerBytes_ = 0;
  uint64_t nextPull_ = 1;
  size_t doneAnswersDue_ = 0;
};

}  // namespace vsup::kv
