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

// Where a submit's answer lands. Only completion goes through the fulfiller (GCC 12 warns,
// falsely, about a fulfiller of an optional with a string inside); the value waits here.
struct SubmitSlot {
  kj::Own<kj::PromiseFulfiller<void>> fulfiller;
  std::optional<engine::Rejection> rejection;
  void fulfill(std::optional<engine::Rejection> r) {
    rejection = std::move(r);
    fulfiller->fulfill();
  }
  void reject(kj::Exception&& e) { fulfiller->reject(kj::mv(e)); }
};

// A submit waiting for the end of this turn of the loop, when every request submitted in it goes
// to the engine in one call.
struct QueuedSubmit {
  engine::GenerateRequest request;
  std::shared_ptr<SubmitSlot> slot;  // shared by a call's success and error paths
};

std::optional<engine::Rejection> rejectionOf(engine::RejectCode code, kj::StringPtr message) {
  if (code == engine::RejectCode::None && message.size() == 0) return std::nullopt;
  return engine::Rejection{code, message};
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
    answered->closed = true;
    answered->clear();
    queued.clear();  // their promises break
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
  // The engine's answers to submits, kept until the next submit goes out, so that their Finish
  // messages follow that call instead of each waking engine-core on its own. Shared with the
  // submits' continuations, which may run after this Impl is gone (then they keep nothing).
  struct Answered {
    bool closed = false;
    std::vector<kj::Own<capnp::Response<schema::Engine::SubmitResults>>> responses;
    std::vector<kj::Own<capnp::Response<schema::Engine::SubmitManyResults>>> manyResponses;
    void clear() {
      responses.clear();
      manyResponses.clear();
    }
  };
  std::shared_ptr<Answered> answered = std::make_shared<Answered>();
  std::unique_ptr<ipc::RpcLink> link;
  std::optional<schema::Engine::Client> engine;
  std::vector<QueuedSubmit> queued;  // submitted in this turn of the loop
  // The engine serves submitMany (asked once, at connect: an engine that predates it, such as a
  // test's fake, answers UNIMPLEMENTED and gets one submit per request).
  std::shared_ptr<bool> manySupported = std::make_shared<bool>(false);
  kj::Own<kj::TaskSet> tasks;

  void keep(capnp::Response<schema::Engine::SubmitResults>&& r) {
    if (!answered->closed) answered->responses.push_back(kj::heap(kj::mv(r)));
  }
  void keep(capnp::Response<schema::Engine::SubmitManyResults>&& r) {
    if (!answered->closed) answered->manyResponses.push_back(kj::heap(kj::mv(r)));
  }

  // Every request queued in this turn, in one call (one alone: a plain submit).
  void flush() {
    std::vector<QueuedSubmit> batch = std::move(queued);
    queued.clear();
    if (batch.empty()) return;  // flushed already (by an abort)
    if (batch.size() == 1 || !*manySupported) {
      for (auto& q : batch) submitOne(std::move(q));
      return;
    }
    auto call = engine->submitManyRequest();
    auto list = call.initRequests(unsigned(batch.size()));
    for (unsigned i = 0; i < batch.size(); ++i) encode(batch[i].request, list[i]);
    auto answer = call.send();
    answered->clear();  // their Finish messages follow this call
    auto shared = std::make_shared<std::vector<QueuedSubmit>>(std::move(batch));
    tasks->add(answer.then(
        [this, shared](capnp::Response<schema::Engine::SubmitManyResults>&& r) {
          auto outcomes = r.getOutcomes();
          for (unsigned i = 0; i < shared->size(); ++i) {
            SubmitSlot& f = *(*shared)[i].slot;
            if (i >= outcomes.size()) {
              f.reject(KJ_EXCEPTION(FAILED, "the engine answered no outcome for this request"));
            } else if (outcomes[i].getRefused().size() != 0) {
              f.reject(ipc::failure(outcomes[i].getRefused()));
            } else {
              f.fulfill(rejectionOf(decode(outcomes[i].getRejectCode()), outcomes[i].getRejected()));
            }
          }
          keep(kj::mv(r));
        },
        [shared](kj::Exception&& e) {
          kj::Exception failure = cleaned(kj::mv(e));
          for (auto& q : *shared) q.slot->reject(kj::cp(failure));
        }));
  }

  void submitOne(QueuedSubmit q) {
    auto call = engine->submitRequest();
    encode(q.request, call.initRequest());
    auto answer = call.send();
    answered->clear();  // their Finish messages follow this call
    tasks->add(answer.then(
        [this, f = q.slot](capnp::Response<schema::Engine::SubmitResults>&& r) {
          f->fulfill(rejectionOf(decode(r.getRejectCode()), r.getRejected()));
          keep(kj::mv(r));
        },
        [f = q.slot](kj::Exception&& e) { f->reject(cleaned(kj::mv(e))); }));
  }
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
  kj::Promise<capnp::Response<schema::Engine::AttachResults>> attached = attach.send();
  // Pipelined with attach: an empty submitMany says whether the engine serves it.
  auto probe = impl_->engine->submitManyRequest();
  probe.initRequests(0);
  auto probed = probe.send().then(
      [many = impl_->manySupported](capnp::Response<schema::Engine::SubmitManyResults>&&) {
        *many = true;
      },
      [](kj::Exception&&) {});
  return probed.then([attached = kj::mv(attached)]() mutable { return kj::mv(attached); }).then(
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
  // Sent at the end of this turn of the loop, with every other request submitted in it.
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto slot = std::make_shared<SubmitSlot>();
  slot->fulfiller = kj::mv(paf.fulfiller);
  impl_->queued.push_back(QueuedSubmit{request, slot});
  if (impl_->queued.size() == 1) {
    Impl* impl = impl_.get();
    impl_->tasks->add(kj::evalLater([impl]() { impl->flush(); }));
  }
  return paf.promise.then([slot]() { return std::move(slot->rejection); });
}

void EngineClient::abort(const std::string& id) {
  if (!impl_->engine) return;
  // A request still waiting for the end of the turn goes out first: the engine must see its
  // submit before its abort.
  impl_->flush();
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
