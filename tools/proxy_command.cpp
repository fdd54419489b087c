// `vsup proxy`: the front end of a disaggregated deployment, as a tree of its own:
//
//   root (this process)   owns SIGTERM/SIGINT and the port, never serves traffic
//   └── proxy             `vsup __proxy`: runs each completion's prefill and decode legs
//
// The same shutdown contract as `vsup run`: on the first signal the proxy stops taking new
// completions at once (503, Retry-After: 1; the listener stays open so nobody is refused or
// reset), lets those in flight finish until --shutdown-timeout, then cuts them with their
// clients told, and the tree exits. The flags are checked here, each a usage error (exit 2)
// naming it, and the port is bound here once, before the proxy is spawned.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "base/error.h"
#include "base/log.h"
#include "supervisor/deadline_budget.h"
#include "supervisor/process.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"
#include "workers/http/http_client.h"
#include "workers/http/http_server.h"

namespace vsup::tools {

using namespace vsup::supervisor;

namespace {

// "a,b" "c" → {a, b, c}; an empty item is an error (a stray comma is a typo, not a URL).
bool splitUrls(const std::vector<std::string>& given, const char* flag,
               std::vector<std::string>& out) {
  for (const auto& value : given) {
    std::stringstream in(value);
    std::string item;
    bool any = false;
    while (std::getline(in, item, ',')) {
      any = true;
      if (item.empty()) {
        printMessage("vsup proxy", std::string(flag) + " '" + value +
                                       "': an empty URL (separate URLs with one comma)");
        return false;
      }
      try {
        (void)http::parseUrl(item);
      } catch (const Error& e) {
        printMessage("vsup proxy", std::string(flag) + " " + e.what());
        return false;
      }
      out.push_back(item);
    }
    if (!any || value.back() == ',') {
      printMessage("vsup proxy", std::string(flag) + " '" + value + "': an empty URL");
      return false;
    }
  }
  if (out.empty()) {
    printMessage("vsup proxy", std::string(flag) + ": give at least one URL");
    return false;
  }
  return true;
}

}  // namespace

int proxy(const ProxyCommandOptions& o) {
  std::vector<std::string> prefill, decode;
  if (!splitUrls(o.prefill, "--prefill", prefill) || !splitUrls(o.decode, "--decode", decode)) {
    return kExitUsage;
  }
  for (const auto& p : prefill) {
    if (std::find(decode.begin(), decode.end(), p) != decode.end()) {
      printMessage("vsup proxy", "--prefill and --decode both name " + p +
                                     " (an instance has one --kv-role: give each its own)");
      return kExitUsage;
    }
  }
  OwnFd listener;
  uint16_t port = 0;
  try {
    listener = http::bindListener(o.host, o.port, http::ServerOptions{}.backlog);
    port = http::boundPort(listener.get());
  } catch (const Error& e) {
    printMessage("vsup proxy", std::string("--host/--port ") + e.what());
    return kExitUsage;
  }
  setLogProcessName("root");
  vsup::log().info("[serve] root: bound {}:{} for the proxy", o.host, port);

  int64_t drainMs = ms(o.shutdownTimeout);
  ServingBudget budget = DeadlineBudget::serving(drainMs, 0);
  SupervisorSpec spec;
  spec.name = "root";
  spec.strategy = Strategy::OneForOne;
  spec.intensity = 0;  // as vsup run: no partial restart; a death stops the tree, non-zero

  ChildSpec child;
  child.name = "proxy";
  child.vsupAware = true;
  child.command = {selfExecutable(), "__proxy", "--host", o.host, "--port",
                   std::to_string(port), "--listen-fd", "4", "--connect-timeout-ms",
                   std::to_string(ms(o.connectTimeout)), "--max-request-bytes",
                   std::to_string(o.maxRequestBytes), "--max-connections",
                   std::to_string(o.maxConnections)};
  for (const auto& u : prefill) child.command.insert(child.command.end(), {"--prefill", u});
  for (const auto& u : decode) child.command.insert(child.command.end(), {"--decode", u});
  if (o.logRequests) child.command.push_back("--log-requests");
  child.inheritFds = {listener.get()};
  child.shutdown = ShutdownPolicy::timeout(budget.apiServerStopMs);
  child.startTimeoutMs = 30'000;
  child.livenessTimeoutMs = o.livenessTimeout > 0 ? ms(o.livenessTimeout) : -1;
  child.livenessIntervalMs = ms(o.livenessInterval);
  spec.children.push_back(child);

  RootHooks hooks;
  // The proxy holds the listening socket; a copy kept here would keep the port open (and
  // connections queueing unanswered) after it exits.
  hooks.afterStart = [&]() { listener.reset(); };
  hooks.drainMs = drainMs;
  hooks.totalMs = budget.apiServerStopMs + DeadlineBudget::kRootMarginMs;
  return runTree(spec, o.controlSocket, hooks);
}

}  // namespace vsup::tools
