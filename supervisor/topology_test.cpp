// Tests for supervisor/topology.h: the TOML topology format, its OTP defaults and its errors,
// each of which names the file (and the line where toml++ knows it), the child path and the field.
#include "supervisor/topology.h"

#include <stdlib.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fstream>
#include <string>

#include "base/check.h"

namespace {

using namespace vsup::supervisor;

std::string parseError(const std::string& text, const std::string& origin = "topo.toml") {
  try {
    parseTopology(text, origin);
  } catch (const vsup::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

void checkNames(const std::string& message, const std::string& where, const std::string& field) {
  INFO("message: ", message);
  CHECK(contains(message, "topo.toml"));
  CHECK(contains(message, where));
  CHECK(contains(message, "field '" + field + "'"));
}

const char* kOneWorker = R"(
[[children]]
name = "w"
command = ["/bin/true"]
)";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Defaults and accepted forms.

TEST_CASE("a minimal topology gets OTP's defaults") {
  SupervisorSpec s = parseTopology(kOneWorker, "topo.toml");
  CHECK(s.name == "root");
  CHECK(s.strategy == Strategy::OneForOne);
  CHECK(s.intensity == 1);
  CHECK(s.periodMs == 5000);
  CHECK(s.autoShutdown == AutoShutdown::Never);
  REQUIRE(s.children.size() == 1);
  const ChildSpec& w = s.children[0];
  CHECK(w.name == "w");
  CHECK(w.command == std::vector<std::string>{"/bin/true"});
  CHECK(w.restart == Restart::Permanent);
  CHECK(w.shutdown == ShutdownPolicy::timeout(5000));
  CHECK(w.type == ChildType::Worker);
  CHECK_FALSE(w.significant);
  CHECK(w.ready == Readiness::None);
  CHECK(w.startTimeoutMs == 10000);
  CHECK_FALSE(w.vsupAware);
  CHECK_FALSE(w.supervisor.has_value());
}

TEST_CASE("every top-level and child key is parsed") {
  SupervisorSpec s = parseTopology(R"(
name = "top"
strategy = "rest_for_one"
intensity = 3
period = 10
auto_shutdown = "any_significant"

[[children]]
name = "db"
command = ["postgres", "-D", "/data"]
env = { PGPORT = "5433", LANG = "C" }
restart = "transient"
shutdown = 2500
significant = true
ready = "notify"
start_timeout = 30000
vsup_aware = true
)",
                                   "topo.toml");
  CHECK(s.name == "top");
  CHECK(s.strategy == Strategy::RestForOne);
  CHECK(s.intensity == 3);
  CHECK(s.periodMs == 10000);
  CHECK(s.autoShutdown == AutoShutdown::AnySignificant);
  REQUIRE(s.children.size() == 1);
  const ChildSpec& c = s.children[0];
  CHECK(c.command == std::vector<std::string>{"postgres", "-D", "/data"});
  REQUIRE(c.env.size() == 2);
  bool pgport = false, lang = false;
  for (auto& [k, v] : c.env) {
    pgport |= (k == "PGPORT" && v == "5433");
    lang |= (k == "LANG" && v == "C");
  }
  CHECK(pgport);
  CHECK(lang);
  CHECK(c.restart == Restart::Transient);
  CHECK(c.shutdown == ShutdownPolicy::timeout(2500));
  CHECK(c.significant);
  CHECK(c.ready == Readiness::Notify);
  CHECK(c.startTimeoutMs == 30000);
  CHECK(c.vsupAware);
}

TEST_CASE("shutdown accepts brutal_kill, infinity and whole milliseconds") {
  auto shutdownOf = [](const std::string& value) {
    auto s = parseTopology("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nshutdown = " + value +
                               "\n",
                           "topo.toml");
    return s.children.at(0).shutdown;
  };
  CHECK(shutdownOf("\"brutal_kill\"") == ShutdownPolicy::brutalKill());
  CHECK(shutdownOf("\"infinity\"") == ShutdownPolicy::infinity());
  CHECK(shutdownOf("0") == ShutdownPolicy::timeout(0));
  CHECK(shutdownOf("1234") == ShutdownPolicy::timeout(1234));
  CHECK(shutdownOf("1000.0") == ShutdownPolicy::timeout(1000));
}

TEST_CASE("start_timeout \"infinity\" means no start timeout (-1)") {
  auto s = parseTopology(
      "[[children]]\nname = \"w\"\ncommand = [\"x\"]\nstart_timeout = \"infinity\"\n", "topo.toml");
  CHECK(s.children.at(0).startTimeoutMs == -1);
}

TEST_CASE("liveness_timeout and liveness_interval are milliseconds; \"off\" turns the pings off") {
  const std::string head = "[[children]]\nname = \"w\"\ncommand = [\"x\"]\nvsup_aware = true\n";
  auto s = parseTopology(head + "liveness_timeout = 1500\nliveness_interval = 250\n", "topo.toml");
  CHECK(s.children.at(0).livenessTimeoutMs == 1500);
  CHECK(s.children.at(0).livenessIntervalMs == 250);
  s = parseTopology(head + "liveness_timeout = \"off\"\n", "topo.toml");
  CHECK(s.children.at(0).livenessTimeoutMs == -1);
  s = parseTopology(head, "topo.toml");
  CHECK(s.children.at(0).livenessTimeoutMs == -1);  // off unless asked for
  CHECK(s.children.at(0).livenessIntervalMs == 1000);
  std::string e = parseError(head + "liveness_timeout = 0\n");
  CHECK(contains(e, "child 'root/w'"));
  CHECK(contains(e, "liveness_timeout"));
  CHECK(contains(parseError(head + "liveness_interval = -1\n"), "liveness_interval"));
  CHECK(contains(parseError(head + "liveness_interval = \"soon\"\n"), "liveness_interval"));
  // A plain process cannot answer pings.
  CHECK(contains(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\n"
                            "liveness_timeout = 500\n"),
                 "vsup-aware"));
}

