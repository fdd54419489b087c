// A custom vsup-aware child program, built on <vsup/child.h>. The custom_topology example
// starts it as a child with vsupAware set: the parent learns when it is really ready, stops it
// over RPC (it ignores SIGTERM and SIGINT), and sees its shutdown progress in `vsup tree`.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include <vsup/child.h>

int main() {
  // Only the parent stops this process: a terminal's Ctrl-C or a stray SIGTERM does not.
  ::signal(SIGTERM, SIG_IGN);
  ::signal(SIGINT, SIG_IGN);
  if (!vsup::Child::launchedByVsup()) {
    std::fprintf(stderr, "aware_child: start me from a vsup supervisor (vsupAware child)\n");
    return 2;
  }
  vsup::Child child;
  // Becomes ready after a short warm-up on its own thread.
  std::thread warmUp([&child]() {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    child.ready();
  });
  std::thread flusher;
  child.onShutdown([&flusher](vsup::ShutdownRequest& stop) {
    // Finish work before exiting, reporting progress; done() from the worker thread.
    flusher = std::thread([stop]() mutable {
      for (int i = 0; i < 3; ++i) {
        stop.defer("flushing", std::to_string(i) + " of 3 batches");
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
      }
      stop.done();
    });
  });
  int code = child.run();
  warmUp.join();
  if (flusher.joinable()) flusher.join();
  std::printf("%s: flushed, exiting with %d\n", child.name().c_str(), code);
  return code;
}
