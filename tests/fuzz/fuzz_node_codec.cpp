// Fuzz target: node_codec's decoders (supervisor/node_codec.h) on any bytes read as a Cap'n Proto
// message.
//
// Input: a flat Cap'n Proto message (segment table + segments), read with capnp's default
// reader options of the control links (ipc::controlReaderOptions()), three times: as a
// SupervisorSpec (what Node.start carries), a NodeStatus (what Node.status returns) and a
// Deferral. A message the reader rejects throws kj::Exception, which is fine; a structurally
// valid one must decode without crashing.
//
// Properties checked:
//   * Bounded cost: what one message decodes to takes at most 64 MiB (footprint.h says why).
//   * decode(encode(decode(m))) encodes to the same bytes as decode(m) (the codec loses nothing
//     it produced itself), and validate() of a decoded spec throws only vsup::Error.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>

#include "ipc/rpc_link.h"
#include "base/error.h"
#include "supervisor/node_codec.h"
#include "tests/fuzz/footprint.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace vsup::supervisor;
namespace schema = vsup::ipc::schema;

template <typename Schema, typename Value>
kj::Array<capnp::word> encoded(const Value& value) {
  capnp::MallocMessageBuilder message;
  encode(value, message.initRoot<Schema>());
  return capnp::messageToFlatArray(message);
}

template <typename Schema>
auto decodeFlat(kj::ArrayPtr<const capnp::word> words) {
  capnp::FlatArrayMessageReader reader(words, vsup::ipc::controlReaderOptions());
  return decode(reader.getRoot<Schema>());
}

// Decodes `words` as `Schema`; then the decoded value must survive encode → decode unchanged.
template <typename Schema>
void roundTrip(kj::ArrayPtr<const capnp::word> words, const char* what) {
  auto value = decodeFlat<Schema>(words);
  const size_t bytes = vsup::fuzz::footprint(value);
  FUZZ_CHECK(bytes <= vsup::fuzz::kMaxDecodedBytes,
             "a " + std::to_string(words.size() * sizeof(capnp::word)) +
                 "-byte message decodes to " +
                 std::to_string(bytes >> 20) + " MiB as a " + what);
  const kj::Array<capnp::word> first = encoded<Schema>(value);
  const kj::Array<capnp::word> second = encoded<Schema>(decodeFlat<Schema>(first));
  FUZZ_CHECK(first.asBytes() == second.asBytes(), "node_codec does not round-trip its own output");
  if constexpr (std::is_same_v<Schema, schema::SupervisorSpec>) {
    try {
      validate(value, "control protocol");
    } catch (const vsup::Error&) {
      // Rejected cleanly: what a sub-supervisor answers to a bad spec.
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Word-aligned, zero-padded copy: the reader needs whole words.
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>((size + 7) / 8);
  std::memset(words.begin(), 0, words.size() * sizeof(capnp::word));
  if (size > 0) std::memcpy(words.begin(), data, size);
  try {
    roundTrip<schema::SupervisorSpec>(words, "SupervisorSpec");
  } catch (const kj::Exception&) {
  }
  try {
    roundTrip<schema::NodeStatus>(words, "NodeStatus");
  } catch (const kj::Exception&) {
  }
  try {
    roundTrip<schema::Deferral>(words, "Deferral");
  } catch (const kj::Exception&) {
  }
  return 0;
}
