// vsup: run and inspect supervised process trees. See README.md.
#include <signal.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <kj/exception.h>

#include "base/check.h"
#include "base/log.h"
#include "supervisor/orphan_guard.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/processes.h"

namespace {

// In the json log format, KJ's own diagnostics (written straight to stderr by default) go
// through the vsup logger too, so that every line of the process's stderr is JSON. Installed on
// the main thread, where every loop of the vsup executable runs.
class KjToVsupLog final : public kj::ExceptionCallback {
 public:
  void logMessage(kj::LogSeverity severity, const char* file, int line, int contextDepth,
                  kj::String&& text) override {
    (void)contextDepth;
    auto level = severity == kj::LogSeverity::INFO    ? spdlog::level::info
                 : severity == kj::LogSeverity::WARNING ? spdlog::level::warn
                 : severity == kj::LogSeverity::DBG     ? spdlog::level::debug
                                                        : spdlog::level::err;
    std::string message(text.cStr());
    while (!message.empty() && message.back() == '\n') message.pop_back();
    vsup::log().log(level, "[kj] {}:{}: {}", file, line, message);
  }
};

// What is wrong with `path` as a Unix socket to create ("" when nothing, or when empty: the
// default): too long for sun_path, or no directory to create it in.
std::string badSocketPath(const std::string& path) {
  if (path.empty()) return "";
  if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return "too long for a Unix socket (" + std::to_string(path.size()) + " bytes, at most " +
           std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + ")";
  }
  std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  if (dir.empty()) dir = "/";
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return "its directory " + dir + " does not exist";
  }
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return "is a directory";
  return "";
}

}  // namespace

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
  if (argc >= 2 && std::string(argv[1]) == "__kv-agent") {
    return workers::kvAgentMain(argc - 1, argv + 1);
  }
  if (argc >= 2 && std::string(argv[1]) == "__node-agent") {
    return workers::nodeAgentMain(argc - 1, argv + 1);
  }
  if (argc >= 2 && std::string(argv[1]) == "__proxy") return workers::proxyMain(argc - 1, argv + 1);
  if (argc >= 2 && std::string(argv[1]) == "__api-server") return workers::apiServerMain(argc - 1, argv + 1);

  CLI::App app{"vsup: OTP-style supervision trees for LLM inference serving"};
  app.require_subcommand(1);
  std::string logLevel = "info";
  // The format every process of the tree logs in (the children get it through the
  // environment, base/log.h); the default keeps what $VSUP_LOG_FORMAT says, else text.
  std::string logFormatName = nameOf(vsup::logFormat());
  const char* logLevelHelp = "trace, debug, info, warn, error or off";
  const char* logFormatHelp =
      "text (one line per event: time, process, message) or json (one JSON object per line: "
      "time, level, process, pid, message; every line of the tree's output, children's "
      "included)";
  auto logFormats = CLI::IsMember({"text", "json"});
  app.add_option("--log-level", logLevel, logLevelHelp)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--log-format", logFormatName, logFormatHelp)->check(logFormats);

  tools::RunOptions run;
  tools::ServeOptions serve;
  auto* runCmd = app.add_subcommand(
      "run", "serve a model over HTTP (default), or supervise a tree of commands (--topology)");
  auto* topology = runCmd->add_option("--topology", run.topology,
                                      "supervise the tree in this TOML file instead of serving")
                       ->check(CLI::ExistingFile);
  runCmd->add_option("--control-socket", run.controlSocket,
                     "serve `vsup tree` here (default: $XDG_RUNTIME_DIR/vsup/<name>-<pid>.sock)");
  runCmd->add_option("--log-level", logLevel, logLevelHelp)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  runCmd->add_option("--log-format", logFormatName, logFormatHelp)->check(logFormats);
  // Serving flags, named like `vllm serve`'s. Each excludes --topology.
  auto seconds = [](double lo, double hi) { return workers::finiteRange(lo, hi, "seconds"); };
  CLI::Option* apiKey = runCmd->add_option(
      "--api-key", serve.apiKey,
      "require `Authorization: Bearer KEY` on /v1/* (or set VSUP_API_KEY)");
  std::vector<CLI::Option*> serving = {
      runCmd->add_option("--api-server-count", serve.apiServerCount,
                         "HTTP front-end processes, all accepting from the one socket the root binds")
          ->check(CLI::Range(1u, 64u))->capture_default_str(),
      runCmd->add_option("--host", serve.host, "address to listen on")->capture_default_str(),
      runCmd->add_option("--port", serve.port, "TCP port")->capture_default_str(),
      runCmd->add_option("--shutdown-timeout", serve.shutdownTimeout,
                         "seconds in-flight requests get to finish after SIGTERM or SIGINT (0: "
                         "abort them at once, as vLLM's default); the whole tree then stops "
                         "within this + 15 s (+ --kv-shutdown-timeout with a KV connector)")
          ->check(seconds(0, 86400))->capture_default_str(),
      apiKey,
      runCmd->add_option("--max-request-bytes", serve.maxRequestBytes, "largest request body")
          ->check(CLI::Range(uint64_t(1024), uint64_t(1) << 34))->capture_default_str(),
      runCmd->add_option("--served-model-name", serve.servedModelNames,
                         "the model names requests may use (\"model\" in a request body), the "
                         "first one shown by /v1/models and in /metrics; default: the model as "
                         "given (MODEL or --model). Takes one or more names: put MODEL before "
                         "it")
          ->expected(1, -1),
      runCmd->add_flag("--enable-log-requests", serve.logRequests,
                       "one log line per request from the API servers (request id, sizes, "
                       "status, time; never the prompt or the completion)"),
      // Hung nodes and start timeouts.
      runCmd->add_option("--liveness-timeout", serve.livenessTimeout,
                         "seconds a node of the tree (engine-core, a rank, an API server) may "
                         "leave its parent's ping unanswered before it is taken for hung: "
                         "killed, named in the log and `vsup tree`, and the tree stopped "
                         "with a non-zero exit; 0: no pings")
          ->check(seconds(0, 3600))->capture_default_str(),
      runCmd->add_option("--liveness-interval", serve.livenessInterval,
                         "seconds between a parent's pings of each child")
          ->check(seconds(0.01, 3600))->capture_default_str(),
      runCmd->add_option("--engine-start-timeout", serve.engineStartTimeout,
                         "seconds engine-core may take to start, its ranks included (a start "
                         "that takes longer fails, naming the node); 0: --worker-start-timeout "
                         "+ 60")
          ->check(seconds(0, 86400))->capture_default_str(),
      runCmd->add_option("--worker-start-timeout", serve.workerStartTimeout,
                         "seconds each rank may take to start (loading its weights)")
          ->check(seconds(0.1, 86400))->capture_default_str(),
      runCmd->add_option("--api-server-start-timeout", serve.apiServerStartTimeout,
                         "seconds each API server may take to start")
          ->check(seconds(0.1, 86400))->capture_default_str(),
      // HTTP limits of every API server.
      runCmd->add_option("--max-connections", serve.maxConnections,
                         "open HTTP connections per API server; one more is answered 503 and "
                         "closed")
          ->check(CLI::Range(size_t(1), size_t(1) << 20))->capture_default_str(),
      runCmd->add_option("--http-first-byte-timeout", serve.httpFirstByteTimeout,
                         "seconds a new connection may stay silent before it is closed, so "
                         "that silent connections cannot hold the connection limit (0: none)")
          ->check(seconds(0, 86400))->capture_default_str(),
      runCmd->add_option("--http-header-timeout", serve.httpHeaderTimeout,
                         "seconds from a request's first byte to the end of its headers "
                         "(then 408; 0: none)")
          ->check(seconds(0, 86400))->capture_default_str(),
      runCmd->add_option("--http-body-timeout", serve.httpBodyTimeout,
                         "seconds from the end of a request's headers to the end of its body "
                         "(then 408; 0: none)")
          ->check(seconds(0, 86400))->capture_default_str(),
      runCmd->add_option("--node-rank", serve.nodeRank,
                         "with --nnodes > 1: this node's rank, 0 for the leader (which serves "
                         "HTTP); $LWS_WORKER_INDEX when absent")
          ->check(CLI::Range(0u, 63u))->capture_default_str(),
      runCmd->add_flag("--headless", serve.headless,
                       "a worker node of a multi-node engine: no API server; runs this node's "
                       "ranks for the leader at --master-addr"),
      runCmd->add_option("--http-idle-timeout", serve.httpIdleTimeout,
                         "seconds a keep-alive connection may wait for its next request (0: "
                         "none)")
          ->check(seconds(0, 86400))->capture_default_str(),
  };
  // vLLM's older spelling of the default, accepted so that scripts written for it run as they
  // are; it only contradicts --enable-log-requests.
  bool noRequestLog = false;
  serving.push_back(runCmd->add_flag("--disable-log-requests", noRequestLog,
                                     "no per-request log lines (the default; accepted as vLLM "
                                     "accepts it)")
                        ->excludes("--enable-log-requests"));
  for (auto* opt : workers::addEngineFlags(*runCmd, serve.engine)) serving.push_back(opt);
  for (auto* opt : serving) opt->excludes(topology);

  tools::TreeOptions tree;
  // Filled in below: every option that takes a value refuses an empty one.
  std::vector<CLI::App*> commands = {&app, runCmd};
  auto* treeCmd = app.add_subcommand("tree", "show a running tree, live");
  treeCmd->add_option("--socket", tree.socket, "the root's control socket (default: find it)");
  treeCmd->add_flag("--json", tree.json, "one JSON object per node, nested");
  treeCmd->add_flag("--watch", tree.watch, "refresh until the tree exits or Ctrl-C");
  treeCmd->add_option("--interval", tree.intervalSeconds, "seconds between refreshes with --watch")
      ->check(workers::finiteRange(0.05, 3600, "seconds"));

  tools::DrainOptions drain;
  auto* drainCmd = app.add_subcommand(
      "drain", "leave the load balancers' rotation, return once the traffic has stopped");
  drainCmd->footer(
      "A preStop hook that watches instead of sleeping: every API server of the running tree "
      "turns /health to 503 (draining) and keeps serving every request; vsup drain returns "
      "once no new request arrived for --quiet-for seconds (the load balancers have noticed). "
      "Exit status: 0 quiet, or the tree exited meanwhile; 124 --timeout passed first; 1 an "
      "error; 2 a usage error.");
  drainCmd->add_option("--socket", drain.socket, "the root's control socket (default: find it)");
  drainCmd->add_option("--quiet-for", drain.quietForSeconds,
                       "return once no new request arrived for this many seconds: the load "
                       "balancers have taken this server out (about their health-check period "
                       "times their failure threshold, plus a margin)")
      ->capture_default_str();
  drainCmd->add_option("--timeout", drain.timeoutSeconds,
                       "give up (exit 124) after this many seconds; keep it below the "
                       "preStop budget (terminationGracePeriodSeconds less the shutdown)")
      ->capture_default_str();
  drainCmd->add_flag("--wait", drain.wait,
                     "once quiet, also wait until no request is in flight");

  // An empty value is never what was meant (`--port "$PORT"` with PORT unset): CLI11 would
  // read it as 0 or as the empty string, for some flags a silent default (--max-model-len,
  // --seed, --kv-cache-memory). --api-key gets its own message (below).
  tools::ProxyCommandOptions proxy;
  auto* proxyCmd = app.add_subcommand(
      "proxy", "the OpenAI-compatible front end of a disaggregated deployment: each completion "
               "is prefilled on a --prefill instance and decoded on a --decode instance");
  proxyCmd->footer(
      "The instances are `vsup run --kv-connector vsup --kv-role prefill|decode` servers. Each "
      "leg goes to the instance of its kind with the fewest legs in flight; a leg that cannot "
      "connect is tried on the next one. Shutdown as vsup run's: on SIGTERM new completions "
      "get 503 at once, those in flight finish within --shutdown-timeout or are cut with "
      "their clients told.");
  proxyCmd->add_option("--host", proxy.host, "address to listen on")->capture_default_str();
  proxyCmd->add_option("--port", proxy.port, "TCP port")->capture_default_str();
  proxyCmd->add_option("--prefill", proxy.prefill,
                       "prefill instance(s): http://HOST:PORT, several comma-separated or the "
                       "flag repeated")
      ->required();
  proxyCmd->add_option("--decode", proxy.decode, "decode instance(s), as --prefill")
      ->required();
  proxyCmd->add_option("--shutdown-timeout", proxy.shutdownTimeout,
                       "seconds in-flight completions get to finish after SIGTERM or SIGINT")
      ->check(seconds(0, 86400))->capture_default_str();
  proxyCmd->add_option("--connect-timeout", proxy.connectTimeout,
                       "seconds a leg may take to connect to its instance and send the "
                       "request")
      ->check(seconds(0.01, 3600))->capture_default_str();
  proxyCmd->add_flag("--enable-log-requests", proxy.logRequests,
                     "one log line per completion (request id, instances, status, time)");
  proxyCmd->add_option("--control-socket", proxy.controlSocket,
                       "serve `vsup tree` here (default: $XDG_RUNTIME_DIR/vsup/<name>-<pid>.sock)");
  proxyCmd->add_option("--liveness-timeout", proxy.livenessTimeout,
                       "seconds the proxy process may leave the root's ping unanswered (0: no "
                       "pings)")
      ->check(seconds(0, 3600))->capture_default_str();
  proxyCmd->add_option("--max-request-bytes", proxy.maxRequestBytes, "largest request body")
      ->check(CLI::Range(uint64_t(1024), uint64_t(1) << 34))->capture_default_str();
  proxyCmd->add_option("--max-connections", proxy.maxConnections,
                       "open client connections; one more is answered 503 and closed")
      ->check(CLI::Range(size_t(1), size_t(1) << 20))->capture_default_str();
  proxyCmd->add_option("--log-level", logLevel, logLevelHelp)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  proxyCmd->add_option("--log-format", logFormatName, logFormatHelp)->check(logFormats);

  commands.push_back(proxyCmd);
  commands.push_back(treeCmd);
  commands.push_back(drainCmd);
  const CLI::Validator nonEmpty(
      [](std::string& v) {
        return v.empty() ? std::string("an empty value (give one, or leave the flag out)")
                         : std::string();
      },
      "");
  for (CLI::App* command : commands) {
    for (CLI::Option* opt : command->get_options()) {
      if (opt != apiKey && opt->get_type_size_min() > 0) opt->check(nonEmpty);
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 prints help with exit 0, errors with its own code: ours is 2 for usage errors.
    if (e.get_exit_code() != 0) {
      // In the json format (asked for on the command line, which did not parse as a whole, or
      // inherited), the usage error is one JSON line too.
      bool json = vsup::logFormat() == LogFormat::Json;
      for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--log-format=json" || (a == "--log-format" && i + 1 < argc &&
                                         std::string(argv[i + 1]) == "json")) {
          json = true;
        }
      }
      if (json) {
        setLogFormat("json");
        tools::printMessage("vsup", std::string(e.what()) + " (see vsup --help)");
        return supervisor::kExitUsage;
      }
    }
    int rc = app.exit(e);
    return rc == 0 ? 0 : supervisor::kExitUsage;
  }
  try {
    setLogLevel(logLevel);
    setLogFormat(logFormatName);
    std::optional<KjToVsupLog> kjLog;
    if (vsup::logFormat() == LogFormat::Json) kjLog.emplace();
    if (runCmd->parsed()) {
      // A control socket path that cannot be bound is the user's to fix: refused before any
      // process starts, naming the flag.
      if (std::string bad = badSocketPath(run.controlSocket); !bad.empty()) {
        tools::printMessage("vsup run", "--control-socket " + run.controlSocket + ": " + bad);
        return supervisor::kExitUsage;
      }
      if (!run.topology.empty()) return tools::runTopology(run);
      // An empty key would serve without authentication: a key variable left unset
      // (`--api-key "$KEY"`) must not open the server.
      if (apiKey->count() > 0 && serve.apiKey.empty()) {
        tools::printMessage("vsup run", "--api-key: the key is empty (give a key, or leave "
                                        "--api-key out to serve without one)");
        return supervisor::kExitUsage;
      }
      if (apiKey->count() == 0) {
        if (const char* key = std::getenv("VSUP_API_KEY")) {
          if (*key == '\0') {
            tools::printMessage("vsup run", "VSUP_API_KEY is set but empty (set a key, or unset "
                                            "it to serve without one)");
            return supervisor::kExitUsage;
          }
          serve.apiKey = key;
        }
      }
      serve.controlSocket = run.controlSocket;
      if (std::string bad = tools::applyLeaderWorkerSetEnv(
              serve, runCmd->get_option("--nnodes")->count() > 0,
              runCmd->get_option("--master-addr")->count() > 0,
              runCmd->get_option("--node-rank")->count() > 0);
          !bad.empty()) {
        tools::printMessage("vsup run", bad);
        return supervisor::kExitUsage;
      }
      return tools::serve(serve);
    }
    if (proxyCmd->parsed()) {
      if (std::string bad = badSocketPath(proxy.controlSocket); !bad.empty()) {
        tools::printMessage("vsup proxy",
                            "--control-socket " + proxy.controlSocket + ": " + bad);
        return supervisor::kExitUsage;
      }
      return tools::proxy(proxy);
    }
    if (treeCmd->parsed()) return tools::tree(tree);
    if (drainCmd->parsed()) return tools::drain(drain);
  } catch (const vsup::Error& e) {
    tools::printMessage("vsup", e.what());
    return supervisor::kExitError;
  }
  return supervisor::kExitUsage;
}
