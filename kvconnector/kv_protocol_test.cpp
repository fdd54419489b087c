#include <doctest/doctest.h>

#include <string>

#include "kvconnector/kv_protocol.h"

namespace vsup::kv {
namespace {

KvCompat compat() {
  KvCompat c;
  c.model = "vsup-tiny-25m";
  c.dtype = "f32";
  c.layers = 4;
  c.kvHeads = 4;
  c.headDim = 64;
  c.blockSize = 16;
  c.tpSize = 2;
  return c;
}

std::vector<Message> everyMessage() {
  return {Hello{compat(), 1, "engine-1", Transport::Shm},
          Hello{compat(), 0, "", Transport::Tcp},
          Welcome{"engine-1", 1, uint64_t(1) << 33},
          Pull{42, "cmpl-7-0", {0, 5, 2147483647}},
          Pull{43, "empty", {}},
          PullReady{42, 123456789},
          PullEnd{42},
          Done{"cmpl-7-0", false},
          Done{"cmpl-8-0", true},
          DoneOk{"cmpl-7-0"},
          ErrorMsg{ErrorCode::LeaseExpired, 42, "cmpl-7-0", "lease cmpl-7-0 expired"}};
}

std::string header(uint32_t magic, uint16_t type, uint16_t flags, uint32_t length) {
  std::string h;
  for (uint64_t v : {uint64_t(magic)}) for (int i = 0; i < 4; ++i) h.push_back(char(v >> (8 * i)));
  h.push_back(char(type & 0xff));
  h.push_back(char(type >> 8));
  h.push_back(char(flags & 0xff));
  h.push_back(char(flags >> 8));
  for (int i = 0; i < 4; ++i) h.push_back(char(length >> (8 * i)));
  return h;
}

std::string decodeError(const std::string& bytes) {
  FrameDecoder d;
  d.feed(bytes.data(), bytes.size());
  Message m;
  try {
    d.next(m);
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("every message round-trips, whole and fed one byte at a time") {
  std::string stream;
  for (const Message& m : everyMessage()) {
    std::string frame = encode(m);
    FrameDecoder d;
    d.feed(frame.data(), frame.size());
    Message out;
    REQUIRE(d.next(out));
    CHECK(out == m);
    CHECK(d.buffered() == 0);
    stream += frame;
  }
  FrameDecoder d;
  std::vector<Message> got;
  for (char c : stream) {
    d.feed(&c, 1);
    Message out;
    while (d.next(out)) got.push_back(out);
  }
  CHECK(got == everyMessage());
}

TEST_CASE("bytes after a frame stay buffered for a raw read") {
  std::string frame = encode(PullReady{1, 6}) + "abcdef";
  FrameDecoder d;
  d.feed(frame.data(), frame.size());
  Message m;
  REQUIRE(d.next(m));
  CHECK(d.buffered() == 6);
  char raw[4];
  CHECK(d.takeRaw(raw, 4) == 4);
  CHECK(std::string(raw, 4) == "abcd");
  CHECK(d.buffered() == 2);
}

TEST_CASE("a malformed frame is an error that says what is wrong, and the stream stays broken") {
  CHECK(decodeError(header(0x12345678, 1, 0, 0)).find("\"VSKV\"") != std::string::npos);
  CHECK(decodeError(header(kFrameMagic, 99, 0, 0)).find("type 99 is unknown") != std::string::npos);
  CHECK(decodeError(header(kFrameMagic, 4, 1, 16)).find("flags") != std::string::npos);
  CHECK(decodeError(header(kFrameMagic, 4, 0, kMaxFrameBytes + 1)).find("limit") !=
        std::string::npos);
  // A PullReady payload one byte short, and one with a byte left over.
  std::string shortPayload = header(kFrameMagic, 4, 0, 15) + std::string(15, '\0');
  CHECK(decodeError(shortPayload).find("it ends inside bytes") != std::string::npos);
  std::string longPayload = header(kFrameMagic, 4, 0, 17) + std::string(17, '\0');
  CHECK(decodeError(longPayload).find("1 byte(s) left over") != std::string::npos);
  // A Done whose flag is 2, an Error with code 0, a string that claims 1 GiB.
  std::string done = encode(Done{"x", true});
  done.back() = 2;
  CHECK(decodeError(done).find("gave up is 2") != std::string::npos);
  std::string err = encode(ErrorMsg{ErrorCode::BadFrame, 0, "", ""});
  err[kFrameHeaderBytes] = 0;
  CHECK(decodeError(err).find("error code 0 is unknown") != std::string::npos);
  std::string big = encode(DoneOk{"x"});
  big[kFrameHeaderBytes + 3] = 0x40;
  CHECK(decodeError(big).find("claims") != std::string::npos);

  FrameDecoder d;
  std::string bad = header(0, 1, 0, 0);
  d.feed(bad.data(), bad.size());
  Message m;
  CHECK_THROWS_AS(d.next(m), ProtocolError);
  std::string good = encode(DoneOk{"x"});
  d.feed(good.data(), good.size());
  CHECK_THROWS_WITH_AS(d.next(m), doctest::Contains("unusable"), ProtocolError);
}

TEST_CASE("encoding refuses what the decoder would refuse") {
  CHECK_THROWS_WITH_AS(encode(DoneOk{std::string(kMaxStringBytes + 1, 'x')}),
                       doctest::Contains("lease id is 4097 bytes"), ProtocolError);
  Pull p;
  p.blocks.assign(kMaxBlocksPerPull + 1, 0);
  CHECK_THROWS_AS(encode(p), ProtocolError);
  // An error message is cut, not refused: it must still reach the peer.
  std::string frame = encode(ErrorMsg{ErrorCode::BadFrame, 0, "", std::string(10000, 'e')});
  FrameDecoder d;
  d.feed(frame.data(), frame.size());
  Message m;
  REQUIRE(d.next(m));
  CHECK(std::get<ErrorMsg>(m).message.size() == kMaxStringBytes);
}

TEST_CASE("a compat mismatch names the first field that differs, with both values") {
  KvCompat a = compat();
  CHECK(compatMismatch(a, a).empty());
  KvCompat b = a;
  b.tpSize = 1;
  CHECK(compatMismatch(a, b) == "tensor-parallel size: this instance 2, the peer 1");
  b = a;
  b.model = "other";
  CHECK(compatMismatch(a, b) == "model: this instance \"vsup-tiny-25m\", the peer \"other\"");
  b = a;
  b.blockSize = 32;
  b.headDim = 128;
  CHECK(compatMismatch(a, b) == "head size: this instance 64, the peer 128");
  b = a;
  b.protocolVersion = 2;
  CHECK(compatMismatch(a, b).find("protocol version") == 0);
}

TEST_CASE("the compat hash changes with every field and only with them") {
  KvCompat a = compat();
  CHECK(compatHash(a) == compatHash(compat()));
  std::vector<KvCompat> variants(9, a);
  variants[0].model = "m";
  variants[1].dtype = "bf16";
  variants[2].layers = 5;
  variants[3].kvHeads = 8;
  variants[4].headDim = 32;
  variants[5].blockSize = 8;
  variants[6].layout = "other";
  variants[7].tpSize = 4;
  variants[8].protocolVersion = 9;
  for (const KvCompat& v : variants) CHECK(compatHash(v) != compatHash(a));
}

}  // namespace vsup::kv
