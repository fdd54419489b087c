// vsup::LLM — offline inference in one object (installed as <vsup/llm.h>).
//
//   vsup::LLM llm({.tensorParallelSize = 2});
//   auto out = llm.generate({"Hello"}, {.maxTokens = 16});
//
// The constructor starts engine-core and its tensor-parallel workers as child processes (the
// same processes `vsup run` uses) and returns when they are ready; the destructor shuts them
// down gracefully and returns when every one of them has been reaped. The library guarantees of
// <vsup/supervisor.h> hold: the host process is left exactly as it was.
//
// Errors are exceptions (vsup::Error) with a clear message: a failed start throws from the
// constructor and leaves nothing behind; an engine that dies mid-generate() makes it throw
// within a bounded time, and every later call fails fast with the same error.
//
// Threading: any thread may call generate(); calls may overlap (they are batched together).
// Streaming callbacks run on vsup's private thread: keep them short, and do not call back into
// the LLM from them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"

namespace vsup {

struct LLMConfig {
  std::string engine = "cpu";        // "cpu" (a real Llama model) or "sim" (simulated tokens)
  std::string model;                 // cpu: a built-in preset or a Hugging Face model directory;
                                     // empty: the default preset (vsup-tiny-25m, dummy weights)
  std::string kvCacheMemory;         // cpu: KV cache per worker, e.g. "64MiB"; empty: 256MiB
  uint32_t tensorParallelSize = 1;
  uint64_t simTokenMs = 0;           // sim engine: cost of one step
  std::chrono::milliseconds startTimeout{60000};
  std::string logLevel = "warn";     // vsup's own log lines (on stderr); "off" silences them
  std::string vsupExecutable;        // empty: $VSUP_EXE, else the installed `vsup`
};

struct Sampling {
  int64_t maxTokens = 16;
  double temperature = 1.0;
  double topP = 1.0;
  int32_t topK = 0;  // <= 0: off
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
};

struct Completion {
  std::string text;
  std::string finishReason;  // "stop", "length" or "abort"
  int64_t promptTokens = 0;
  int64_t completionTokens = 0;
};

class LLM {
 public:
  explicit LLM(LLMConfig config = {});
  ~LLM();  // shutdown(std::chrono::seconds(30)) if still running
  LLM(const LLM&) = delete;
  LLM& operator=(const LLM&) = delete;

  // One completion per prompt, in order. Blocks until all are done.
  std::vector<Completion> generate(const std::vector<std::string>& prompts,
                                   const Sampling& sampling = {});
  // One prompt; `onText` gets each piece of text as it is generated.
  Completion generateStream(const std::string& prompt, const Sampling& sampling,
                            const std::function<void(std::string_view text)>& onText);
  // Graceful, bounded, idempotent.
  void shutdown(std::chrono::milliseconds timeout);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup
