// Offline inference in a host program with vsup::LLM: engine-core and two tensor-parallel ranks
// as child processes, batched generate() and a streaming generateStream().
//
// Build against an installed vsup: see examples/meson.build. The engine runs in the `vsup`
// executable: $VSUP_EXE, else the installed one.
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include <vsup/llm.h>

int main() {
  try {
    vsup::LLMConfig config;
    config.engine = "sim";
    config.tensorParallelSize = 2;
    vsup::LLM llm(config);  // returns when engine-core and both ranks are ready

    vsup::Sampling sampling;
    sampling.maxTokens = 12;
    sampling.seed = 42;
    std::vector<std::string> prompts = {"The capital of France is", "Once upon a time"};
    std::vector<vsup::Completion> outs = llm.generate(prompts, sampling);
    for (size_t i = 0; i < outs.size(); ++i) {
      std::printf("[%zu] %s ->%s (%s, %lld tokens)\n", i, prompts[i].c_str(), outs[i].text.c_str(),
                  outs[i].finishReason.c_str(), static_cast<long long>(outs[i].completionTokens));
    }

    // Streaming: the callback runs on vsup's thread, so it only prints.
    std::printf("stream:");
    vsup::Completion streamed = llm.generateStream(
        "Tell me a story", sampling, [](std::string_view piece) {
          std::fwrite(piece.data(), 1, piece.size(), stdout);
          std::fflush(stdout);
        });
    std::printf("\n(%s, %lld tokens)\n", streamed.finishReason.c_str(),
                static_cast<long long>(streamed.completionTokens));

    // Stopping drains: requests still running get up to 5 s, then end with "abort" and their
    // text so far; a generate() after this throws vsup::ShutDownError. (The destructor drains
    // too, with LLMConfig::shutdownTimeout, when this was not called.)
    vsup::DrainReport report = llm.drain(std::chrono::seconds(5));
    std::printf("drained: %lld completed, %lld aborted\n",
                static_cast<long long>(report.completed), static_cast<long long>(report.aborted));
  } catch (const vsup::Error& e) {
    std::fprintf(stderr, "offline_generate: %s\n", e.what());
    return 1;
  }
  return 0;
}
