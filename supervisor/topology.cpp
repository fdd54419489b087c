#include "supervisor/topology.h"

#include <cmath>
#include <limits>
#include <fstream>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "base/check.h"

namespace vsup::supervisor {
namespace {

// Where an error is reported: the file, and the line of the node when toml++ knows it.
struct Place {
  const std::string& origin;
  std::string where;  // "supervisor 'root'" or "child 'root/db'"

  [[noreturn]] void fail(const toml::node* node, const std::string& field,
                         const std::string& what) const {
    std::string loc = origin;
    if (node != nullptr && node->source().begin.line > 0) {
      loc += ":" + std::to_string(node->source().begin.line);
    }
    throw vsup::Error(loc + ": " + where + ": field '" + field + "': " + what);
  }
};

std::string typeName(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

std::string getString(const Place& p, const toml::node& n, const std::string& field) {
  if (auto s = n.value<std::string>(); s && n.is_string()) return *s;
  p.fail(&n, field, "expected a string, got " + typeName(n));
}

bool getBool(const Place& p, const toml::node& n, const std::string& field) {
  if (n.is_boolean()) return *n.value<bool>();
  p.fail(&n, field, "expected true or false, got " + typeName(n));
}

template <typename E, size_t N>
E getEnum(const Place& p, const toml::node& n, const std::string& field,
          const std::pair<const char*, E> (&choices)[N]) {
  std::string accepted;
  for (auto& [name, value] : choices) accepted += std::string(accepted.empty() ? "" : ", ") + name;
  if (!n.is_string()) p.fail(&n, field, "expected one of " + accepted + ", got " + typeName(n));
  std::string s = *n.value<std::string>();
  for (auto& [name, value] : choices) {
    if (s == name) return value;
  }
  p.fail(&n, field, "unknown value \"" + s + "\" (accepted: " + accepted + ")");
}

// Milliseconds, or one of the named words; returns -1 for "infinity" when allowed.
int64_t getMs(const Place& p, const toml::node& n, const std::string& field) {
  if (n.is_integer()) return *n.value<int64_t>();
  if (n.is_floating_point()) {
    double d = *n.value<double>();
    if (std::isfinite(d) && d == std::floor(d)) {
      // Out of int64's range, the conversion is undefined (found by tests/fuzz).
      if (d < -9.2e18 || d > 9.2e18) p.fail(&n, field, "is too large");
      return int64_t(d);
    }
  }
  p.fail(&n, field, "expected a whole number of milliseconds, got " + typeName(n));
}

constexpr std::pair<const char*, Restart> kRestarts[] = {
    {"permanent", Restart::Permanent},
    {"transient", Restart::Transient},
    {"temporary", Restart::Temporary}};
constexpr std::pair<const char*, ChildType> kTypes[] = {{"worker", ChildType::Worker},
                                                        {"supervisor", ChildType::Supervisor}};
constexpr std::pair<const char*, Readiness> kReadiness[] = {{"none", Readiness::None},
                                                            {"notify", Readiness::Notify}};
constexpr std::pair<const char*, Strategy> kStrategies[] = {
    {"one_for_one", Strategy::OneForOne},
    {"one_for_all", Strategy::OneForAll},
    {"rest_for_one", Strategy::RestForOne}};
constexpr std::pair<const char*, AutoShutdown> kAutoShutdowns[] = {
    {"never", AutoShutdown::Never},
    {"any_significant", AutoShutdown::AnySignificant},
    {"all_significant", AutoShutdown::AllSignificant}};

const std::set<std::string> kSupervisorKeys = {"name", "strategy", "intensity", "period",
                                               "auto_shutdown", "children"};
const std::set<std::string> kChildKeys = {
    "name", "command", "env", "restart", "shutdown", "type", "significant", "ready",
    "start_timeout", "start_concurrently", "vsup_aware", "liveness_timeout", "liveness_interval",
    // supervisor children also take the supervisor keys
    "strategy", "intensity", "period", "auto_shutdown", "children"};

void parseSupervisorKeys(const Place& p, const toml::table& t, SupervisorSpec& spec);

ChildSpec parseChild(const std::string& origin, const std::string& parentPath,
                     const toml::table& t, size_t index) {
  ChildSpec child;
  std::string label = "#" + std::to_string(index + 1);
  if (const toml::node* n = t.get("name")) {
    Place p{origin, "child " + label + " of '" + parentPath + "'"};
    child.name = getString(p, *n, "name");
    label = child.name;
  } else {
    Place{origin, "child " + label + " of '" + parentPath + "'"}.fail(&t, "name", "missing");
  }
  Place p{origin, "child '" + parentPath + "/" + label + "'"};

  for (auto&& [key, node] : t) {
    std::string k(key.str());
    if (!kChildKeys.count(k)) {
      p.fail(&node, k,
             "unknown key (accepted: name, command, env, restart, shutdown, type, significant, "
             "ready, start_timeout, start_concurrently, vsup_aware, liveness_timeout, "
             "liveness_interval; and for "
             "type = \"supervisor\": strategy, intensity, period, auto_shutdown, children)");
    }
  }

  if (const toml::node* n = t.get("type")) child.type = getEnum(p, *n, "type", kTypes);
  bool isSupervisor = child.type == ChildType::Supervisor;
  child.shutdown = isSupervisor ? ShutdownPolicy::infinity() : ShutdownPolicy::timeout(5000);
  if (isSupervisor) child.vsupAware = true;

  if (const toml::node* n = t.get("command")) {
    if (const toml::array* a = n->as_array()) {
      for (const toml::node& item : *a) {
        child.command.push_back(getString(p, item, "command"));
      }
      if (child.command.empty()) p.fail(n, "command", "empty array: the program is missing");
    } else {
      p.fail(n, "command",
             "expected an array of strings such as [\"/usr/bin/prog\", \"--flag\"], got " +
                 typeName(*n));
    }
  }
  if (const toml::node* n = t.get("env")) {
    const toml::table* env = n->as_table();
    if (env == nullptr) p.fail(n, "env", "expected a table such as { KEY = \"value\" }");
    for (auto&& [key, value] : *env) {
      child.env.emplace_back(std::string(key.str()),
                             getString(p, value, "env." + std::string(key.str())));
    }
  }
  if (const toml::node* n = t.get("restart")) child.restart = getEnum(p, *n, "restart", kRestarts);
  if (const toml::node* n = t.get("shutdown")) {
    if (n->is_string()) {
      std::string s = *n->value<std::string>();
      if (s == "brutal_kill") {
        child.shutdown = ShutdownPolicy::brutalKill();
      } else if (s == "infinity") {
        child.shutdown = ShutdownPolicy::infinity();
      } else {
        p.fail(n, "shutdown",
               "unknown value \"" + s + "\" (accepted: milliseconds, \"brutal_kill\", \"infinity\")");
      }
    } else {
      child.shutdown = ShutdownPolicy::timeout(getMs(p, *n, "shutdown"));
      if (child.shutdown.timeoutMs < 0) {
        p.fail(n, "shutdown",
               "negative timeout " + std::to_string(child.shutdown.timeoutMs) +
                   " (accepted: milliseconds >= 0, \"brutal_kill\" or \"infinity\")");
      }
    }
  }
  if (const toml::node* n = t.get("significant")) child.significant = getBool(p, *n, "significant");
  if (const toml::node* n = t.get("ready")) child.ready = getEnum(p, *n, "ready", kReadiness);
  if (const toml::node* n = t.get("start_timeout")) {
    if (n->is_string() && *n->value<std::string>() == "infinity") {
      child.startTimeoutMs = -1;
    } else {
      child.startTimeoutMs = getMs(p, *n, "start_timeout");
      if (child.startTimeoutMs < 0) {
        p.fail(n, "start_timeout",
               "negative timeout " + std::to_string(child.startTimeoutMs) +
                   " (accepted: milliseconds >= 0 or \"infinity\")");
      }
    }
  }
  if (const toml::node* n = t.get("start_concurrently")) {
    child.startConcurrently = getBool(p, *n, "start_concurrently");
  }
  if (const toml::node* n = t.get("liveness_timeout")) {
    if (n->is_string() && *n->value<std::string>() == "off") {
      child.livenessTimeoutMs = -1;
    } else {
      child.livenessTimeoutMs = getMs(p, *n, "liveness_timeout");
      if (child.livenessTimeoutMs <= 0) {
        p.fail(n, "liveness_timeout",
               "invalid timeout " + std::to_string(child.livenessTimeoutMs) +
                   " (accepted: milliseconds > 0 or \"off\")");
      }
    }
  }
  if (const toml::node* n = t.get("liveness_interval")) {
    child.livenessIntervalMs = getMs(p, *n, "liveness_interval");
    if (child.livenessIntervalMs <= 0) {
      p.fail(n, "liveness_interval",
             "invalid interval " + std::to_string(child.livenessIntervalMs) +
                 " (accepted: milliseconds > 0)");
    }
  }
  if (const toml::node* n = t.get("vsup_aware")) {
    child.vsupAware = getBool(p, *n, "vsup_aware");
    if (isSupervisor && !child.vsupAware) {
      p.fail(n, "vsup_aware", "a supervisor child is always vsup-aware");
    }
  }

  if (isSupervisor) {
    SupervisorSpec sub;
    sub.name = child.name;
    parseSupervisorKeys(Place{origin, "supervisor '" + parentPath + "/" + child.name + "'"}, t,
                        sub);
    child.supervisor = std::move(sub);
    normalize(child);
  } else {
    for (const char* k : {"strategy", "intensity", "period", "auto_shutdown", "children"}) {
      if (const toml::node* n = t.get(k)) {
        p.fail(n, k, "only a child of type = \"supervisor\" takes this key");
      }
    }
  }
  return child;
}

void parseSupervisorKeys(const Place& p, const toml::table& t, SupervisorSpec& spec) {
  if (const toml::node* n = t.get("strategy")) spec.strategy = getEnum(p, *n, "strategy", kStrategies);
  if (const toml::node* n = t.get("intensity")) {
    if (!n->is_integer() || *n->value<int64_t>() < 0 ||
        *n->value<int64_t>() > int64_t(std::numeric_limits<uint32_t>::max())) {
      p.fail(n, "intensity",
             "expected an integer from 0 to 4294967295 (restarts allowed within 'period')");
    }
    spec.intensity = uint32_t(*n->value<int64_t>());
  }
  if (const toml::node* n = t.get("period")) {
    if (!n->is_number()) p.fail(n, "period", "expected a number of seconds, got " + typeName(*n));
    double seconds = *n->value<double>();
    if (!(seconds > 0) || !std::isfinite(seconds)) {
      p.fail(n, "period", "expected a positive number of seconds");
    }
    if (seconds > 9.2e12) p.fail(n, "period", "is too large");
    spec.periodMs = int64_t(std::llround(seconds * 1000.0));
    if (spec.periodMs <= 0) p.fail(n, "period", "must be at least 0.001 seconds");
  }
  if (const toml::node* n = t.get("auto_shutdown")) {
    spec.autoShutdown = getEnum(p, *n, "auto_shutdown", kAutoShutdowns);
  }
  if (const toml::node* n = t.get("children")) {
    const toml::array* a = n->as_array();
    if (a == nullptr) p.fail(n, "children", "expected an array of tables ([[children]])");
    std::string path = p.where.substr(p.where.find('\'') + 1);
    path.pop_back();
    for (size_t i = 0; i < a->size(); ++i) {
      const toml::table* ct = (*a)[i].as_table();
      if (ct == nullptr) p.fail(&(*a)[i], "children", "each entry must be a table ([[children]])");
      spec.children.push_back(parseChild(p.origin, path, *ct, i));
    }
  }
}

}  // namespace

SupervisorSpec parseTopology(std::string_view text, const std::string& origin) {
  toml::table root;
  try {
    root = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    throw vsup::Error(origin + ":" + std::to_string(e.source().begin.line) + ":" +
                      std::to_string(e.source().begin.column) + ": invalid TOML: " +
                      std::string(e.description()));
  }
  SupervisorSpec spec;
  if (const toml::node* n = root.get("name")) {
    spec.name = getString(Place{origin, "supervisor (top level)"}, *n, "name");
  }
  Place p{origin, "supervisor '" + spec.name + "'"};
  for (auto&& [key, node] : root) {
    std::string k(key.str());
    if (!kSupervisorKeys.count(k)) {
      p.fail(&node, k,
             "unknown key (accepted at the top level: name, strategy, intensity, period, "
             "auto_shutdown, children)");
    }
  }
  parseSupervisorKeys(p, root, spec);
  validate(spec, origin);
  return spec;
}

SupervisorSpec loadTopology(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  VSUP_REQUIRE(in.good(), path + ": cannot open topology file: " + std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parseTopology(buffer.str(), path);
}

}  // namespace vsup::supervisor
