// Conversions between the control protocol's Cap'n Proto structs and vsup's plain value types.
// The only place in supervisor/ that reads or builds schema structs (STYLE.md habit 11).
#pragma once

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

}  // namespace vsup::supervisor
