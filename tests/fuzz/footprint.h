// What a decoded control-protocol value costs in memory, and the most one message may cost.
//
// A Cap'n Proto list of zero-size structs costs its sender nothing per element (the reader's
// traversal limit charges one word each: 8 Mi elements under capnp's default limit), yet
// node_codec turns every element into a full ChildSpec / NodeStatus / env pair. The fuzz
// targets hold every decode to kMaxDecodedBytes, whatever enforces it in vsup (reader limits on
// the links, a cap in decode).
#pragma once

#include <cstddef>
#include <string>

#include "supervisor/spec.h"
#include "supervisor/status.h"

namespace vsup::fuzz {

inline constexpr size_t kMaxDecodedBytes = 64 << 20;

inline size_t footprint(const std::string& s) { return sizeof s + s.size(); }

inline size_t footprint(const supervisor::Deferral& d) {
  return footprint(d.reason) + footprint(d.progress);
}

inline size_t footprint(const supervisor::NodeStatus& s) {
  size_t n = sizeof s + footprint(s.name) + footprint(s.deferral);
  for (const supervisor::NodeStatus& c : s.children) n += footprint(c);
  return n;
}

inline size_t footprint(const supervisor::SupervisorSpec& spec) {
  size_t n = sizeof spec + footprint(spec.name);
  for (const supervisor::ChildSpec& c : spec.children) {
    n += sizeof c + footprint(c.name);
    for (const std::string& arg : c.command) n += footprint(arg);
    for (const auto& [key, value] : c.env) n += footprint(key) + footprint(value);
    n += footprint(c.startConfig) - sizeof c.startConfig;  // its sizeof is in sizeof c
    if (c.supervisor) n += footprint(*c.supervisor);
  }
  return n;
}

}  // namespace vsup::fuzz
