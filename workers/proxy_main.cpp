// `vsup __proxy --prefill URL --decode URL [...]`: the disaggregated front end
// (workers/proxy/proxy.h), wired into its node: Node.start listens, Node.leaveRotation turns
// /health to 503 while it keeps serving (`vsup drain`), Node.quiesce starts the drain, and the
// "drain" shutdown hook waits for the last response before the process exits. Its status
// carries the completions in flight and since start, and the legs in flight (`vsup tree`).
//
//   --prefill URL, --decode URL  the instances (repeatable; each http://HOST:PORT)
//   --listen-fd FD               the listening socket `vsup proxy`'s root bound (inherited);
//                                without it, --host/--port are bound here
//   --connect-timeout-ms MS      per leg: connecting and sending the request
//   --log-requests               one log line per completion (never a prompt)
//   --max-request-bytes, --max-connections, --first-byte-timeout-ms, --header-timeout-ms,
//   --body-timeout-ms, --idle-timeout-ms   the HTTP limits (workers/http/http_server.h)
#include <CLI/CLI.hpp>
#include <memory>

#include "supervisor/child_runtime.h"
#include "workers/node_process.h"
#include "workers/processes.h"
#include "workers/proxy/proxy.h"

namespace vsup::workers {

int proxyMain(int argc, char** argv) {
  CLI::App app{"vsup proxy process (started by vsup proxy)"};
  ProxyOptions options;
  std::vector<std::string> prefill, decode;
  app.add_option("--host", options.host);
  app.add_option("--port", options.port);
  app.add_option("--prefill", prefill)->required();
  app.add_option("--decode", decode)->required();
  app.add_option("--listen-fd", options.listenFd)->check(CLI::NonNegativeNumber);
  app.add_option("--connect-timeout-ms", options.connectTimeoutMs);
  app.add_flag("--log-requests", options.logRequests);
  app.add_option("--max-request-bytes", options.maxRequestBytes);
  app.add_option("--max-connections", options.maxConnections)->check(CLI::PositiveNumber);
  app.add_option("--first-byte-timeout-ms", options.firstByteTimeoutMs);
  app.add_option("--header-timeout-ms", options.headerTimeoutMs);
  app.add_option("--body-timeout-ms", options.bodyTimeoutMs);
  app.add_option("--idle-timeout-ms", options.idleTimeoutMs);
  CLI11_PARSE(app, argc, argv);
  try {
    for (const auto& u : prefill) options.prefill.push_back(http::parseUrl(u));
    for (const auto& u : decode) options.decode.push_back(http::parseUrl(u));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vsup __proxy: %s\n", e.what());
    return 2;
  }

  return runNodeProcess("vsup __proxy", [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    options.name = runtime.name();
    auto proxy = std::make_unique<Proxy>(loop, options);
    Proxy* p = proxy.get();
    runtime.onStart([p](const supervisor::SupervisorSpec&) { return p->start(); });
    runtime.onQuiesce([p](MonoNs deadline) { return p->quiesce(deadline); });
    runtime.onLeaveRotation([p]() -> kj::Promise<void> {
      p->leaveRotation();
      return kj::READY_NOW;
    });
    runtime.onStatus([p]() -> kj::Promise<supervisor::NodeStatus> {
      supervisor::NodeStatus s;
      s.type = supervisor::NodeType::Worker;
      s.state = supervisor::NodeState::Running;
      s.inFlight = p->inFlight();
      s.requestsTotal = int64_t(p->requestsTotal());
      s.outOfRotation = p->outOfRotation();
      s.detail = p->detail();
      return s;
    });
    runtime.addShutdownHook("drain", [p](supervisor::ShutdownContext& ctx) {
      return p->drain(ctx.deadline(), [&ctx](const std::string& reason) { ctx.defer(reason); });
    });
    return holding(std::move(proxy));
  });
}

}  // namespace vsup::workers
