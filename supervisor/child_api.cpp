// vsup::Child (supervisor/public/child.h): ChildRuntime behind an API without KJ types.
// Cross-thread calls (ready, defer, done) are queued under a mutex and applied on the loop
// thread by a uv_async.
#include "supervisor/public/child.h"

#include <uv.h>

#include <deque>
#include <mutex>

#include <kj/async.h>

#include "base/clock.h"
#include "ipc/uv_handle.h"
#include "ipc/uv_kj.h"
#include "supervisor/child_runtime.h"

namespace vsup {

class Child::Impl {
 public:
  Impl() {
    uv_loop_init(&loop_);
    kj_ = std::make_unique<ipc::KjOnUv>(&loop_);
    wake_ = UvHandle<uv_async_t>::make([this](uv_async_t* h) {
      uv_async_init(&loop_, h, [](uv_async_t* async) {
        if (async->data != nullptr) static_cast<Impl*>(async->data)->drain();
      });
    });
    wake_->data = this;
    uv_unref(reinterpret_cast<uv_handle_t*>(wake_.get()));
    runtime_ = std::make_unique<supervisor::ChildRuntime>(&loop_);
    runtime_->onStart([this](const supervisor::SupervisorSpec&) -> kj::Promise<void> {
      if (ready_) return kj::READY_NOW;
      auto paf = kj::newPromiseAndFulfiller<void>();
      readyFulfiller_ = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    });
    runtime_->addShutdownHook("app", [this](supervisor::ShutdownContext& ctx) {
      return shutdownHook(ctx);
    });
  }

  ~Impl() {
    runtime_.reset();
    wake_.reset();
    kj_.reset();
    uv_run(&loop_, UV_RUN_DEFAULT);
    uv_loop_close(&loop_);
  }

  const std::string& name() const { return runtime_->name(); }

  // Any thread.
  void post(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(work));
    }
    uv_async_send(wake_.get());
  }

  void ready() {
    post([this]() {
      ready_ = true;
      if (readyFulfiller_) readyFulfiller_->fulfill();
    });
  }

  std::function<void(ShutdownRequest&)> handler;

  int run() {
    drain();  // whatever was posted before run()
    return runtime_->run();
  }

 private:
  void drain() {
    std::deque<std::function<void()>> work;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      work.swap(queue_);
    }
    for (auto& w : work) w();
  }

  kj::Promise<void> shutdownHook(supervisor::ShutdownContext& ctx);

  uv_loop_t loop_;
  std::unique_ptr<ipc::KjOnUv> kj_;
  UvHandle<uv_async_t> wake_;
  std::unique_ptr<supervisor::ChildRuntime> runtime_;
  std::mutex mutex_;
  std::deque<std::function<void()>> queue_;
  bool ready_ = false;
  kj::Own<kj::PromiseFulfiller<void>> readyFulfiller_;
  kj::Own<kj::PromiseFulfiller<void>> doneFulfiller_;
  supervisor::ShutdownContext* ctx_ = nullptr;
};

struct ShutdownRequest::State {
  std::function<void(std::function<void()>)> post;  // onto the loop thread, from any thread
  MonoNs deadline;
  std::function<void(const std::string&, const std::string&)> deferOnLoop;
  std::function<void()> doneOnLoop;
};

kj::Promise<void> Child::Impl::shutdownHook(supervisor::ShutdownContext& ctx) {
  if (!handler) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  doneFulfiller_ = kj::mv(paf.fulfiller);
  ctx_ = &ctx;
  auto state = std::make_shared<ShutdownRequest::State>();
  state->post = [this](std::function<void()> work) { post(std::move(work)); };
  state->deadline = ctx.deadline();
  state->deferOnLoop = [this](const std::string& reason, const std::string& progress) {
    if (ctx_ != nullptr) ctx_->defer(reason, progress);
  };
  state->doneOnLoop = [this]() {
    ctx_ = nullptr;
    if (doneFulfiller_) doneFulfiller_->fulfill();
  };
  ShutdownRequest request(state);
  handler(request);
  return kj::mv(paf.promise);
}

std::chrono::steady_clock::time_point ShutdownRequest::deadline() const {
  // CLOCK_MONOTONIC is steady_clock's clock on Linux.
  if (state_->deadline == kNoDeadline) return std::chrono::steady_clock::time_point::max();
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(state_->deadline));
}

void ShutdownRequest::defer(const std::string& reason, const std::string& progress) {
  auto state = state_;
  state->post([state, reason, progress]() { state->deferOnLoop(reason, progress); });
}

void ShutdownRequest::done() {
  auto state = state_;
  state->post([state]() { state->doneOnLoop(); });
}

bool Child::launchedByVsup() { return supervisor::ChildRuntime::launchedByVsup(); }
Child::Child() : impl_(std::make_unique<Impl>()) {}
Child::~Child() = default;
const std::string& Child::name() const { return impl_->name(); }
void Child::ready() { impl_->ready(); }
void Child::onShutdown(std::function<void(ShutdownRequest&)> handler) {
  impl_->handler = std::move(handler);
}
int Child::run() { return impl_->run(); }

}  // namespace vsup
