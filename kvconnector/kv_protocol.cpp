#include "kvconnector/kv_protocol.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

namespace vsup::kv {
namespace {

enum class Type : uint16_t {
  Hello = 1,
  Welcome = 2,
  Pull = 3,
  PullReady = 4,
  Done = 5,
  DoneOk = 6,
  Error = 7,
  PullEnd = 8,
};

class Writer {
 public:
  void u8(uint8_t v) { out_.push_back(char(v)); }
  void u16(uint16_t v) { le(v, 2); }
  void u32(uint32_t v) { le(v, 4); }
  void u64(uint64_t v) { le(v, 8); }
  void i32(int32_t v) { le(uint32_t(v), 4); }
  void str(const std::string& s, const char* field) {
    if (s.size() > kMaxStringBytes) {
      throw ProtocolError(std::string(field) + " is " + std::to_string(s.size()) +
                          " bytes; at most " + std::to_string(kMaxStringBytes) + " are allowed");
    }
    u32(uint32_t(s.size()));
    out_ += s;
  }
  std::string& bytes() { return out_; }

 private:
  void le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(char((v >> (8 * i)) & 0xff));
  }
  std::string out_;
};

class Reader {
 public:
  Reader(const char* p, size_t n, const char* frame) : p_(p), n_(n), frame_(frame) {}
  uint8_t u8(const char* f) { return uint8_t(le(1, f)); }
  uint16_t u16(const char* f) { return uint16_t(le(2, f)); }
  uint32_t u32(const char* f) { return uint32_t(le(4, f)); }
  uint64_t u64(const char* f) { return le(8, f); }
  int32_t i32(const char* f) { return int32_t(u32(f)); }
  bool flag(const char* f) {
    uint8_t v = u8(f);
    if (v > 1) fail(std::string(f) + " is " + std::to_string(v) + ", not 0 or 1");
    return v == 1;
  }
  std::string str(const char* f) {
    uint32_t len = u32(f);
    if (len > kMaxStringBytes) {
      fail(std::string(f) + " claims " + std::to_string(len) + " bytes (at most " +
           std::to_string(kMaxStringBytes) + ")");
    }
    need(len, f);
    std::string s(p_ + at_, len);
    at_ += len;
    return s;
  }
  void end() {
    if (at_ != n_) fail(std::to_string(n_ - at_) + " byte(s) left over after the last field");
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw ProtocolError(std::string("bad ") + frame_ + " frame: " + why);
  }

