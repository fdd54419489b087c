#include "engine/llama_config.h"

#include <sys/stat.h>

#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace vsup::engine {
namespace {

using nlohmann::json;

bool isDirectory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool isFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

json readJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot be read");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
}

// A positive integer of at most `most`: the bound is far above any real checkpoint's (so a
// typo or a corrupt file is refused here, naming the field, rather than as an allocation of
// terabytes in a rank).
int64_t positiveInt(const json& j, const std::string& path, const char* field, int64_t most,
                    std::optional<int64_t> fallback = std::nullopt) {
  if (!j.contains(field) || j[field].is_null()) {
    if (fallback) return *fallback;
    throw std::runtime_error(path + ": missing \"" + field + "\"");
  }
  const json& v = j[field];
  bool positive = v.is_number_unsigned() ? v.get<uint64_t>() > 0
                  : v.is_number_integer() ? v.get<int64_t>() > 0
                                          : false;
  if (!positive) {
    throw std::runtime_error(path + ": \"" + field + "\" must be a positive integer, got " +
                             v.dump());
  }
  if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(most) : v.get<int64_t>() > most) {
    throw std::runtime_error(path + ": \"" + field + "\" is " + v.dump() + ", more than " +
                             std::to_string(most) + " (no supported checkpoint is that large: "
                             "the file is corrupt or the value a typo)");
  }
  return v.get<int64_t>();
}

double positiveNumber(const json& j, const std::string& path, const char* field,
                      double fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  if (!j[field].is_number() || j[field].get<double>() <= 0) {
    throw std::runtime_error(path + ": \"" + field + "\" must be a positive number, got " +
                             j[field].dump());
  }
  return j[field].get<double>();
}

struct Preset {
  const char* name;
  LlamaConfig config;
};

LlamaConfig tiny25m() {
  LlamaConfig c;
  c.hiddenSize = 512;
  c.intermediateSize = 1536;
  c.numLayers = 8;
  c.numHeads = 8;
  c.numKvHeads = 4;
  c.headDim = 64;
  c.vocabSize = 260;  // the byte tokenizer's
  c.maxPositions = 2048;
  c.rmsEps = 1e-5;
  c.ropeTheta = 10000;
  c.tieEmbeddings = false;
  c.eosTokenIds = {256, 258};  // <|endoftext|>, <|im_end|>
  return c;
}

LlamaConfig tiny4m() {  // for tests: same shape rules, a fraction of the cost
  LlamaConfig c = tiny25m();
  c.hiddenSize = 256;
  c.intermediateSize = 768;
  c.numLayers = 4;
  c.numHeads = 4;
  c.numKvHeads = 4;
  c.headDim = 64;
  return c;
}

std::optional<LlamaConfig> preset(const std::string& name) {
  if (name == "vsup-tiny-25m") return tiny25m();
  if (name == "vsup-tiny-4m") return tiny4m();
  return std::nullopt;
}

// The model's own chat template, recognised by the special tokens it writes. Templates are Jinja;
// vsup does not run Jinja, so only the formats it knows are used, and anything else falls back
// to the plain format (with a note saying so).
void detectChatFormat(ModelSource& m) {
  std::string path = m.directory + "/tokenizer_config.json";
  if (!isFile(path)) {
    m.chatFormatNote = "no tokenizer_config.json: the plain chat format is used";
    return;
  }
  json j = readJson(path);
  std::string tmpl;
  if (j.contains("chat_template") && j["chat_template"].is_string()) {
    tmpl = j["chat_template"].get<std::string>();
  } else if (j.contains("chat_template") && j["chat_template"].is_array()) {
    for (const auto& t : j["chat_template"]) {
      if (t.value("name", "") == "default" && t.contains("template") && t["template"].is_string()) {
        tmpl = t["template"].get<std::string>();
      }
    }
  }
  if (tmpl.find("<|im_start|>") != std::string::npos) {
    m.chatFormat = ChatFormat::ChatMl;
  } else if (tmpl.find("<|start_header_id|>") != std::string::npos) {
    m.chatFormat = ChatFormat::Llama3;
  } else {
    m.chatFormatNote = tmpl.empty() ? path + " has no chat_template: the plain chat format is used"
                                    : path + ": chat_template is not ChatML or Llama 3 (vsup does "
                                             "not run Jinja): the plain chat format is used";
  }
}

}  // namespace

int64_t LlamaConfig::parameterCount() const {
  int64_t attn = hiddenSize * headDim * (2 * numHeads + 2 * numKvHeads);
  int64_t mlp = 3 * hiddenSize * intermediateSize;
  int64_t perLayer = attn + mlp + 2 * hiddenSize;
  return numLayers * perLayer + vocabSize * hiddenSize * (tieEmbeddings ? 1 : 2) + hiddenSize;
}

