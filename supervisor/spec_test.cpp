// Tests for supervisor/spec.h: OTP defaults and validate(), whose every error names the origin,
// the child path and the field.
#include "supervisor/spec.h"

#include <doctest/doctest.h>
#include <string>

#include "base/check.h"

namespace {

using namespace vsup::supervisor;

ChildSpec worker(const std::string& name) {
  ChildSpec c;
  c.name = name;
  c.command = {"/bin/true"};
  return c;
}

ChildSpec supervisorChild(const std::string& name, std::vector<ChildSpec> children) {
  ChildSpec c;
  c.name = name;
  c.type = ChildType::Supervisor;
  c.shutdown = ShutdownPolicy::infinity();
  c.vsupAware = true;
  SupervisorSpec sub;
  sub.name = name;
  sub.children = std::move(children);
  c.supervisor = std::move(sub);
  return c;
}

SupervisorSpec rootWith(std::vector<ChildSpec> children) {
  SupervisorSpec s;
  s.children = std::move(children);
  return s;
}

// The message validate() throws, or "" when the spec is valid.
std::string validationError(const SupervisorSpec& spec, const std::string& origin = "app.toml") {
  try {
    validate(spec, origin);
  } catch (const vsup::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The three things every validation error must name.
void checkNames(const std::string& message, const std::string& origin, const std::string& where,
                const std::string& field) {
  INFO("message: ", message);
  CHECK(contains(message, origin + ":"));
  CHECK(contains(message, where));
  CHECK(contains(message, "field '" + field + "'"));
}

}  // namespace

TEST_CASE("a default ChildSpec and SupervisorSpec follow OTP's defaults") {
  ChildSpec c;
  CHECK(c.restart == Restart::Permanent);
  CHECK(c.shutdown == ShutdownPolicy::timeout(5000));
  CHECK(c.type == ChildType::Worker);
  CHECK_FALSE(c.significant);
  CHECK(c.ready == Readiness::None);
  SupervisorSpec s;
  CHECK(s.name == "root");
  CHECK(s.strategy == Strategy::OneForOne);
  CHECK(s.intensity == 1);
  CHECK(s.periodMs == 5000);
  CHECK(s.autoShutdown == AutoShutdown::Never);
}

TEST_CASE("a well-formed spec with nested supervisors validates") {
  auto sub = supervisorChild("sub", {worker("leaf"), worker("leaf2")});
  auto spec = rootWith({worker("a"), sub, worker("b.c_d-9")});
  CHECK(validationError(spec) == "");
}

TEST_CASE("an empty supervisor validates") { CHECK(validationError(SupervisorSpec{}) == ""); }

TEST_CASE("duplicate child names are rejected, naming the file, the child and the field") {
  auto msg = validationError(rootWith({worker("a"), worker("b"), worker("a")}), "dup.toml");
  checkNames(msg, "dup.toml", "child 'root/a'", "name");
  CHECK(contains(msg, "duplicate"));
}

TEST_CASE("the same name under two different supervisors is allowed") {
  auto spec = rootWith({worker("x"), supervisorChild("sub", {worker("x")})});
  CHECK(validationError(spec) == "");
}

TEST_CASE("invalid child names are rejected") {
  for (std::string bad : {std::string(""), std::string("a/b"), std::string("has space"),
                          std::string("ünïcode"), std::string(65, 'x'), std::string("semi;colon")}) {
    auto msg = validationError(rootWith({worker(bad)}));
    INFO("name: '", bad, "'");
    checkNames(msg, "app.toml", "child 'root/" + bad + "'", "name");
  }
  CHECK(validationError(rootWith({worker(std::string(64, 'x'))})) == "");
}

TEST_CASE("an invalid supervisor name is rejected") {
  SupervisorSpec s;
  s.name = "bad name";
  checkNames(validationError(s), "app.toml", "supervisor 'bad name'", "name");
}

TEST_CASE("a permanent child cannot be significant; transient and temporary ones can") {
  auto c = worker("db");
  c.significant = true;
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/db'", "significant");
  c.restart = Restart::Transient;
  CHECK(validationError(rootWith({c})) == "");
  c.restart = Restart::Temporary;
  CHECK(validationError(rootWith({c})) == "");
}

TEST_CASE("a negative shutdown timeout is rejected; zero, brutal_kill and infinity are not") {
  auto c = worker("w");
  c.shutdown = ShutdownPolicy::timeout(-1);
  auto msg = validationError(rootWith({c}));
  checkNames(msg, "app.toml", "child 'root/w'", "shutdown");
  CHECK(contains(msg, "-1"));
  c.shutdown = ShutdownPolicy::timeout(0);
  CHECK(validationError(rootWith({c})) == "");
  c.shutdown = ShutdownPolicy::brutalKill();
  CHECK(validationError(rootWith({c})) == "");
  c.shutdown = ShutdownPolicy::infinity();
  CHECK(validationError(rootWith({c})) == "");
}

TEST_CASE("a negative start_timeout other than -1 (none) is rejected") {
  auto c = worker("w");
  c.startTimeoutMs = -5;
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "start_timeout");
  c.startTimeoutMs = -1;
  CHECK(validationError(rootWith({c})) == "");
  c.startTimeoutMs = 0;
  CHECK(validationError(rootWith({c})) == "");
}

TEST_CASE("a worker without a command is rejected") {
  auto c = worker("w");
  c.command.clear();
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "command");
  c.command = {""};
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "command");
}