 private:
  void need(size_t k, const char* f) {
    if (n_ - at_ < k) fail(std::string("it ends inside ") + f);
  }
  uint64_t le(int k, const char* f) {
    need(size_t(k), f);
    uint64_t v = 0;
    for (int i = 0; i < k; ++i) v |= uint64_t(uint8_t(p_[at_ + size_t(i)])) << (8 * i);
    at_ += size_t(k);
    return v;
  }
  const char* p_;
  size_t n_;
  size_t at_ = 0;
  const char* frame_;
};

void writeCompat(Writer& w, const KvCompat& c) {
  w.str(c.model, "model");
  w.str(c.dtype, "dtype");
  w.u32(c.layers);
  w.u32(c.kvHeads);
  w.u32(c.headDim);
  w.u32(c.blockSize);
  w.str(c.layout, "layout");
  w.u32(c.tpSize);
  w.u32(c.protocolVersion);
}

KvCompat readCompat(Reader& r) {
  KvCompat c;
  c.model = r.str("model");
  c.dtype = r.str("dtype");
  c.layers = r.u32("layers");
  c.kvHeads = r.u32("kv heads");
  c.headDim = r.u32("head size");
  c.blockSize = r.u32("block size");
  c.layout = r.str("layout");
  c.tpSize = r.u32("tensor-parallel size");
  c.protocolVersion = r.u32("protocol version");
  return c;
}

Transport readTransport(Reader& r) {
  uint8_t t = r.u8("transport");
  if (t != uint8_t(Transport::Shm) && t != uint8_t(Transport::Tcp)) {
    r.fail("transport " + std::to_string(t) + " is not 1 (shm) or 2 (tcp)");
  }
  return Transport(t);
}

ErrorCode readCode(Reader& r) {
  uint16_t c = r.u16("error code");
  if (c < uint16_t(ErrorCode::BadFrame) || c > uint16_t(ErrorCode::ShuttingDown)) {
    r.fail("error code " + std::to_string(c) + " is unknown");
  }
  return ErrorCode(c);
}

const char* typeName(uint16_t t) {
  switch (Type(t)) {
    case Type::Hello: return "Hello";
    case Type::Welcome: return "Welcome";
    case Type::Pull: return "Pull";
    case Type::PullReady: return "PullReady";
    case Type::Done: return "Done";
    case Type::DoneOk: return "DoneOk";
    case Type::Error: return "Error";
    case Type::PullEnd: return "PullEnd";
  }
  return "unknown";
}

Message decodePayload(uint16_t type, const char* p, size_t n) {
  Reader r(p, n, typeName(type));
  Message m;
  switch (Type(type)) {
    case Type::Hello: {
      Hello h;
      h.compat = readCompat(r);
      h.rank = r.u32("rank");
      h.expectEngineId = r.str("engine id");
      h.transport = readTransport(r);
      m = std::move(h);
      break;
    }
    case Type::Welcome: {
      Welcome w;
      w.engineId = r.str("engine id");
      w.rank = r.u32("rank");
      w.regionBytes = r.u64("region bytes");
      m = std::move(w);
      break;
    }
    case Type::Pull: {
      Pull pl;
      pl.pullId = r.u64("pull id");
      pl.leaseId = r.str("lease id");
      uint32_t count = r.u32("block count");
      if (count > kMaxBlocksPerPull) {
        r.fail("block count " + std::to_string(count) + " is over " +
               std::to_string(kMaxBlocksPerPull));
      }
      pl.blocks.reserve(count);
      for (uint32_t i = 0; i < count; ++i) pl.blocks.push_back(r.i32("block id"));
      m = std::move(pl);
      break;
    }
    case Type::PullReady: {
      PullReady pr;
      pr.pullId = r.u64("pull id");
      pr.bytes = r.u64("bytes");
      m = pr;
      break;
    }
    case Type::PullEnd: {
      PullEnd pe;
      pe.pullId = r.u64("pull id");
      m = pe;
      break;
    }
    case Type::Done: {
      Done d;
      d.leaseId = r.str("lease id");
      d.gaveUp = r.flag("gave up");
      m = std::move(d);
      break;
    }
    case Type::DoneOk: {
      DoneOk d;
      d.leaseId = r.str("lease id");
      m = std::move(d);
      break;
    }
    case Type::Error: {
      ErrorMsg e;
      e.code = readCode(r);
      e.pullId = r.u64("pull id");
      e.leaseId = r.str("lease id");
      e.message = r.str("message");
      m = std::move(e);
      break;
    }
    default:
      throw ProtocolError("bad frame: type " + std::to_string(type) + " is unknown (1..8)");
  }
  r.end();
  return m;
}

}  // namespace

KvCompat compatFor(const engine::KvCacheLayout& l, std::string model, uint32_t modelKvHeads,
                   uint32_t tpSize) {
  KvCompat c;
  c.model = std::move(model);
  c.dtype = l.dtype;
  c.layers = uint32_t(l.layers);
  c.kvHeads = modelKvHeads;
  c.headDim = uint32_t(l.headDim);
  c.blockSize = uint32_t(l.blockSize);
  c.tpSize = tpSize;
  return c;
}

uint64_t compatHash(const KvCompat& c) {
  Writer w;
  writeCompat(w, c);
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : w.bytes()) {
    h ^= uint8_t(ch);
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string compatMismatch(const KvCompat& a, const KvCompat& b) {
  auto differ = [](const char* field, const auto& x, const auto& y) -> std::string {
    if (x == y) return {};
    auto show = [](const auto& v) {
      if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>) {
        return "\"" + v + "\"";
      } else {
        return std::to_string(v);
      }
    };
    return std::string(field) + ": this instance " + show(x) + ", the peer " + show(y);
  };
  for (std::string d : {differ("protocol version", a.protocolVersion, b.protocolVersion),
                        differ("model", a.model, b.model), differ("dtype", a.dtype, b.dtype),
                        differ("layers", a.layers, b.layers),
                        differ("kv heads", a.kvHeads, b.kvHeads),
                        differ("head size", a.headDim, b.headDim),
                        differ("block size", a.blockSize, b.blockSize),
                        differ("layout", a.layout, b.layout),
                        differ("tensor-parallel size", a.tpSize, b.tpSize)}) {
    if (!d.empty()) return d;
  }
  return {};
}

const char* transportName(Transport t) { return t == Transport::Shm ? "shm" : "tcp"; }

