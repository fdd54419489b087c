// The CUDA engine's speed on one GPU, each figure against a floor measured in the same run:
//   decode: tokens/s at batch 1, 8 and 64 of a bf16 model shaped like Llama 3 8B (dummy
//     weights), against (weight bytes + KV bytes read per step) / the device's copy bandwidth
//     (a device-to-device cudaMemcpy, which reads and writes every byte once);
//   prefill: tokens/s of a 2048-token prompt against cuBLAS alone on the same products.
// `build/bench/cuda_engine_bench [--layers N] [--context N] [--json]`; tests/gpu/run.sh runs it.
// Needs a GPU (exit 77 without one).
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "engine/cuda_backend.h"
#include "engine/weights.h"

using namespace vsup::engine;

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Device-to-device copy bandwidth (bytes read + written per second), the best of 5 1-GiB copies.
double copyBandwidth() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  cudaMemset(a, 1, bytes);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  float best = 1e30f;
  for (int i = 0; i < 5; ++i) {
    cudaEventRecord(start);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    best = std::min(best, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) / (double(best) / 1000.0);
}

// cuBLAS alone: the time of one prefill's products of `tokens` tokens (bf16 in, fp32 out).
double gemmSeconds(const LlamaConfig& c, int tokens) {
  cublasHandle_t h;
  cublasCreate(&h);
  const int64_t H = c.hiddenSize, hd = c.headDim;
  const int64_t qkv = (c.numHeads + 2 * c.numKvHeads) * hd, attn = c.numHeads * hd;
  struct Shape {
    int64_t out, in;
  };
  std::vector<Shape> shapes = {{qkv, H}, {H, attn}, {2 * c.intermediateSize, H},
                               {H, c.intermediateSize}};
  int64_t maxW = 0, maxX = 0, maxY = 0;
  for (auto s : shapes) {
    maxW = std::max(maxW, s.out * s.in);
    maxX = std::max(maxX, s.in * tokens);
    maxY = std::max(maxY, s.out * tokens);
  }
  void *w, *x, *y;
  cudaMalloc(&w, size_t(maxW) * 2);
  cudaMalloc(&x, size_t(maxX) * 2);
  cudaMalloc(&y, size_t(maxY) * 4);
  cudaMemset(w, 0, size_t(maxW) * 2);
  cudaMemset(x, 0, size_t(maxX) * 2);
  const float one = 1, zero = 0;
  auto layer = [&] {
    for (auto s : shapes) {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(s.out), tokens, int(s.in), &one, w,
                   CUDA_R_16BF, int(s.in), x, CUDA_R_16BF, int(s.in), &zero, y, CUDA_R_32F,
                   int(s.out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
  };
  layer();
  cudaDeviceSynchronize();
  double t0 = seconds();
  for (int64_t l = 0; l < c.numLayers; ++l) layer();
  cudaDeviceSynchronize();
  double t = seconds() - t0;
  cudaFree(w);
  cudaFree(x);
  cudaFree(y);
  cublasDestroy(h);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CUDA engine decode and prefill tokens/s against the device's floors"};
  int layers = 32, context = 1024;
  bool json = false;
  app.add_option("--layers", layers, "layers of the 8B-shaped model (fewer: a quicker run)")
      ->check(CLI::Range(1, 32));
  app.add_option("--context", context, "tokens already in each sequence's cache at decode")
      ->check(CLI::Range(16, 4096));
  app.add_flag("--json", json, "one JSON object instead of the table");
  CLI11_PARSE(app, argc, argv);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "SKIPPED: cuda_engine_bench needs an NVIDIA GPU\n");
    return 77;
  }
  LlamaConfig c;  // Llama 3 8B's shape
  c.hiddenSize = 4096;
  c.intermediateSize = 14336;
  c.numLayers = layers;
  c.numHeads = 32;
  c.numKvHeads = 8;
  c.headDim = 128;
  c.vocabSize = 128256;
  c.maxPositions = 8192;
  c.ropeTheta = 500000;
  const int blockSize = 16, maxBatch = 64;
  const int blocksPerSeq = (context + 64 + blockSize - 1) / blockSize;
  cuda::ShardSpec spec;
  spec.model = c;
  spec.shard = rankShard(c, 0, 1);
  spec.numBlocks = maxBatch * blocksPerSeq;
  spec.blockSize = blockSize;
  spec.maxPositions = c.maxPositions;
  spec.bf16 = true;
  auto weights = makeDummyWeights(0);
  double loadStart = seconds();
  std::unique_ptr<cuda::Shard> shard = makeCudaShard(spec, *weights);
  double loadS = seconds() - loadStart;
  const double bandwidth = copyBandwidth();
  // The bytes a decode step reads: every weight once, but of the (untied) embedding only the
  // batch's rows, which the floor leaves out.
  const double weightBytes = double(c.parameterCount() - c.vocabSize * c.hiddenSize) * 2;  // bf16
  const double kvBytesPerToken = double(2 * c.numLayers * c.numKvHeads * c.headDim * 2);

  std::vector<std::vector<int32_t>> tables(maxBatch);
  for (int s = 0; s < maxBatch; ++s) {
    for (int b = 0; b < blocksPerSeq; ++b) tables[size_t(s)].push_back(s * blocksPerSeq + b);
  }
  std::vector<int32_t> prompt(size_t(context), 17);
  std::vector<float> logits;
  std::vector<int32_t> argmax;
  // Every sequence's context, once (prefill in chunks of 8 sequences).
  for (int s0 = 0; s0 < maxBatch; s0 += 8) {
    std::vector<cuda::SeqInput> batch;
    for (int s = s0; s < s0 + 8; ++s) {
      cuda::SeqInput q;
      q.tokens = prompt.data();
      q.count = context;
      q.blockTable = tables[size_t(s)].data();
      q.blockCount = blocksPerSeq;
      batch.push_back(q);
    }
    shard->forward(batch, logits, argmax);
  }
  struct Row {
    int batch;
    double tokensPerS, floorTokensPerS;
  };
  std::vector<Row> rows;
  for (int batchSize : {1, 8, 64}) {
    const int steps = 32;
    std::vector<int32_t> token(1, 17);
    double best = 1e30;
    for (int run = 0; run < 2; ++run) {
      double t0 = seconds();
      for (int i = 0; i < steps; ++i) {
        std::vector<cuda::SeqInput> batch;
        for (int s = 0; s < batchSize; ++s) {
          cuda::SeqInput q;
          q.tokens = token.data();
          q.count = 1;
          q.startPos = context + i;  // the same positions in both runs: the cache is rewritten
          q.blockTable = tables[size_t(s)].data();
          q.blockCount = blocksPerSeq;
          q.wantLogits = true;
          q.greedy = true;
          batch.push_back(q);
        }
        shard->forward(batch, logits, argmax);
      }
      best = std::min(best, seconds() - t0);
    }
    const double stepS = best / steps;
    const double floorS =
        (weightBytes + kvBytesPerToken * batchSize * (context + steps / 2)) / bandwidth;
    rows.push_back({batchSize, batchSize / stepS, batchSize / floorS});
  }
  // Prefill: one 2048-token prompt.
  const int prefillTokens = 2048;
  std::vector<int32_t> longPrompt(size_t(prefillTokens), 23);
  std::vector<int32_t> longTable;
  for (int b = 0; b < (prefillTokens + blockSize - 1) / blockSize && b < spec.numBlocks; ++b) {
    longTable.push_back(b);
  }
  cuda::SeqInput p;
  p.tokens = longPrompt.data();
  p.count = prefillTokens;
  p.blockTable = longTable.data();
  p.blockCount = int32_t(longTable.size());
  p.wantLogits = true;
  p.greedy = true;
  shard->forward({p}, logits, argmax);  // warm
  double t0 = seconds();
  shard->forward({p}, logits, argmax);
  const double prefillS = seconds() - t0;
  const double gemmS = gemmSeconds(c, prefillTokens);

  if (json) {
    std::printf("{\"device_copy_GBps\": %.1f, \"load_s\": %.1f", bandwidth / 1e9, loadS);
    for (const Row& r : rows) {
      std::printf(", \"decode_b%d_tokens_per_s\": %.1f, \"decode_b%d_vs_floor\": %.3f", r.batch,
                  r.tokensPerS, r.batch, r.tokensPerS / r.floorTokensPerS);
    }
    std::printf(", \"prefill_%d_tokens_per_s\": %.1f, \"prefill_%d_vs_cublas\": %.3f}\n",
                prefillTokens, prefillTokens / prefillS, prefillTokens, gemmS / prefillS);
    return 0;
  }
  std::printf("cuda engine, Llama-3-8B-shaped bf16 dummy model (%d layers), context %d\n", layers,
              context);
  std::printf("device copy bandwidth %.0f GB/s; weights %.1f GB; load %.1f s\n", bandwidth / 1e9,
              weightBytes / 1e9, loadS);
  std::printf("%-22s %12s %12s %8s\n", "case", "tokens/s", "floor", "ratio");
  for (const Row& r : rows) {
    std::printf("decode batch %-9d %12.1f %12.1f %8.2f\n", r.batch, r.tokensPerS,
                r.floorTokensPerS, r.tokensPerS / r.floorTokensPerS);
  }
  std::printf("%-22s %12.1f %12.1f %8.2f\n", "prefill 2048 tokens", prefillTokens / prefillS,
              prefillTokens / gemmS, gemmS / prefillS);
  return 0;
}
