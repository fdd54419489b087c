#include "workers/rank_spec.h"

namespace vsup::workers {

supervisor::ChildSpec rankChildSpec(const std::string& exe, uint32_t rank,
                                    const std::string& config, const std::string& nodeAddress,
                                    int collectiveFd, const EngineRankOptions& options,
                                    int64_t stopMs) {
  supervisor::ChildSpec c;
  c.name = "worker-tp" + std::to_string(rank);
  c.vsupAware = true;
  c.command = {exe, "__worker", "--rank", std::to_string(rank)};
  if (!nodeAddress.empty()) c.command.insert(c.command.end(), {"--node-address", nodeAddress});
  c.startConfig = config;
  if (collectiveFd >= 0) {
    c.inheritFds.push_back(collectiveFd);  // fd 4, after the control socket
    c.command.insert(c.command.end(), {"--collective-fd", "4"});
  }
  c.startTimeoutMs = options.startTimeoutMs;  // loading a model's weights
  c.livenessTimeoutMs = options.livenessTimeoutMs;
  c.livenessIntervalMs = options.livenessIntervalMs;
  c.shutdown = supervisor::ShutdownPolicy::timeout(stopMs);
  return c;
}

kj::Promise<kj::Array<ipc::schema::Worker::Client>> rankWorkers(supervisor::Supervisor& ranks,
                                                                uint32_t first, uint32_t count) {
  kj::Vector<kj::Promise<ipc::schema::Worker::Client>> caps;
  for (uint32_t r = first; r < first + count; ++r) {
    caps.add(ranks.service("worker-tp" + std::to_string(r))
                 .then([](capnp::Capability::Client cap) {
                   return cap.castAs<ipc::schema::Worker>();
                 }));
  }
  return kj::joinPromises(caps.releaseAsArray());
}

}  // namespace vsup::workers
