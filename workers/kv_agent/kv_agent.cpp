#include "workers/kv_agent/kv_agent.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/debug.h>

#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "base/error.h"
#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "workers/engine_codec.h"
#include "workers/node_process.h"

namespace vsup::workers {

namespace schema = ipc::schema;

std::string encodeKvAgentConfig(const KvAgentSettings& s) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<schema::KvAgentConfig>();
  out.setRank(s.rank);
  out.setRole(s.role);
  out.setHost(s.host);
  out.setPort(s.port);
  out.setTransport(s.transport);
  out.setLeaseMs(s.leaseMs);
  out.setTransferTimeoutMs(s.transferTimeoutMs);
  out.setShutdownTimeoutMs(s.shutdownTimeoutMs);
  out.setEngineId(s.engineId);
  out.setLayers(s.layout.layers);
  out.setKvHeads(s.layout.kvHeads);
  out.setHeadDim(s.layout.headDim);
  out.setBlockSize(s.layout.blockSize);
  out.setNumBlocks(s.layout.numBlocks);
  out.setDtype(s.layout.dtype);
  out.setModel(s.compat.model);
  out.setModelKvHeads(s.compat.kvHeads);
  out.setTpSize(s.compat.tpSize);
  return flatBytes(message);
}

KvAgentSettings decodeKvAgentConfig(const std::string& bytes) {
  kj::Array<capnp::word> words = flatWords(bytes, "KV agent configuration");
  KvAgentSettings s;
  try {
    capnp::FlatArrayMessageReader message(words);
    auto in = message.getRoot<schema::KvAgentConfig>();
    s.rank = in.getRank();
    s.role = in.getRole();
    s.host = in.getHost();
    s.port = in.getPort();
    s.transport = in.getTransport();
    s.leaseMs = in.getLeaseMs();
    s.transferTimeoutMs = in.getTransferTimeoutMs();
    s.shutdownTimeoutMs = in.getShutdownTimeoutMs();
    s.engineId = in.getEngineId();
    s.layout.layers = in.getLayers();
    s.layout.kvHeads = in.getKvHeads();
    s.layout.headDim = in.getHeadDim();
    s.layout.blockSize = in.getBlockSize();
    s.layout.numBlocks = in.getNumBlocks();
    s.layout.dtype = in.getDtype();
    s.layout.elementBytes = engine::elementBytesOf(s.layout.dtype);
    s.compat = kv::compatFor(s.layout, in.getModel(), in.getModelKvHeads(), in.getTpSize());
  } catch (const kj::Exception& e) {
    throw Error("KV agent configuration: not a valid message: " + ipc::userMessage(e));
  }
  try {
    engine::validate(s.layout);
  } catch (const std::invalid_argument& e) {
    throw Error(std::string("KV agent configuration: ") + e.what());
  }
  return s;
}