TEST_CASE("period is in seconds and may be fractional") {
  CHECK(parseTopology("period = 0.25\n", "topo.toml").periodMs == 250);
  CHECK(parseTopology("period = 2\n", "topo.toml").periodMs == 2000);
}

TEST_CASE("a nested supervisor is parsed with its own keys and supervisor defaults") {
  SupervisorSpec s = parseTopology(R"(
[[children]]
name = "web"
command = ["/bin/true"]

[[children]]
name = "sub"
type = "supervisor"
strategy = "one_for_all"
intensity = 5
period = 1

  [[children.children]]
  name = "leaf"
  command = ["/bin/true"]

  [[children.children]]
  name = "inner"
  type = "supervisor"

    [[children.children.children]]
    name = "deep"
    command = ["/bin/true"]
)",
                                   "topo.toml");
  REQUIRE(s.children.size() == 2);
  const ChildSpec& sub = s.children[1];
  CHECK(sub.type == ChildType::Supervisor);
  CHECK(sub.shutdown == ShutdownPolicy::infinity());
  CHECK(sub.vsupAware);
  CHECK(sub.command.empty());
  REQUIRE(sub.supervisor.has_value());
  CHECK(sub.supervisor->name == "sub");
  CHECK(sub.supervisor->strategy == Strategy::OneForAll);
  CHECK(sub.supervisor->intensity == 5);
  CHECK(sub.supervisor->periodMs == 1000);
  REQUIRE(sub.supervisor->children.size() == 2);
  CHECK(sub.supervisor->children[0].name == "leaf");
  const ChildSpec& inner = sub.supervisor->children[1];
  REQUIRE(inner.supervisor.has_value());
  CHECK(inner.supervisor->strategy == Strategy::OneForOne);
  CHECK(inner.supervisor->intensity == 1);
  CHECK(inner.supervisor->periodMs == 5000);
  REQUIRE(inner.supervisor->children.size() == 1);
  CHECK(inner.supervisor->children[0].name == "deep");
}

TEST_CASE("an explicit shutdown on a supervisor child overrides its infinity default") {
  auto s = parseTopology(R"(
[[children]]
name = "sub"
type = "supervisor"
shutdown = 3000
)",
                         "topo.toml");
  CHECK(s.children.at(0).shutdown == ShutdownPolicy::timeout(3000));
}

TEST_CASE("loadTopology reads a file and names it in errors") {
  char dir[] = "/tmp/vsup-topology-test-XXXXXX";
  REQUIRE(::mkdtemp(dir) != nullptr);
  std::string good = std::string(dir) + "/good.toml";
  std::string bad = std::string(dir) + "/bad.toml";
  std::ofstream(good) << kOneWorker;
  std::ofstream(bad) << "[[children]]\nname = \"w\"\ncommand = 5\n";
  CHECK(loadTopology(good).children.size() == 1);
  std::string msg;
  try {
    loadTopology(bad);
  } catch (const vsup::Error& e) {
    msg = e.what();
  }
  CHECK(contains(msg, bad + ":3:"));
  std::string missing = std::string(dir) + "/missing.toml";
  CHECK_THROWS_WITH_AS(loadTopology(missing), doctest::Contains(missing.c_str()), vsup::Error);
  ::unlink(good.c_str());
  ::unlink(bad.c_str());
  CHECK(::rmdir(dir) == 0);
}

