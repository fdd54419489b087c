// The CUDA backend (--engine cuda), the executable's half: the same models, plan, tokenizers,
// checkpoint reading and sampling as the CPU engine (so seeded output is reproducible across
// engines), with each rank's compute in the CUDA module (engine/cuda/cuda_shard.h), which only
// a rank loads.
#pragma once

#include <memory>

#include "engine/cuda/cuda_shard.h"
#include "engine/registry.h"
#include "engine/weights.h"

namespace vsup::engine {

// The registry's entry for "cuda" (in a build with nvcc: registry.cpp says whether).
const Backend& cudaBackend();

// One rank's shard from the CUDA module (loaded on first use, VSUP_CUDA_MODULE overriding where
// from), its weights read from `weights` one layer at a time (the host never holds more than a
// layer of fp32): what the backend's runner computes with, and what the GPU checks drive
// directly.
std::unique_ptr<cuda::Shard> makeCudaShard(const cuda::ShardSpec& spec, const WeightSource& weights);

}  // namespace vsup::engine
