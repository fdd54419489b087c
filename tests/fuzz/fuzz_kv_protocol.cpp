// Fuzz target: the KV agents' frame decoder (kvconnector/kv_protocol.h) on any bytes a peer
// could send, since a KV agent's port is reachable over TCP.
//
// Input: byte 0 picks how the rest is fed (all at once, or in pieces of 1..16 bytes, so that
// every split of a frame is tried); the rest is the stream.
//
// Properties checked:
//   * The decoder never reads past what it was given and throws only ProtocolError.
//   * Every message it decodes re-encodes to exactly the frame it came from, and decodes again
//     to an equal message (nothing it accepts is lost or changed).
//   * buffered() is always the bytes fed minus the bytes of the frames decoded.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvconnector/kv_protocol.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vsup::kv;
  if (size == 0) return 0;
  const size_t piece = data[0] == 0 ? size : size_t(data[0] % 16) + 1;
  const char* stream = reinterpret_cast<const char*>(data + 1);
  const size_t n = size - 1;
  FrameDecoder decoder;
  size_t fed = 0;
  size_t consumed = 0;
  try {
    while (fed < n) {
      size_t k = std::min(piece, n - fed);
      decoder.feed(stream + fed, k);
      fed += k;
      Message m;
      while (decoder.next(m)) {
        std::string frame = encode(m);
        FUZZ_CHECK(consumed + frame.size() <= fed, "a frame longer than the bytes fed");
        FUZZ_CHECK(frame == std::string(stream + consumed, frame.size()),
                   "a decoded frame does not re-encode to its own bytes");
        consumed += frame.size();
        FrameDecoder again;
        again.feed(frame.data(), frame.size());
        Message m2;
        FUZZ_CHECK(again.next(m2) && m2 == m, "a re-encoded frame decodes to another message");
        if (const auto* h = std::get_if<Hello>(&m)) {
          FUZZ_CHECK(compatMismatch(h->compat, h->compat).empty(), "a compat differs from itself");
        }
      }
      FUZZ_CHECK(decoder.buffered() == fed - consumed, "buffered() lost track of the bytes");
    }
  } catch (const ProtocolError&) {
    // A malformed stream: the one error the decoder may raise.
  }
  return 0;
}