KvAgent::KvAgent(uv_loop_t* loop, std::string node, KvAgentSettings settings, int regionFd)
    : loop_(loop), node_(std::move(node)), settings_(std::move(settings)),
      region_(::fcntl(regionFd, F_DUPFD_CLOEXEC, 0)),
      map_(regionFd, settings_.layout.totalBytes(),
           "the KV cache region (fd " + std::to_string(regionFd) + ")") {
  if (!region_) throw SysError("dup of the KV cache region failed", errno);
  // Test hook: VSUP_KV_DIGEST_LOG=FILE appends one line per pull served and per pull done,
  // "served|pulled LEASE tpR DIGEST", so a test can check that the bytes arrived intact.
  if (const char* path = std::getenv("VSUP_KV_DIGEST_LOG"); path != nullptr && *path != '\0') {
    digestLog_ = OwnFd(::open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600));
    if (!digestLog_) throw SysError(std::string("VSUP_KV_DIGEST_LOG ") + path, errno);
  }
  if (settings_.serves()) {
    leases_ = std::make_unique<kv::LeaseBook>(
        settings_.leaseMs * kNsPerMs, [this](const std::vector<kv::EndedLease>& e) { ended(e); });
    uint16_t port = uint16_t(settings_.port + settings_.rank);
    OwnFd tcp = kv::listenTcp(settings_.host, port);
    OwnFd shm = kv::listenUnixAbstract(kv::shmSocketName(settings_.port, settings_.rank));
    kv::KvSource source{settings_.layout, map_.data(), region_.get(), settings_.engineId,
                        settings_.rank, settings_.compat};
    if (digestLog_) {
      source.servedDigest = [this](const std::string& lease, uint64_t digest) {
        logDigest("served", lease, digest);
      };
    }
    server_ = std::make_unique<kv::KvServer>(source, *leases_, std::move(shm), std::move(tcp));
    const kv::KvCompat& c = settings_.compat;
    vsup::log().info("[kv] {}: serving engine {}'s rank {} blocks on {}:{} and @{} (model {}, "
                     "{}, {} layers, {} kv heads of {}, blocks of {} tokens, tp {})",
                     node_, settings_.engineId, settings_.rank, settings_.host, port,
                     kv::shmSocketName(settings_.port, settings_.rank), c.model, c.dtype,
                     c.layers, c.kvHeads, c.headDim, c.blockSize, c.tpSize);
    expiry_ = expireEvery100ms().eagerlyEvaluate([](kj::Exception&&) {});
  }
  if (settings_.pulls()) transfers_ = std::make_unique<ComputeThread>();
}

kj::Promise<void> KvAgent::expireEvery100ms() {
  return ipc::uvSleep(loop_, 100).then([this]() {
    leases_->expireOverdue();  // an unpulled lease ends on time, not at the next pull
    return expireEvery100ms();
  });
}

KvAgent::~KvAgent() {
  cancelPulls_ = true;
  expiry_ = nullptr;
  if (server_) server_->stop();
  transfers_.reset();  // joins the transfer thread (a pull in flight ends at its deadline)
}

void KvAgent::grant(const std::string& id, std::vector<int32_t> blocks) {
  if (!leases_) throw Error(node_ + " does not serve blocks (--kv-role decode)");
  for (int32_t b : blocks) {
    if (b < 0 || b >= settings_.layout.numBlocks) {
      throw Error("lease " + id + ": block " + std::to_string(b) + " is not in the cache");
    }
  }
  leases_->grant(id, std::move(blocks));
}

void KvAgent::ended(const std::vector<kv::EndedLease>& e) {
  std::lock_guard lock(mu_);
  endedQueue_.insert(endedQueue_.end(), e.begin(), e.end());
  if (endedWaiter_) {
    auto f = kj::mv(endedWaiter_);
    f->fulfill();
  }
}

kj::Promise<std::vector<kv::EndedLease>> KvAgent::nextEnded() {
  auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
  {
    std::lock_guard lock(mu_);
    if (!endedQueue_.empty()) {
      std::vector<kv::EndedLease> out(endedQueue_.begin(), endedQueue_.end());
      endedQueue_.clear();
      return out;
    }
    endedWaiter_ = kj::mv(paf.fulfiller);
  }
  return paf.promise.then([this]() { return nextEnded(); });
}

