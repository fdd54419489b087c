#include "supervisor/node_service.h"

#include <memory>

#include <kj/debug.h>

#include "base/log.h"
#include "ipc/user_message.h"
#include "supervisor/node_codec.h"

namespace vsup::supervisor {
namespace {

namespace schema = ipc::schema;

class NodeServer final : public schema::Node::Server, private kj::TaskSet::ErrorHandler {
 public:
  explicit NodeServer(NodeHandler& handler) : handler_(handler), tasks_(*this) {}

 protected:
  kj::Promise<void> start(StartContext context) override {
    auto params = context.getParams();
    SupervisorSpec spec = decode(params.getSpec());
    std::string config = params.hasConfig() ? fromData(params.getConfig()) : std::string();
    return handler_.start(std::move(spec), std::move(config));
  }

  kj::Promise<void> status(StatusContext context) override {
    context.allowCancellation();
    int64_t budget = context.getParams().getBudgetMs();
    return handler_.statusWithin(budget > 0 ? budget : kStatusBudgetMs).then([context](NodeStatus s) mutable {
      encode(s, context.getResults().initStatus());
    });
  }

  kj::Promise<void> shutdown(ShutdownContext context) override {
    auto params = context.getParams();
    MonoNs deadline = params.getDeadlineNs();
    DeferralReporter reporter;
    if (params.hasObserver()) {
      auto observer = std::make_shared<schema::ShutdownObserver::Client>(params.getObserver());
      reporter = [this, observer](const std::string& node, const Deferral& d) {
        auto request = observer->deferralRequest();
        request.setNode(node);
        encode(d, request.initDeferral());
        tasks_.add(request.send().ignoreResult());
      };
    }
    if (params.getHurry()) handler_.hurry(deadline);
    return handler_.shutdown(deadline, std::move(reporter)).then([context](bool clean) mutable {
      context.getResults().setClean(clean);
    });
  }

  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }

  kj::Promise<void> service(ServiceContext context) override {
    return handler_.service().then([context](capnp::Capability::Client cap) mutable {
      context.getResults().setService(kj::mv(cap));
    });
  }

  kj::Promise<void> quiesce(QuiesceContext context) override {
    return handler_.quiesce(context.getParams().getDrainDeadlineNs());
  }

  kj::Promise<void> leaveRotation(LeaveRotationContext) override { return handler_.leaveRotation(); }

 private:
  void taskFailed(kj::Exception&& e) override {
    // The parent may be gone while we report: that is its business, not an error of ours.
    if (e.getType() != kj::Exception::Type::DISCONNECTED) {
      vsup::log().debug("[ipc] deferral report failed: {}", ipc::userMessage(e));
    }
  }

  NodeHandler& handler_;
  kj::TaskSet tasks_;
};

}  // namespace

kj::Promise<capnp::Capability::Client> NodeHandler::service() {
  return KJ_EXCEPTION(UNIMPLEMENTED, "this node has no service");
}

kj::Promise<NodeStatus> NodeHandler::statusWithin(int64_t) { return status(); }

void NodeHandler::hurry(MonoNs) {}

kj::Promise<void> NodeHandler::quiesce(MonoNs) { return kj::READY_NOW; }

kj::Promise<void> NodeHandler::leaveRotation() { return kj::READY_NOW; }

schema::Node::Client makeNodeServer(NodeHandler& handler) { return kj::heap<NodeServer>(handler); }

}  // namespace vsup::supervisor
