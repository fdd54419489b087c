// The CPU backend's plan (a preset's config only: no weights are loaded, no BLAS is called) and
// the registry's choice of backend. The scheduler the plan configures is tested on its own, in
// engine/core/scheduler_test.cpp.
#include "engine/cpu_engine.h"

#include <doctest/doctest.h>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>

#include "engine/blas.h"
#include "engine/llama_config.h"
#include "engine/llama_model.h"
#include "engine/core/scheduler.h"
#include "engine/sim_engine.h"

namespace vsup::engine {
namespace {

constexpr const char* kModel = "vsup-tiny-4m";

EngineConfig configFor(int32_t blocks, int32_t blockSize = 4, int64_t maxModelLen = 64) {
  EngineConfig c;
  c.backend = CpuConfig{};
  c.common.model = kModel;
  c.common.blockSize = blockSize;
  c.common.maxModelLen = maxModelLen;
  c.common.maxNumSeqs = 8;
  c.common.maxNumBatchedTokens = 256;
  LlamaConfig model = resolveModel(kModel, "auto").config;
  c.common.kvCacheBytes = int64_t(blocks) * kvBytesPerBlock(model, 1, blockSize);
  return c;
}

std::string messageOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace

TEST_CASE("the cpu plan sizes the cache in whole blocks of the per-rank budget") {
  EngineConfig c = configFor(20);
  c.common.kvCacheBytes += 100;  // less than a block more
  EnginePlan plan = cpuBackend().plan(c);
  CHECK(plan.scheduler.numBlocks == 20);
  CHECK(plan.scheduler.blockSize == 4);
  CHECK(plan.scheduler.maxModelLen == 64);
  CHECK(plan.scheduler.maxNumSeqs == 8);
  CHECK(plan.scheduler.maxNumBatchedTokens == 256);
  CHECK(plan.scheduler.vocabSize == int32_t(kByteVocabSize));
  CHECK(plan.scheduler.eosTokenIds == resolveModel(kModel, "auto").config.eosTokenIds);
  CHECK(plan.scheduler.kvHoldMs == 0);
  CHECK(plan.chatFormat == ChatFormat::ChatMl);  // the presets speak ChatML
  CHECK_FALSE(plan.sharedCollective);
  CHECK(plan.summary.find("model vsup-tiny-4m (") != std::string::npos);
  CHECK(plan.summary.find("parameters, weights dummy), context 64 tokens, KV cache 20 blocks of "
                          "4 tokens per rank") != std::string::npos);
  // Two ranks hold half of the (4) KV heads each: twice the blocks in the same budget.
  c.common.tensorParallelSize = 2;
  plan = cpuBackend().plan(c);
  CHECK(plan.scheduler.numBlocks == 40);
  CHECK(plan.sharedCollective);
  c.common.maxModelLen = 0;  // the model's own context length
  c.common.kvCacheBytes = int64_t(1) << 30;
  CHECK(cpuBackend().plan(c).scheduler.maxModelLen == 2048);
  c.common.kv.connector = "sim";
  CHECK(cpuBackend().plan(c).scheduler.kvHoldMs > 0);
}

TEST_CASE("the cpu tokenizer of a preset is the byte tokenizer") {
  auto t = cpuBackend().tokenizer(configFor(20));
  REQUIRE(t != nullptr);
  CHECK(t->vocabSize() == kByteVocabSize);
  CHECK(t->encode("hi") == std::vector<int32_t>{'h', 'i'});
}

TEST_CASE("the cpu plan refuses a tensor-parallel size that does not divide the heads") {
  EngineConfig c = configFor(64);
  c.common.tensorParallelSize = 3;
  std::string msg = messageOf([&] { cpuBackend().plan(c); });
  CHECK(msg.find("--tensor-parallel-size 3") != std::string::npos);
  CHECK(msg.find("attention heads (4)") != std::string::npos);
  CHECK_THROWS_AS(cpuBackend().plan(c), std::invalid_argument);
}

TEST_CASE("the cpu plan refuses a token budget below max_num_seqs") {
  EngineConfig c = configFor(64);
  c.common.maxNumSeqs = 16;
  c.common.maxNumBatchedTokens = 8;
  std::string msg = messageOf([&] { cpuBackend().plan(c); });
  CHECK(msg.find("--max-num-batched-tokens (8)") != std::string::npos);
  CHECK(msg.find("--max-num-seqs (16)") != std::string::npos);
  CHECK_THROWS_AS(cpuBackend().plan(c), std::invalid_argument);
}

TEST_CASE("the cpu plan refuses a block size out of range") {
  EngineConfig c = configFor(64);
  c.common.blockSize = 0;
  CHECK(messageOf([&] { cpuBackend().plan(c); }) == "--block-size must be 1..1024, got 0");
}

TEST_CASE("the cpu plan refuses a KV cache smaller than one context-length sequence") {
  // 64 tokens need 16 blocks of 4; give 15.
  EngineConfig c = configFor(15, 4, 64);
  std::string msg = messageOf([&] { cpuBackend().plan(c); });
  CHECK(msg.find("holds 60 tokens") != std::string::npos);
  CHECK(msg.find("context length 64") != std::string::npos);
  CHECK(msg.find("--kv-cache-memory") != std::string::npos);
  CHECK_THROWS_AS(cpuBackend().plan(c), std::invalid_argument);
  CHECK(cpuBackend().plan(configFor(16, 4, 64)).scheduler.numBlocks == 16);
}

TEST_CASE("the cpu plan refuses an unknown model and lists the presets") {
  EngineConfig c = configFor(64);
  c.common.model = "no-such-model-here";
  std::string msg = messageOf([&] { cpuBackend().plan(c); });
  CHECK(msg.find("no-such-model-here") != std::string::npos);
  CHECK(msg.find("vsup-tiny-25m") != std::string::npos);
  CHECK(msg.find("vsup-tiny-4m") != std::string::npos);
  CHECK_THROWS_AS(cpuBackend().plan(c), std::runtime_error);
}

TEST_CASE("a cpu runner serves the core scheduler's steps: greedy text is the same run after run") {
  EngineConfig c = configFor(64);
  auto run = [&c] {
    EnginePlan plan = cpuBackend().plan(c);
    std::shared_ptr<const Tokenizer> tokenizer = cpuBackend().tokenizer(c);
    core::Scheduler s(plan.scheduler, tokenizer);
    std::unique_ptr<ModelRunner> runner = cpuBackend().makeRunner(c, 0, {});
    core::TokenizedRequest t;
    t.request.id = "r";
    t.request.prompt = "hello";
    t.request.sampling.maxTokens = 4;
    t.request.sampling.temperature = 0;
    t.promptTokens = tokenizer->encode(t.request.prompt);
    REQUIRE_FALSE(s.admit(t));
    std::string text;
    int64_t tokens = 0;
    for (int i = 0; i < 10 && s.inFlight() > 0; ++i) {
      for (const TokenDelta& d : s.complete({runner->execute(s.nextStep())}).deltas) {
        text += d.text;
        tokens = d.completionTokens;
      }
    }
    CHECK(s.inFlight() == 0);
    CHECK(s.stats().freeBlocks == s.stats().totalBlocks);
    CHECK(tokens >= 1);
    return text + "/" + std::to_string(tokens);
  };
  std::string first = run();
  CHECK(first == run());
}

TEST_CASE("rankShard: the ranks' q, MLP and vocabulary ranges tile each tensor exactly, and "
          "each rank holds the KV heads its query heads use") {
  ModelSource m = resolveModel(kDefaultModel, "dummy", false);
  for (int64_t kvHeads : {4, 2, 1}) {
    LlamaConfig c = m.config;  // 8 query heads of 64, MLP 1536, vocab 260
    c.numKvHeads = kvHeads;
    for (uint32_t tp : {1u, 2u, 4u, 8u}) {
      if (c.intermediateSize % tp != 0) continue;
      int64_t q = 0, mlp = 0, vocab = 0;
      for (uint32_t r = 0; r < tp; ++r) {
        RankShard s = rankShard(c, r, tp);
        CHECK(s.qBegin == q);
        CHECK(s.qEnd - s.qBegin == s.qHeads * c.headDim);
        q = s.qEnd;
        CHECK(s.mlpBegin == mlp);
        mlp = s.mlpEnd;
        CHECK(s.vocabBegin == vocab);
        CHECK(s.vocabEnd - s.vocabBegin <= s.vocabShard);
        vocab = s.vocabEnd;
        // Grouped-query: global query head h uses KV head h / (numHeads / numKvHeads).
        const int64_t group = c.numHeads / c.numKvHeads;
        for (int64_t h = s.qBegin / c.headDim; h < s.qEnd / c.headDim; ++h) {
          int64_t kv = h / group;
          CHECK(kv * c.headDim >= s.kvBegin);
          CHECK((kv + 1) * c.headDim <= s.kvEnd);
        }
        CHECK(s.kvEnd - s.kvBegin == s.kvHeads * c.headDim);
      }
      CHECK(q == c.numHeads * c.headDim);
      CHECK(mlp == c.intermediateSize);
      CHECK(vocab == c.vocabSize);
    }
  }
  CHECK_THROWS_AS(rankShard(m.config, 2, 2), std::invalid_argument);
  CHECK_THROWS_AS(rankShard(m.config, 0, 3), std::invalid_argument);  // 8 heads over 3
}

TEST_CASE("the cuda backend plans like the cpu one, with a bf16 cache holding twice the blocks") {
  EngineConfig cpu;
  cpu.common.model = kDefaultModel;
  cpu.common.kvCacheBytes = int64_t(64) << 20;
  EngineConfig bf16 = cpu, fp32 = cpu;
  CudaConfig cuda;
  bf16.backend = cuda;
  cuda.dtype = "float32";
  fp32.backend = cuda;
  LlamaPlan a = planLlamaEngine(cpu, "auto", 4);
  LlamaPlan b = planLlamaEngine(bf16, "auto", 2);
  CHECK(b.numBlocks == 2 * a.numBlocks);
  CHECK(b.maxModelLen == a.maxModelLen);
#ifdef VSUP_HAVE_CUDA
  EnginePlan p16 = backendFor(bf16).plan(bf16), p32 = backendFor(fp32).plan(fp32);
  EnginePlan pc = backendFor(cpu).plan(cpu);
  CHECK(p16.scheduler.numBlocks == 2 * pc.scheduler.numBlocks);
  CHECK(p32.scheduler.numBlocks == pc.scheduler.numBlocks);
  CHECK(p16.scheduler.eosTokenIds == pc.scheduler.eosTokenIds);
  CHECK_FALSE(p16.kvLayout.has_value());  // a GPU cache: not for the KV connector
  CHECK(pc.kvLayout.has_value());
  CHECK(p16.summary.find("bfloat16 on the GPU") != std::string::npos);
#endif
}

TEST_CASE("backendFor picks the configured backend and refuses one this build lacks") {
  EngineConfig c;
  CHECK(std::string(backendFor(c).name()) == "cpu");
  CHECK(&backendFor(c) == &cpuBackend());
  c.backend = SimConfig{};
  CHECK(&backendFor(c) == &simBackend());
  c.backend = CudaConfig{};
#ifdef VSUP_HAVE_CUDA
  CHECK(std::string(backendFor(c).name()) == "cuda");
#else
  CHECK(messageOf([&] { backendFor(c); }).rfind("--engine 'cuda': ", 0) == 0);
  CHECK_THROWS_AS(backendFor(c), std::invalid_argument);
#endif
}

}  // namespace vsup::engine

TEST_CASE("betterCoreType: a pre-AVX2 OpenBLAS core on an AVX2 or AVX-512 CPU gets the one "
          "that uses them; a fitting pick, or a CPU without them, gets nothing") {
  using vsup::engine::blas::betterCoreType;
  using vsup::kernels::GemvIsa;
  const GemvIsa sse = GemvIsa::kBaseline;  // nothing past SSE2
  const GemvIsa avx2 = GemvIsa::kAvx2;      // x86-64-v3: AVX2 and FMA
  const GemvIsa avx512 = GemvIsa::kAvx512;  // x86-64-v4: AVX-512 F, BW, CD, DQ, VL
  // The fallback on a CPU OpenBLAS does not know. (A CPU with only part of v4's AVX-512 set,
  // such as a Xeon Phi's F and CD, is v3 at best: Haswell.)
  CHECK(betterCoreType("Prescott", avx512) == "SkylakeX");
  CHECK(betterCoreType("Prescott", avx2) == "Haswell");
  CHECK(betterCoreType("Sandybridge", avx2) == "Haswell");  // AVX without FMA
  CHECK(betterCoreType("Nehalem", avx512) == "SkylakeX");
  // Nothing better to run: the CPU lacks AVX2/FMA.
  CHECK(betterCoreType("Prescott", sse) == "");
  // A pick that already uses them stays (on this Zen 4, Haswell runs sgemm as fast as SkylakeX).
  for (const char* fine : {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"}) {
    CHECK(betterCoreType(fine, avx512) == "");
  }
  CHECK(betterCoreType("", avx512) == "");  // a library that does not say
}

TEST_CASE("OpenBLAS names its core here, and a user's OPENBLAS_CORETYPE silences the advice") {
  using namespace vsup::engine::blas;
  CHECK_FALSE(coreName().empty());  // Debian's OpenBLAS exports openblas_get_corename
  const char* before = ::getenv("OPENBLAS_CORETYPE");
  std::string saved = before != nullptr ? before : "";
  ::setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  CHECK(coreTypeAdvice() == "");
  if (before != nullptr) {
    ::setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
  } else {
    ::unsetenv("OPENBLAS_CORETYPE");
  }
  // Without it, the advice is what betterCoreType says of this machine's pick.
  std::string expected = betterCoreType(coreName(), vsup::kernels::gemvIsas().back());
  if (before == nullptr) {
    const std::string advice = coreTypeAdvice();
    if (expected.empty()) {
      CHECK(advice == "");
    } else {
      CHECK(advice.find("OPENBLAS_CORETYPE=" + expected) != std::string::npos);
    }
  }
}
