#include "engine/llama_model.h"

#include "engine/blas.h"
#include "engine/shard_weights.h"

#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>

namespace vsup::engine {
namespace {

// Batches up to this many tokens go through the batched gemv, which reads each weight once for
// the whole batch; larger ones through sgemm, whose packing then pays off. Measured on a 2-core
// Xeon (Sapphire Rapids class) with the step's matrices of vsup-tiny-25m: the batched gemv
// takes 0.4-0.5 of sgemm's time up to 64 tokens with the OpenBLAS kernels that DYNAMIC_ARCH
// picks there (Prescott), and crosses OpenBLAS's AVX-512 (SkylakeX) sgemm at about 32.
constexpr int64_t kBatchedGemvMaxTokens = 32;

// y[T, out] = x[T, in] · w[out, in]ᵀ, x rows `ldx` floats apart. Up to kBatchedGemvMaxTokens
// tokens, one token included: the batched gemv on the shard's threads (at one token it streams
// the weights at least as fast as sgemv); more: sgemm on OpenBLAS's.
void matmul(kernels::BatchedGemv& gemv, float* y, const float* x, int64_t T, int64_t ldx,
            const float* w, int64_t out, int64_t in) {
  if (T <= kBatchedGemvMaxTokens) {
    gemv.run(y, out, x, ldx, T, w, out, in);
  } else {
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(T), blasint(out), blasint(in),
                1.0f, x, blasint(ldx), w, blasint(in), 0.0f, y, blasint(out));
  }
}

}  // namespace

int64_t kvBytesPerBlock(const LlamaConfig& c, uint32_t tp, int32_t blockSize,
                        int64_t elementBytes) {
  return 2 * c.numLayers * int64_t(blockSize) * c.kvHeadsPerRank(tp) * c.headDim * elementBytes;
}

KvCacheLayout kvCacheLayout(const LlamaConfig& c, uint32_t tp, int32_t blockSize,
                            int32_t numBlocks) {
  KvCacheLayout l;
  l.layers = int32_t(c.numLayers);
  l.kvHeads = int32_t(c.kvHeadsPerRank(tp));
  l.headDim = int32_t(c.headDim);
  l.blockSize = blockSize;
  l.numBlocks = numBlocks;
  return l;
}

int32_t kvBlocksFor(const LlamaConfig& c, uint32_t tp, int32_t blockSize, int64_t budgetBytes,
                    int64_t elementBytes) {
  int64_t blocks = budgetBytes / kvBytesPerBlock(c, tp, blockSize, elementBytes);
  return int32_t(std::min<int64_t>(blocks, 1 << 30));
}

LlamaShard::LlamaShard(const LlamaConfig& config, uint32_t rank, uint32_t tp,
                       const WeightSource& weights, KvCacheShape cache, Collective& collective,
                       int threads)
    : config_(config), rank_(rank), tp_(tp), collective_(collective), cache_(cache),
      rope_(int(config.headDim), float(config.ropeTheta), int(config.maxPositions)) {
  gemv_ = std::make_unique<kernels::BatchedGemv>(threads);
  const LlamaConfig& c = config_;
  const RankShard s = rankShard(c, rank, tp);
  qHeads_ = s.qHeads;
  kvHeads_ = s.kvHeads;
  mlp_ = s.mlp;
  vocabShard_ = s.vocabShard;

  embed_ = loadEmbedding(c, weights);
  lmHead_ = loadLmHeadShard(c, s, weights);
  finalNorm_ = loadFinalNorm(c, weights);
  for (int64_t i = 0; i < c.numLayers; ++i) layers_.push_back(loadShardLayer(c, s, weights, i));

  layout_.blockSize = cache.blockSize;
  layout_.numKvHeads = int(kvHeads_);
  layout_.headDim = int(c.headDim);
  kvLayout_ = kvCacheLayout(c, tp, cache.blockSize, cache.numBlocks);
  if (cache.numBlocks > 0) {
    // Shared with this rank's KV agent when engine-core made a region; private otherwise.
    kvMap_ = KvCacheMapping(cache.regionFd, kvLayout_.totalBytes(),
                            cache.regionFd >= 0 ? "the KV cache region (fd " +
                                                      std::to_string(cache.regionFd) + ")"
                                                : std::string("the KV cache"));
    // Touch it now, with huge pages where the kernel allows: first-touch faults would otherwise
    // land in the first requests' steps.
    ::madvise(kvMap_.data(), size_t(kvLayout_.totalBytes()), MADV_HUGEPAGE);
    std::memset(kvMap_.data(), 0, size_t(kvLayout_.totalBytes()));
    kv_ = reinterpret_cast<float*>(kvMap_.data());
  }
}

LlamaShard::~LlamaShard() = default;

int64_t LlamaShard::weightBytes() const {
  size_t n = embed_.size() + lmHead_.size() + finalNorm_.size();
  for (const Layer& l : layers_) {
    n += l.inputNorm.size() + l.postNorm.size() + l.qkv.size() + l.o.size() + l.gateUp.size() +
         l.down.size();
  }
  return int64_t(n * sizeof(float));
}

