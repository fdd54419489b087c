// `vsup drain`: a Kubernetes preStop hook (or any deploy script's step) that watches the traffic
// instead of sleeping a fixed time.
//
//   1. Node.leaveRotation on the root of the running tree: every API server turns /health to 503
//      "draining" and goes on serving every request, new ones included, so the load balancers
//      take it out of their rotation by their own health checks.
//   2. Then it polls the root's status every 100 ms and sums what the API servers report
//      (requests accepted since start, requests in flight). Once no new request arrived for
//      --quiet-for seconds, the load balancers have noticed: it returns 0, and the SIGTERM that
//      follows drains only what is still running. With --wait it also waits until nothing is in
//      flight.
//   3. At --timeout it gives up with kExitDrainTimeout (124). A tree that exits meanwhile is a
//      success (0), said on stderr.
//
// One progress line per second on stderr. In the json log format (`vsup --log-format json drain`)
// every line it writes is a JSON object, as vsup run's.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <kj/async.h>

#include "base/clock.h"
#include "base/log.h"
#include "ipc/node.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/node_codec.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"

namespace vsup::tools {

using namespace vsup::supervisor;

namespace {

constexpr uint64_t kPollMs = 100;
constexpr int64_t kProgressEveryNs = 1'000'000'000;
constexpr int64_t kLeaveFloorNs = 2'000'000'000;

void say(const std::string& message, const char* level = "info") {
  printMessage("vsup drain", message, level);
}

std::string secs(double s) { return fmt::format("{:.1f}s", s); }

// What the API servers of a tree report, summed.
struct Traffic {
  std::map<std::string, int64_t> totals;  // per node (path and pid): requests accepted so far
  int64_t inFlight = 0;
  size_t servers = 0;        // nodes that count requests
  size_t outOfRotation = 0;  // of those, how many left the rotation
};

void collect(const NodeStatus& s, const std::string& parent, Traffic& t) {
  std::string path = parent.empty() ? s.name : parent + "/" + s.name;
  if (s.requestsTotal >= 0) {
    t.totals[path + "#" + std::to_string(s.pid)] = s.requestsTotal;
    ++t.servers;
    if (s.outOfRotation) ++t.outOfRotation;
    if (s.inFlight > 0) t.inFlight += s.inFlight;
  }
  for (const auto& c : s.children) collect(c, path, t);
}

// New requests between two samples: what each node's count grew by (a node seen for the first
// time counts from 0: it started after the previous sample).
int64_t newRequests(const Traffic& before, const Traffic& now) {
  int64_t added = 0;
  for (const auto& [node, total] : now.totals) {
    auto it = before.totals.find(node);
    int64_t was = it == before.totals.end() ? 0 : it->second;
    if (total > was) added += total - was;
  }
  return added;
}

bool validSeconds(const char* flag, double value) {
  if (std::isfinite(value) && value >= 0) return true;
  say(fmt::format("{} must be a finite number of seconds, 0 or more (got {})", flag, value));
  return false;
}

}  // namespace

void printMessage(const char* command, const std::string& message, const char* level) {
  std::string line = vsup::logFormat() == LogFormat::Json
                         ? jsonLogLine(level, command, ::getpid(), message)
                         : std::string(command) + ": " + message;
  line.push_back('\n');
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

int drain(const DrainOptions& o) {
  if (!validSeconds("--quiet-for", o.quietForSeconds) ||
      !validSeconds("--timeout", o.timeoutSeconds)) {
    return kExitUsage;
  }
  if (o.quietForSeconds > o.timeoutSeconds) {
    say(fmt::format("--quiet-for {} is longer than --timeout {}: it could never be reached "
                    "(make --timeout at least --quiet-for)",
                    o.quietForSeconds, o.timeoutSeconds));
    return kExitUsage;
  }
  int rc = 0;
  auto found = findTreeSocket(o.socket, "vsup drain", rc);
  if (!found) return rc;
  const std::string path = *found;
  OwnFd fd = connectToSocket(path);
  if (!fd) {
    say("cannot connect to " + path + ": " + std::strerror(errno));
    return kExitError;
  }
  const MonoNs began = monoNow();
  const MonoNs deadline = began + int64_t(std::llround(o.timeoutSeconds * 1e9));
  const int64_t quietNs = int64_t(std::llround(o.quietForSeconds * 1e9));

  uv_loop_t loop;
  uv_loop_init(&loop);
  {
    ipc::KjOnUv kj(&loop);
    auto& ws = kj.waitScope();
    auto link = ipc::RpcLink::connect(&loop, std::move(fd));
    auto node = link->bootstrap<ipc::schema::Node>();
    // Waits for `promise` until it resolves or `until` passes (nullopt). Throws what it throws.
    auto bounded = [&](auto promise, MonoNs until) {
      using T = decltype(promise.wait(ws));
      return kj::mv(promise)
          .then([](T v) -> std::optional<T> { return v; })
          .exclusiveJoin(ipc::uvSleep(&loop, msUntil(until)).then([]() -> std::optional<T> {
            return std::nullopt;
          }))
          .wait(ws);
    };
    // The tree went away: while draining, that is a success (the drain's purpose is met).
    auto exited = [&](const kj::Exception& e) {
      if (e.getType() != kj::Exception::Type::DISCONNECTED) {
        say(path + ": " + ipc::userMessage(e));
        rc = kExitError;
      } else {
        say("the tree has exited: nothing left to drain");
        rc = kExitClean;
      }
    };
    auto status = [&]() {
      return node.statusRequest().send().then(
          [](capnp::Response<ipc::schema::Node::StatusResults>&& r) {
            return decode(r.getStatus());
          });
    };

    std::optional<NodeStatus> first;
    bool done = false;
    try {
      // The request to leave the rotation is the point of the command: it gets at least
      // kLeaveFloorNs even under a shorter --timeout (the root may take a second to hear from a
      // hung child).
      MonoNs leaveUntil = std::max(deadline, began + kLeaveFloorNs);
      auto left = bounded(node.leaveRotationRequest().send().then(
                              [](capnp::Response<ipc::schema::Node::LeaveRotationResults>&&) {
                                return true;
                              }),
                          leaveUntil);
      if (left) first = bounded(status(), leaveUntil);
      if (!first) {
        say("the tree did not answer within --timeout " + secs(o.timeoutSeconds), "error");
        rc = kExitDrainTimeout;
        done = true;
      }
    } catch (const kj::Exception& e) {
      exited(e);
      done = true;
    }

    if (!done) {
      Traffic last;
      collect(*first, "", last);
      say(fmt::format("out of rotation: {} of {} API server{} (/health answers 503 \"draining\", "
                      "every request is still served); waiting for {} without a new request{}",
                      last.outOfRotation, last.servers, last.servers == 1 ? "" : "s",
                      secs(o.quietForSeconds), o.wait ? ", then for nothing in flight" : ""),
          last.outOfRotation == last.servers ? "info" : "warn");
      MonoNs lastActivity = monoNow();
      MonoNs lastProgress = lastActivity;
      int64_t served = 0;  // requests accepted since leaving the rotation
      for (;;) {
        MonoNs now = monoNow();
        bool quiet = now - lastActivity >= quietNs;
        if (quiet && (!o.wait || last.inFlight == 0)) {
          say(fmt::format("no new request for {}{}: the load balancers have noticed ({} "
                          "request{} since leaving the rotation)",
                          secs(double(now - lastActivity) / 1e9),
                          o.wait ? " and nothing in flight" : "", served,
                          served == 1 ? "" : "s"));
          rc = kExitClean;
          break;
        }
        if (now >= deadline) {
          say(quiet ? fmt::format("{} request{} still in flight at --timeout {}: giving up",
                                  last.inFlight, last.inFlight == 1 ? "" : "s",
                                  secs(o.timeoutSeconds))
                    : fmt::format("still receiving requests at --timeout {} (the last one "
                                  "{} ago; {} in flight): giving up",
                                  secs(o.timeoutSeconds), secs(double(now - lastActivity) / 1e9),
                                  last.inFlight),
              "warn");
          rc = kExitDrainTimeout;
          break;
        }
        if (now - lastProgress >= kProgressEveryNs) {
          lastProgress = now;
          say(fmt::format("quiet for {} (of {}), {} in flight",
                          secs(double(now - lastActivity) / 1e9), secs(o.quietForSeconds),
                          last.inFlight));
        }
        std::optional<NodeStatus> s;
        try {
          ipc::uvSleep(&loop, std::min(kPollMs, msUntil(deadline))).wait(ws);
          s = bounded(status(), deadline);
        } catch (const kj::Exception& e) {
          exited(e);
          break;
        }
        if (!s) continue;  // the deadline passed while waiting: said above, next turn
        Traffic t;
        collect(*s, "", t);
        int64_t added = newRequests(last, t);
        if (added > 0) {
          served += added;
          lastActivity = monoNow();
        }
        last = std::move(t);
      }
    }
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return rc;
}

}  // namespace vsup::tools
