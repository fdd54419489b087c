// `vsup __api-server --index I --engine-fd FD [...]`: one OpenAI-compatible HTTP front end
// (workers/api_server/api_server.h), wired into its node: Node.start attaches to engine-core
// over the inherited socket and listens, Node.quiesce starts the drain, and the "drain" shutdown
// hook waits for the last response before the process exits.
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
  app.add_option("--max-request-bytes", options.maxRequestBytes);
  app.add_option("--max-tokens", options.maxTokens);
  app.add_option("--engine-fd", engineFd)->required();
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
    runtime.onStatus([a]() -> kj::Promise<supervisor::NodeStatus> {
      supervisor::NodeStatus s;
      s.type = supervisor::NodeType::Worker;
      s.state = supervisor::NodeState::Running;
      s.inFlight = a->inFlight();
      return s;
    });
    runtime.addShutdownHook("drain", [a](supervisor::ShutdownContext& ctx) {
      return a->drain(ctx.deadline(), [&ctx](const std::string& reason) { ctx.defer(reason); });
    });
    return holding(std::move(api));
  });
}

}  // namespace vsup::workers
