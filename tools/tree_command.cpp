// `vsup tree`: connects to a running root's control socket and prints its tree. Also how every
// client command (`vsup tree`, `vsup drain`) finds and connects to that socket.
#include <dirent.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include <kj/debug.h>

#include "base/check.h"
#include "ipc/node.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/control_socket.h"
#include "supervisor/node_codec.h"
#include "supervisor/supervisor.h"
#include "tools/commands.h"

namespace vsup::tools {

using namespace vsup::supervisor;

OwnFd connectToSocket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return {};
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  OwnFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return {};
  return fd;
}

namespace {

// How long `vsup tree` waits for the root: its own status budget and then some.
constexpr uint64_t kRootAnswerMs = 5000;

std::vector<std::string> liveSockets() {
  std::vector<std::string> out;
  std::string dir = ControlSocket::defaultDirectory();
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.size() > 5 && name.substr(name.size() - 5) == ".sock") {
      std::string path = dir + "/" + name;
      if (connectToSocket(path)) out.push_back(path);
    }
  }
  ::closedir(d);
  return out;
}

nlohmann::json toJson(const NodeStatus& s) {
  nlohmann::json j;
  j["name"] = s.name;
  j["pid"] = s.pid;
  j["type"] = nameOf(s.type);
  j["state"] = nameOf(s.state);
  j["uptime_s"] = double(s.uptimeMs) / 1000.0;
  j["restarts"] = s.restarts;
  j["deferral"] = s.deferral.active()
                      ? nlohmann::json{{"reason", s.deferral.reason}, {"progress", s.deferral.progress}}
                      : nlohmann::json(nullptr);
  if (s.inFlight >= 0) j["in_flight"] = s.inFlight;
  // Like in_flight, only for the nodes they apply to (an API server, a node that serves
  // traffic): the others are never in a load balancer's rotation.
  if (s.requestsTotal >= 0) j["requests_total"] = s.requestsTotal;
  if (s.requestsTotal >= 0 || s.outOfRotation) j["out_of_rotation"] = s.outOfRotation;
  if (!s.detail.empty()) j["detail"] = s.detail;
  j["children"] = nlohmann::json::array();
  for (const auto& c : s.children) j["children"].push_back(toJson(c));
  return j;
}

void printText(const NodeStatus& s, const std::string& prefix, const std::string& childPrefix,
               std::string& out) {
  char line[512];
  std::string pid = s.pid > 0 ? std::to_string(s.pid) : "-";
  // Pad by displayed characters, not bytes: the tree drawing is multi-byte UTF-8.
  std::string label = prefix + s.name;
  size_t width = 0;
  for (unsigned char ch : label) width += (ch & 0xC0) != 0x80;
  label.append(width < 28 ? 28 - width : 1, ' ');
  std::snprintf(line, sizeof line, "%s %-10s %-12s pid %-8s up %8.1fs  restarts %u",
                label.c_str(), nameOf(s.type), nameOf(s.state), pid.c_str(),
                double(s.uptimeMs) / 1000.0, s.restarts);
  out += line;
  if (s.inFlight >= 0) out += "  in-flight " + std::to_string(s.inFlight);
  if (s.requestsTotal >= 0) out += "  requests " + std::to_string(s.requestsTotal);
  if (s.outOfRotation) out += "  out of rotation";
  if (!s.detail.empty()) out += "  " + s.detail;
  if (s.deferral.active()) {
    out += "  deferring: " + s.deferral.reason;
    if (!s.deferral.progress.empty()) out += " (" + s.deferral.progress + ")";
  }
  out += "\n";
  for (size_t i = 0; i < s.children.size(); ++i) {
    bool last = i + 1 == s.children.size();
    printText(s.children[i], childPrefix + (last ? "└── " : "├── "),
              childPrefix + (last ? "    " : "│   "), out);
  }
}

}  // namespace

std::optional<std::string> findTreeSocket(const std::string& given, const char* command,
                                          int& rc) {
  if (!given.empty()) return given;
  auto found = liveSockets();
  if (found.empty()) {
    printMessage(command, "no running vsup tree found in " + ControlSocket::defaultDirectory() +
                              " (use --socket PATH)");
    rc = kExitError;
    return std::nullopt;
  }
  if (found.size() > 1) {
    std::string message =
        std::to_string(found.size()) + " trees are running; choose one with --socket:";
    for (const auto& p : found) message += " " + p;
    printMessage(command, message);
    rc = kExitUsage;
    return std::nullopt;
  }
  return found[0];
}

int tree(const TreeOptions& options) {
  int rc = 0;
  auto found = findTreeSocket(options.socket, "vsup tree", rc);
  if (!found) return rc;
  std::string path = *found;
  OwnFd fd = connectToSocket(path);
  if (!fd) {
    printMessage("vsup tree", "cannot connect to " + path + ": " + std::strerror(errno));
    return kExitError;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  {
    ipc::KjOnUv kj(&loop);
    auto link = ipc::RpcLink::connect(&loop, std::move(fd));
    auto node = link->bootstrap<ipc::schema::Node>();
    for (bool first = true;; first = false) {
      NodeStatus status;
      try {
        auto request = node.statusRequest();
        request.setBudgetMs(kStatusBudgetMs);
        // The root answers within its budget, whatever hangs below it; a root that does not
        // (stopped, deadlocked) must not hang `vsup tree` too.
        auto answer = request.send().then(
            [](capnp::Response<ipc::schema::Node::StatusResults>&& r) {
              return decode(r.getStatus());
            });
        status = answer
                     .exclusiveJoin(ipc::uvSleep(&loop, kRootAnswerMs).then([]() -> NodeStatus {
                       KJ_FAIL_REQUIRE("the root did not answer within 5s: it is hung or stopped");
                     }))
                     .wait(kj.waitScope());
      } catch (const kj::Exception& e) {
        if (!first) {
          std::printf("(the tree has exited)\n");
          break;
        }
        printMessage("vsup tree", path + ": " + ipc::userMessage(e));
        rc = kExitError;
        break;
      }
      std::string out;
      if (options.json) {
        out = toJson(status).dump() + "\n";
      } else {
        if (options.watch) out = "\033[H\033[2J";  // clear the screen between refreshes
        printText(status, "", "", out);
      }
      std::fwrite(out.data(), 1, out.size(), stdout);
      std::fflush(stdout);
      if (!options.watch) break;
      ipc::uvSleep(&loop, uint64_t(options.intervalSeconds * 1000)).wait(kj.waitScope());
    }
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return rc;
}

}  // namespace vsup::tools
