// The CPU engine's own kernels (everything but the matrix products, which are BLAS): written as
// plain loops over contiguous fp32 that the compiler vectorizes. Pure functions of their inputs;
// no allocation except where a scratch buffer is passed in; safe from any thread.
#pragma once

#include <cstdint>
#include <vector>

namespace vsup::kernels {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * weight[i], i < n. `out` may be `x`.
void rmsNorm(float* out, const float* x, const float* weight, int n, float eps);

// out[i] += a[i].
void addInPlace(float* out, const float* a, int n);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). `out` may alias gate or up.
void siluMul(float* out, const float* gate, const float* up, int n);

// Rotary position embedding tables, the Hugging Face Llama ("rotate half") convention:
// inv_freq[j] = theta^(-2j/headDim), j < headDim/2; for position p, angle = p * inv_freq[j].
// The tables are computed in double and stored as float.
class RopeTable {
 public:
  // Throws std::invalid_argument unless headDim is even and positive, theta positive and
  // maxPositions non-negative.
  RopeTable(int headDim, float theta, int maxPositions);
  // Rotates `numHeads` consecutive vectors of headDim floats in place for position `pos`:
  // for j < headDim/2: (x[j], x[j+half]) -> (x[j]cos - x[j+half]sin, x[j+half]cos + x[j]sin).
  // Throws std::out_of_range unless 0 <= pos < maxPositions().
  void apply(float* heads, int numHeads, int pos) const;
  int headDim() const { return headDim_; }
  int maxPositions() const { return maxPositions_; }

 private:
  int headDim_;
  int maxPositions_;
  std::vector<float> cos_;  // [maxPositions][headDim/2]
  std::vector<float> sin_;
};

// Paged KV cache layout, per layer: kCache and vCache are each
// [numBlocks][blockSize][numKvHeads][headDim] floats. Token position p of a sequence lives in
// block blockTable[p / blockSize], slot p % blockSize.
struct PagedLayout {
  int blockSize = 16;
  int numKvHeads = 1;
  int headDim = 64;
};

// Writes one token's k and v ([numKvHeads][headDim] each) at position `pos`.
void writeKv(float* kCache, float* vCache, const PagedLayout& layout, const int32_t* blockTable,
             int pos, const float* k, const float* v);

// Causal attention of one query token over positions [0, contextLen) of its sequence (its own
// k/v already written at contextLen-1). q and out are [numHeads][headDim], and must not overlap;
// grouped-query attention: query head h uses kv head h / (numHeads / numKvHeads), numHeads a
// multiple of numKvHeads. scale = 1/sqrt(headDim). `scratch` holds at least contextLen floats
// (the current implementation does not use it: its online softmax needs about 18 KiB of stack).
// Softmax is computed stably (max subtracted). contextLen 0 gives zeros.
void pagedAttention(float* out, const float* q, const float* kCache, const float* vCache,
                    const PagedLayout& layout, const int32_t* blockTable, int contextLen,
                    int numHeads, float scale, float* scratch);

// Sampling of one token from full-vocabulary logits. Deterministic: the same logits, params and
// (seed, position) always give the same token, on every rank and after a recompute.
struct SamplingConfig {
  float temperature = 1.0f;  // 0: greedy (argmax, lowest index wins a tie)
  int topK = 0;              // <= 0: off
  float topP = 1.0f;         // (0, 1]; 1: off
  uint64_t seed = 0;
};
// `position` is the index in the sequence of the token being sampled; the uniform draw is a
// hash of (seed, position). Order: temperature, then top-k, then top-p (smallest set whose
// probability reaches topP, always at least one token), then one draw. Candidates are ranked by
// (logit descending, index ascending), so ties at a top-k or top-p boundary go to the lowest
// indices. NaN logits count as -inf; a temperature <= 0 (or NaN) is greedy; if any logit is +inf
// the lowest such index is returned, if none is above -inf, index 0. `scratch` is reused
// between calls to avoid allocation (it grows to at most vocab + vocab/1024 + 1 floats).
int32_t sampleToken(const float* logits, int vocab, const SamplingConfig& config,
                    uint64_t position, std::vector<float>& scratch);

}  // namespace vsup::kernels
