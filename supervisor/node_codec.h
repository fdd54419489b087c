// Conversions between the control protocol's Cap'n Proto structs and vsup's plain value types.
// Kept in one place so that the rest of supervisor/ deals in plain values, not schema readers.
#pragma once

#include <string>

#include "ipc/node.capnp.h"
#include "supervisor/spec.h"
#include "supervisor/status.h"

namespace vsup::supervisor {

void encode(const SupervisorSpec& spec, ipc::schema::SupervisorSpec::Builder out);
SupervisorSpec decode(ipc::schema::SupervisorSpec::Reader in);

void encode(const NodeStatus& status, ipc::schema::NodeStatus::Builder out);
NodeStatus decode(ipc::schema::NodeStatus::Reader in);

void encode(const Deferral& deferral, ipc::schema::Deferral::Builder out);
Deferral decode(ipc::schema::Deferral::Reader in);

// Opaque bytes (ChildSpec::startConfig) as a capnp Data field and back. asData() points into
// `bytes`, which must outlive the reader.
capnp::Data::Reader asData(const std::string& bytes);
std::string fromData(capnp::Data::Reader data);

}  // namespace vsup::supervisor