int64_t LlamaConfig::rankWeightBytes(uint32_t tp) const {
  const int64_t t = std::max<int64_t>(1, tp);
  const int64_t H = hiddenSize;
  const int64_t q = numHeads / t * headDim;
  const int64_t kv = std::max<int64_t>(1, numKvHeads / t) * headDim;
  const int64_t mlp = intermediateSize / t;
  const int64_t vocabShard = (vocabSize + t - 1) / t;
  const int64_t perLayer = 2 * H + (q + 2 * kv) * H + H * q + 3 * mlp * H;
  const int64_t floats = vocabSize * H + vocabShard * H + H + numLayers * perLayer +
                         maxPositions * headDim;  // rotary cos and sin: headDim/2 each
  return floats * int64_t(sizeof(float));
}

std::vector<TensorShape> LlamaConfig::checkpointTensors() const {
  const int64_t H = hiddenSize;
  std::vector<TensorShape> t;
  t.push_back({"model.embed_tokens.weight", {vocabSize, H}});
  if (!tieEmbeddings) t.push_back({"lm_head.weight", {vocabSize, H}});
  t.push_back({"model.norm.weight", {H}});
  for (int64_t i = 0; i < numLayers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    t.push_back({p + "self_attn.q_proj.weight", {numHeads * headDim, H}});
    t.push_back({p + "self_attn.k_proj.weight", {numKvHeads * headDim, H}});
    t.push_back({p + "self_attn.v_proj.weight", {numKvHeads * headDim, H}});
    t.push_back({p + "self_attn.o_proj.weight", {H, numHeads * headDim}});
    t.push_back({p + "mlp.gate_proj.weight", {intermediateSize, H}});
    t.push_back({p + "mlp.up_proj.weight", {intermediateSize, H}});
    t.push_back({p + "mlp.down_proj.weight", {H, intermediateSize}});
  }
  return t;
}

void LlamaConfig::checkTensorParallel(uint32_t tp) const {
  auto check = [&](const char* what, int64_t n) {
    if (n % int64_t(tp) != 0) {
      throw std::invalid_argument("--tensor-parallel-size " + std::to_string(tp) +
                                  " does not divide the model's " + what + " (" +
                                  std::to_string(n) + ")");
    }
  };
  check("attention heads", numHeads);
  // Fewer KV heads than ranks: each rank holds a copy of the one its query heads use.
  if (numKvHeads % int64_t(tp) != 0 && int64_t(tp) % numKvHeads != 0) {
    throw std::invalid_argument("--tensor-parallel-size " + std::to_string(tp) +
                                " and the model's key/value heads (" +
                                std::to_string(numKvHeads) +
                                ") must divide one another");
  }
  check("MLP width (intermediate_size)", intermediateSize);
}

RankShard rankShard(const LlamaConfig& c, uint32_t rank, uint32_t tp) {
  c.checkTensorParallel(tp);
  if (rank >= tp) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " of a tensor-parallel size of " +
                                std::to_string(tp));
  }
  RankShard s;
  const int64_t hd = c.headDim, r = rank;
  s.qHeads = c.numHeads / tp;
  s.kvHeads = c.kvHeadsPerRank(tp);
  s.mlp = c.intermediateSize / tp;
  s.vocabShard = (c.vocabSize + tp - 1) / tp;
  s.qBegin = r * s.qHeads * hd;
  s.qEnd = s.qBegin + s.qHeads * hd;
  // With fewer KV heads than ranks, rank r's query heads all use KV head r / (tp / numKvHeads).
  int64_t kvFirst = c.numKvHeads >= int64_t(tp) ? r * s.kvHeads : r / (tp / c.numKvHeads);
  s.kvBegin = kvFirst * hd;
  s.kvEnd = s.kvBegin + s.kvHeads * hd;
  s.mlpBegin = r * s.mlp;
  s.mlpEnd = s.mlpBegin + s.mlp;
  s.vocabBegin = std::min<int64_t>(r * s.vocabShard, c.vocabSize);
  s.vocabEnd = std::min<int64_t>(s.vocabBegin + s.vocabShard, c.vocabSize);
  return s;
}

std::vector<std::string> presetNames() { return {"vsup-tiny-25m", "vsup-tiny-4m"}; }

