// The boundary between the vsup executable and the CUDA engine's module (libvsup-cuda.so, the
// only code that links the CUDA runtime, cuBLAS and NCCL). The executable's CUDA backend
// (engine/cuda_backend.cpp) plans, reads the checkpoint and samples exactly as the CPU engine
// does; it dlopens the module in a rank only, so the root, engine-core and the API servers never
// load a CUDA library. The module holds one rank's shard on one GPU and computes a step's
// logits (or, for greedy rows, their argmax) on it.
//
// Both sides are built from this header by the same compiler in the same build: C++ types cross
// the boundary (exceptions included), the one C symbol being the factory.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/llama_config.h"
#include "engine/shard_weights.h"

namespace vsup::engine::cuda {

struct ShardSpec {
  LlamaConfig model;
  RankShard shard;
  uint32_t rank = 0;
  uint32_t tp = 1;
  // This node's ranks (across nodes: tp / nnodes) and this rank's place among them: which of
  // the node's GPUs it takes.
  uint32_t localRank = 0;
  uint32_t localRanks = 1;
  int32_t numBlocks = 0;  // the KV cache, per rank
  int32_t blockSize = 16;
  int64_t maxPositions = 0;  // the context length served (rotary tables)
  bool bf16 = true;          // else fp32 throughout
  std::string ncclUniqueId;  // TP > 1: the communicator every rank joins
  int64_t collectiveTimeoutMs = 10000;
  int64_t initTimeoutMs = 60000;  // the communicator's non-blocking init
  const std::atomic<bool>* cancel = nullptr;
  std::function<std::string()> deadPeer;  // a peer rank that has exited, or empty
};

// One sequence's part of a step (engine/shard_weights.h), greedy rows included.
using SeqInput = ShardSeq;

class Shard {
 public:
  // Ends the communicator (a finalize bounded by the collective timeout after a clean run, an
  // abort after a failure or cancel) and frees every allocation, stream, event and handle.
  virtual ~Shard() = default;
  // Loading, in any order, each part once: fp32 host vectors, converted to the dtype on upload.
  virtual void loadGlobals(const std::vector<float>& embedding, const std::vector<float>& lmHead,
                           const std::vector<float>& finalNorm) = 0;
  virtual void loadLayer(int64_t layer, const ShardLayerWeights& weights) = 0;
  // One step. For each SeqInput with wantLogits, in order: greedy ones get their argmax in
  // `argmax` (and no logits row), the others a row of vocab floats in `logits` (argmax -1).
  // Throws CollectiveError when the step cannot complete (a peer, a timeout, cancel, a CUDA
  // error), after which every call throws; std::invalid_argument for a sequence outside the
  // cache or the context.
  virtual void forward(const std::vector<SeqInput>& batch, std::vector<float>& logits,
                       std::vector<int32_t>& argmax) = 0;
  virtual int64_t deviceBytes() const = 0;  // what it allocated on the GPU
};

// The module's factory: selects the GPU, allocates the KV cache and joins the communicator.
// Throws std::runtime_error ("no CUDA device: ..." when there is none).
using MakeShardFn = Shard* (*)(const ShardSpec& spec);
inline constexpr const char* kMakeShardSymbol = "vsup_cuda_make_shard";

}  // namespace vsup::engine::cuda
