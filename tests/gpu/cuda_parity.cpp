// Parity of the CUDA engine with the CPU engine on the default preset's dummy weights: 16
// prompts, batched, then 32 greedy tokens each. fp32: the same tokens at every step and logits
// within 1e-4 of the row's scale; bf16 (fed the CPU's tokens): the same top-1 token at >= 98 %
// of the steps. Prints one line per dtype; exit 0 when both hold, 1 when one does not, 77 (skip)
// without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "engine/collective.h"
#include "engine/cuda_backend.h"
#include "engine/llama_model.h"
#include "engine/weights.h"
#include "kernels/cpu_kernels.h"

using namespace vsup::engine;

namespace {

constexpr int kPrompts = 16, kTokens = 32, kBlocksPerSeq = 6, kBlockSize = 16;

int argmaxOf(const float* row, int vocab) {
  std::vector<float> scratch;
  vsup::kernels::SamplingConfig greedy;
  greedy.temperature = 0;
  return vsup::kernels::sampleToken(row, vocab, greedy, 0, scratch);
}

struct Result {
  int steps = 0, sameTokens = 0;
  double worstLogitError = 0;  // max |cuda - cpu| / max |cpu| over a row
};

Result run(bool bf16) {
  ModelSource model = resolveModel(kDefaultModel, "dummy", false);
  const LlamaConfig& c = model.config;
  auto weights = makeDummyWeights(0);
  auto single = makeSingleRankCollective();
  KvCacheShape cache;
  cache.numBlocks = kPrompts * kBlocksPerSeq;
  cache.blockSize = kBlockSize;
  LlamaShard cpu(c, 0, 1, *weights, cache, *single, 2);

  cuda::ShardSpec spec;
  spec.model = c;
  spec.shard = rankShard(c, 0, 1);
  spec.numBlocks = cache.numBlocks;
  spec.blockSize = kBlockSize;
  spec.maxPositions = c.maxPositions;
  spec.bf16 = bf16;
  std::unique_ptr<cuda::Shard> gpu = makeCudaShard(spec, *weights);

  std::mt19937 rng(12345);
  std::vector<std::vector<int32_t>> seqs(kPrompts), tables(kPrompts);
  for (int s = 0; s < kPrompts; ++s) {
    int len = 5 + int(rng() % 36);
    for (int i = 0; i < len; ++i) seqs[size_t(s)].push_back(int32_t(rng() % 256));
    for (int b = 0; b < kBlocksPerSeq; ++b) tables[size_t(s)].push_back(s * kBlocksPerSeq + b);
  }
  Result r;
  const int vocab = int(c.vocabSize);
  std::vector<size_t> done(kPrompts, 0);  // tokens of each sequence already in the cache
  std::vector<float> cpuLogits, gpuLogits;
  std::vector<int32_t> argmax;
  for (int step = 0; step <= kTokens; ++step) {
    std::vector<LlamaShard::Seq> cb;
    std::vector<cuda::SeqInput> gb;
    for (int s = 0; s < kPrompts; ++s) {
      const auto& q = seqs[size_t(s)];
      LlamaShard::Seq a;
      a.tokens = q.data() + done[size_t(s)];
      a.count = int32_t(q.size() - done[size_t(s)]);
      a.startPos = int32_t(done[size_t(s)]);
      a.blockTable = tables[size_t(s)].data();
      a.blockCount = kBlocksPerSeq;
      a.wantLogits = true;
      cb.push_back(a);
      gb.push_back(a);  // not greedy: the GPU returns the logits rows too
    }
    cpu.forward(cb, cpuLogits);
    gpu->forward(gb, gpuLogits, argmax);
    for (int s = 0; s < kPrompts; ++s) {
      const float* a = &cpuLogits[size_t(s * vocab)];
      const float* b = &gpuLogits[size_t(s * vocab)];
      double scale = 0, diff = 0;
      for (int v = 0; v < vocab; ++v) {
        scale = std::max(scale, double(std::fabs(a[v])));
        diff = std::max(diff, double(std::fabs(a[v] - b[v])));
      }
      r.worstLogitError = std::max(r.worstLogitError, diff / std::max(scale, 1e-30));
      const int cpuToken = argmaxOf(a, vocab), gpuToken = argmaxOf(b, vocab);
      ++r.steps;
      r.sameTokens += cpuToken == gpuToken;
      done[size_t(s)] = seqs[size_t(s)].size();
      seqs[size_t(s)].push_back(cpuToken);  // both continue with the CPU's token
    }
  }
  return r;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "SKIPPED: cuda_parity needs an NVIDIA GPU, and there is none here\n");
    return 77;
  }
  bool ok = true;
  try {
    Result f = run(false);
    bool pass = f.sameTokens == f.steps && f.worstLogitError < 1e-4;
    std::printf("parity fp32  | same greedy token %d/%d | worst logit error %.2e of the row | %s\n",
                f.sameTokens, f.steps, f.worstLogitError, pass ? "PASS" : "FAIL");
    ok &= pass;
    Result b = run(true);
    double agree = double(b.sameTokens) / double(b.steps);
    pass = agree >= 0.98;
    std::printf("parity bf16  | same top-1 token %d/%d (%.1f %%) | worst logit error %.2e | %s\n",
                b.sameTokens, b.steps, 100 * agree, b.worstLogitError, pass ? "PASS" : "FAIL");
    ok &= pass;
  } catch (const std::exception& e) {
    std::printf("parity       | FAIL: %s\n", e.what());
    return 1;
  }
  return ok ? 0 : 1;
}