const char* errorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::BadFrame: return "bad frame";
    case ErrorCode::Incompatible: return "incompatible";
    case ErrorCode::EngineRestarted: return "remote engine restarted";
    case ErrorCode::UnknownLease: return "unknown lease";
    case ErrorCode::LeaseExpired: return "lease expired";
    case ErrorCode::OutsideLease: return "block outside the lease";
    case ErrorCode::WrongRank: return "wrong rank";
    case ErrorCode::ShuttingDown: return "shutting down";
  }
  return "unknown";
}

std::string encode(const Message& message) {
  Writer w;
  Type type = Type::Error;
  std::visit(
      [&](const auto& m) {
        using M = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<M, Hello>) {
          type = Type::Hello;
          writeCompat(w, m.compat);
          w.u32(m.rank);
          w.str(m.expectEngineId, "engine id");
          w.u8(uint8_t(m.transport));
        } else if constexpr (std::is_same_v<M, Welcome>) {
          type = Type::Welcome;
          w.str(m.engineId, "engine id");
          w.u32(m.rank);
          w.u64(m.regionBytes);
        } else if constexpr (std::is_same_v<M, Pull>) {
          type = Type::Pull;
          if (m.blocks.size() > kMaxBlocksPerPull) {
            throw ProtocolError("a pull of " + std::to_string(m.blocks.size()) +
                                " blocks; at most " + std::to_string(kMaxBlocksPerPull));
          }
          w.u64(m.pullId);
          w.str(m.leaseId, "lease id");
          w.u32(uint32_t(m.blocks.size()));
          for (int32_t b : m.blocks) w.i32(b);
        } else if constexpr (std::is_same_v<M, PullReady>) {
          type = Type::PullReady;
          w.u64(m.pullId);
          w.u64(m.bytes);
        } else if constexpr (std::is_same_v<M, PullEnd>) {
          type = Type::PullEnd;
          w.u64(m.pullId);
        } else if constexpr (std::is_same_v<M, Done>) {
          type = Type::Done;
          w.str(m.leaseId, "lease id");
          w.u8(m.gaveUp ? 1 : 0);
        } else if constexpr (std::is_same_v<M, DoneOk>) {
          type = Type::DoneOk;
          w.str(m.leaseId, "lease id");
        } else {
          type = Type::Error;
          w.u16(uint16_t(m.code));
          w.u64(m.pullId);
          w.str(m.leaseId, "lease id");
          // An error message is cut rather than refused: the error must still go out.
          w.str(m.message.substr(0, kMaxStringBytes), "message");
        }
      },
      message);
  Writer h;
  h.u32(kFrameMagic);
  h.u16(uint16_t(type));
  h.u16(0);
  h.u32(uint32_t(w.bytes().size()));
  return h.bytes() + w.bytes();
}

void FrameDecoder::feed(const void* data, size_t n) {
  if (pos_ > 0 && pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  } else if (pos_ > 65536) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  buf_.append(static_cast<const char*>(data), n);
}

bool FrameDecoder::next(Message& out) {
  if (broken_) throw ProtocolError("the stream is unusable after an earlier bad frame");
  if (buffered() < kFrameHeaderBytes) return false;
  const char* p = buf_.data() + pos_;
  Reader hr(p, kFrameHeaderBytes, "frame");
  uint32_t magic = hr.u32("magic");
  uint16_t type = hr.u16("type");
  uint16_t flags = hr.u16("flags");
  uint32_t length = hr.u32("length");
  try {
    if (magic != kFrameMagic) {
      throw ProtocolError("bad frame: magic " + std::to_string(magic) +
                          " is not \"VSKV\" (is the peer a vsup KV agent?)");
    }
    if (flags != 0) throw ProtocolError("bad frame: flags are " + std::to_string(flags) + ", not 0");
    if (length > kMaxFrameBytes) {
      throw ProtocolError("bad frame: a payload of " + std::to_string(length) +
                          " bytes is over the " + std::to_string(kMaxFrameBytes) + "-byte limit");
    }
    if (buffered() < kFrameHeaderBytes + length) return false;
    out = decodePayload(type, p + kFrameHeaderBytes, length);
  } catch (const ProtocolError&) {
    broken_ = true;
    throw;
  }
  pos_ += kFrameHeaderBytes + length;
  return true;
}

size_t FrameDecoder::takeRaw(void* dst, size_t n) {
  size_t k = std::min(n, buffered());
  std::memcpy(dst, buf_.data() + pos_, k);
  pos_ += k;
  return k;
}

}  // namespace vsup::kv
