// peer_greedy: greedy decoding with llama.cpp's library for given token ids, the llama.cpp side
// of bench/peer_llama_cpp.sh's check that both engines compute the same model.
//
//   peer_greedy MODEL.gguf THREADS NEW_TOKENS ID,ID,...
//
// Decodes the prompt as one batch, then NEW_TOKENS times takes the arg-max of the last logits
// and feeds it back, one token at a time (CPU only; an fp32 KV cache and no flash attention, so
// that it computes in fp32 as vsup does). Prints one JSON object on stdout:
// {"vocab": V, "tokens": [the generated ids], "logits": [[V floats] per step]}: the logits after
// the prompt, then after each generated token but the last (so that row i chose tokens[i]), the
// same rows `vsup-logits --prompt IDS --decode tokens[0..n-2]` prints. llama.cpp's log goes to
// stderr, warnings and errors only. Exit status 1 with a message on any failure.
//
// Built by bench/peer_llama_cpp.sh against the llama.cpp it built (not part of vsup's build).
// Single-threaded program (llama.cpp runs its own compute threads).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

namespace {

void logWarnings(ggml_log_level level, const char* text, void*) {
  if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "peer_greedy: %s\n", what.c_str());
  std::exit(1);
}

int positive(const char* arg, const char* what) {
  char* end = nullptr;
  long v = std::strtol(arg, &end, 10);
  if (end == arg || *end != '\0' || v <= 0 || v > 1000000) {
    die(std::string(what) + ": \"" + arg + "\" is not a positive integer");
  }
  return int(v);
}

int32_t argmax(const float* logits, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) die("usage: peer_greedy MODEL.gguf THREADS NEW_TOKENS ID,ID,...");
  const int threads = positive(argv[2], "THREADS");
  const int newTokens = positive(argv[3], "NEW_TOKENS");
  std::vector<llama_token> prompt;
  for (std::string list = argv[4], item; !list.empty();) {
    size_t comma = list.find(',');
    item = list.substr(0, comma);
    list = comma == std::string::npos ? "" : list.substr(comma + 1);
    char* end = nullptr;
    long id = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || id < 0) die("prompt: \"" + item + "\" is not a token id");
    prompt.push_back(llama_token(id));
  }
  if (prompt.empty()) die("prompt: at least one token id");

  llama_log_set(logWarnings, nullptr);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (model == nullptr) die(std::string("cannot load ") + argv[1]);
  const int32_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  for (llama_token t : prompt)
    if (t >= vocab) die("prompt: token " + std::to_string(t) + " is past the vocabulary");

  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = uint32_t(prompt.size()) + uint32_t(newTokens) + 16;
  cp.n_batch = uint32_t(prompt.size());
  cp.n_ubatch = uint32_t(prompt.size());
  cp.n_threads = threads;
  cp.n_threads_batch = threads;
  cp.no_perf = true;
  // fp32 all the way, as vsup computes: llama.cpp's defaults (an f16 KV cache, and the CPU
  // flash-attention kernel, which rounds through f16 even over an f32 cache) put its logits
  // about 1e-3 from a float64 reference; with these, both engines are within 1e-5 of it.
  cp.type_k = GGML_TYPE_F32;
  cp.type_v = GGML_TYPE_F32;
  cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (ctx == nullptr) die("cannot create a context");

  std::string out = "{\"vocab\": " + std::to_string(vocab) + ", \"tokens\": [";
  std::string rows;
  std::vector<llama_token> feed = prompt;
  char number[32];
  for (int step = 0; step < newTokens; ++step) {
    if (llama_decode(ctx, llama_batch_get_one(feed.data(), int32_t(feed.size()))) != 0) {
      die("llama_decode failed at step " + std::to_string(step));
    }
    const float* logits = llama_get_logits_ith(ctx, -1);
    if (logits == nullptr) die("no logits at step " + std::to_string(step));
    const llama_token next = argmax(logits, vocab);
    out += (step ? ", " : "") + std::to_string(next);
    rows += step ? ", [" : "[";
    for (int32_t i = 0; i < vocab; ++i) {
      std::snprintf(number, sizeof number, "%s%.9g", i ? ", " : "", double(logits[i]));
      rows += number;
    }
    rows += "]";
    feed.assign(1, next);
  }
  out += "], \"logits\": [" + rows + "]}";
  std::puts(out.c_str());
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
