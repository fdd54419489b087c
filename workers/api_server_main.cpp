// `vsup __api-server --index I --engine-fd FD [...]`: one OpenAI-compatible HTTP front end
// (workers/api_server/api_server.h), wired into its node: Node.start attaches to engine-core
// over the inherited socket and listens, Node.leaveRotation turns /health to 503 while it keeps
// serving (`vsup drain`), Node.quiesce starts the drain, and the "drain" shutdown hook waits for
// the last response before the process exits. Its status carries the requests in flight and
// since start, and whether it left the rotation.
//
//   --model M                  the model as `vsup run` was given it (/v1/models' root)
//   --served-model-name NAME   a name requests may use (repeatable; the first is public);
//                              none: M
//   --log-requests             one log line per request (never a prompt)
//   --listen-fd FD             the listening socket `vsup run`'s root bound for every API
//                              server (inherited); without it, --host/--port are bound here
//   --max-connections N, --first-byte-timeout-ms, --header-timeout-ms, --body-timeout-ms,
//   --idle-timeout-ms MS       the HTTP limits (workers/http/http_server.h; 0 ms: none)
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>

#include "supervisor/child_runtime.h"
#include "workers/api_server/api_server.h"
#include "workers/node_process.h"
#include "workers/processes.h"

namespace vsup::workers {

int apiServerMain(int argc, char** argv) {
  CLI::App app{"vsup API server (started by vsup run)"};
  ApiServerOptions options;
  int engineFd = -1;
  app.add_option("--index", options.index);
  app.add_option("--host", options.host);
  app.add_option("--port", options.port);
  app.add_option("--model", options.model);
  app.add_option("--served-model-name", options.servedModelNames);
  app.add_flag("--log-requests", options.logRequests);
  app.add_option("--max-request-bytes", options.maxRequestBytes);
  app.add_option("--max-tokens", options.maxTokens);
  app.add_option("--engine-fd", engineFd)->required();
  app.add_option("--listen-fd", options.listenFd)->check(CLI::NonNegativeNumber);
  app.add_option("--max-connections", options.maxConnections)->check(CLI::PositiveNumber);
  app.add_option("--first-byte-timeout-ms", options.firstByteTimeoutMs);
  app.add_option("--header-timeout-ms", options.headerTimeoutMs);
  app.add_option("--body-timeout-ms", options.bodyTimeoutMs);
  app.add_option("--idle-timeout-ms", options.idleTimeoutMs);
  CLI11_PARSE(app, argc, argv);
  // The API key comes through the environment, never argv (visible in ps).
  if (const char* key = std::getenv("VSUP_API_KEY")) options.apiKey = key;

  return runNodeProcess("vsup __api-server",
                        [&](uv_loop_t* loop, supervisor::ChildRuntime& runtime) {
    options.name = runtime.name();
    auto api = std::make_unique<ApiServer>(loop, options);
    ApiServer* a = api.get();
    runtime.onStart([a, engineFd](const supervisor::SupervisorSpec&) {
      return a->start(OwnFd(engineFd));
    });
    runtime.onQuiesce([a](MonoNs deadline) { return a->quiesce(deadline); });
    runtime.onLeaveRotation([a]() -> kj::Promise<void> {
      a->leaveRotation();
      return kj::READY_NOW;
    });
    runtime.onStatus([a]() -> kj::Promise<supervisor::NodeStatus> {
      supervisor::NodeStatus s;
      s.type = supervisor::NodeType::Worker;
      s.state = supervisor::NodeState::Running;
      s.inFlight = a->inFlight();
      s.requestsTotal = int64_t(a->requestsTotal());
      s.outOfRotation = a->outOfRotation();
      return s;
    });
    runtime.addShutdownHook("drain", [a](supervisor::ShutdownContext& ctx) {
      return a->drain(ctx.deadline(), [&ctx](const std::string& reason) { ctx.defer(reason); });
    });
    return holding(std::move(api));
  });
}

}  // namespace vsup::workers
