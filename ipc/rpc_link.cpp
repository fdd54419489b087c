#include "ipc/rpc_link.h"

namespace vsup::ipc {

capnp::ReaderOptions controlReaderOptions() {
  capnp::ReaderOptions o;
  o.traversalLimitInWords = 1 << 17;  // 1 MiB
  return o;
}

capnp::ReaderOptions dataReaderOptions() { return capnp::ReaderOptions(); }

RpcLink::RpcLink(uv_loop_t* loop, OwnFd fd, capnp::rpc::twoparty::Side side,
                 capnp::ReaderOptions options)
    : stream_(loop, std::move(fd)),
      network_(stream_, side, options),
      disconnected_(network_.onDisconnect().fork()) {}

RpcLink::~RpcLink() = default;

std::unique_ptr<RpcLink> RpcLink::serve(uv_loop_t* loop, OwnFd fd,
                                        capnp::Capability::Client bootstrap,
                                        capnp::ReaderOptions options) {
  std::unique_ptr<RpcLink> link(
      new RpcLink(loop, std::move(fd), capnp::rpc::twoparty::Side::SERVER, options));
  link->rpc_ = kj::heap(capnp::makeRpcServer(link->network_, kj::mv(bootstrap)));
  return link;
}

std::unique_ptr<RpcLink> RpcLink::connect(uv_loop_t* loop, OwnFd fd,
                                          capnp::ReaderOptions options) {
  std::unique_ptr<RpcLink> link(
      new RpcLink(loop, std::move(fd), capnp::rpc::twoparty::Side::CLIENT, options));
  link->rpc_ = kj::heap(capnp::makeRpcClient(link->network_));
  return link;
}

capnp::Capability::Client RpcLink::bootstrapCap() {
  capnp::word scratch[4];
  memset(&scratch, 0, sizeof(scratch));
  capnp::MallocMessageBuilder message(scratch);
  auto vatId = message.getRoot<capnp::rpc::twoparty::VatId>();
  vatId.setSide(capnp::rpc::twoparty::Side::SERVER);
  return rpc_->bootstrap(vatId);
}

kj::Promise<void> RpcLink::onDisconnect() { return disconnected_.addBranch(); }

}  // namespace vsup::ipc
