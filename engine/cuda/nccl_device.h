// The CommGuard's view (engine/comm_guard.h) of one GPU stream and one NCCL communicator: what
// the CUDA engine's shard waits on, and what the GPU suite's NCCL check drives directly.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "engine/comm_guard.h"

namespace vsup::engine::cuda {

class NcclDevice final : public CommDevice {
 public:
  ncclComm_t comm = nullptr;   // null at TP 1: no communicator, always Done
  cudaEvent_t done = nullptr;  // the current step's completion

  State commState(std::string& why) override {
    if (comm == nullptr) return State::Done;
    ncclResult_t r = ncclSuccess;
    ncclResult_t q = ncclCommGetAsyncError(comm, &r);
    if (q != ncclSuccess) r = q;
    if (r == ncclSuccess) return State::Done;
    if (r == ncclInProgress) return State::Pending;
    why = std::string(ncclGetErrorString(r));
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') why += ": " + std::string(last);
    return State::Failed;
  }
  State workState(std::string& why) override {
    if (done == nullptr) return State::Done;
    cudaError_t e = cudaEventQuery(done);
    if (e == cudaSuccess) return State::Done;
    if (e == cudaErrorNotReady) return State::Pending;
    why = std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
    return State::Failed;
  }
  void finalize() override {
    if (comm != nullptr) ncclCommFinalize(comm);
  }
  void destroy() override {
    if (comm != nullptr) ncclCommDestroy(comm);
    comm = nullptr;
  }
  void abort() override {
    if (comm != nullptr) ncclCommAbort(comm);
    comm = nullptr;
  }
};

}  // namespace vsup::engine::cuda
