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
// one value per rank), for joinCrossNodeCollective. Serving needs none: engine-core gathers the
// ranks' addresses over its control connections and hands them back (listenCrossNode,
// CrossNodeCollective::connect). Tests and benchmarks on one machine use a directory.
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
  // Bounds the connect and every wait of every operation (and, through a store, each look-up).
  int64_t timeoutMs = 30000;
  // joinCrossNodeCollective only: prefixes every key it writes or reads, one group per prefix,
  // so that one store may serve several groups (one start after another).
  std::string groupKey = "tp";
};

// A rank's collective over the whole group, joined in two phases so that the rank's runner can
// be built (its weights loaded) while whoever orchestrates the group gathers every rank's
// address: listenCrossNode() opens this rank's sockets, address() says how to reach them,
// connect() takes every rank's address and connects. Operations before connect() fail with
// CollectiveError.
//
// Thread: connect() and the operations on one thread at a time (the rank's compute thread);
// address() and cancel() from any thread.
class CrossNodeCollective : public Collective {
 public:
  // Opaque bytes, the same length for every rank of the group.
  virtual const std::vector<char>& address() const = 0;
  // addresses[r] is rank r's address() (this rank's own entry is not read). Blocks until every
  // connection of this rank is up, or throws CollectiveError after timeoutMs naming the peer.
  // Once.
  virtual void connect(const std::vector<std::vector<char>>& addresses) = 0;
};

// Phase one for rank join.rank. `local` is this rank's collective among the ranks of its node:
// its size() must be join.ranksPerNode and its rank() join.rank % join.ranksPerNode. The result
// owns it. Throws std::invalid_argument for a layout that does not add up, CollectiveError when
// the listen address is not usable here.
std::unique_ptr<CrossNodeCollective> listenCrossNode(const CrossNodeJoin& join,
                                                     std::unique_ptr<Collective> local);

// Both phases through a store (ranks on one machine: tests, benchmarks): publishes address()
// under "<groupKey>/<rank>", reads every other rank's (each read bounded by timeoutMs), connects.
std::unique_ptr<Collective> joinCrossNodeCollective(const CrossNodeJoin& join,
                                                    std::unique_ptr<Collective> local,
                                                    RendezvousStore& store);

}  // namespace vsup::engine
