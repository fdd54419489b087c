// A tensor-parallel rank as a child of the supervisor of its node's ranks: engine-core's on the
// leader (and on one machine), a worker node's agent across nodes. Both make the same child,
// and both collect the ranks' Worker capabilities the same way.
//
// Runs on the loop thread of the supervising process.
#pragma once

#include <cstdint>
#include <string>

#include <kj/async.h>

#include "ipc/engine.capnp.h"
#include "supervisor/spec.h"
#include "supervisor/supervisor.h"

namespace vsup::workers {

// How a node supervises its ranks (`vsup __engine-core` and `vsup __node-agent` flags).
struct EngineRankOptions {
  int64_t startTimeoutMs = 600000;  // loading a model's weights
  int64_t livenessTimeoutMs = -1;   // -1: no liveness pings
  int64_t livenessIntervalMs = 1000;
};

// The child "worker-tpR": `exe __worker --rank R`, given `config` (an EngineConfig message) in
// Node.start. `nodeAddress` non-empty (across nodes): --node-address. `collectiveFd` >= 0: the
// node's shared region, inherited as fd 4. Stopped within `stopMs`. The caller may inherit more
// fds after these (the KV cache region).
supervisor::ChildSpec rankChildSpec(const std::string& exe, uint32_t rank,
                                    const std::string& config, const std::string& nodeAddress,
                                    int collectiveFd, const EngineRankOptions& options,
                                    int64_t stopMs);

// The Worker capabilities of ranks first .. first + count - 1 of `ranks`, in rank order.
kj::Promise<kj::Array<ipc::schema::Worker::Client>> rankWorkers(supervisor::Supervisor& ranks,
                                                                uint32_t first, uint32_t count);

}  // namespace vsup::workers
