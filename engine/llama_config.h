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
  // Throws std::invalid_argument unless heads and the MLP width divide by `tp` and KV heads
  // divide by `tp` or `tp` by them (then KV heads are replicated across ranks).
  int64_t kvHeadsPerRank(uint32_t tp) const { return std::max<int64_t>(1, numKvHeads / tp); }
  void checkTensorParallel(uint32_t tp) const;
};

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

// Parses a Hugging Face config.json. Throws std::runtime_error naming `path` and the field.
LlamaConfig parseLlamaConfig(const std::string& path);

}  // namespace vsup::engine