void LlamaShard::forward(const std::vector<Seq>& batch, std::vector<float>& logits) {
  const LlamaConfig& c = config_;
  const int64_t H = c.hiddenSize, hd = c.headDim;
  const int64_t qkvDim = (qHeads_ + 2 * kvHeads_) * hd;
  const int64_t attnDim = qHeads_ * hd;

  // Where each token of the batch belongs.
  struct Token {
    const Seq* seq;
    int32_t pos;
  };
  std::vector<Token> tokens;
  int64_t wanted = 0;
  for (const Seq& s : batch) {
    checkShardInput(c, cache_.numBlocks, cache_.blockSize, s);
    for (int32_t i = 0; i < s.count; ++i) {
      tokens.push_back({&s, s.startPos + i});
    }
    if (s.wantLogits) ++wanted;
  }
  const int64_t T = int64_t(tokens.size());
  logits.assign(size_t(wanted * c.vocabSize), 0.0f);
  if (T == 0) return;

  x_.resize(size_t(T * H));
  h_.resize(size_t(T * H));
  qkvOut_.resize(size_t(T * qkvDim));
  attn_.resize(size_t(T * attnDim));
  proj_.resize(size_t(T * H));
  gu_.resize(size_t(T * 2 * mlp_));
  {
    int64_t t = 0;
    for (const Seq& s : batch) {
      for (int32_t i = 0; i < s.count; ++i, ++t) {
        std::memcpy(&x_[size_t(t * H)], &embed_[size_t(s.tokens[i]) * size_t(H)],
                    size_t(H) * sizeof(float));
      }
    }
  }
  const float scale = 1.0f / std::sqrt(float(hd));
  const size_t perCache = size_t(kvLayout_.planeElements());
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& l = layers_[li];
    float* kCache = kv_ + (2 * li) * perCache;
    float* vCache = kv_ + (2 * li + 1) * perCache;
    for (int64_t t = 0; t < T; ++t) {
      kernels::rmsNorm(&h_[size_t(t * H)], &x_[size_t(t * H)], l.inputNorm.data(), int(H),
                       float(c.rmsEps));
    }
    matmul(*gemv_, qkvOut_.data(), h_.data(), T, H, l.qkv.data(), qkvDim, H);
    // Every token's K/V first, so that attention of a prompt token sees its predecessors.
    for (int64_t t = 0; t < T; ++t) {
      float* q = &qkvOut_[size_t(t * qkvDim)];
      float* k = q + attnDim;
      float* v = k + kvHeads_ * hd;
      rope_.apply(q, int(qHeads_), tokens[size_t(t)].pos);
      rope_.apply(k, int(kvHeads_), tokens[size_t(t)].pos);
      kernels::writeKv(kCache, vCache, layout_, tokens[size_t(t)].seq->blockTable,
                       tokens[size_t(t)].pos, k, v);
    }
    // A run of prompt tokens: blocked matrix products; one query (decode): paged attention.
    {
      int64_t t = 0;
      for (const Seq& s : batch) {
        if (s.count > 1) {
          prefillAttention_.run(&attn_[size_t(t * attnDim)], attnDim, &qkvOut_[size_t(t * qkvDim)],
                                qkvDim, kCache, vCache, layout_, s.blockTable, s.startPos, s.count,
                                int(qHeads_), scale);
        } else {
          int32_t context = s.startPos + 1;
          if (scores_.size() < size_t(context)) scores_.resize(size_t(context));
          kernels::pagedAttention(&attn_[size_t(t * attnDim)], &qkvOut_[size_t(t * qkvDim)],
                                  kCache, vCache, layout_, s.blockTable, context, int(qHeads_),
                                  scale, scores_.data());
        }
        t += s.count;
      }
    }
    matmul(*gemv_, proj_.data(), attn_.data(), T, attnDim, l.o.data(), H, attnDim);
    collective_.allReduceSum(proj_.data(), size_t(T * H));
    kernels::addInPlace(x_.data(), proj_.data(), int(T * H));

    for (int64_t t = 0; t < T; ++t) {
      kernels::rmsNorm(&h_[size_t(t * H)], &x_[size_t(t * H)], l.postNorm.data(), int(H),
                       float(c.rmsEps));
    }
    matmul(*gemv_, gu_.data(), h_.data(), T, H, l.gateUp.data(), 2 * mlp_, H);
    for (int64_t t = 0; t < T; ++t) {
      float* row = &gu_[size_t(t * 2 * mlp_)];
      kernels::siluMul(row, row, row + mlp_, int(mlp_));
    }
    matmul(*gemv_, proj_.data(), gu_.data(), T, 2 * mlp_, l.down.data(), H, mlp_);
    collective_.allReduceSum(proj_.data(), size_t(T * H));
    kernels::addInPlace(x_.data(), proj_.data(), int(T * H));
  }
  if (wanted == 0) return;

  // The last token of each sequence that wants logits: final norm, this rank's vocabulary
  // slice, then every rank gathers the full rows.
  lastRows_.resize(size_t(wanted * H));
  {
    int64_t t = 0, row = 0;
    for (const Seq& s : batch) {
      t += s.count;
      if (!s.wantLogits) continue;
      kernels::rmsNorm(&lastRows_[size_t(row * H)], &x_[size_t((t - 1) * H)], finalNorm_.data(),
                       int(H), float(c.rmsEps));
      ++row;
    }
  }
  shardLogits_.resize(size_t(wanted * vocabShard_));
  matmul(*gemv_, shardLogits_.data(), lastRows_.data(), wanted, H, lmHead_.data(), vocabShard_,
         H);
  gathered_.resize(size_t(tp_) * shardLogits_.size());
  collective_.allGather(shardLogits_.data(), shardLogits_.size(), gathered_.data());
  for (int64_t s = 0; s < wanted; ++s) {
    for (uint32_t r = 0; r < tp_; ++r) {
      int64_t v0 = int64_t(r) * vocabShard_;
      int64_t n = std::min<int64_t>(vocabShard_, c.vocabSize - v0);
      if (n <= 0) continue;
      const float* from = &gathered_[size_t(r) * shardLogits_.size() + size_t(s * vocabShard_)];
      std::memcpy(&logits[size_t(s * c.vocabSize + v0)], from, size_t(n) * sizeof(float));
    }
  }
}

}  // namespace vsup::engine
