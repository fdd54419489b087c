#include "kernels/cuda/cuda_kernels.h"

#include <cuda_bf16.h>

#include "kernels/cuda/device_math.h"

namespace vsup::kernels::cuda {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);  // round to nearest even, as floatToBf16 on the host
}

__device__ __forceinline__ float warpSum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warpSum(double v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of every thread's `v` in a block of at most 1024 threads, on every thread.
__device__ double blockSum(double v) {
  __shared__ double partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warpSum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  double total = 0;
  for (int w = 0; w < warps; ++w) total += partial[w];
  __syncthreads();  // partial may be reused by the next call
  return total;
}

unsigned blocksFor(size_t n, unsigned threads) { return unsigned((n + threads - 1) / threads); }

template <typename T>
__global__ void embedGatherKernel(float* out, const T* embed, const int32_t* tokens, int hidden) {
  const int t = blockIdx.x;  // tokens on x: up to 2^31 - 1 of them
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= hidden) return;
  out[size_t(t) * hidden + i] = toFloat(embed[size_t(tokens[t]) * hidden + i]);
}

template <typename Out>
__global__ void rmsNormKernel(float* x, const float* add, const int32_t* rowIndex,
                              const float* weight, Out* out, int hidden, float eps) {
  const int r = blockIdx.x;
  const size_t from = size_t(rowIndex != nullptr ? rowIndex[r] : r) * hidden;
  float* row = x + from;
  const float* addRow = add != nullptr ? add + from : nullptr;
  double sum = 0;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = row[i];
    if (addRow != nullptr) {
      v += addRow[i];
      row[i] = v;
    }
    sum += double(v) * v;
  }
  const float inv = rmsInverse(blockSum(sum), hidden, eps);
  Out* o = out + size_t(r) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = fromFloat<Out>(row[i] * inv * weight[i]);
}

__global__ void rotaryKernel(float* qkv, const int32_t* positions, const float* cosTable,
                             const float* sinTable, int qHeads, int kvHeads, int headDim) {
  const int t = blockIdx.x;
  const int half = headDim / 2;
  const int qkvDim = (qHeads + 2 * kvHeads) * headDim;
  const int pairs = (qHeads + kvHeads) * half;  // q and k heads; v is not rotated
  const size_t table = size_t(positions[t]) * half;
  float* row = qkv + size_t(t) * qkvDim;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int head = p / half, j = p % half;
    float* lo = row + size_t(head) * headDim + j;
    ropeRotate(lo[0], lo[half], cosTable[table + j], sinTable[table + j]);
  }
}

template <typename T>
__global__ void writeKvKernel(T* kCache, T* vCache, const float* qkv, const int32_t* slots,
                              int qHeads, int kvHeads, int headDim) {
  const int t = blockIdx.x;
  const int width = kvHeads * headDim;
  const int qkvDim = (qHeads + 2 * kvHeads) * headDim;
  const float* k = qkv + size_t(t) * qkvDim + size_t(qHeads) * headDim;
  const float* v = k + width;
  const size_t at = size_t(slots[t]) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    kCache[at + i] = fromFloat<T>(k[i]);
    vCache[at + i] = fromFloat<T>(v[i]);
  }
}

constexpr int kAttnWarps = 4;
constexpr int kPerLane = kMaxHeadDim / kWarp;

