// What model the CPU engine serves: the Llama architecture's hyper-parameters (from a Hugging
// Face config.json or a built-in preset), where its tokenizer and weights come from, and how its
// chat prompts are written. Resolved the same way in engine-core (which needs the tokenizer and
// the context length) and in every worker (which needs the weights).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/prompt.h"

namespace vsup::engine {

// The largest values parseLlamaConfig accepts, each far above any real checkpoint's (the
// largest Llama models have hidden_size 16384, 126 layers, 128 heads, a 256k vocabulary): a
// value past one is a corrupt file or a typo, refused naming the field.
inline constexpr int64_t kMaxHiddenSize = int64_t(1) << 16;
inline constexpr int64_t kMaxIntermediateSize = int64_t(1) << 20;
inline constexpr int64_t kMaxLayers = 1024;
inline constexpr int64_t kMaxHeads = 1024;  // attention and key/value heads
inline constexpr int64_t kMaxHeadDim = 1024;
inline constexpr int64_t kMaxVocabSize = int64_t(1) << 24;
inline constexpr int64_t kMaxPositions = int64_t(1) << 24;  // as --max-model-len's bound

// One tensor a checkpoint must hold, with its shape ([rows, cols], or [n]).
struct TensorShape {
  std::string name;
  std::vector<int64_t> shape;
};

struct LlamaConfig {
  int64_t hiddenSize = 0;
  int64_t intermediateSize = 0;
  int64_t numLayers = 0;
  int64_t numHeads = 0;
  int64_t numKvHeads = 0;
  int64_t headDim = 0;
  int64_t vocabSize = 0;
  int64_t maxPositions = 0;  // the context length: prompt + generated tokens
  double rmsEps = 1e-5;
  double ropeTheta = 10000;
  bool tieEmbeddings = false;
  std::vector<int32_t> eosTokenIds;

  int64_t parameterCount() const;
  // The bytes one rank of the CPU engine holds for this model at `tp` ranks: its fp32 shard of
  // the weights (the embedding whole, the rest split) and its rotary table. The KV cache
  // (--kv-cache-memory) comes on top.
  int64_t rankWeightBytes(uint32_t tp) const;
  // Every tensor a Hugging Face Llama checkpoint of this configuration holds, with its shape
  // (lm_head.weight only without tie_word_embeddings): what the ranks will read, so that a
  // checkpoint can be checked against the config before any rank starts.
  std::vector<TensorShape> checkpointTensors() const;
  // Throws std::invalid_argument unless heads and the MLP width divide by `tp` and KV heads
  // divide by `tp` or `tp` by them (then KV heads are replicated across ranks).
  int64_t kvHeadsPerRank(uint32_t tp) const { return std::max<int64_t>(1, numKvHeads / tp); }
  void checkTensorParallel(uint32_t tp) const;
  // The output projection's tensor: lm_head.weight, or the embedding when they are tied.
  std::string lmHeadTensor() const {
    return tieEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  }
};

// The Megatron split of a Llama model over `tp` ranks, as rank `rank` holds it: the one plan
// every backend loads its shard by (LlamaShard on the CPU, the CUDA engine's shard on a GPU).
// q/k/v and gate/up are column-parallel (rows of the [out, in] checkpoint tensors), o and down
// row-parallel (columns), the embedding replicated, lm_head vocab-parallel with the last shard
// padded with zero rows to vocabShard. Ranges are [begin, end) rows or columns of the tensors.
struct RankShard {
  int64_t qHeads = 0, kvHeads = 0, mlp = 0, vocabShard = 0;
  int64_t qBegin = 0, qEnd = 0;      // rows of q_proj, columns of o_proj
  int64_t kvBegin = 0, kvEnd = 0;    // rows of k_proj and v_proj
  int64_t mlpBegin = 0, mlpEnd = 0;  // rows of gate_proj and up_proj, columns of down_proj
  int64_t vocabBegin = 0, vocabEnd = 0;  // rows of lm_head (vocabEnd - vocabBegin <= vocabShard)
};
// Throws as checkTensorParallel(), and std::invalid_argument unless rank < tp.
RankShard rankShard(const LlamaConfig& config, uint32_t rank, uint32_t tp);

struct ModelSource {
  std::string name;       // the preset's name or the directory, as given to --model
  std::string directory;  // empty for a preset
  LlamaConfig config;
  std::string tokenizerPath;  // tokenizer.json; empty: the byte tokenizer (presets)
  bool dummyWeights = true;   // seeded weights; false: the directory's safetensors
  ChatFormat chatFormat = ChatFormat::Plain;
  std::string chatFormatNote;  // why the format was chosen, when the model's own was not usable
};

// The built-in presets (`vsup run` serves the first one by default): small Llama configs with a
// byte tokenizer and seeded weights, so real computation runs offline.
constexpr const char* kDefaultModel = "vsup-tiny-25m";
std::vector<std::string> presetNames();

// Resolves --model and --load-format ("auto", "dummy" or "safetensors"). A directory must hold a
// config.json for a supported architecture (LlamaForCausalLM) and a tokenizer.json. Throws
// std::runtime_error naming the file and the problem; an unknown name lists the presets.
// Without needTokenizer a directory may lack tokenizer.json (tools that feed token ids).
ModelSource resolveModel(const std::string& model, const std::string& loadFormat,
                         bool needTokenizer = true);

// Parses a Hugging Face config.json. Throws std::runtime_error naming `path` and the field (a
// missing or non-positive size, one past its kMax… bound, an architecture or feature vsup does
// not run).
LlamaConfig parseLlamaConfig(const std::string& path);

}  // namespace vsup::engine
