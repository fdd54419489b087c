// RpcLink: one Cap'n Proto two-party RPC connection over a connected Unix socket, on the
// thread's KjOnUv loop. The parent end of a tree edge is the CLIENT (it calls the child's Node);
// the child end and the root's control socket are SERVERs (they serve Node as bootstrap).
// Runs on the loop thread only.
#pragma once

#include <capnp/rpc-twoparty.h>

#include <memory>

#include "base/fd.h"
#include "ipc/uv_kj.h"

namespace vsup::ipc {

// How much one received message may make its reader traverse. Cap'n Proto's default (64 MiB)
// lets a 56-byte message of zero-size list elements decode into millions of specs or statuses
// (found by tests/fuzz): control links (Node, `vsup tree`) carry small messages and get 1 MiB.
// The data plane (Engine) carries prompts up to --max-request-bytes and keeps the default.
capnp::ReaderOptions controlReaderOptions();
capnp::ReaderOptions dataReaderOptions();

class RpcLink {
 public:
  // Serve `bootstrap` to the peer.
  static std::unique_ptr<RpcLink> serve(uv_loop_t* loop, OwnFd fd,
                                        capnp::Capability::Client bootstrap,
                                        capnp::ReaderOptions options = controlReaderOptions());
  // Connect as client; bootstrap() is then the peer's capability.
  static std::unique_ptr<RpcLink> connect(uv_loop_t* loop, OwnFd fd,
                                          capnp::ReaderOptions options = controlReaderOptions());

  ~RpcLink();
  RpcLink(const RpcLink&) = delete;
  RpcLink& operator=(const RpcLink&) = delete;

  template <typename T>
  typename T::Client bootstrap() {
    return bootstrapCap().castAs<T>();
  }
  // Resolves when the connection is gone (peer closed or died).
  kj::Promise<void> onDisconnect();

 private:
  RpcLink(uv_loop_t* loop, OwnFd fd, capnp::rpc::twoparty::Side side,
          capnp::ReaderOptions options);
  capnp::Capability::Client bootstrapCap();

  UvSocketStream stream_;
  capnp::TwoPartyVatNetwork network_;
  kj::Own<capnp::RpcSystem<capnp::rpc::twoparty::VatId>> rpc_;
  kj::ForkedPromise<void> disconnected_;
};

}  // namespace vsup::ipc
