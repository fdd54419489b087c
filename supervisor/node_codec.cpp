#include "supervisor/node_codec.h"

namespace vsup::supervisor {

namespace schema = ipc::schema;

// The casts below rely on the schema's enums having the C++ enums' order.
static_assert(int(schema::NodeStatus::Type::WORKER) == int(NodeType::Worker));
static_assert(int(schema::NodeStatus::Type::SUPERVISOR) == int(NodeType::Supervisor));
static_assert(int(schema::NodeStatus::State::STARTING) == int(NodeState::Starting));
static_assert(int(schema::NodeStatus::State::RUNNING) == int(NodeState::Running));
static_assert(int(schema::NodeStatus::State::STOPPING) == int(NodeState::Stopping));
static_assert(int(schema::NodeStatus::State::STOPPED) == int(NodeState::Stopped));
static_assert(int(schema::NodeStatus::State::RESTARTING) == int(NodeState::Restarting));
static_assert(int(schema::NodeStatus::State::UNRESPONSIVE) == int(NodeState::Unresponsive));
static_assert(int(schema::NodeStatus::State::FAILED) == int(NodeState::Failed));

capnp::Data::Reader asData(const std::string& bytes) {
  return {reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()};
}

std::string fromData(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

void encode(const SupervisorSpec& spec, schema::SupervisorSpec::Builder out) {
  out.setName(spec.name);
  out.setStrategy(static_cast<schema::SupervisorSpec::Strategy>(spec.strategy));
  out.setIntensity(spec.intensity);
  out.setPeriodMs(spec.periodMs);
  out.setAutoShutdown(static_cast<schema::SupervisorSpec::AutoShutdown>(spec.autoShutdown));
  auto children = out.initChildren(unsigned(spec.children.size()));
  for (unsigned i = 0; i < spec.children.size(); ++i) {
    const ChildSpec& c = spec.children[i];
    auto b = children[i];
    b.setName(c.name);
    auto cmd = b.initCommand(unsigned(c.command.size()));
    for (unsigned j = 0; j < c.command.size(); ++j) cmd.set(j, c.command[j]);
    auto env = b.initEnv(unsigned(c.env.size()));
    for (unsigned j = 0; j < c.env.size(); ++j) {
      env[j].setName(c.env[j].first);
      env[j].setValue(c.env[j].second);
    }
    b.setRestart(static_cast<schema::ChildSpec::Restart>(c.restart));
    switch (c.shutdown.kind) {
      case ShutdownPolicy::Kind::Timeout: b.initShutdown().setTimeoutMs(c.shutdown.timeoutMs); break;
      case ShutdownPolicy::Kind::BrutalKill: b.initShutdown().setBrutalKill(); break;
      case ShutdownPolicy::Kind::Infinity: b.initShutdown().setInfinite(); break;
    }
    b.setType(static_cast<schema::ChildSpec::ChildType>(c.type));
    b.setSignificant(c.significant);
    b.setReady(static_cast<schema::ChildSpec::Readiness>(c.ready));
    b.setStartTimeoutMs(c.startTimeoutMs);
    b.setLivenessTimeoutMs(c.livenessTimeoutMs);
    b.setLivenessIntervalMs(c.livenessIntervalMs);
    b.setVsupAware(c.vsupAware);
    b.setStartConcurrently(c.startConcurrently);
    if (c.supervisor) encode(*c.supervisor, b.initSupervisor());
    if (!c.startConfig.empty()) {
      b.setStartConfig(asData(c.startConfig));
    }
  }
}

SupervisorSpec decode(schema::SupervisorSpec::Reader in) {
  SupervisorSpec spec;
  spec.name = in.getName();
  spec.strategy = static_cast<Strategy>(in.getStrategy());
  spec.intensity = in.getIntensity();
  spec.periodMs = in.getPeriodMs();
  spec.autoShutdown = static_cast<AutoShutdown>(in.getAutoShutdown());
  for (auto c : in.getChildren()) {
    ChildSpec child;
    child.name = c.getName();
    for (auto arg : c.getCommand()) child.command.emplace_back(arg);
    for (auto kv : c.getEnv()) child.env.emplace_back(kv.getName(), kv.getValue());
    child.restart = static_cast<Restart>(c.getRestart());
    auto sd = c.getShutdown();
    switch (sd.which()) {
      case schema::ChildSpec::Shutdown::TIMEOUT_MS:
        child.shutdown = ShutdownPolicy::timeout(sd.getTimeoutMs());
        break;
      case schema::ChildSpec::Shutdown::BRUTAL_KILL: child.shutdown = ShutdownPolicy::brutalKill(); break;
      case schema::ChildSpec::Shutdown::INFINITE: child.shutdown = ShutdownPolicy::infinity(); break;
    }
    child.type = static_cast<ChildType>(c.getType());
    child.significant = c.getSignificant();
    child.ready = static_cast<Readiness>(c.getReady());
    child.startTimeoutMs = c.getStartTimeoutMs();
    child.livenessTimeoutMs = c.getLivenessTimeoutMs();
    child.livenessIntervalMs = c.getLivenessIntervalMs();
    child.vsupAware = c.getVsupAware();
    child.startConcurrently = c.getStartConcurrently();
    if (c.hasSupervisor()) child.supervisor = decode(c.getSupervisor());
    if (c.hasStartConfig()) child.startConfig = fromData(c.getStartConfig());
    spec.children.push_back(std::move(child));
  }
  return spec;
}

void encode(const Deferral& deferral, schema::Deferral::Builder out) {
  out.setReason(deferral.reason);
  out.setProgress(deferral.progress);
}

Deferral decode(schema::Deferral::Reader in) { return {in.getReason(), in.getProgress()}; }

void encode(const NodeStatus& s, schema::NodeStatus::Builder out) {
  out.setName(s.name);
  out.setPid(s.pid);
  out.setType(static_cast<schema::NodeStatus::Type>(s.type));
  out.setState(static_cast<schema::NodeStatus::State>(s.state));
  out.setUptimeMs(s.uptimeMs);
  out.setRestarts(s.restarts);
  encode(s.deferral, out.initDeferral());
  out.setInFlight(s.inFlight);
  out.setRequestsTotal(s.requestsTotal);
  out.setOutOfRotation(s.outOfRotation);
  out.setDetail(s.detail);
  auto children = out.initChildren(unsigned(s.children.size()));
  for (unsigned i = 0; i < s.children.size(); ++i) encode(s.children[i], children[i]);
}

NodeStatus decode(schema::NodeStatus::Reader in) {
  NodeStatus s;
  s.name = in.getName();
  s.pid = in.getPid();
  // A value outside the enums (a newer peer's) is kept as it is: nameOf() names it "?".
  s.type = static_cast<NodeType>(in.getType());
  s.state = static_cast<NodeState>(in.getState());
  s.uptimeMs = in.getUptimeMs();
  s.restarts = in.getRestarts();
  if (in.hasDeferral()) s.deferral = decode(in.getDeferral());
  s.inFlight = in.getInFlight();
  s.requestsTotal = in.getRequestsTotal();
  s.outOfRotation = in.getOutOfRotation();
  s.detail = in.getDetail();
  for (auto c : in.getChildren()) s.children.push_back(decode(c));
  return s;
}

}  // namespace vsup::supervisor
