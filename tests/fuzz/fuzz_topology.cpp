// Fuzz target: the TOML topology loader (supervisor/topology.h), input = the file's text.
//
// Properties checked: parseTopology either returns a spec or throws vsup::Error whose message
// starts with the origin (never another exception type, never a crash); a spec it returns passes
// validate() again, and survives the trip a sub-supervisor's spec takes over the control protocol
// (node_codec encode → decode → encode yields the same bytes, and the decoded spec validates).
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>

#include "ipc/rpc_link.h"
#include "base/error.h"
#include "supervisor/node_codec.h"
#include "supervisor/topology.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_log.h"

namespace {

using namespace vsup::supervisor;

const std::string kOrigin = "fuzz.toml";

kj::Array<capnp::word> encoded(const SupervisorSpec& spec) {
  capnp::MallocMessageBuilder message;
  encode(spec, message.initRoot<vsup::ipc::schema::SupervisorSpec>());
  return capnp::messageToFlatArray(message);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool init = (vsup::fuzz::quietLogs(), true);
  (void)init;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  SupervisorSpec spec;
  try {
    spec = parseTopology(text, kOrigin);
  } catch (const vsup::Error& e) {
    if (vsup::fuzz::tracing()) std::fprintf(stderr, "rejected: %s\n", e.what());
    FUZZ_CHECK(std::string_view(e.what()).starts_with(kOrigin + ":"),
               std::string("error without its origin: ") + e.what());
    return 0;
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("parseTopology threw something other than vsup::Error: ") +
                          e.what());
  }

  if (vsup::fuzz::tracing()) {
    std::fprintf(stderr, "accepted: '%s' with %zu children\n", spec.name.c_str(),
                 spec.children.size());
  }
  validate(spec, kOrigin);  // accepted once, accepted again: throws (→ crash) otherwise

  const kj::Array<capnp::word> first = encoded(spec);
  SupervisorSpec decoded;
  try {
    // The reader limits of an RPC link (capnp's defaults): what a sub-supervisor's start() gets.
    capnp::FlatArrayMessageReader reader(first, vsup::ipc::controlReaderOptions());
    decoded = decode(reader.getRoot<vsup::ipc::schema::SupervisorSpec>());
  } catch (const kj::Exception& e) {
    FUZZ_CHECK(false, std::string("the topology loader accepted a spec the control protocol "
                                  "cannot carry: ") + e.getDescription().cStr());
  }
  validate(decoded, kOrigin);
  const kj::Array<capnp::word> second = encoded(decoded);
  FUZZ_CHECK(first.asBytes() == second.asBytes(),
             "node_codec does not round-trip a spec the topology loader accepted");
  return 0;
}