// One block per (head, token); warp w takes positions w, w + kAttnWarps, ...; lane l holds
// elements l, l + 32, ... of the head.
template <typename KV, typename Out>
__global__ void __launch_bounds__(kAttnWarps * kWarp)
    pagedAttentionKernel(Out* out, const float* qkv, const KV* kCache, const KV* vCache,
                         const int32_t* positions, const int32_t* blockTables,
                         const int32_t* tableOffsets, int qHeads, int kvHeads, int headDim,
                         int blockSize, float scale) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int per = headDim / kWarp;
  const int kvh = h / (qHeads / kvHeads);
  const int qkvDim = (qHeads + 2 * kvHeads) * headDim;
  const size_t rowWidth = size_t(kvHeads) * headDim;
  const int32_t* table = blockTables + tableOffsets[t];
  const int contextLen = positions[t] + 1;

  float q[kPerLane], acc[kPerLane];
  const float* qRow = qkv + size_t(t) * qkvDim + size_t(h) * headDim;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    q[e] = e < per ? qRow[e * kWarp + lane] : 0.0f;
    acc[e] = 0.0f;
  }
  SoftmaxState state = softmaxStart();
  for (int p = warp; p < contextLen; p += kAttnWarps) {
    const size_t at = (size_t(table[p / blockSize]) * blockSize + p % blockSize) * rowWidth +
                      size_t(kvh) * headDim;
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      if (e < per) dot += q[e] * toFloat(kCache[at + e * kWarp + lane]);
    }
    dot = warpSum(dot);
    const SoftmaxStep s = softmaxPush(state, dot * scale);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      if (e < per) acc[e] = acc[e] * s.rescale + s.weight * toFloat(vCache[at + e * kWarp + lane]);
    }
  }

  __shared__ float shM[kAttnWarps], shL[kAttnWarps];
  __shared__ float shAcc[kAttnWarps][kMaxHeadDim];
  if (lane == 0) {
    shM[warp] = state.m;
    shL[warp] = state.l;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    if (e < per) shAcc[warp][e * kWarp + lane] = acc[e];
  }
  __syncthreads();
  if (warp != 0) return;
  SoftmaxState merged{shM[0], shL[0]};
  float scaleOf[kAttnWarps];
  scaleOf[0] = 1.0f;
  for (int w = 1; w < kAttnWarps; ++w) {
    const SoftmaxMerge m = softmaxMerge(merged, SoftmaxState{shM[w], shL[w]});
    for (int v = 0; v < w; ++v) scaleOf[v] *= m.scaleA;
    scaleOf[w] = m.scaleB;
  }
  Out* o = out + (size_t(t) * qHeads + h) * headDim;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    if (e >= per) continue;
    const int i = e * kWarp + lane;
    float sum = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) sum += shAcc[w][i] * scaleOf[w];
    o[i] = fromFloat<Out>(sum / merged.l);
  }
}

template <typename Out>
__global__ void siluMulKernel(Out* out, const float* gateUp, int mlp) {
  const int t = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= mlp) return;
  const float* row = gateUp + size_t(t) * 2 * mlp;
  out[size_t(t) * mlp + i] = fromFloat<Out>(siluMul(row[i], row[mlp + i]));
}

__global__ void argmaxKernel(int32_t* out, const float* logits, int vocab, int ld) {
  const float* row = logits + size_t(blockIdx.x) * ld;
  float bestKey = -infinity();
  int bestIndex = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float k = argmaxKey(row[i]);
    if (argmaxBetter(k, i, bestKey, bestIndex)) {
      bestKey = k;
      bestIndex = i;
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float k = __shfl_xor_sync(0xffffffffu, bestKey, o);
    const int i = __shfl_xor_sync(0xffffffffu, bestIndex, o);
    if (argmaxBetter(k, i, bestKey, bestIndex)) {
      bestKey = k;
      bestIndex = i;
    }
  }
  __shared__ float keys[kWarp];
  __shared__ int indices[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    keys[warp] = bestKey;
    indices[warp] = bestIndex;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  for (int w = 1; w < warps; ++w) {
    if (argmaxBetter(keys[w], indices[w], keys[0], indices[0])) {
      keys[0] = keys[w];
      indices[0] = indices[w];
    }
  }
  // No logit above -inf (or all NaN): index 0, as kernels::sampleToken.
  out[blockIdx.x] = indices[0] < vocab ? indices[0] : 0;
}

__global__ void joinVocabShardsKernel(float* out, const float* gathered, int rows, int vocabShard,
                                      int vocab) {
  const int r = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= vocab) return;
  const int shard = i / vocabShard, j = i % vocabShard;
  out[size_t(r) * vocab + i] = gathered[(size_t(shard) * rows + r) * vocabShard + j];
}

}  // namespace

void embedGather(float* out, const void* embed, DType type, const int32_t* tokens, int count,
                 int hidden, cudaStream_t stream) {
  if (count == 0) return;
  dim3 grid(unsigned(count), blocksFor(size_t(hidden), 256));
  if (type == DType::BF16) {
    embedGatherKernel<<<grid, 256, 0, stream>>>(out, static_cast<const __nv_bfloat16*>(embed),
                                                tokens, hidden);
  } else {
    embedGatherKernel<<<grid, 256, 0, stream>>>(out, static_cast<const float*>(embed), tokens,
                                                hidden);
  }
}