LlamaConfig parseLlamaConfig(const std::string& path) {
  json j = readJson(path);
  if (!j.is_object()) throw std::runtime_error(path + ": not a JSON object");
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() &&
      !j["architectures"].empty() && j["architectures"][0].is_string()) {
    arch = j["architectures"][0].get<std::string>();
  }
  std::string type = j.value("model_type", "");
  if (arch != "LlamaForCausalLM" && !(arch.empty() && type == "llama")) {
    throw std::runtime_error(path + ": architecture \"" + (arch.empty() ? type : arch) +
                             "\" is not supported (supported: LlamaForCausalLM)");
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    throw std::runtime_error(path + ": \"rope_scaling\" " + j["rope_scaling"].dump() +
                             " is not supported (only plain rotary embeddings)");
  }
  for (const char* biasField : {"attention_bias", "mlp_bias"}) {
    if (j.value(biasField, false)) {
      throw std::runtime_error(path + ": \"" + std::string(biasField) +
                               "\": true is not supported (Llama has no biases)");
    }
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    throw std::runtime_error(path + ": \"hidden_act\" " + j["hidden_act"].dump() +
                             " is not supported (only silu)");
  }
  LlamaConfig c;
  c.hiddenSize = positiveInt(j, path, "hidden_size", kMaxHiddenSize);
  c.intermediateSize = positiveInt(j, path, "intermediate_size", kMaxIntermediateSize);
  c.numLayers = positiveInt(j, path, "num_hidden_layers", kMaxLayers);
  c.numHeads = positiveInt(j, path, "num_attention_heads", kMaxHeads);
  c.numKvHeads = positiveInt(j, path, "num_key_value_heads", kMaxHeads, c.numHeads);
  c.vocabSize = positiveInt(j, path, "vocab_size", kMaxVocabSize);
  c.maxPositions = positiveInt(j, path, "max_position_embeddings", kMaxPositions, 2048);
  if (c.hiddenSize % c.numHeads != 0 && !j.contains("head_dim")) {
    throw std::runtime_error(path + ": hidden_size is not a multiple of num_attention_heads and "
                                    "there is no head_dim");
  }
  c.headDim = positiveInt(j, path, "head_dim", kMaxHeadDim, c.hiddenSize / c.numHeads);
  if (c.headDim % 2 != 0) throw std::runtime_error(path + ": head_dim must be even");
  if (c.numHeads % c.numKvHeads != 0) {
    throw std::runtime_error(path + ": num_attention_heads (" + std::to_string(c.numHeads) +
                             ") is not a multiple of num_key_value_heads (" +
                             std::to_string(c.numKvHeads) + ")");
  }
  c.rmsEps = positiveNumber(j, path, "rms_norm_eps", 1e-6);
  c.ropeTheta = positiveNumber(j, path, "rope_theta", 10000);
  c.tieEmbeddings = j.value("tie_word_embeddings", false);
  if (j.contains("eos_token_id")) {
    const json& e = j["eos_token_id"];
    auto add = [&](const json& v) {
      if (!v.is_number_integer()) return;
      // One past the vocabulary is only never produced; one that is negative or past int32 is
      // no token id at all.
      if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(INT32_MAX)
                                 : v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
        throw std::runtime_error(path + ": \"eos_token_id\" " + v.dump() +
                                 " is not a token id (0.." + std::to_string(INT32_MAX) + ")");
      }
      c.eosTokenIds.push_back(v.get<int32_t>());
    };
    if (e.is_array()) {
      for (const auto& v : e) add(v);
    } else {
      add(e);
    }
  }
  return c;
}

ModelSource resolveModel(const std::string& model, const std::string& loadFormat,
                         bool needTokenizer) {
  if (loadFormat != "auto" && loadFormat != "dummy" && loadFormat != "safetensors") {
    throw std::runtime_error("--load-format \"" + loadFormat +
                             "\" is not supported (auto, dummy or safetensors)");
  }
  ModelSource m;
  m.name = model;
  if (auto p = preset(model); p && !isDirectory(model)) {
    if (loadFormat == "safetensors") {
      throw std::runtime_error("--model " + model +
                               " is a built-in preset: it has no safetensors (use --load-format "
                               "dummy or auto)");
    }
    m.config = *p;
    m.dummyWeights = true;
    m.chatFormat = ChatFormat::ChatMl;
    return m;
  }
  if (!isDirectory(model)) {
    std::string names;
    for (const auto& n : presetNames()) names += (names.empty() ? "" : ", ") + n;
    throw std::runtime_error("--model " + model +
                             ": no such directory, and not a built-in preset (presets: " + names +
                             "; or a Hugging Face model directory with config.json, "
                             "tokenizer.json and *.safetensors)");
  }
  m.directory = model;
  while (m.directory.size() > 1 && m.directory.back() == '/') m.directory.pop_back();
  std::string config = m.directory + "/config.json";
  if (!isFile(config)) throw std::runtime_error(config + ": missing (a Hugging Face model "
                                                "directory needs config.json)");
  m.config = parseLlamaConfig(config);
  m.tokenizerPath = m.directory + "/tokenizer.json";
  if (!needTokenizer && !isFile(m.tokenizerPath)) {
    m.tokenizerPath.clear();
  } else if (!isFile(m.tokenizerPath)) {
    throw std::runtime_error(m.tokenizerPath + ": missing (a Hugging Face model directory needs "
                                               "tokenizer.json)");
  }
  m.dummyWeights = loadFormat == "dummy";
  detectChatFormat(m);
  return m;
}

}  // namespace vsup::engine
