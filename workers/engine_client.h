// EngineClient: the client side of the Engine protocol (ipc/engine.capnp), shared by the API
// server and vsup::LLM. It connects over a socket to engine-core, attaches a TokenSink, and
// turns the protocol into plain values: a submit resolves to an optional Rejection, tokens
// arrive as batches of engine::TokenDelta, and the engine's failure and the connection's loss
// are callbacks. Nothing outside this class touches schema::Engine or schema::TokenSink.
//
// Every promise it returns rejects with a description meant for a person (ipc::userMessage:
// no "remote exception: ..."), its type kept (DISCONNECTED: the engine is gone).
//
// Thread: construct, use and destroy on the thread that runs `loop` (with KJ on it, KjOnUv).
// Callbacks run on that thread, from inside the RPC dispatch or a KJ task: they must not
// destroy the EngineClient.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kj/async.h>

#include "base/fd.h"
#include "engine/stats.h"
#include "engine/types.h"

namespace vsup::ipc {
class RpcLink;
}

namespace vsup::workers {

// What attach tells about the model being served.
struct EngineInfo {
  int64_t maxModelLen = 0;  // 0: unbounded
  std::string chatFormat;   // "plain", "chatml", "llama3"
};

class EngineClient final {
 public:
  struct Callbacks {
    // Every delta for this client's requests, one call per batch the engine sends (one per
    // engine step), in the engine's order.
    std::function<void(const std::vector<engine::TokenDelta>&)> onDeltas;
    // The engine cannot serve any more (sent after the failed requests' final deltas).
    std::function<void(const std::string& reason)> onEngineFailed;
    // The connection is gone (engine-core exited or closed it). Called at most once; not
    // called when the EngineClient itself is destroyed.
    std::function<void()> onDisconnect;
  };

  // `logPrefix` starts this client's log lines, e.g. "[api] api-server-0:".
  EngineClient(uv_loop_t* loop, std::string logPrefix, Callbacks callbacks);
  // Closes the connection without calling any callback; promises still pending from submit()
  // are broken (rejected).
  ~EngineClient();
  EngineClient(const EngineClient&) = delete;
  EngineClient& operator=(const EngineClient&) = delete;

  // Takes over `socket` (connected to engine-core), attaches, and resolves with what attach
  // returned. Call once, before anything else.
  kj::Promise<EngineInfo> connect(OwnFd socket);

  // Queues `request` (its id must be unique among this client's requests). Resolves to nullopt
  // once the engine queued it (its deltas follow through onDeltas), or to the Rejection when the
  // engine can never serve it as asked (nothing is queued). Rejects when the engine refused to
  // take it at all (stopping, failed, gone) or before connect().
  kj::Promise<std::optional<engine::Rejection>> submit(const engine::GenerateRequest& request);

  // Asks the engine to end request `id`; its final delta (finish = abort) follows through
  // onDeltas. Fire-and-forget: a no-op before connect() or once the connection is gone.
  void abort(const std::string& id);

  // The engine's serving figures (Engine.stats). Rejects before connect() or once the
  // connection is gone.
  kj::Promise<engine::EngineStats> stats();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup::workers