kv::KvPuller& KvAgent::peer(const engine::KvParams& remote, MonoNs deadline) {
  std::string key = remote.remoteHost + ":" + std::to_string(remote.remotePort);
  auto it = peers_.find(key);
  if (it != peers_.end() && it->second->peerEngineId() == remote.remoteEngineId) {
    return *it->second;
  }
  if (it != peers_.end()) peers_.erase(it);  // another engine there now: say hello again
  bool shm = settings_.transport == "shm" ||
             (settings_.transport == "auto" && kv::isLocalHost(remote.remoteHost));
  OwnFd fd = shm ? kv::connectUnixAbstract(kv::shmSocketName(remote.remotePort, settings_.rank),
                                           deadline)
                 : kv::connectTcp(remote.remoteHost,
                                  uint16_t(remote.remotePort + settings_.rank), deadline);
  auto p = std::make_unique<kv::KvPuller>(std::move(fd),
                                          shm ? kv::Transport::Shm : kv::Transport::Tcp,
                                          settings_.compat, settings_.rank,
                                          remote.remoteEngineId, settings_.layout, deadline);
  vsup::log().info("[kv] {}: connected to engine {}'s rank {} at {} over {}", node_,
                   p->peerEngineId(), settings_.rank,
                   shm ? "@" + kv::shmSocketName(remote.remotePort, settings_.rank)
                       : remote.remoteHost + ":" + std::to_string(remote.remotePort + settings_.rank),
                   shm ? "shm" : "tcp");
  kv::KvPuller& ref = *p;
  peers_[key] = std::move(p);
  return ref;
}

void KvAgent::logDigest(const char* what, const std::string& lease, uint64_t digest) {
  // One write per line (O_APPEND): lines of concurrent writers never interleave.
  std::string line = fmt::format("{} {} tp{} {:016x}\n", what, lease, settings_.rank, digest);
  if (::write(digestLog_.get(), line.data(), line.size()) != ssize_t(line.size())) {
    vsup::log().warn("[kv] {}: VSUP_KV_DIGEST_LOG: {}", node_, std::strerror(errno));
  }
}

kj::Promise<KvAgent::PullResult> KvAgent::pull(const engine::KvParams& remote,
                                               std::vector<int32_t> localBlocks) {
  if (!transfers_) {
    return PullResult{node_ + " does not pull blocks (--kv-role prefill)", "", 0};
  }
  return transfers_->run<PullResult>([this, remote, localBlocks = std::move(localBlocks)]() {
    kv::KvCancelScope scope(cancelPulls_);
    MonoNs deadline = monoNow() + settings_.transferTimeoutMs * kNsPerMs;
    PullResult r;
    std::string key = remote.remoteHost + ":" + std::to_string(remote.remotePort);
    try {
      for (int attempt = 0;; ++attempt) {
        bool reused = peers_.count(key) != 0;
        try {
          kv::KvPuller& p = peer(remote, deadline);
          r.bytes = p.pull(remote.remoteRequestId, remote.remoteBlockIds, localBlocks,
                           map_.data(), settings_.layout, deadline);
          if (digestLog_) {
            logDigest("pulled", remote.remoteRequestId,
                      engine::kvBlocksDigest(map_.data(), settings_.layout, localBlocks));
          }
          break;
        } catch (const kv::KvTransferError& e) {
          // A kept connection that fails without a refusal (its agent went away, or restarted)
          // gets one fresh connection, whose handshake then says what is there now.
          if (e.code() || !reused || attempt > 0) throw;
          peers_.erase(key);
        }
      }
      ++pullsDone_;
      bytesPulled_ += r.bytes;
    } catch (const kv::KvTransferError& e) {
      r.error = e.what();
      if (e.code()) {
        r.code = kv::errorCodeName(*e.code());
      } else {
        peers_.erase(key);  // the connection is in an unknown state: a new one next time
      }
      ++pullsFailed_;
    } catch (const std::exception& e) {
      r.error = e.what();
      peers_.erase(key);
      ++pullsFailed_;
    }
    return r;
  });
}

kj::Promise<void> KvAgent::giveUp(const engine::KvParams& remote) {
  if (!transfers_) return kj::READY_NOW;
  return transfers_->run<void>([this, remote]() {
    kv::KvCancelScope scope(cancelPulls_);
    MonoNs deadline = monoNow() + 1000 * kNsPerMs;
    try {
      peer(remote, deadline).giveUp(remote.remoteRequestId, deadline);
    } catch (const std::exception&) {
      // Best effort: a prefill that cannot be reached ends the lease itself (expiry).
    }
  });
}

