// Collectives between the tensor-parallel ranks of one engine that spans several machines
// (nodes): shared memory between the ranks of one node, exactly as on one machine, and Gloo's
// TCP transport between ranks on different nodes.
//
// Layout: ranks are numbered node by node. Node k holds ranks [k * ranksPerNode,
// (k + 1) * ranksPerNode), and its ranks share one node-local collective (the shared-memory
// region of collective.h, or the identity when a node runs one rank).
//
// Algorithm: an all-gather over the whole group. Every rank sends its contribution to every
// rank on another node (Gloo, one TCP connection per pair of ranks) while it gathers its own
// node's contributions through shared memory. An all-reduce is that gather followed by a sum in
// rank order, which is exactly what the shared-memory collective computes: the result is
// bit-identical on every rank, and bit-identical to the same tensor-parallel size on one
// machine. This costs (remote ranks) x n floats sent per rank and operation. For the decode
// messages of serving (one hidden vector per token) that is one round trip, the least latency
// possible. For long prefills at TP > 2 a ring would send less.
//
// Never stuck: every wait is bounded. A peer on another node whose connection breaks (its
// process died, its node rebooted) fails the operation at once. A peer that stops answering
// fails it after timeoutMs. cancel() fails it now. A local peer is checked by pidfd, as in
// collective.h. After any failure, every connection is closed and every later call fails at
// once with CollectiveError.
//
// Thread: one compute thread per rank calls the operations; cancel() may be called from any
// thread. Gloo runs one thread of its own (its TCP event loop) per joined collective, ended by
// the destructor. Gloo writes to its sockets with writev(2), which raises SIGPIPE on a
// connection the peer closed. Only the processes of vsup's own tree (rank workers, whose
// executable ignores SIGPIPE) may join: never a library host.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/collective.h"

namespace vsup::engine {

// Where the ranks of one group publish what they need to connect (their listening addresses,
// one value per rank). In serving this is the engine's control channel. Tests and benchmarks on
// one machine use a directory (makeDirectoryStore).
//
// Thread: called only from the joining rank's thread, during join.
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  // The value some rank set for `key`, waiting up to timeoutMs for it. Throws CollectiveError
  // naming the key when the wait ends without one.
  virtual std::vector<char> get(const std::string& key, int64_t timeoutMs) = 0;
};

// A store in a directory that every rank can read: one file per key, written whole (a temporary
// name, then rename(2)). A get() checks for the file every 2 ms. Only for ranks on one machine
// (tests, benchmarks). The directory must exist. Its files are the caller's to remove.
std::unique_ptr<RendezvousStore> makeDirectoryStore(const std::string& dir);

struct CrossNodeJoin {
  uint32_t rank = 0;          // this rank, in the whole group
  uint32_t ranks = 0;         // the group's size: nodes x ranksPerNode
  uint32_t ranksPerNode = 1;  // divides ranks
  // The address this rank listens on for its peers on other nodes: an IPv4 or IPv6 literal or a
  // host name that resolves to an address of this node. Port: any free one (the store carries it).
  std::string listenAddress;
  // Bounds the rendezvous (publish, look up, connect) and every wait of every operation.
  int64_t timeoutMs = 30000;
  // Prefixes every key this join writes or reads: one group per prefix. A store may then
  // serve several groups (one engine start after another) without mixing them up.
  std::string groupKey = "tp";
};

// Joins rank join.rank of the group. `local` is this rank's collective among the ranks of its
// node: its size() must be join.ranksPerNode and its rank() join.rank % join.ranksPerNode. The
// result owns it. Blocks until every rank of the group has joined, or throws CollectiveError
// after timeoutMs naming what it waited for (which rank's address, which peer's connection),
// and std::invalid_argument for a layout that does not add up.
std::unique_ptr<Collective> joinCrossNodeCollective(const CrossNodeJoin& join,
                                                    std::unique_ptr<Collective> local,
                                                    RendezvousStore& store);

}  // namespace vsup::engine
