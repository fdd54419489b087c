// The CUDA engine's own kernels: everything in a Llama forward pass but the matrix products
// (cuBLAS) and the collectives (NCCL). Each launches on `stream` and returns at once; a launch
// error is left for the caller's next synchronisation (the step's completion event) to report.
//
// Activations and the residual stream are fp32; the inputs of the matrix products (norm outputs,
// attention and SwiGLU outputs) and the KV cache are in the engine's dtype: fp32 or bf16. The
// per-element math is device_math.h's, shared with the host so that it is tested on the CPU.
//
// Layouts: rows of `hidden` floats per token; qkv rows of qkvDim = (qHeads + 2 kvHeads) * headDim
// (q heads, then k, then v); the KV cache of one layer as [numBlocks * blockSize slots][kvHeads]
// [headDim], K and V separately, a token's slot being blockTable[pos / blockSize] * blockSize +
// pos % blockSize (the CPU engine's paged layout).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vsup::kernels::cuda {

enum class DType { F32, BF16 };

// headDim a multiple of 32, at most kMaxHeadDim: one warp holds a head in registers.
inline constexpr int kMaxHeadDim = 256;

// out[t][:] = embed[tokens[t]][:] as fp32 (embed [vocab][hidden] in `type`).
void embedGather(float* out, const void* embed, DType type, const int32_t* tokens, int tokensCount,
                 int hidden, cudaStream_t stream);

// For each row t: x[t] += add[t] (add may be null), then out[t] = rmsnorm(x[t]) * weight in
// `outType`, the mean square accumulated in double.
void addRmsNorm(float* x, const float* add, const float* weight, void* out, DType outType,
                int rows, int hidden, float eps, cudaStream_t stream);

// As addRmsNorm for rows rowIndex[r] of x and add only, out row r (the last token of each
// sampled sequence, after the last layer).
void rmsNormRows(float* x, const float* add, const int32_t* rowIndex, const float* weight,
                 void* out, DType outType, int rows, int hidden, float eps, cudaStream_t stream);

// Rotates the q and k heads of each token's qkv row in place at positions[t]; cosTable and
// sinTable are [maxPositions][headDim / 2].
void rotary(float* qkv, const int32_t* positions, const float* cosTable, const float* sinTable,
            int tokensCount, int qHeads, int kvHeads, int headDim, cudaStream_t stream);

// Writes each token's k and v (from its qkv row) at slots[t] of one layer's cache.
void writeKv(void* kCache, void* vCache, DType type, const float* qkv, const int32_t* slots,
             int tokensCount, int qHeads, int kvHeads, int headDim, cudaStream_t stream);

// Causal attention of every token's q heads over positions [0, positions[t]] of its sequence,
// whose block table starts at blockTables[tableOffsets[t]] (its own K and V already written).
// out is [tokens][qHeads * headDim] in `outType`. Grouped-query: q head h reads KV head
// h / (qHeads / kvHeads). One thread block per (token, head), its warps splitting the context
// and merging their online softmax states: decode and prefill alike. Tokens index the grid's x
// dimension in every kernel (2^31 - 1 of them); the other dimension stays far below 65535.
void pagedAttention(void* out, DType outType, const float* qkv, const void* kCache,
                    const void* vCache, DType kvType, const int32_t* positions,
                    const int32_t* blockTables, const int32_t* tableOffsets, int tokensCount,
                    int qHeads, int kvHeads, int headDim, int blockSize, float scale,
                    cudaStream_t stream);

// out[t][i] = silu(gateUp[t][i]) * gateUp[t][mlp + i], in `outType`.
void siluMul(void* out, DType outType, const float* gateUp, int tokensCount, int mlp,
             cudaStream_t stream);

// out[r] = the argmax of logits row r (`vocab` floats, rows `ld` apart) in greedy sampling's
// order (device_math.h).
void argmaxRows(int32_t* out, const float* logits, int rows, int vocab, int ld,
                cudaStream_t stream);

// The full-vocabulary logits from an all-gather of vocab-parallel shards: gathered is
// [tp][rows][vocabShard], out [rows][vocab] (the last shard's padding dropped).
void joinVocabShards(float* out, const float* gathered, int rows, int tp, int vocabShard,
                     int vocab, cudaStream_t stream);

}  // namespace vsup::kernels::cuda
