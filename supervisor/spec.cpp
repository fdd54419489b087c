#include "supervisor/spec.h"

#include <set>

#include "base/check.h"

namespace vsup::supervisor {
namespace {

bool validName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

[[noreturn]] void fail(const std::string& origin, const std::string& where,
                       const std::string& field, const std::string& what) {
  throw vsup::Error(origin + ": " + where + ": field '" + field + "': " + what);
}

// Nested supervisors at most (the root counts as 1). Each level is a message level of the
// control protocol, whose reader stops at 64 (found by tests/fuzz): refuse here, clearly.
constexpr int kMaxNesting = 16;

void validateSupervisor(const SupervisorSpec& spec, const std::string& origin,
                        const std::string& path, int depth = 1) {
  std::string where = "supervisor '" + path + "'";
  if (depth > kMaxNesting) {
    fail(origin, where, "type", "supervisors nest " + std::to_string(depth) +
                                    " deep; at most " + std::to_string(kMaxNesting) +
                                    " levels are supported");
  }
  if (!validName(spec.name)) {
    fail(origin, where, "name",
         "'" + spec.name + "' is not a valid name (1-64 characters of A-Z a-z 0-9 _ - .)");
  }
  if (spec.periodMs <= 0) {
    fail(origin, where, "period", "must be a positive number of seconds");
  }
  std::set<std::string> seen;
  for (const ChildSpec& child : spec.children) {
    std::string childPath = path + "/" + child.name;
    std::string cw = "child '" + childPath + "'";
    if (!validName(child.name)) {
      fail(origin, cw, "name",
           "'" + child.name + "' is not a valid name (1-64 characters of A-Z a-z 0-9 _ - .)");
    }
    if (!seen.insert(child.name).second) {
      fail(origin, cw, "name", "duplicate name: another child of '" + path + "' is called '" +
                                   child.name + "'");
    }
    if (child.significant && child.restart == Restart::Permanent) {
      fail(origin, cw, "significant",
           "a permanent child cannot be significant (OTP: only transient or temporary children "
           "may be significant)");
    }
    if (child.shutdown.kind == ShutdownPolicy::Kind::Timeout && child.shutdown.timeoutMs < 0) {
      fail(origin, cw, "shutdown",
           "negative timeout " + std::to_string(child.shutdown.timeoutMs) +
               " (accepted: milliseconds >= 0, \"brutal_kill\" or \"infinity\")");
    }
    if (child.startTimeoutMs < -1) {
      fail(origin, cw, "start_timeout",
           "negative timeout " + std::to_string(child.startTimeoutMs) +
               " (accepted: milliseconds >= 0 or \"infinity\")");
    }
    if (child.livenessTimeoutMs != -1 && child.livenessTimeoutMs <= 0) {
      fail(origin, cw, "liveness_timeout",
           "invalid timeout " + std::to_string(child.livenessTimeoutMs) +
               " (accepted: milliseconds > 0, or -1 (\"off\"): no liveness pings)");
    }
    if (child.livenessIntervalMs <= 0) {
      fail(origin, cw, "liveness_interval",
           "invalid interval " + std::to_string(child.livenessIntervalMs) +
               " (accepted: milliseconds > 0)");
    }
    if (child.livenessTimeoutMs > 0 && !child.vsupAware) {
      fail(origin, cw, "liveness_timeout",
           "liveness pings need a vsup-aware child (vsup_aware = true, or type = "
           "\"supervisor\"): a plain process has no control connection to answer them");
    }
    if (child.startConcurrently && !child.vsupAware && child.ready == Readiness::None) {
      fail(origin, cw, "start_concurrently",
           "the child has no readiness to wait for (ready = \"none\" and not vsup-aware: it is "
           "ready once spawned, so the next child never waits for it); give ready = \"notify\" "
           "or drop the field");
    }
    for (const auto& [key, value] : child.env) {
      if (key.empty() || key.find('=') != std::string::npos) {
        fail(origin, cw, "env", "invalid variable name '" + key + "'");
      }
    }
    if (child.type == ChildType::Supervisor) {
      if (!child.command.empty()) {
        fail(origin, cw, "command",
             "a child of type \"supervisor\" runs vsup itself and takes no command");
      }
      if (!child.supervisor.has_value()) {
        fail(origin, cw, "supervisor", "missing: a child of type \"supervisor\" needs its spec");
      }
      if (child.supervisor->name != child.name) {
        fail(origin, cw, "name", "supervisor spec name does not match the child name");
      }
      validateSupervisor(*child.supervisor, origin, childPath, depth + 1);
    } else {
      if (child.command.empty() || child.command[0].empty()) {
        fail(origin, cw, "command", "missing: a worker needs a command (an array of strings)");
      }
      if (child.supervisor.has_value()) {
        fail(origin, cw, "children", "only a child of type \"supervisor\" can have children");
      }
    }
  }
}

}  // namespace

void normalize(ChildSpec& child) {
  if (child.type != ChildType::Supervisor) return;
  child.vsupAware = true;
  if (!child.supervisor) child.supervisor.emplace();
  child.supervisor->name = child.name;
  normalize(*child.supervisor);
}

void normalize(SupervisorSpec& spec) {
  for (ChildSpec& child : spec.children) normalize(child);
}

void validate(const SupervisorSpec& spec, const std::string& origin) {
  validateSupervisor(spec, origin, spec.name);
}

const char* nameOf(Restart r) {
  switch (r) {
    case Restart::Permanent: return "permanent";
    case Restart::Transient: return "transient";
    case Restart::Temporary: return "temporary";
  }
  return "?";
}

const char* nameOf(Strategy s) {
  switch (s) {
    case Strategy::OneForOne: return "one_for_one";
    case Strategy::OneForAll: return "one_for_all";
    case Strategy::RestForOne: return "rest_for_one";
  }
  return "?";
}

const char* nameOf(AutoShutdown a) {
  switch (a) {
    case AutoShutdown::Never: return "never";
    case AutoShutdown::AnySignificant: return "any_significant";
    case AutoShutdown::AllSignificant: return "all_significant";
  }
  return "?";
}

std::string nameOf(const ShutdownPolicy& p) {
  switch (p.kind) {
    case ShutdownPolicy::Kind::Timeout: return std::to_string(p.timeoutMs) + "ms";
    case ShutdownPolicy::Kind::BrutalKill: return "brutal_kill";
    case ShutdownPolicy::Kind::Infinity: return "infinity";
  }
  return "?";
}

}  // namespace vsup::supervisor
