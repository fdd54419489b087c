// ipc::userMessage: the sentence a person wrote, out of a kj::Exception that may have crossed
// one or more Cap'n Proto RPC hops.
//
// What KJ and capnp add, and what is removed:
//   - "remote exception: " (capnp, once per hop, anywhere in the text: a message that wraps
//     another one carries its prefixes in the middle);
//   - "expected <condition>; " (KJ_REQUIRE/KJ_ASSERT render the failed condition first) when a
//     message follows it; a bare "expected <condition>" is left as it is (it is all there is);
//   - "; <expression> = " (KJ renders a non-literal argument as "name = value"), which becomes
//     ": ", e.g. "the stats are malformed; e.what() = bad" -> "the stats are malformed: bad";
//   - "<file>.c++:<line>: failed: " style locations (also .cpp/.h/.capnp, and the "(remote):0"
//     of a remote exception), "std::exception: " (KJ's wrapping of a std::exception), and a
//     trailing "stack: ..." trace;
// The result is trimmed; an exception with nothing left says "an internal error (<type>)" (a
// DISCONNECTED one: "the connection was lost").
//
// Pure functions: any thread.
#pragma once

#include <string>
#include <string_view>

#include <kj/exception.h>

namespace vsup::ipc {

// The exception's description, cleaned as above.
std::string userMessage(const kj::Exception& e);
// The same cleaning on text (e.g. a description already turned into a string); "" when
// nothing is left.
std::string userMessage(std::string_view description);

// The other way: a sentence for a person as a FAILED kj::Exception, to reject a promise or
// fail an RPC with (userMessage() gives the sentence back on the other side).
kj::Exception failure(const std::string& why);

}  // namespace vsup::ipc
