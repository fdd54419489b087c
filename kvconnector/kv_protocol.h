// The KV agents' wire protocol (docs/architecture.md, "KV transfer"): the control frames a
// decode instance's agent and a prefill instance's agent exchange over one stream socket (a Unix
// socket on the same host, TCP across hosts). Bulk KV bytes are never frames: over TCP they
// follow a PullReady frame raw, straight from the sender's mapping into the receiver's blocks;
// over a Unix socket the prefill agent sends its cache's memfd once (SCM_RIGHTS, with Welcome)
// and the decode agent copies the blocks itself.
//
// Sans-IO: encode() makes bytes, FrameDecoder turns received bytes into messages. Every frame is
// a 12-byte header (magic "VSKV", type, flags 0, payload length, all little-endian) and a
// payload of at most kMaxFrameBytes. A malformed frame is a ProtocolError saying what was wrong;
// it never reads past the bytes it was given.
//
// One conversation:
//   decode agent                           prefill agent
//   Hello{compat, rank, engine id?, transport} ──►  checks compat (a mismatch names the field)
//                                         ◄── Welcome{engine id, rank, region bytes} [+ memfd]
//   Pull{pull id, lease id, blocks} ────────►  every block in the lease? extends the lease
//                                         ◄── PullReady{pull id, bytes}
//   TCP:                                  ◄── the bytes, then PullEnd{pull id}: the lease was
//                                             still live once they were all sent
//   Done{lease id, gave up?} ───────────────►  releases the lease
//                                         ◄── DoneOk{lease id}, or Error{LeaseExpired}
// Over TCP a pull is one round trip: the data is good once PullEnd arrives, and Done's answer is
// read later (it only ends the lease). Over shared memory the puller copies as soon as it has
// sent Pull, then sends Done, and the data is good once PullReady and DoneOk both arrive: the
// lease was granted before its id was handed out (the prefill side's rule), and it was still
// live at Done, so it was live during the whole copy. Either way, bytes of a lease that expired
// during the pull are never used.
// Any request may instead be answered with Error{code, ...} (a pull's with its pull id, Done's
// with pull id 0); the connection stays usable except after BadFrame and Incompatible, which the
// sender follows by closing it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "engine/kv_cache.h"

namespace vsup::kv {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kFrameMagic = 0x564b5356;  // "VSKV" little-endian
inline constexpr size_t kFrameHeaderBytes = 12;
inline constexpr uint32_t kMaxFrameBytes = 1 << 20;
inline constexpr uint32_t kMaxStringBytes = 4096;
inline constexpr uint32_t kMaxBlocksPerPull = 65536;

// Everything two instances must agree on for one's KV blocks to mean the same in the other's
// cache. The block count and the engine id may differ.
struct KvCompat {
  std::string model;
  std::string dtype;
  uint32_t layers = 0;
  uint32_t kvHeads = 0;  // the model's, not a rank's share
  uint32_t headDim = 0;
  uint32_t blockSize = 0;
  std::string layout = "layer,kv,block,slot,head,dim";
  uint32_t tpSize = 0;
  uint32_t protocolVersion = kProtocolVersion;
  bool operator==(const KvCompat&) const = default;
};

// What an instance whose ranks each hold `rankLayout` must agree on with its peers: the cache's
// shape from the layout, the rest as named (the model's KV heads, not the rank's share).
KvCompat compatFor(const engine::KvCacheLayout& rankLayout, std::string model,
                   uint32_t modelKvHeads, uint32_t tpSize);

// A stable 64-bit hash of every field (FNV-1a over their encoding): what a router may compare.
uint64_t compatHash(const KvCompat& compat);
// Empty when the two agree; else the first field that differs, both values named:
// "tensor-parallel size: this instance 2, the peer 1".
std::string compatMismatch(const KvCompat& ours, const KvCompat& theirs);

enum class Transport : uint8_t { Shm = 1, Tcp = 2 };
const char* transportName(Transport t);

enum class ErrorCode : uint16_t {
  BadFrame = 1,         // malformed or unexpected: the connection is closed after it
  Incompatible = 2,     // compat mismatch: closed after it
  EngineRestarted = 3,  // the engine id named is not this agent's engine's
  UnknownLease = 4,     // never granted here, or released already
  LeaseExpired = 5,     // it expired (before or during the pull): its blocks may be reused
  OutsideLease = 6,     // a block the lease does not hold
  WrongRank = 7,        // the decode rank does not match this agent's
  ShuttingDown = 8,     // the agent takes no new pulls
};
const char* errorCodeName(ErrorCode code);

struct Hello {
  KvCompat compat;
  uint32_t rank = 0;
  std::string expectEngineId;  // empty: any
  Transport transport = Transport::Tcp;
  bool operator==(const Hello&) const = default;
};
struct Welcome {
  std::string engineId;
  uint32_t rank = 0;
  uint64_t regionBytes = 0;
  bool operator==(const Welcome&) const = default;
};
struct Pull {
  uint64_t pullId = 0;
  std::string leaseId;
  std::vector<int32_t> blocks;  // the prefill's block ids, in the order they are sent
  bool operator==(const Pull&) const = default;
};
struct PullReady {
  uint64_t pullId = 0;
  uint64_t bytes = 0;  // over TCP, exactly this many raw bytes follow
  bool operator==(const PullReady&) const = default;
};
struct PullEnd {
  uint64_t pullId = 0;
  bool operator==(const PullEnd&) const = default;
};
struct Done {
  std::string leaseId;
  bool gaveUp = false;  // the decode side will not pull this lease (an abort, a failure)
  bool operator==(const Done&) const = default;
};
struct DoneOk {
  std::string leaseId;
  bool operator==(const DoneOk&) const = default;
};
struct ErrorMsg {
  ErrorCode code = ErrorCode::BadFrame;
  uint64_t pullId = 0;
  std::string leaseId;
  std::string message;
  bool operator==(const ErrorMsg&) const = default;
};

using Message = std::variant<Hello, Welcome, Pull, PullReady, PullEnd, Done, DoneOk, ErrorMsg>;

class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One whole frame. Throws ProtocolError for a message over the limits (a string longer than
// kMaxStringBytes, more than kMaxBlocksPerPull blocks).
std::string encode(const Message& message);

// Received bytes in, messages out.
class FrameDecoder {
 public:
  void feed(const void* data, size_t n);
  // The next whole message, or false when more bytes are needed. Throws ProtocolError naming
  // what is wrong (bad magic, an unknown type, a length over the limit, a payload that ends
  // early or has bytes left over, a bad enum value); the decoder is unusable afterwards.
  bool next(Message& out);
  // Bytes received past the last decoded frame (the start of a raw bulk transfer).
  size_t buffered() const { return buf_.size() - pos_; }
  // Moves up to `n` buffered bytes to `dst`; returns how many.
  size_t takeRaw(void* dst, size_t n);

 private:
  std::string buf_;
  size_t pos_ = 0;
  bool broken_ = false;
};

}  // namespace vsup::kv