void KvAgent::fillStats(schema::KvAgentStats::Builder out) const {
  if (leases_) {
    kv::LeaseBook::Counts c = leases_->counts();
    out.setLive(c.live);
    out.setPulling(c.pulling);
    out.setGranted(c.granted);
    out.setDone(c.done);
    out.setGaveUp(c.gaveUp);
    out.setDisconnected(c.disconnected);
    out.setExpired(c.expired);
    out.setAbandoned(c.abandoned);
    out.setBytesSent(c.bytesSent);
    out.setPullsServed(c.pullsServed);
    out.setPullsRefused(c.pullsRefused);
  }
  out.setPullsDone(pullsDone_.load());
  out.setPullsFailed(pullsFailed_.load());
  out.setBytesPulled(bytesPulled_.load());
}

std::string KvAgent::summary() const {
  auto mib = [](uint64_t b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / double(1 << 20));
    return std::string(buf);
  };
  std::string out;
  if (leases_) {
    kv::LeaseBook::Counts c = leases_->counts();
    out = "leases " + std::to_string(c.live) + " held (" + std::to_string(c.pulling) +
          " pulling), " + std::to_string(c.done) + " done, " + std::to_string(c.gaveUp) +
          " given up, " + std::to_string(c.disconnected) + " disconnected, " +
          std::to_string(c.expired) + " expired; sent " + mib(c.bytesSent);
  }
  if (transfers_) {
    if (!out.empty()) out += "; ";
    out += "pulls " + std::to_string(pullsDone_.load()) + " done, " +
           std::to_string(pullsFailed_.load()) + " failed; pulled " + mib(bytesPulled_.load());
  }
  return out;
}

kj::Promise<void> KvAgent::drain(uv_loop_t* loop, supervisor::ShutdownContext& ctx,
                                 MonoNs giveUpAt) {
  // Pulls still in flight are of requests engine-core has aborted by now: end them, so the
  // connection closes and the prefill side releases what it was sending.
  cancelPulls_ = true;
  if (!leases_) return kj::READY_NOW;
  leases_->expireOverdue();
  return drainFrom(loop, ctx, giveUpAt, leases_->counts().live);
}

kj::Promise<void> KvAgent::drainFrom(uv_loop_t* loop, supervisor::ShutdownContext& ctx,
                                     MonoNs giveUpAt, uint64_t total) {
  leases_->expireOverdue();
  uint64_t live = leases_->counts().live;
  if (live == 0) {
    if (total > 0) vsup::log().info("[shutdown] {}: kv: all {} lease(s) released", node_, total);
    server_->stop();
    return kj::READY_NOW;
  }
  MonoNs now = monoNow();
  if (now >= giveUpAt) {
    leases_->abandonAll();
    vsup::log().warn("[shutdown] {}: kv: giving up: {} lease(s) abandoned", node_, live);
    server_->stop();
    return kj::READY_NOW;
  }
  ctx.defer("kv: " + std::to_string(live) + " lease(s) held",
            std::to_string(total - std::min(total, live)) + " of " + std::to_string(total) +
                " released");
  MonoNs wakeAt = std::min(giveUpAt, now + 50 * kNsPerMs);
  return ipc::uvSleep(loop, msUntil(wakeAt)).then([this, loop, &ctx, giveUpAt, total]() {
    return drainFrom(loop, ctx, giveUpAt, total);
  });
}

namespace {

// The peer a pull or a give-up names.
template <typename Params>
engine::KvParams remoteOf(Params p) {
  engine::KvParams remote;
  remote.remoteEngineId = p.getRemoteEngineId();
  remote.remoteRequestId = p.getRemoteRequestId();
  remote.remoteHost = p.getRemoteHost();
  remote.remotePort = p.getRemotePort();
  return remote;
}

class KvAgentService final : public schema::KvAgent::Server {
 public:
  explicit KvAgentService(KvAgent& agent) : agent_(agent) {}

