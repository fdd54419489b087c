// vsup::Supervisor (supervisor/public/supervisor.h): the OTP supervisor on a private loop
// thread, with blocking calls from any thread.
#include "supervisor/public/supervisor.h"

#include <signal.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <cstring>
#include <unistd.h>

#include "base/check.h"
#include "base/log.h"
#include "ipc/user_message.h"
#include "ipc/uv_kj.h"
#include "supervisor/host_checks.h"
#include "supervisor/loop_thread.h"
#include "supervisor/supervisor.h"


namespace vsup {

namespace {

}  // namespace


// KJ allows one event loop per thread: every Supervisor on the same host loop shares one
// KjOnUv, which goes away with the last of them.
std::shared_ptr<ipc::KjOnUv> kjFor(uv_loop_t* loop) {
  static std::mutex mutex;
  static std::map<uv_loop_t*, std::weak_ptr<ipc::KjOnUv>> registry;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = registry.begin(); it != registry.end();) {
    it = it->second.expired() ? registry.erase(it) : std::next(it);
  }
  if (auto existing = registry[loop].lock()) return existing;
  auto created = std::make_shared<ipc::KjOnUv>(loop);
  registry[loop] = created;
  return created;
}

vsup::Error toError(const kj::Exception& e) {
  return vsup::Error(ipc::userMessage(e));
}

class Supervisor::Impl final : public kj::TaskSet::ErrorHandler {
 public:
  // Private-thread mode.
  Impl(supervisor::SupervisorSpec spec, Options options) {
    supervisor::requireSigchldNotIgnored("vsup::Supervisor");
    supervisor::normalize(spec);
    supervisor::validate(spec, "vsup::Supervisor spec");
    loop_ = std::make_unique<supervisor::LoopThread>();
    loop_->run([&]() { create(loop_->loop(), std::move(spec), options); });
  }

  // Host-loop mode.
  Impl(uv_loop_t* host, supervisor::SupervisorSpec spec, Options options)
      : hostThread_(std::this_thread::get_id()) {
    VSUP_REQUIRE(host != nullptr, "vsup::Supervisor: the host loop is null");
    supervisor::requireSigchldNotIgnored("vsup::Supervisor");
    supervisor::normalize(spec);
    supervisor::validate(spec, "vsup::Supervisor spec");
    kj_ = kjFor(host);
    create(host, std::move(spec), options);
  }

  ~Impl() noexcept(false) {
    try {
      shutdown(std::chrono::seconds(30));
    } catch (const std::exception&) {
      // Destruction must not throw; the backstop below reaps whatever is left.
    }
    // Destroyed on its own thread (its promises and handles belong there), then the thread.
    auto destroy = [this]() {
      tasks_ = nullptr;
      sup_.reset();
    };
    if (loop_) {
      loop_->run(destroy);
      loop_.reset();
    } else {
      destroy();
      kj_.reset();
    }
  }

  void taskFailed(kj::Exception&& e) override {
    vsup::log().warn("[supervisor] embedded: {}", ipc::userMessage(e));
  }

  // Runs `func` where the supervisor lives and waits for it (and for the promise it returns).
  template <typename Func>
  auto run(Func&& func) {
    if (loop_) return loop_->run(kj::fwd<Func>(func));
    requireHostThread();
    try {
      return kj::evalNow(kj::fwd<Func>(func)).wait(kj_->waitScope());
    } catch (const kj::Exception& e) {
      throw toError(e);
    }
  }

  void async(kj::Promise<void> work, Done done) {
    VSUP_REQUIRE(!loop_, "vsup::Supervisor: the *Async methods are for host-loop mode");
    requireHostThread();
    auto shared = std::make_shared<Done>(std::move(done));
    tasks_->add(work.then([shared]() { (*shared)(nullptr); },
                          [shared](kj::Exception&& e) {
                            (*shared)(std::make_exception_ptr(toError(e)));
                          }));
  }

  supervisor::Supervisor& sup() { return *sup_; }

  bool shutdown(std::chrono::milliseconds timeout) {
    return run([&]() {
      return sup_->shutdown(deadlineAfterMs(timeout.count())).then([this]() {
        return sup_->escalations() == 0;
      });
    });
  }

 private:
  void create(uv_loop_t* loop, supervisor::SupervisorSpec spec, const Options& options) {
    setLogLevel(options.logLevel);
    supervisor::SupervisorOptions o;
    std::string exe = supervisor::resolveVsupExecutable(options.vsupExecutable);
    // The vsup executable only when it exists: a tree of plain commands needs none.
    if (::access(exe.c_str(), X_OK) == 0) o.selfExe = exe;
    sup_ = std::make_unique<supervisor::Supervisor>(loop, std::move(spec), o);
    tasks_ = kj::heap<kj::TaskSet>(*this);
  }

  void requireHostThread() const {
    VSUP_REQUIRE(std::this_thread::get_id() == hostThread_,
                 "vsup::Supervisor on a host loop must be called from that loop's thread");
  }

  std::unique_ptr<supervisor::LoopThread> loop_;  // private-thread mode
  std::shared_ptr<ipc::KjOnUv> kj_;               // host-loop mode
  std::thread::id hostThread_;
  // On the supervisor's thread.
  std::unique_ptr<supervisor::Supervisor> sup_;
  kj::Own<kj::TaskSet> tasks_;
};

Supervisor::Supervisor(supervisor::SupervisorSpec spec, Options options)
    : impl_(std::make_unique<Impl>(std::move(spec), std::move(options))) {}
Supervisor::Supervisor(uv_loop_s* hostLoop, supervisor::SupervisorSpec spec, Options options)
    : impl_(std::make_unique<Impl>(hostLoop, std::move(spec), std::move(options))) {}
Supervisor::Supervisor(supervisor::SupervisorSpec spec) : Supervisor(std::move(spec), Options()) {}
Supervisor::Supervisor(uv_loop_s* hostLoop, supervisor::SupervisorSpec spec)
    : Supervisor(hostLoop, std::move(spec), Options()) {}
Supervisor::~Supervisor() = default;

void Supervisor::start() {
  impl_->run([this]() { return impl_->sup().start(); });
}

supervisor::NodeStatus Supervisor::status() {
  return impl_->run([this]() { return impl_->sup().status(); });
}

void Supervisor::stopChild(const std::string& name) {
  impl_->run([&]() { return impl_->sup().stopChild(name); });
}

void Supervisor::addChild(supervisor::ChildSpec spec) {
  impl_->run([&]() { return impl_->sup().addChild(std::move(spec)); });
}

void Supervisor::restartChild(const std::string& name) {
  impl_->run([&]() { return impl_->sup().restartChild(name); });
}

void Supervisor::deleteChild(const std::string& name) {
  impl_->run([&]() { return impl_->sup().deleteChild(name); });
}

bool Supervisor::shutdown(std::chrono::milliseconds timeout) { return impl_->shutdown(timeout); }

bool Supervisor::terminated() {
  return impl_->run([this]() { return impl_->sup().isTerminated(); });
}

void Supervisor::startAsync(Done done) { impl_->async(impl_->sup().start(), std::move(done)); }

void Supervisor::shutdownAsync(std::chrono::milliseconds timeout, Done done) {
  impl_->async(impl_->sup().shutdown(deadlineAfterMs(timeout.count())), std::move(done));
}

}  // namespace vsup