TEST_CASE("a supervisor child with a command is rejected") {
  auto c = supervisorChild("sub", {worker("leaf")});
  c.command = {"/bin/true"};
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/sub'", "command");
}

TEST_CASE("a worker that carries a supervisor spec is rejected") {
  auto c = worker("w");
  c.supervisor = SupervisorSpec{};
  c.supervisor->name = "w";
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "children");
}

TEST_CASE("a supervisor spec whose name differs from its child's is rejected") {
  auto c = supervisorChild("sub", {worker("leaf")});
  c.supervisor->name = "other";
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/sub'", "name");
}

TEST_CASE("an env variable name that is empty or contains '=' is rejected") {
  auto c = worker("w");
  c.env = {{"A=B", "1"}};
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "env");
  c.env = {{"", "1"}};
  checkNames(validationError(rootWith({c})), "app.toml", "child 'root/w'", "env");
  c.env = {{"GOOD_NAME", "a=b=c"}};
  CHECK(validationError(rootWith({c})) == "");
}

TEST_CASE("a period of zero or less is rejected for the root and for nested supervisors") {
  SupervisorSpec s = rootWith({worker("a")});
  s.periodMs = 0;
  checkNames(validationError(s), "app.toml", "supervisor 'root'", "period");
  s.periodMs = -1000;
  checkNames(validationError(s), "app.toml", "supervisor 'root'", "period");
  auto sub = supervisorChild("sub", {worker("leaf")});
  sub.supervisor->periodMs = 0;
  checkNames(validationError(rootWith({sub})), "app.toml", "supervisor 'root/sub'", "period");
}

TEST_CASE("errors deep in the tree name the full child path") {
  auto bad = worker("leaf");
  bad.command.clear();
  auto mid = supervisorChild("mid", {worker("ok"), bad});
  auto sub = supervisorChild("sub", {mid});
  auto msg = validationError(rootWith({worker("a"), sub}), "embedded spec");
  checkNames(msg, "embedded spec", "child 'root/sub/mid/leaf'", "command");
}

TEST_CASE("nameOf names the OTP values") {
  CHECK(std::string(vsup::supervisor::nameOf(Restart::Permanent)) == "permanent");
  CHECK(std::string(vsup::supervisor::nameOf(Restart::Transient)) == "transient");
  CHECK(std::string(vsup::supervisor::nameOf(Restart::Temporary)) == "temporary");
  CHECK(std::string(vsup::supervisor::nameOf(Strategy::OneForOne)) == "one_for_one");
  CHECK(std::string(vsup::supervisor::nameOf(Strategy::OneForAll)) == "one_for_all");
  CHECK(std::string(vsup::supervisor::nameOf(Strategy::RestForOne)) == "rest_for_one");
  CHECK(std::string(vsup::supervisor::nameOf(AutoShutdown::Never)) == "never");
  CHECK(std::string(vsup::supervisor::nameOf(AutoShutdown::AnySignificant)) == "any_significant");
  CHECK(std::string(vsup::supervisor::nameOf(AutoShutdown::AllSignificant)) == "all_significant");
  CHECK(vsup::supervisor::nameOf(ShutdownPolicy::timeout(250)) == "250ms");
  CHECK(vsup::supervisor::nameOf(ShutdownPolicy::brutalKill()) == "brutal_kill");
  CHECK(vsup::supervisor::nameOf(ShutdownPolicy::infinity()) == "infinity");
}