  kj::Promise<void> grant(GrantContext context) override {
    for (auto l : context.getParams().getLeases()) {
      std::vector<int32_t> blocks;
      for (int32_t b : l.getBlocks()) blocks.push_back(b);
      try {
        agent_.grant(l.getId(), std::move(blocks));
      } catch (const std::exception& e) {
        return KJ_EXCEPTION(FAILED, e.what());
      }
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> nextEnded(NextEndedContext context) override {
    return agent_.nextEnded().then([context](std::vector<kv::EndedLease> ended) mutable {
      auto list = context.getResults().initEnded(unsigned(ended.size()));
      for (unsigned i = 0; i < ended.size(); ++i) {
        list[i].setId(ended[i].id);
        list[i].setReason(kv::leaseEndName(ended[i].reason));
      }
    });
  }

  kj::Promise<void> pull(PullContext context) override {
    auto p = context.getParams();
    engine::KvParams remote = remoteOf(p);
    for (int32_t b : p.getRemoteBlocks()) remote.remoteBlockIds.push_back(b);
    std::vector<int32_t> local;
    for (int32_t b : p.getLocalBlocks()) local.push_back(b);
    return agent_.pull(remote, std::move(local))
        .then([context](KvAgent::PullResult r) mutable {
          auto out = context.getResults();
          out.setError(r.error);
          out.setCode(r.code);
          out.setBytes(r.bytes);
        });
  }

  kj::Promise<void> giveUp(GiveUpContext context) override {
    return agent_.giveUp(remoteOf(context.getParams()));
  }

  kj::Promise<void> stats(StatsContext context) override {
    agent_.fillStats(context.getResults().initStats());
    return kj::READY_NOW;
  }

 private:
  KvAgent& agent_;
};

}  // namespace

kj::Own<schema::KvAgent::Server> makeKvAgentService(KvAgent& agent) {
  return kj::heap<KvAgentService>(agent);
}

int kvAgentMain(int argc, char** argv) {
  CLI::App app{"vsup KV agent (started by engine-core)"};
  int regionFd = -1;
  app.add_option("--kv-cache-fd", regionFd, "the rank's KV cache region")->required();
  CLI11_PARSE(app, argc, argv);
  return runNodeProcess("vsup __kv-agent", [regionFd](uv_loop_t* loop,
                                                      supervisor::ChildRuntime& runtime) {
    auto holder = std::make_unique<std::unique_ptr<KvAgent>>();
    std::unique_ptr<KvAgent>* agent = holder.get();
    runtime.onStart([agent, regionFd, loop, &runtime](const supervisor::SupervisorSpec&) {
      try {
        KvAgentSettings s = decodeKvAgentConfig(runtime.startConfig());
        *agent = std::make_unique<KvAgent>(loop, runtime.name(), std::move(s), regionFd);
        ::close(regionFd);  // mapped, and kept as a dup for Shm peers
      } catch (const std::exception& e) {
        return kj::Promise<void>(KJ_EXCEPTION(FAILED, e.what()));
      }
      KvAgent* a = agent->get();
      runtime.setService(makeKvAgentService(*a));
      runtime.onStatus([a]() -> kj::Promise<supervisor::NodeStatus> {
        supervisor::NodeStatus s;
        s.type = supervisor::NodeType::Worker;
        s.state = supervisor::NodeState::Running;
        s.detail = a->summary();
        return s;
      });
      runtime.addShutdownHook("kv", [loop, a](supervisor::ShutdownContext& ctx) {
        MonoNs own = deadlineAfterMs(a->settings().shutdownTimeoutMs);
        return a->drain(loop, ctx, std::min(ctx.deadline(), own));
      });
      return kj::Promise<void>(kj::READY_NOW);
    });
    return holding(std::move(holder));
  });
}

}  // namespace vsup::workers