// ---------------------------------------------------------------------------------------------
// Errors.

TEST_CASE("invalid TOML syntax is reported with its line number") {
  auto msg = parseError("name = \"x\"\n\n[[children]\nname = 1\n");
  INFO(msg);
  CHECK(contains(msg, "topo.toml:3:"));
  CHECK(contains(msg, "invalid TOML"));
}

TEST_CASE("duplicate child names are rejected, naming file, path and field") {
  auto msg = parseError(std::string(kOneWorker) + kOneWorker);
  checkNames(msg, "child 'root/w'", "name");
  CHECK(contains(msg, "duplicate"));
}

TEST_CASE("an invalid child name is rejected") {
  checkNames(parseError("[[children]]\nname = \"a b\"\ncommand = [\"x\"]\n"), "child 'root/a b'",
             "name");
  checkNames(parseError("[[children]]\nname = 7\ncommand = [\"x\"]\n"), "child #1 of 'root'",
             "name");
}

TEST_CASE("a child without a name is rejected, naming its position") {
  auto msg = parseError("[[children]]\nname = \"a\"\ncommand = [\"x\"]\n[[children]]\ncommand = [\"x\"]\n");
  checkNames(msg, "child #2 of 'root'", "name");
  CHECK(contains(msg, "missing"));
}

TEST_CASE("significant on a permanent child is rejected") {
  checkNames(parseError("[[children]]\nname = \"db\"\ncommand = [\"x\"]\nsignificant = true\n"),
             "child 'root/db'", "significant");
}

TEST_CASE("a negative shutdown is rejected with its line") {
  auto msg = parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nshutdown = -5\n");
  checkNames(msg, "child 'root/w'", "shutdown");
  CHECK(contains(msg, "topo.toml:4:"));
}

TEST_CASE("an unknown shutdown word or a fractional shutdown is rejected, listing accepted forms") {
  auto msg = parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nshutdown = \"never\"\n");
  checkNames(msg, "child 'root/w'", "shutdown");
  CHECK(contains(msg, "brutal_kill"));
  CHECK(contains(msg, "infinity"));
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nshutdown = 1.5\n"),
             "child 'root/w'", "shutdown");
}

TEST_CASE("a negative start_timeout is rejected") {
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nstart_timeout = -1\n"),
             "child 'root/w'", "start_timeout");
}

TEST_CASE("a worker without a command is rejected") {
  checkNames(parseError("[[children]]\nname = \"w\"\n"), "child 'root/w'", "command");
}

TEST_CASE("a command that is not an array of strings is rejected") {
  auto msg = parseError("[[children]]\nname = \"w\"\ncommand = \"/bin/true --x\"\n");
  checkNames(msg, "child 'root/w'", "command");
  CHECK(contains(msg, "topo.toml:3:"));
  CHECK(contains(msg, "array"));
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\", 3]\n"), "child 'root/w'",
             "command");
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = []\n"), "child 'root/w'",
             "command");
}

TEST_CASE("a supervisor child with a command is rejected") {
  checkNames(
      parseError("[[children]]\nname = \"sub\"\ntype = \"supervisor\"\ncommand = [\"x\"]\n"),
      "child 'root/sub'", "command");
}

TEST_CASE("supervisor-only keys on a worker are rejected") {
  for (std::string kv : {"strategy = \"one_for_all\"", "intensity = 2", "period = 1",
                         "auto_shutdown = \"never\"", "children = []"}) {
    auto msg = parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\n" + kv + "\n");
    std::string key = kv.substr(0, kv.find(' '));
    INFO("key: ", key);
    checkNames(msg, "child 'root/w'", key);
  }
}

TEST_CASE("vsup_aware = false on a supervisor child is rejected") {
  checkNames(
      parseError("[[children]]\nname = \"sub\"\ntype = \"supervisor\"\nvsup_aware = false\n"),
      "child 'root/sub'", "vsup_aware");
}

