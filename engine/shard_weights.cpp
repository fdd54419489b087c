#include "engine/shard_weights.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vsup::engine {
namespace {

std::vector<float> load(const WeightSource& weights, const std::string& name,
                        std::vector<int64_t> shape, TensorSlice slice) {
  std::vector<float> out(size_t(slice.rows() * slice.cols()));
  weights.read(name, shape, slice, out.data());
  return out;
}

std::vector<float> loadVector(const WeightSource& weights, const std::string& name, int64_t n) {
  return load(weights, name, {n}, TensorSlice{0, 1, 0, n});
}

std::vector<float> loadRows(const WeightSource& weights, const std::string& name, int64_t rows,
                            int64_t cols, int64_t begin, int64_t end) {
  return load(weights, name, {rows, cols}, TensorSlice{begin, end, 0, cols});
}

std::vector<float> loadCols(const WeightSource& weights, const std::string& name, int64_t rows,
                            int64_t cols, int64_t begin, int64_t end) {
  return load(weights, name, {rows, cols}, TensorSlice{0, rows, begin, end});
}

void append(std::vector<float>& to, const std::vector<float>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

}  // namespace

ShardLayerWeights loadShardLayer(const LlamaConfig& c, const RankShard& s,
                                 const WeightSource& weights, int64_t layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const int64_t H = c.hiddenSize, hd = c.headDim;
  ShardLayerWeights l;
  l.inputNorm = loadVector(weights, p + "input_layernorm.weight", H);
  l.postNorm = loadVector(weights, p + "post_attention_layernorm.weight", H);
  l.qkv = loadRows(weights, p + "self_attn.q_proj.weight", c.numHeads * hd, H, s.qBegin, s.qEnd);
  append(l.qkv, loadRows(weights, p + "self_attn.k_proj.weight", c.numKvHeads * hd, H, s.kvBegin,
                         s.kvEnd));
  append(l.qkv, loadRows(weights, p + "self_attn.v_proj.weight", c.numKvHeads * hd, H, s.kvBegin,
                         s.kvEnd));
  l.o = loadCols(weights, p + "self_attn.o_proj.weight", H, c.numHeads * hd, s.qBegin, s.qEnd);
  l.gateUp = loadRows(weights, p + "mlp.gate_proj.weight", c.intermediateSize, H, s.mlpBegin,
                      s.mlpEnd);
  append(l.gateUp, loadRows(weights, p + "mlp.up_proj.weight", c.intermediateSize, H, s.mlpBegin,
                            s.mlpEnd));
  l.down = loadCols(weights, p + "mlp.down_proj.weight", H, c.intermediateSize, s.mlpBegin,
                    s.mlpEnd);
  return l;
}

std::vector<float> loadEmbedding(const LlamaConfig& c, const WeightSource& weights) {
  return loadRows(weights, "model.embed_tokens.weight", c.vocabSize, c.hiddenSize, 0,
                  c.vocabSize);
}

std::vector<float> loadLmHeadShard(const LlamaConfig& c, const RankShard& s,
                                   const WeightSource& weights) {
  std::vector<float> out(size_t(s.vocabShard * c.hiddenSize), 0.0f);
  if (s.vocabEnd > s.vocabBegin) {
    auto rows = loadRows(weights, c.lmHeadTensor(), c.vocabSize, c.hiddenSize, s.vocabBegin,
                         s.vocabEnd);
    std::copy(rows.begin(), rows.end(), out.begin());
  }
  return out;
}

std::vector<float> loadFinalNorm(const LlamaConfig& c, const WeightSource& weights) {
  return loadVector(weights, "model.norm.weight", c.hiddenSize);
}

ShardSeq shardSeqOf(const SeqStep& q) {
  ShardSeq s;
  s.tokens = q.tokens.data();
  s.count = int32_t(q.tokens.size());
  s.startPos = int32_t(q.startPos);
  s.blockTable = q.blockTable.data();
  s.blockCount = int32_t(q.blockTable.size());
  s.wantLogits = q.sample;
  s.greedy = !(q.temperature > 0.0) || q.topK == 1;
  return s;
}

kernels::SamplingConfig samplingOf(const SeqStep& q) {
  kernels::SamplingConfig c;
  c.temperature = float(q.temperature);
  c.topK = q.topK;
  c.topP = float(q.topP);
  c.seed = q.seed;
  return c;
}

void checkShardInput(const LlamaConfig& c, int32_t numBlocks, int32_t blockSize,
                     const ShardSeq& seq) {
  const int32_t* tokens = seq.tokens;
  const int32_t count = seq.count, startPos = seq.startPos, blockCount = seq.blockCount;
  const int32_t* blockTable = seq.blockTable;
  if (count <= 0) throw std::invalid_argument("a sequence in the batch has no tokens");
  int64_t end = int64_t(startPos) + count;
  if (startPos < 0 || end > c.maxPositions) {
    throw std::invalid_argument("positions " + std::to_string(startPos) + ".." +
                                std::to_string(end - 1) + " exceed the context (" +
                                std::to_string(c.maxPositions) + ")");
  }
  if (end > int64_t(blockCount) * blockSize) {
    throw std::invalid_argument("block table of " + std::to_string(blockCount) +
                                " blocks does not cover position " + std::to_string(end - 1));
  }
  for (int32_t b = 0; b < blockCount; ++b) {
    if (blockTable[b] < 0 || blockTable[b] >= numBlocks) {
      throw std::invalid_argument("block " + std::to_string(blockTable[b]) +
                                  " is outside the KV cache (" + std::to_string(numBlocks) +
                                  " blocks)");
    }
  }
  for (int32_t i = 0; i < count; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocabSize) {
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) +
                                  " is outside the vocabulary");
    }
  }
}

}  // namespace vsup::engine
