// The body every vsup-aware process of the serving tree shares: it ignores SIGINT, SIGTERM and
// SIGHUP (only its parent stops it, over RPC; docs/architecture.md, "One SIGTERM, through the tree"), sets up the uv loop, KJ on it
// and the ChildRuntime, lets `setup` register the node's behaviour, runs until the parent says
// stop, and tears down in reverse order: the node's state, the runtime, KJ, the loop.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>

#include "supervisor/child_runtime.h"

namespace vsup::workers {

// Whatever a node keeps alive while it runs; destroyed before its ChildRuntime.
class NodeState {
 public:
  virtual ~NodeState() noexcept(false) = default;  // states hold KJ promises
};

template <typename T>
class Holding final : public NodeState {
 public:
  explicit Holding(std::unique_ptr<T> value) : value(std::move(value)) {}
  std::unique_ptr<T> value;
};

template <typename T>
std::unique_ptr<NodeState> holding(std::unique_ptr<T> value) {
  return std::make_unique<Holding<T>>(std::move(value));
}

using NodeSetup =
    std::function<std::unique_ptr<NodeState>(uv_loop_t* loop, supervisor::ChildRuntime& runtime)>;

// `program` names the process in error messages ("vsup __worker"). Returns the exit status.
int runNodeProcess(const char* program, const NodeSetup& setup);

}  // namespace vsup::workers