TEST_CASE("unknown keys are rejected at the top level and in a child") {
  auto top = parseError("name = \"r\"\nstrategyy = \"one_for_one\"\n");
  checkNames(top, "supervisor 'r'", "strategyy");
  CHECK(contains(top, "topo.toml:2:"));
  CHECK(contains(top, "unknown key"));
  auto child = parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nrestrat = \"temporary\"\n");
  checkNames(child, "child 'root/w'", "restrat");
  CHECK(contains(child, "unknown key"));
}

TEST_CASE("bad enum values are rejected, listing the accepted values") {
  struct Case {
    std::string text, where, field;
    std::vector<std::string> accepted;
  };
  const std::string w = "[[children]]\nname = \"w\"\ncommand = [\"x\"]\n";
  Case cases[] = {
      {"strategy = \"one_for_none\"\n", "supervisor 'root'", "strategy",
       {"one_for_one", "one_for_all", "rest_for_one"}},
      {"auto_shutdown = \"sometimes\"\n", "supervisor 'root'", "auto_shutdown",
       {"never", "any_significant", "all_significant"}},
      {w + "restart = \"always\"\n", "child 'root/w'", "restart",
       {"permanent", "transient", "temporary"}},
      {w + "type = \"daemon\"\n", "child 'root/w'", "type", {"worker", "supervisor"}},
      {w + "ready = \"sd_notify\"\n", "child 'root/w'", "ready", {"none", "notify"}},
      {w + "restart = 1\n", "child 'root/w'", "restart", {"permanent", "transient", "temporary"}},
  };
  for (const Case& c : cases) {
    auto msg = parseError(c.text);
    INFO("field: ", c.field, "; message: ", msg);
    checkNames(msg, c.where, c.field);
    for (const std::string& a : c.accepted) CHECK(contains(msg, a));
  }
}

TEST_CASE("a period of zero, a negative period or a non-number period is rejected") {
  checkNames(parseError("period = 0\n"), "supervisor 'root'", "period");
  checkNames(parseError("period = -2\n"), "supervisor 'root'", "period");
  checkNames(parseError("period = 0.0000001\n"), "supervisor 'root'", "period");
  checkNames(parseError("period = \"5s\"\n"), "supervisor 'root'", "period");
  checkNames(parseError("period = nan\n"), "supervisor 'root'", "period");
}

TEST_CASE("a negative or non-integer intensity is rejected") {
  checkNames(parseError("intensity = -1\n"), "supervisor 'root'", "intensity");
  checkNames(parseError("intensity = 1.5\n"), "supervisor 'root'", "intensity");
  checkNames(parseError("intensity = \"3\"\n"), "supervisor 'root'", "intensity");
}

TEST_CASE("an intensity too large for 32 bits is rejected rather than wrapped") {
  // 4294967296 would silently become 0 restarts if truncated to uint32_t.
  std::string msg;
  uint32_t parsed = 0;
  try {
    parsed = parseTopology("intensity = 4294967296\n", "topo.toml").intensity;
  } catch (const vsup::Error& e) {
    msg = e.what();
  }
  INFO("parsed intensity: ", parsed);
  checkNames(msg, "supervisor 'root'", "intensity");
}

TEST_CASE("errors in nested supervisors name the full path") {
  const std::string nested = R"(
[[children]]
name = "sub"
type = "supervisor"

  [[children.children]]
  name = "mid"
  type = "supervisor"

    [[children.children.children]]
    name = "leaf"
)";
  checkNames(parseError(nested), "child 'root/sub/mid/leaf'", "command");
  checkNames(parseError(nested + "    command = [\"x\"]\n    restart = \"never\"\n"),
             "child 'root/sub/mid/leaf'", "restart");
  checkNames(parseError(nested + "    command = [\"x\"]\n    bogus = 1\n"),
             "child 'root/sub/mid/leaf'", "bogus");
  auto strategy = parseError(R"(
[[children]]
name = "sub"
type = "supervisor"
strategy = "random"
)");
  checkNames(strategy, "'root/sub'", "strategy");
}

TEST_CASE("env must be a table of strings") {
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nenv = [\"A=1\"]\n"),
             "child 'root/w'", "env");
  checkNames(parseError("[[children]]\nname = \"w\"\ncommand = [\"x\"]\nenv = { A = 1 }\n"),
             "child 'root/w'", "env.A");
}

TEST_CASE("children must be an array of tables") {
  checkNames(parseError("children = 5\n"), "supervisor 'root'", "children");
  checkNames(parseError("children = [1, 2]\n"), "supervisor 'root'", "children");
}
