// Writes the binary seeds of the node_codec, control and kv_protocol fuzz targets (the text seeds of the other
// targets are written by hand). Run it again when ipc/node.capnp changes:
//   ninja -C build tests/fuzz/fuzz_make_seeds && build/tests/fuzz/fuzz_make_seeds tests/fuzz/corpus
// It overwrites only the seed-* files it makes; reproducers (regression-*) are left alone.
//
// node_codec seeds are flat messages built with node_codec's own encoders. control seeds are what
// a real RpcLink client (as `vsup tree` uses) writes to the socket for each Node call, recorded
// from the far end of a socketpair, behind the control target's selector byte.
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "base/fd.h"
#include "ipc/node.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/uv_kj.h"
#include "kvconnector/kv_protocol.h"
#include "supervisor/node_codec.h"

namespace {

using namespace vsup::supervisor;
namespace schema = vsup::ipc::schema;

void writeFile(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), std::streamsize(size));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::printf("wrote %s (%zu bytes)\n", path.c_str(), size);
}

void writeMessage(const std::string& path, capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  writeFile(path, words.asBytes().begin(), words.asBytes().size());
}

SupervisorSpec sampleSpec() {
  SupervisorSpec spec;
  spec.name = "root";
  spec.strategy = Strategy::RestForOne;
  spec.intensity = 3;
  spec.periodMs = 10000;
  spec.autoShutdown = AutoShutdown::AnySignificant;
  ChildSpec db;
  db.name = "db";
  db.command = {"/usr/bin/postgres", "-D", "/var/lib/db"};
  db.env = {{"PGPORT", "5433"}, {"LANG", "C"}};
  db.restart = Restart::Transient;
  db.significant = true;
  db.ready = Readiness::Notify;
  db.startTimeoutMs = -1;
  db.shutdown = ShutdownPolicy::timeout(2500);
  ChildSpec sub;
  sub.name = "workers";
  sub.type = ChildType::Supervisor;
  sub.shutdown = ShutdownPolicy::infinity();
  SupervisorSpec inner;
  inner.strategy = Strategy::OneForAll;
  ChildSpec leaf;
  leaf.name = "leaf";
  leaf.command = {"sleep", "1000"};
  leaf.shutdown = ShutdownPolicy::brutalKill();
  leaf.vsupAware = true;
  leaf.startConfig = std::string("cfg\0\x01\xff", 6);
  inner.children.push_back(leaf);
  sub.supervisor = inner;
  normalize(sub);
  spec.children = {db, sub};
  return spec;
}

NodeStatus sampleStatus() {
  constexpr NodeType kSup = NodeType::Supervisor;
  constexpr NodeType kWorker = NodeType::Worker;
  NodeStatus root{"root", 100, kSup, NodeState::Running, 5000, 0, {}, -1, {}};
  NodeStatus api{"api", 101, kWorker, NodeState::Stopping, 4000, 2, {"draining", "3 in flight"}, 3, {}};
  NodeStatus sub{"sub", 102, kSup, NodeState::Running, 3000, 0, {}, -1, {}};
  sub.children.push_back({"leaf", 0, kWorker, NodeState::Restarting, 0, 7, {}, -1, {}});
  root.children = {api, sub};
  return root;
}

void nodeCodecSeeds(const std::string& dir) {
  {
    capnp::MallocMessageBuilder m;
    encode(sampleSpec(), m.initRoot<schema::SupervisorSpec>());
    writeMessage(dir + "/seed-supervisor-spec", m);
  }
  {
    capnp::MallocMessageBuilder m;
    encode(sampleStatus(), m.initRoot<schema::NodeStatus>());
    writeMessage(dir + "/seed-node-status", m);
  }
  {
    capnp::MallocMessageBuilder m;
    encode(Deferral{"draining", "2 of 5 left"}, m.initRoot<schema::Deferral>());
    writeMessage(dir + "/seed-deferral", m);
  }
  {
    capnp::MallocMessageBuilder m;
    m.initRoot<schema::SupervisorSpec>();
    writeMessage(dir + "/seed-empty", m);
  }
}

class Observer final : public schema::ShutdownObserver::Server {
 protected:
  kj::Promise<void> deferral(DeferralContext) override { return kj::READY_NOW; }
};

// What a client writes for the calls `issue` makes on the root's Node.
using Pending = kj::Vector<kj::Promise<void>>;
using Issue = std::function<void(schema::Node::Client&, Pending&)>;

