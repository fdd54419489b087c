#include "workers/engine_client.h"

#include <kj/debug.h>

#include "base/error.h"
#include "base/log.h"
#include "ipc/engine.capnp.h"
#include "ipc/rpc_link.h"
#include "ipc/user_message.h"
#include "workers/engine_codec.h"

namespace vsup::workers {

namespace schema = ipc::schema;

namespace {

// The sink is owned by the RPC system, which may keep it past the EngineClient (a call being
// dispatched, a connection torn down later): it reaches the client only through this cell,
// which the client clears when it goes.
struct SinkTarget {
  EngineClient::Callbacks* callbacks = nullptr;
};

class Sink final : public schema::TokenSink::Server {
 public:
  explicit Sink(std::shared_ptr<SinkTarget> target) : target_(std::move(target)) {}

 protected:
  kj::Promise<void> deltas(DeltasContext context) override {
    if (target_->callbacks == nullptr) return kj::READY_NOW;
    std::vector<engine::TokenDelta> list;
    auto in = context.getParams().getDeltas();
    list.reserve(in.size());
    for (auto d : in) list.push_back(decode(d));
    if (target_->callbacks->onDeltas) target_->callbacks->onDeltas(list);
    return kj::READY_NOW;
  }

  kj::Promise<void> engineFailed(EngineFailedContext context) override {
    if (target_->callbacks == nullptr) return kj::READY_NOW;
    if (target_->callbacks->onEngineFailed) {
      target_->callbacks->onEngineFailed(context.getParams().getReason());
    }
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<SinkTarget> target_;
};

// The same failure (its type kept: DISCONNECTED means the engine is gone), described as a person
// would say it: no "remote exception: " or KJ decoration (ipc/user_message.h).
kj::Exception cleaned(kj::Exception&& e) {
  kj::Exception out(e.getType(), e.getFile(), e.getLine(), kj::str(ipc::userMessage(e)));
  return out;
}

}  // namespace

struct EngineClient::Impl final : public kj::TaskSet::ErrorHandler {
  Impl(uv_loop_t* loop, std::string logPrefix, Callbacks callbacks)
      : loop(loop),
        logPrefix(std::move(logPrefix)),
        callbacks(std::move(callbacks)),
        target(std::make_shared<SinkTarget>()),
        tasks(kj::heap<kj::TaskSet>(*this)) {
    target->callbacks = &this->callbacks;
  }

  ~Impl() noexcept(false) {
    target->callbacks = nullptr;
    // The tasks wait on the link (its disconnect, abort calls): they go before it does.
    tasks = nullptr;
    engine.reset();
    link.reset();
  }

  void taskFailed(kj::Exception&& e) override {
    // A vanished engine is onDisconnect's news, not a failed task.
    if (e.getType() == kj::Exception::Type::DISCONNECTED) return;
    vsup::log().warn("{} {}", logPrefix, ipc::userMessage(e));
  }

  uv_loop_t* loop;
  std::string logPrefix;
  Callbacks callbacks;
  std::shared_ptr<SinkTarget> target;
  std::unique_ptr<ipc::RpcLink> link;
  std::optional<schema::Engine::Client> engine;
  kj::Own<kj::TaskSet> tasks;
};

EngineClient::EngineClient(uv_loop_t* loop, std::string logPrefix, Callbacks callbacks)
    : impl_(std::make_unique<Impl>(loop, std::move(logPrefix), std::move(callbacks))) {}

EngineClient::~EngineClient() = default;

kj::Promise<EngineInfo> EngineClient::connect(OwnFd socket) {
  KJ_REQUIRE(!impl_->link, "EngineClient::connect called twice");
  // The data plane carries prompts up to the API server's request size limit.
  impl_->link = ipc::RpcLink::connect(impl_->loop, std::move(socket), ipc::dataReaderOptions());
  impl_->engine = impl_->link->bootstrap<schema::Engine>();
  Impl* impl = impl_.get();
  impl_->tasks->add(impl_->link->onDisconnect().then([impl]() {
    if (impl->callbacks.onDisconnect) impl->callbacks.onDisconnect();
  }));
  auto attach = impl_->engine->attachRequest();
  attach.setSink(kj::heap<Sink>(impl_->target));
  return attach.send().then(
      [](capnp::Response<schema::Engine::AttachResults>&& r) {
        EngineInfo info;
        info.maxModelLen = r.getMaxModelLen();
        info.chatFormat = r.getChatFormat();
        return info;
      },
      [](kj::Exception&& e) -> EngineInfo { kj::throwFatalException(cleaned(kj::mv(e))); });
}

kj::Promise<std::optional<engine::Rejection>> EngineClient::submit(
    const engine::GenerateRequest& request) {
  if (!impl_->engine) {
    return KJ_EXCEPTION(FAILED, "EngineClient: not connected to the engine");
  }
  auto call = impl_->engine->submitRequest();
  encode(request, call.initRequest());
  return call.send().then(
      [](capnp::Response<schema::Engine::SubmitResults>&& r) -> std::optional<engine::Rejection> {
        engine::RejectCode code = decode(r.getRejectCode());
        if (code == engine::RejectCode::None && r.getRejected().size() == 0) return std::nullopt;
        return engine::Rejection{code, r.getRejected()};
      },
      [](kj::Exception&& e) -> std::optional<engine::Rejection> {
        kj::throwFatalException(cleaned(kj::mv(e)));
      });
}

void EngineClient::abort(const std::string& id) {
  if (!impl_->engine) return;
  auto call = impl_->engine->abortRequest();
  call.setId(id);
  impl_->tasks->add(call.send().ignoreResult());
}

kj::Promise<engine::EngineStats> EngineClient::stats() {
  if (!impl_->engine) {
    return KJ_EXCEPTION(FAILED, "EngineClient: not connected to the engine");
  }
  return impl_->engine->statsRequest().send().then(
      [](capnp::Response<schema::Engine::StatsResults>&& r) -> engine::EngineStats {
        try {
          return decode(r.getStats());
        } catch (const Error& e) {
          // One sentence (KJ_FAIL_REQUIRE would render "...; e.what() = ..."): it may reach a
          // log line or an error body as it is.
          kj::throwFatalException(kj::Exception(
              kj::Exception::Type::FAILED, __FILE__, __LINE__,
              kj::str("the engine's stats are malformed: ", e.what())));
        }
      },
      [](kj::Exception&& e) -> engine::EngineStats {
        kj::throwFatalException(cleaned(kj::mv(e)));
      });
}

}  // namespace vsup::workers