void addRmsNorm(float* x, const float* add, const float* weight, void* out, DType outType,
                int rows, int hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  if (outType == DType::BF16) {
    rmsNormKernel<<<rows, 256, 0, stream>>>(x, add, nullptr, weight,
                                            static_cast<__nv_bfloat16*>(out), hidden, eps);
  } else {
    rmsNormKernel<<<rows, 256, 0, stream>>>(x, add, nullptr, weight, static_cast<float*>(out),
                                            hidden, eps);
  }
}

void rmsNormRows(float* x, const float* add, const int32_t* rowIndex, const float* weight,
                 void* out, DType outType, int rows, int hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  if (outType == DType::BF16) {
    rmsNormKernel<<<rows, 256, 0, stream>>>(x, add, rowIndex, weight,
                                            static_cast<__nv_bfloat16*>(out), hidden, eps);
  } else {
    rmsNormKernel<<<rows, 256, 0, stream>>>(x, add, rowIndex, weight, static_cast<float*>(out),
                                            hidden, eps);
  }
}

void rotary(float* qkv, const int32_t* positions, const float* cosTable, const float* sinTable,
            int count, int qHeads, int kvHeads, int headDim, cudaStream_t stream) {
  if (count == 0) return;
  rotaryKernel<<<count, 128, 0, stream>>>(qkv, positions, cosTable, sinTable, qHeads, kvHeads,
                                          headDim);
}

void writeKv(void* kCache, void* vCache, DType type, const float* qkv, const int32_t* slots,
             int count, int qHeads, int kvHeads, int headDim, cudaStream_t stream) {
  if (count == 0) return;
  if (type == DType::BF16) {
    writeKvKernel<<<count, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(kCache),
                                             static_cast<__nv_bfloat16*>(vCache), qkv, slots,
                                             qHeads, kvHeads, headDim);
  } else {
    writeKvKernel<<<count, 256, 0, stream>>>(static_cast<float*>(kCache),
                                             static_cast<float*>(vCache), qkv, slots, qHeads,
                                             kvHeads, headDim);
  }
}

void pagedAttention(void* out, DType outType, const float* qkv, const void* kCache,
                    const void* vCache, DType kvType, const int32_t* positions,
                    const int32_t* blockTables, const int32_t* tableOffsets, int count,
                    int qHeads, int kvHeads, int headDim, int blockSize, float scale,
                    cudaStream_t stream) {
  if (count == 0) return;
  dim3 grid{unsigned(count), unsigned(qHeads)};
  const unsigned threads = kAttnWarps * kWarp;
  if (kvType == DType::BF16 && outType == DType::BF16) {
    pagedAttentionKernel<<<grid, threads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(out), qkv, static_cast<const __nv_bfloat16*>(kCache),
        static_cast<const __nv_bfloat16*>(vCache), positions, blockTables, tableOffsets, qHeads,
        kvHeads, headDim, blockSize, scale);
  } else if (kvType == DType::F32 && outType == DType::F32) {
    pagedAttentionKernel<<<grid, threads, 0, stream>>>(
        static_cast<float*>(out), qkv, static_cast<const float*>(kCache),
        static_cast<const float*>(vCache), positions, blockTables, tableOffsets, qHeads, kvHeads,
        headDim, blockSize, scale);
  }
  // Mixed types are not an engine configuration (one dtype for the cache and the products).
}

void siluMul(void* out, DType outType, const float* gateUp, int count, int mlp,
             cudaStream_t stream) {
  if (count == 0) return;
  dim3 grid(unsigned(count), blocksFor(size_t(mlp), 256));
  if (outType == DType::BF16) {
    siluMulKernel<<<grid, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(out), gateUp, mlp);
  } else {
    siluMulKernel<<<grid, 256, 0, stream>>>(static_cast<float*>(out), gateUp, mlp);
  }
}

void argmaxRows(int32_t* out, const float* logits, int rows, int vocab, int ld,
                cudaStream_t stream) {
  if (rows == 0) return;
  argmaxKernel<<<rows, 1024, 0, stream>>>(out, logits, vocab, ld);
}

void joinVocabShards(float* out, const float* gathered, int rows, int tp, int vocabShard,
                     int vocab, cudaStream_t stream) {
  if (rows == 0) return;
  static_cast<void>(tp);  // implied by vocab and vocabShard
  dim3 grid(unsigned(rows), blocksFor(size_t(vocab), 256));
  joinVocabShardsKernel<<<grid, 256, 0, stream>>>(out, gathered, rows, vocabShard, vocab);
}

}  // namespace vsup::kernels::cuda