std::string record(const Issue& issue) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) {
    std::perror("socketpair");
    std::exit(1);
  }
  vsup::OwnFd far(sv[1]);
  uv_loop_t loop;
  uv_loop_init(&loop);
  std::string bytes;
  {
    vsup::ipc::KjOnUv kj(&loop);
    auto link = vsup::ipc::RpcLink::connect(&loop, vsup::OwnFd(sv[0]));
    auto node = link->bootstrap<schema::Node>();
    kj::Vector<kj::Promise<void>> pending;
    issue(node, pending);
    for (int i = 0; i < 20; ++i) uv_run(&loop, UV_RUN_NOWAIT);
    char buf[64 * 1024];
    for (ssize_t n; (n = ::read(far.get(), buf, sizeof buf)) > 0;) bytes.append(buf, size_t(n));
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return bytes;
}

void controlSeeds(const std::string& dir) {
  auto status = [](schema::Node::Client& n, Pending& p) {
    p.add(n.statusRequest().send().ignoreResult());
  };
  auto ping = [](schema::Node::Client& n, Pending& p) {
    p.add(n.pingRequest().send().ignoreResult());
  };
  auto start = [](schema::Node::Client& n, Pending& p) {
    auto request = n.startRequest();
    encode(sampleSpec(), request.initSpec());
    const std::string config("engine\0config", 13);
    request.setConfig(asData(config));
    p.add(request.send().ignoreResult());
  };
  auto startInvalid = [](schema::Node::Client& n, Pending& p) {
    auto request = n.startRequest();
    SupervisorSpec bad = sampleSpec();
    bad.children[0].name = "bad name/with slash";
    encode(bad, request.initSpec());
    p.add(request.send().ignoreResult());
  };
  auto shutdown = [](schema::Node::Client& n, Pending& p) {
    auto request = n.shutdownRequest();
    request.setDeadlineNs(123456789);
    request.setObserver(kj::heap<Observer>());
    p.add(request.send().ignoreResult());
  };
  auto quiesce = [](schema::Node::Client& n, Pending& p) {
    auto request = n.quiesceRequest();
    request.setDrainDeadlineNs(987654321);
    p.add(request.send().ignoreResult());
  };
  auto service = [](schema::Node::Client& n, Pending& p) {
    p.add(n.serviceRequest().send().ignoreResult());
  };
  struct Seed {
    const char* name;
    Issue issue;
  };
  std::vector<Seed> seeds = {
      {"status", status},
      {"ping", ping},
      {"start", start},
      {"start-invalid", startInvalid},
      {"shutdown", shutdown},
      {"quiesce", quiesce},
      {"service", service},
  };
  // Every call on one connection, pipelined behind the one bootstrap.
  const std::vector<Seed> single = seeds;
  seeds.push_back({"all", [single](schema::Node::Client& n, Pending& p) {
                     for (const Seed& s : single) s.issue(n, p);
                   }});
  for (const Seed& seed : seeds) {
    // Selector 0: the stream in one write; the "all" seed also once in 8-byte pieces (3).
    std::string bytes = std::string(1, '\0') + record(seed.issue);
    writeFile(dir + "/seed-" + seed.name, bytes.data(), bytes.size());
    if (std::string(seed.name) == "all") {
      bytes[0] = 3;
      writeFile(dir + "/seed-all-pieces", bytes.data(), bytes.size());
    }
  }
}

// kv_protocol seeds: one conversation of each side, each frame type at least once, behind the
// target's selector byte (0: one piece; 5: pieces of 6 bytes).
void kvProtocolSeeds(const std::string& dir) {
  using namespace vsup::kv;
  KvCompat compat;
  compat.model = "vsup-tiny-25m";
  compat.dtype = "f32";
  compat.layers = 4;
  compat.kvHeads = 4;
  compat.headDim = 64;
  compat.blockSize = 16;
  compat.tpSize = 2;
  std::string decodeSide = encode(Hello{compat, 1, "engine-3f2a", Transport::Tcp}) +
                           encode(Pull{7, "cmpl-1-0", {3, 9, 12}}) +
                           encode(Done{"cmpl-1-0", false}) + encode(Done{"cmpl-2-0", true});
  std::string prefillSide =
      encode(Welcome{"engine-3f2a", 1, 1 << 20}) + encode(PullReady{7, 3 * 65536}) + encode(PullEnd{7}) +
      encode(DoneOk{"cmpl-1-0"}) +
      encode(ErrorMsg{ErrorCode::LeaseExpired, 8, "cmpl-2-0", "lease cmpl-2-0 expired"});
  for (auto [name, bytes] : {std::pair{"decode", decodeSide}, std::pair{"prefill", prefillSide}}) {
    std::string one = std::string(1, '\0') + bytes;
    writeFile(dir + "/seed-" + name, one.data(), one.size());
    std::string pieces = std::string(1, '\5') + bytes;
    writeFile(dir + "/seed-" + name + "-pieces", pieces.data(), pieces.size());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s tests/fuzz/corpus\n", argv[0]);
    return 1;
  }
  const std::string corpus = argv[1];
  nodeCodecSeeds(corpus + "/node_codec");
  controlSeeds(corpus + "/control");
  kvProtocolSeeds(corpus + "/kv_protocol");
  return 0;
}
