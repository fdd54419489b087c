// vsup: run and inspect supervised process trees. See README.md.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "ipc/check.h"
#include "ipc/log.h"
#include "supervisor/orphan_guard.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  using namespace vsup;
  // The hidden entry point of sub-supervisors: not a user command, so not in --help.
  if (argc == 2 && std::string(argv[1]) == "__node") return tools::nodeMain();
  if (argc == 2 && std::string(argv[1]) == "__guard") return supervisor::orphanGuardMain();

  CLI::App app{"vsup: OTP-style supervision trees for LLM inference serving"};
  app.require_subcommand(1);
  std::string logLevel = "info";
  app.add_option("--log-level", logLevel, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  tools::RunOptions run;
  auto* runCmd = app.add_subcommand("run", "start a tree and supervise it until SIGTERM/SIGINT");
  runCmd->add_option("--topology", run.topology, "TOML file describing the tree")
      ->required()
      ->check(CLI::ExistingFile);
  runCmd->add_option("--control-socket", run.controlSocket,
                     "serve `vsup tree` here (default: $XDG_RUNTIME_DIR/vsup/<name>-<pid>.sock)");
  runCmd->add_option("--log-level", logLevel, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  tools::TreeOptions tree;
  auto* treeCmd = app.add_subcommand("tree", "show a running tree, live");
  treeCmd->add_option("--socket", tree.socket, "the root's control socket (default: find it)");
  treeCmd->add_flag("--json", tree.json, "one JSON object per node, nested");
  treeCmd->add_flag("--watch", tree.watch, "refresh until the tree exits or Ctrl-C");
  treeCmd->add_option("--interval", tree.intervalSeconds, "seconds between refreshes with --watch")
      ->check(CLI::Range(0.05, 3600.0));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 prints help with exit 0, errors with its own code: ours is 2 for usage errors.
    int rc = app.exit(e);
    return rc == 0 ? 0 : supervisor::kExitUsage;
  }
  try {
    setLogLevel(logLevel);
    if (runCmd->parsed()) return tools::runTopology(run);
    if (treeCmd->parsed()) return tools::tree(tree);
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "vsup: %s\n", e.what());
    return supervisor::kExitError;
  }
  return supervisor::kExitUsage;
}
