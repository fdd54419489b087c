// NCCL with one rank, through the CUDA engine's guard and device (engine/comm_guard.h,
// engine/cuda/nccl_device.h): a non-blocking init, an all-reduce, finalize and destroy; and an
// init followed by an abort. Skips without a GPU (gpu_main.cpp).
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <vector>

#include "engine/comm_guard.h"
#include "engine/cuda/nccl_device.h"

using vsup::engine::CommGuard;
using vsup::engine::CommGuardOptions;
using vsup::engine::cuda::NcclDevice;

namespace {

void initOneRank(NcclDevice& d, CommGuard& g) {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&d.comm, 1, id, 0, &config);
  REQUIRE((r == ncclSuccess || r == ncclInProgress));
  g.awaitInit(30000);
}

}  // namespace

TEST_CASE("one rank: init, an all-reduce through the guard, finalize, destroy") {
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  cudaStream_t stream;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  NcclDevice d;
  REQUIRE(cudaEventCreateWithFlags(&d.done, cudaEventDisableTiming) == cudaSuccess);
  {
    CommGuard g(d, CommGuardOptions{});
    initOneRank(d, g);
    std::vector<float> host(1 << 16, 1.5f);
    float* data = nullptr;
    REQUIRE(cudaMalloc(&data, host.size() * 4) == cudaSuccess);
    REQUIRE(cudaMemcpy(data, host.data(), host.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    ncclResult_t r = ncclAllReduce(data, data, host.size(), ncclFloat32, ncclSum, d.comm, stream);
    if (r == ncclInProgress) g.awaitComm();
    else REQUIRE(r == ncclSuccess);
    REQUIRE(cudaEventRecord(d.done, stream) == cudaSuccess);
    g.awaitStep();
    REQUIRE(cudaMemcpy(host.data(), data, host.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(host.front() == 1.5f);  // one rank: the sum of one
    CHECK(host.back() == 1.5f);
    g.finalize();
    CHECK(g.closed());
    CHECK_FALSE(g.broken());
    CHECK(d.comm == nullptr);  // destroyed
    cudaFree(data);
  }
  cudaEventDestroy(d.done);
  cudaStreamDestroy(stream);
}

TEST_CASE("one rank: init, then abort") {
  NcclDevice d;
  {
    CommGuard g(d, CommGuardOptions{});
    initOneRank(d, g);
    CHECK(d.comm != nullptr);
  }  // neither finalized nor failed: the guard's destructor aborts
  CHECK(d.comm == nullptr);
}
