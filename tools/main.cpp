// vsup: run and inspect supervised process trees. See README.md.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "base/check.h"
#include "base/log.h"
#include "supervisor/orphan_guard.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/processes.h"

int main(int argc, char** argv) {
  using namespace vsup;
  // The vsup executable (never the library) writes children's collected output to its own
  // stdout/stderr: a closed terminal or pipe there must not kill the tree's supervisor.
  ::signal(SIGPIPE, SIG_IGN);
  // The hidden entry point of sub-supervisors: not a user command, so not in --help.
  if (argc == 2 && std::string(argv[1]) == "__node") return tools::nodeMain();
  if (argc == 2 && std::string(argv[1]) == "__guard") return supervisor::orphanGuardMain();
  if (argc >= 2 && std::string(argv[1]) == "__engine-core") return workers::engineCoreMain(argc - 1, argv + 1);
  if (argc >= 2 && std::string(argv[1]) == "__worker") return workers::workerMain(argc - 1, argv + 1);
  if (argc >= 2 && std::string(argv[1]) == "__api-server") return workers::apiServerMain(argc - 1, argv + 1);

  CLI::App app{"vsup: OTP-style supervision trees for LLM inference serving"};
  app.require_subcommand(1);
  std::string logLevel = "info";
  app.add_option("--log-level", logLevel, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  tools::RunOptions run;
  tools::ServeOptions serve;
  auto* runCmd = app.add_subcommand(
      "run", "serve a model over HTTP (default), or supervise a tree of commands (--topology)");
  auto* topology = runCmd->add_option("--topology", run.topology,
                                      "supervise the tree in this TOML file instead of serving")
                       ->check(CLI::ExistingFile);
  runCmd->add_option("--control-socket", run.controlSocket,
                     "serve `vsup tree` here (default: $XDG_RUNTIME_DIR/vsup/<name>-<pid>.sock)");
  runCmd->add_option("--log-level", logLevel, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  // Serving flags, named like `vllm serve`'s. Each excludes --topology.
  std::vector<CLI::Option*> serving = {
      runCmd->add_option("--api-server-count", serve.apiServerCount,
                         "HTTP front-end processes sharing the port")
          ->check(CLI::Range(1u, 64u))->capture_default_str(),
      runCmd->add_option("--host", serve.host, "address to listen on")->capture_default_str(),
      runCmd->add_option("--port", serve.port, "TCP port")->capture_default_str(),
      runCmd->add_option("--shutdown-timeout", serve.shutdownTimeout,
                         "seconds in-flight requests get to finish after SIGTERM (0: abort at once)")
          ->check(CLI::Range(0.0, 86400.0))->capture_default_str(),
      runCmd->add_option("--api-key", serve.apiKey,
                         "require `Authorization: Bearer KEY` on /v1/* (or set VSUP_API_KEY)"),
      runCmd->add_option("--max-request-bytes", serve.maxRequestBytes, "largest request body")
          ->check(CLI::Range(uint64_t(1024), uint64_t(1) << 34))->capture_default_str(),
  };
  for (auto* opt : workers::addEngineFlags(*runCmd, serve.engine)) serving.push_back(opt);
  for (auto* opt : serving) opt->excludes(topology);

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
    if (runCmd->parsed()) {
      if (!run.topology.empty()) return tools::runTopology(run);
      if (serve.apiKey.empty()) {
        if (const char* key = std::getenv("VSUP_API_KEY")) serve.apiKey = key;
      }
      serve.controlSocket = run.controlSocket;
      return tools::serve(serve);
    }
    if (treeCmd->parsed()) return tools::tree(tree);
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "vsup: %s\n", e.what());
    return supervisor::kExitError;
  }
  return supervisor::kExitUsage;
}
