// vsup::LLM — offline inference in one object (installed as <vsup/llm.h>).
//
//   vsup::LLM llm({.tensorParallelSize = 2});
//   auto out = llm.generate({"Hello"}, {.maxTokens = 16});
//
// The constructor starts engine-core and its tensor-parallel workers as child processes (the
// same processes `vsup run` uses) and returns when they are ready; the destructor drains (below,
// with LLMConfig::shutdownTimeout) and returns when every one of them has been reaped. The library guarantees of
// <vsup/supervisor.h> hold: the host process is left exactly as it was.
//
// Errors are exceptions (vsup::Error) with a clear message: a failed start throws from the
// constructor and leaves nothing behind; an engine that dies mid-generate() makes it throw
// within a bounded time, and every later call fails fast with the same error (until a shutdown:
// then "shut down", below). Sampling values out of range throw before anything is sent, with
// the API server's message for the same value ("'top_p' must be a number greater than 0 and at
// most 1, got 1.5"). A hung engine-core (LLMConfig::livenessTimeout) counts as one that died.
//
// Stopping drains (drain(), shutdown(), the destructor): admission stops at once (a generate()
// that starts later throws vsup::ShutDownError), running requests go on until the timeout and
// complete normally if they can; those still running then end with finishReason "abort" and
// their text so far (the call returns, it does not throw); then engine-core stops at a step
// boundary and its processes are reaped. Every call after that throws vsup::ShutDownError ("shut
// down"), never an engine failure's error.
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
  std::string engine = "cpu";        // "cpu" (a real Llama model), "cuda" (the same models on an
                                     // NVIDIA GPU) or "sim" (simulated tokens)
  std::string model;                 // cpu: a built-in preset or a Hugging Face model directory;
                                     // empty: the default preset (vsup-tiny-25m, dummy weights)
  std::string kvCacheMemory;         // cpu: KV cache per worker, e.g. "64MiB"; empty: 256MiB
  uint32_t tensorParallelSize = 1;
  uint64_t simTokenMs = 0;           // sim engine: cost of one step
  std::string dtype = "auto";        // cuda: bfloat16 (auto) or float32; cpu: float32 (auto)
  std::chrono::milliseconds startTimeout{60000};
  std::string logLevel = "warn";     // vsup's own log lines (on stderr); "off" silences them
  std::string vsupExecutable;        // empty: $VSUP_EXE, else the installed `vsup`
  // What the destructor drains with when shutdown() or drain() was not called: running
  // requests get this long to finish (then "abort"). >= 0.
  std::chrono::milliseconds shutdownTimeout{30000};
  // Hung-engine detection: engine-core is pinged every second (every half timeout if that is
  // shorter) while it runs; one that has not answered for this long (stopped, deadlocked) is
  // killed, and generate() throws as for an engine that died. 0: off. Otherwise >= 100 ms.
  std::chrono::milliseconds livenessTimeout{5000};
  // The largest Sampling::maxTokens accepted (the API server's limit is 4096); 0: none but the
  // model's context. >= 0.
  int64_t maxTokensLimit = 0;
};

// Checked by generate() exactly as the API server checks the same OpenAI fields.
struct Sampling {
  int64_t maxTokens = 16;  // >= 1, <= LLMConfig::maxTokensLimit if set; prompt + maxTokens
                           // within the model's context
  double temperature = 1.0;  // [0, 2]; 0: greedy
  double topP = 1.0;         // (0, 1]
  int32_t topK = 0;          // [-1, 2^30]; -1 or 0: off
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;  // at most 4, each non-empty
};

struct Completion {
  std::string text;
  std::string finishReason;  // "stop", "length" or "abort"
  int64_t promptTokens = 0;
  int64_t completionTokens = 0;
};

// Thrown by generate() once drain() or shutdown() has begun (or the destructor is running): the
// LLM admits no new request. Its message says "shut down". A vsup::Error, so a handler of
// vsup::Error still catches it; catch it first to tell a requested stop from a failure.
class ShutDownError final : public Error {
 public:
  using Error::Error;
};

// What drain() did with the requests that were running when it was called.
struct DrainReport {
  int64_t completed = 0;  // finished normally ("stop" or "length") before the deadline
  int64_t aborted = 0;    // still running at the deadline: ended with "abort" and their text
  int64_t failed = 0;     // ended with an error during the drain (the engine failed meanwhile)
  // KV transfers to a peer instance given up at the deadline. Always 0: vsup::LLM configures no
  // KV connector, so it never has any.
  int64_t kvTransfersAbandoned = 0;
};

class LLM {
 public:
  explicit LLM(LLMConfig config = {});
  ~LLM();  // drain(config.shutdownTimeout) if not shut down yet
  LLM(const LLM&) = delete;
  LLM& operator=(const LLM&) = delete;

  // One completion per prompt, in order. Blocks until all are done.
  std::vector<Completion> generate(const std::vector<std::string>& prompts,
                                   const Sampling& sampling = {});
  // One prompt; `onText` gets each piece of text as it is generated.
  Completion generateStream(const std::string& prompt, const Sampling& sampling,
                            const std::function<void(std::string_view text)>& onText);
  // Stops the LLM, draining (the file comment says how): returns once running requests have
  // completed or, at `timeout` after the call, were aborted, and every engine process was
  // reaped; within timeout + about 11 s in all (the engine's own bounded stop), normally a few
  // ms after the last request ended. Later calls, and calls while a drain runs on another
  // thread, wait for it and return an empty report. `timeout` >= 0 (0: abort at once).
  DrainReport drain(std::chrono::milliseconds timeout);
  // drain(timeout) without the report. Bounded, idempotent.
  void shutdown(std::chrono::milliseconds timeout);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vsup
