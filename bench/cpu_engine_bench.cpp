// CPU engine throughput (LlamaShard::forward, fp32) for a preset or a model directory at the
// given TP sizes, each row next to a floor measured in the same run:
//
//   decode, batch B  B sequences with a 16-token prompt already in the KV cache; one step is one
//                    forward() of B one-token Seqs, all wanting logits (no sampling: forward
//                    only), from position 16 on. tokens/s = B × steps / time.
//                    Floor: one read of the weights the step's matrix products read (every
//                    layer's qkv, o, gate/up and down, plus this rank's lm_head rows; not the
//                    embedding table, which is only row-gathered, nor the norms), timed as the
//                    fastest of three ways of streaming those bytes on the rank's threads (at TP
//                    2 both ranks at once, as in a step): a kernel summing a buffer of that
//                    size, OpenBLAS sgemv over matrices of the shard's shapes, and the engine's
//                    own batched gemv (kernels/batched_gemv.h) at one token over the same
//                    matrices (a batch-1 step's products alone, each way). Each is four passes
//                    back to back, as steps follow one another. A batch-B step reads the same
//                    weights, so its floor is B tokens per that time: the bound for an engine
//                    that reads each weight once per step, whatever the batch.
//   prefill, T       one sequence of T tokens from position 0, logits for its last token.
//                    Floor: the same matrix products alone, as OpenBLAS does them (cblas_sgemm on
//                    T × H · Wᵀ for each matrix of each layer, then lm_head for the last token
//                    only), on matrices of the same shapes.
//
// The "OpenBLAS alone" column times OpenBLAS on each row's matrix products (sgemv at batch 1,
// sgemm above): for decode at batch > 1 it is what the engine would do with sgemm alone (sgemm
// at a small M repacks the weights on every call); measured ÷ it says how much the engine gains
// or loses against it.
//
// Each TP runs as TP rank processes (this program again, with --rank), joined by the engine's
// shared-memory collective; each rank computes on --threads threads (default max(1, nproc / TP)),
// which it gives to OpenBLAS and to the engine. Rank 0 prints the rows: step times and floors
// are those of the slower rank (a step ends when both have). Medians of --runs repetitions;
// each repetition measures the floors, then for each case OpenBLAS alone and then the engine, so
// that load from elsewhere hits floors and measurements alike.
//
//   build/bench/cpu_engine_bench [--model vsup-tiny-25m|DIR] [--tp 1,2] [--threads N]
//       [--batches 1,8,32] [--prefill 128,512,2048] [--runs 5] [--quick] [--json]
//
// Prefill lengths past the model's context are left out of the default list (with a note) and
// refused when asked for. --json: one JSON object on stdout (the table then goes to stderr):
// per TP ("tp1", "tp2", ...) the ratios decode_b<B>_vs_floor and prefill_<T>_vs_sgemm, and the
// raw numbers (decode_b<B>_tok_s, decode_b<B>_floor_tok_s, decode_b<B>_openblas_tok_s,
// prefill_<T>_tok_s, prefill_<T>_sgemm_tok_s, floor_read_gb_s, floor_sgemv_gb_s,
// floor_batched_gemv_gb_s, ...).
// --quick: one short repetition with small sizes (a smoke test of a few seconds; its numbers
// mean nothing).
#include <dlfcn.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/check.h"
#include "base/fd.h"
#include "engine/blas.h"
#include "engine/collective.h"
#include "engine/llama_config.h"
#include "engine/llama_model.h"
#include "engine/weights.h"
#include "kernels/batched_gemv.h"

extern char** environ;

namespace {

using namespace vsup::engine;
using Clock = std::chrono::steady_clock;

constexpr int32_t kBlockSize = 16;
constexpr int32_t kDecodePrompt = 16;  // tokens already in the cache when decode starts

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Sizes {
  int runs = 5;
  int decodeSteps = 32;
  std::vector<int32_t> batches{1, 8, 32};
  std::vector<int32_t> prefillTokens{128, 512, 2048};
};

Sizes quickSizes() {
  Sizes s;
  s.runs = 1;
  s.decodeSteps = 4;
  s.batches = {1, 8};
  s.prefillTokens = {32};
  return s;
}

// --- Memory bandwidth ---------------------------------------------------------------------------

typedef float Vec16 __attribute__((vector_size(64)));

// Sum of n floats (n a multiple of 64) with four independent vector accumulators, so that the
// loop is bound by loads, not by the latency of one add chain, and a software prefetch 2 KiB
// ahead: without it one core keeps too few misses in flight and reads about a fifth slower than
// OpenBLAS's sgemv does (which prefetches). Built for AVX-512 and AVX2 too: the baseline SSE2
// build is limited by its 16-byte loads (about 31 GB/s on one core here).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) float sumFloats(
    const float* p, size_t n) {
  constexpr size_t kAhead = 2048 / sizeof(float);
  Vec16 a0{}, a1{}, a2{}, a3{};
  for (size_t i = 0; i < n; i += 64) {
    for (size_t line = 0; line < 64; line += 16) __builtin_prefetch(p + i + kAhead + line);
    Vec16 x0, x1, x2, x3;
    std::memcpy(&x0, p + i, sizeof x0);
    std::memcpy(&x1, p + i + 16, sizeof x1);
    std::memcpy(&x2, p + i + 32, sizeof x2);
    std::memcpy(&x3, p + i + 48, sizeof x3);
    a0 += x0;
    a1 += x1;
    a2 += x2;
    a3 += x3;
  }
  Vec16 s = (a0 + a1) + (a2 + a3);
  float total = 0;
  for (int j = 0; j < 16; ++j) total += s[j];
  return total;
}

// Runs fn(chunkBegin, chunkFloats) on `threads` threads over equal parts of `floats` floats, each
// a multiple of 64 (the calling thread takes the first part). Returns the seconds until all are
// done, scaled to the whole of `floats`.
template <typename Fn>
double onThreads(int threads, size_t floats, Fn fn) {
  size_t per = floats / size_t(threads) / 64 * 64;
  auto t0 = Clock::now();
  std::vector<std::thread> others;
  for (int i = 1; i < threads; ++i) others.emplace_back([&, i] { fn(size_t(i) * per, per); });
  fn(0, per);
  for (auto& t : others) t.join();
  return seconds(Clock::now() - t0) * double(floats) / double(per * size_t(threads));
}

// A buffer of the size that a decode step's matrix products read, so that the cache holds as
// much of it between passes as it holds of the weights between steps (the last-level cache here
// is 32 MiB, a third of the TP 1 weights: a much larger buffer reads slower than the weights do).
// Touched once at construction, so that no page fault is timed.
class BandwidthProbe {
 public:
  explicit BandwidthProbe(size_t bytes) : buffer_((bytes / sizeof(float) + 63) / 64 * 64, 1.0f) {}

  // Read bandwidth in bytes/s: `threads` threads each sum their part of the buffer, `passes`
  // times back to back (as decode steps follow each other).
  double read(int threads, int passes) {
    std::vector<float> sums(static_cast<size_t>(threads));
    double s = onThreads(threads, buffer_.size(), [&](size_t begin, size_t n) {
      float sum = 0;
      for (int p = 0; p < passes; ++p) sum += sumFloats(buffer_.data() + begin, n);
      sums[begin / std::max<size_t>(n, 1)] = sum;
    });
    float total = 0;
    for (float v : sums) total += v;
    sink_ = total;  // the sums are used, so the reads are not optimized away
    return double(buffer_.size() * sizeof(float)) * passes / s;
  }

  // Copy bandwidth in bytes copied/s (for comparison with other measurements of the machine): the first
  // half of the buffer onto the second.
  double copy(int threads) {
    size_t half = buffer_.size() / 2;
    double s = onThreads(threads, half, [&](size_t begin, size_t n) {
      std::memcpy(buffer_.data() + half + begin, buffer_.data() + begin, n * sizeof(float));
    });
    return double(half * sizeof(float)) / s;
  }

  float sink() const { return sink_; }

 private:
  std::vector<float> buffer_;
  volatile float sink_ = 0;
};

// --- The matrix products alone --------------------------------------------------------------

// The products as OpenBLAS alone does them, through the same run-time-loaded library as the
// engine: y[T, out] = x[T, in] · w[out, in]ᵀ, sgemv for one row, sgemm for more.
void matmul(float* y, const float* x, int64_t T, const float* w, int64_t out, int64_t in) {
  if (T == 1) {
    blas::sgemv(CblasRowMajor, CblasNoTrans, blasint(out), blasint(in), 1.0f, w, blasint(in), x, 1,
                0.0f, y, 1);
  } else {
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(T), blasint(out), blasint(in),
                1.0f, x, blasint(in), w, blasint(in), 0.0f, y, blasint(out));
  }
}

// Matrices of the shapes one rank's shard holds (its own copies: the shard's are private),
// laid out one allocation per matrix as the shard's are.
class ShardMatrices {
 public:
  ShardMatrices(const LlamaConfig& c, uint32_t tp) {
    H_ = c.hiddenSize;
    qkvDim_ = (c.numHeads / tp + 2 * c.kvHeadsPerRank(tp)) * c.headDim;
    attnDim_ = c.numHeads / tp * c.headDim;
    mlp_ = c.intermediateSize / tp;
    vocabShard_ = (c.vocabSize + tp - 1) / tp;
    auto filled = [](int64_t n) {
      std::vector<float> v(static_cast<size_t>(n));
      for (size_t i = 0; i < v.size(); ++i) v[i] = float(int(i % 13) - 6) * 0.01f;
      return v;
    };
    for (int64_t l = 0; l < c.numLayers; ++l) {
      layers_.push_back(
          {filled(qkvDim_ * H_), filled(H_ * attnDim_), filled(2 * mlp_ * H_), filled(H_ * mlp_)});
    }
    lmHead_ = filled(vocabShard_ * H_);
  }

  // The bytes one forward pass's matrix products read.
  int64_t bytes() const {
    int64_t n = vocabShard_ * H_;
    for (const Layer& l : layers_)
      n += int64_t(l.qkv.size() + l.o.size() + l.gateUp.size() + l.down.size());
    return n * int64_t(sizeof(float));
  }

  // Floating-point operations of run(T, logitRows).
  double flops(int64_t T, int64_t logitRows) const {
    double perToken = double(bytes() / int64_t(sizeof(float)) - vocabShard_ * H_);
    return 2.0 * (double(T) * perToken + double(logitRows * vocabShard_ * H_));
  }

  // One token's products read by the engine's own kernel (kernels::BatchedGemv at T = 1): the
  // third way of streaming the weights once.
  void runGemv(vsup::kernels::BatchedGemv& gemv) {
    ensureScratch(1);
    for (const Layer& l : layers_) {
      gemv.run(y_.data(), qkvDim_, x_.data(), H_, 1, l.qkv.data(), qkvDim_, H_);
      gemv.run(y_.data(), H_, x_.data(), attnDim_, 1, l.o.data(), H_, attnDim_);
      gemv.run(y_.data(), 2 * mlp_, x_.data(), H_, 1, l.gateUp.data(), 2 * mlp_, H_);
      gemv.run(y_.data(), H_, x_.data(), mlp_, 1, l.down.data(), H_, mlp_);
    }
    gemv.run(y_.data(), vocabShard_, x_.data(), H_, 1, lmHead_.data(), vocabShard_, H_);
  }

  // The forward pass's products for T tokens, then lm_head for `logitRows` rows.
  void run(int64_t T, int64_t logitRows) {
    ensureScratch(T);
    for (const Layer& l : layers_) {
      matmul(y_.data(), x_.data(), T, l.qkv.data(), qkvDim_, H_);
      matmul(y_.data(), x_.data(), T, l.o.data(), H_, attnDim_);
      matmul(y_.data(), x_.data(), T, l.gateUp.data(), 2 * mlp_, H_);
      matmul(y_.data(), x_.data(), T, l.down.data(), H_, mlp_);
    }
    matmul(y_.data(), x_.data(), logitRows, lmHead_.data(), vocabShard_, H_);
  }

 private:
  struct Layer {
    std::vector<float> qkv, o, gateUp, down;
  };
  void ensureScratch(int64_t T) {
    int64_t widest = std::max({H_, attnDim_, 2 * mlp_, qkvDim_, vocabShard_});
    if (x_.size() < size_t(T * widest)) {
      x_.assign(size_t(T * widest), 0.01f);
      y_.assign(size_t(T * widest), 0.0f);
    }
  }
  int64_t H_, qkvDim_, attnDim_, mlp_, vocabShard_;
  std::vector<Layer> layers_;
  std::vector<float> lmHead_;
  std::vector<float> x_, y_;
};

// --- One rank -------------------------------------------------------------------------------

// One row of the table, as this rank measured it: seconds per unit (a decode step, a prefill
// forward), one entry per run.
struct Row {
  std::string name;
  std::string key;        // the JSON names' stem: decode_b8, prefill_512
  int64_t tokensPerUnit;  // decode: B per step; prefill: T per forward
  bool prefill;
  std::vector<double> measured, blas, floor;
};

// What one rank process is told by the parent.
struct RankArgs {
  uint32_t tp = 1;
  uint32_t rank = 0;
  int threads = 1;
  int collectiveFd = -1;
  int resultFd = -1;  // rank 0: where the rows go as JSON (the parent prints them)
  bool tableToStderr = false;
};

// OpenBLAS's idle workers spin (sched_yield) for about 0.1 s after a call before they sleep;
// until then a thread of anything else timed would share a core with one of them.
void letBlasSettle() { std::this_thread::sleep_for(std::chrono::milliseconds(200)); }

int runRank(const ModelSource& model, const RankArgs& a, const Sizes& sizes) {
  const uint32_t tp = a.tp, rank = a.rank;
  const int threads = a.threads;
  // LlamaShard leaves OpenBLAS's threads to its owner (the CPU backend's runner sets them the
  // same way, and gives the shard the same count): without it each rank would run nproc.
  blas::setThreads(threads);

  vsup::OwnFd region(a.collectiveFd);  // inherited from the parent
  std::unique_ptr<Collective> collective =
      tp == 1 ? makeSingleRankCollective() : joinSharedCollective(region.get(), rank, tp, 60000);
  region.reset();  // mapped: the descriptor is no longer needed
  auto barrier = [&] {
    float one = 1;
    collective->allReduceSum(&one, 1);
  };
  auto weights = model.dummyWeights ? makeDummyWeights(0) : openSafetensors(model.directory);
  const LlamaConfig& c = model.config;

  // Blocks: each decode sequence its own, then the prefill sequence's.
  const int32_t maxBatch = *std::max_element(sizes.batches.begin(), sizes.batches.end());
  const int32_t maxPrefill =
      *std::max_element(sizes.prefillTokens.begin(), sizes.prefillTokens.end());
  const int32_t decodeBlocks = (kDecodePrompt + sizes.decodeSteps + kBlockSize - 1) / kBlockSize;
  const int32_t prefillBlocks = (maxPrefill + kBlockSize - 1) / kBlockSize;
  KvCacheShape cache;
  cache.blockSize = kBlockSize;
  cache.numBlocks = maxBatch * decodeBlocks + prefillBlocks;
  LlamaShard shard(c, rank, tp, *weights, cache, *collective, threads);
  ShardMatrices mirror(c, tp);

  // What the matrix products read must be what the shard holds less the embedding and norms.
  const int64_t normBytes = (2 * c.numLayers + 1) * c.hiddenSize * int64_t(sizeof(float));
  const int64_t embedBytes = c.vocabSize * c.hiddenSize * int64_t(sizeof(float));
  const int64_t stepBytes = mirror.bytes();
  if (shard.weightBytes() - embedBytes - normBytes != stepBytes) {
    throw std::logic_error("the bench's idea of the shard's matrices (" +
                           std::to_string(stepBytes) + " bytes) differs from the shard's (" +
                           std::to_string(shard.weightBytes() - embedBytes - normBytes) + ")");
  }
  BandwidthProbe probe(static_cast<size_t>(stepBytes));

  std::vector<std::vector<int32_t>> tables(static_cast<size_t>(maxBatch));
  for (int32_t s = 0; s < maxBatch; ++s) {
    for (int32_t b = 0; b < decodeBlocks; ++b) tables[size_t(s)].push_back(s * decodeBlocks + b);
  }
  std::vector<int32_t> prefillTable;
  for (int32_t b = 0; b < prefillBlocks; ++b) prefillTable.push_back(maxBatch * decodeBlocks + b);
  auto tokenAt = [&](int64_t i) { return int32_t((i * 37 + 11) % std::min<int64_t>(c.vocabSize, 256)); };
  std::vector<int32_t> prompts(static_cast<size_t>(std::max(maxPrefill, kDecodePrompt + maxBatch)));
  for (size_t i = 0; i < prompts.size(); ++i) prompts[i] = tokenAt(int64_t(i));

  // Every decode sequence's prompt, into the cache (not timed; each run then decodes positions
  // kDecodePrompt.. again, overwriting the same slots).
  std::vector<float> logits;
  {
    std::vector<LlamaShard::Seq> batch;
    for (int32_t s = 0; s < maxBatch; ++s) {
      LlamaShard::Seq q;
      q.tokens = prompts.data() + s;
      q.count = kDecodePrompt;
      q.blockTable = tables[size_t(s)].data();
      q.blockCount = decodeBlocks;
      q.wantLogits = true;
      batch.push_back(q);
    }
    shard.forward(batch, logits);
  }

  std::vector<Row> rows;
  for (int32_t b : sizes.batches) {
    rows.push_back({"decode, batch " + std::to_string(b), "decode_b" + std::to_string(b), b,
                    false, {}, {}, {}});
  }
  for (int32_t t : sizes.prefillTokens) {
    rows.push_back({"prefill, " + std::to_string(t) + " tokens", "prefill_" + std::to_string(t), t,
                    true, {}, {}, {}});
  }
  // Per run: the two ways of streaming the step's weights (seconds per pass), and the copy
  // bandwidth (for comparison with other measurements of the machine only).
  std::vector<double> readPass, sgemvPass, gemvPass, copyBw;
  vsup::kernels::BatchedGemv gemv(threads);
  constexpr int kPasses = 4;

  for (int run = 0; run < sizes.runs; ++run) {
    letBlasSettle();
    barrier();
    readPass.push_back(double(stepBytes) / probe.read(threads, kPasses));
    barrier();
    copyBw.push_back(probe.copy(threads));
    barrier();
    {
      mirror.run(1, 1);  // wakes OpenBLAS's threads, untimed
      auto t0 = Clock::now();
      for (int p = 0; p < kPasses; ++p) mirror.run(1, 1);
      sgemvPass.push_back(seconds(Clock::now() - t0) / kPasses);
    }
    barrier();
    {
      mirror.runGemv(gemv);
      auto t0 = Clock::now();
      for (int p = 0; p < kPasses; ++p) mirror.runGemv(gemv);
      gemvPass.push_back(seconds(Clock::now() - t0) / kPasses);
    }
    const double floorStep = std::min({readPass.back(), sgemvPass.back(), gemvPass.back()});
    for (Row& row : rows) {
      barrier();
      if (row.prefill) {
        const int64_t T = row.tokensPerUnit;
        auto t0 = Clock::now();
        mirror.run(T, 1);
        row.blas.push_back(seconds(Clock::now() - t0));
        row.floor.push_back(row.blas.back());
        LlamaShard::Seq q;
        q.tokens = prompts.data();
        q.count = int32_t(T);
        q.blockTable = prefillTable.data();
        q.blockCount = prefillBlocks;
        q.wantLogits = true;
        barrier();
        t0 = Clock::now();
        shard.forward({q}, logits);
        row.measured.push_back(seconds(Clock::now() - t0));
      } else {
        const int64_t B = row.tokensPerUnit;
        auto t0 = Clock::now();
        for (int step = 0; step < sizes.decodeSteps; ++step) mirror.run(B, B);
        row.blas.push_back(seconds(Clock::now() - t0) / sizes.decodeSteps);
        row.floor.push_back(floorStep);
        std::vector<int32_t> next(static_cast<size_t>(B));
        std::vector<LlamaShard::Seq> batch(static_cast<size_t>(B));
        letBlasSettle();
        barrier();
        t0 = Clock::now();
        for (int step = 0; step < sizes.decodeSteps; ++step) {
          for (int64_t s = 0; s < B; ++s) {
            next[size_t(s)] = tokenAt(step * B + s);
            LlamaShard::Seq& q = batch[size_t(s)];
            q.tokens = &next[size_t(s)];
            q.count = 1;
            q.startPos = kDecodePrompt + step;
            q.blockTable = tables[size_t(s)].data();
            q.blockCount = decodeBlocks;
            q.wantLogits = true;
          }
          shard.forward(batch, logits);
        }
        row.measured.push_back(seconds(Clock::now() - t0) / sizes.decodeSteps);
      }
    }
  }

  // Every rank's medians to rank 0: [read pass, sgemv pass, gemv pass, copy, bytes, then
  // measured, blas, floor per row].
  std::vector<float> mine{float(median(readPass)), float(median(sgemvPass)),
                          float(median(gemvPass)), float(median(copyBw)), float(stepBytes)};
  for (const Row& row : rows) {
    mine.push_back(float(median(row.measured)));
    mine.push_back(float(median(row.blas)));
    mine.push_back(float(median(row.floor)));
  }
  std::vector<float> all(mine.size() * tp);
  collective->allGather(mine.data(), mine.size(), all.data());
  if (rank != 0) return 0;

  // Times: the slower rank's; bandwidths: the slower rank's.
  auto worst = [&](size_t i) {
    float w = 0;
    for (uint32_t r = 0; r < tp; ++r) w = std::max(w, all[r * mine.size() + i]);
    return double(w);
  };
  auto slowestBandwidth = [&](size_t i) {
    float w = all[i];
    for (uint32_t r = 1; r < tp; ++r) w = std::min(w, all[r * mine.size() + i]);
    return double(w);
  };
  const double bytes = double(stepBytes);
  const double readGbs = bytes / worst(0) / 1e9, sgemvGbs = bytes / worst(1) / 1e9;
  const double gemvGbs = bytes / worst(2) / 1e9;
  const double copyGbs = slowestBandwidth(3) / 1e9;
  const char* fastest = readGbs >= std::max(sgemvGbs, gemvGbs)
                            ? "read"
                            : (sgemvGbs >= gemvGbs ? "sgemv" : "batched gemv");
  constexpr size_t kFirstRow = 5;
  auto at = [&](size_t row, size_t what) { return worst(kFirstRow + 3 * row + what); };
  FILE* table = a.tableToStderr ? stderr : stdout;
  nlohmann::json result;
  result["threads_per_rank"] = threads;
  result["step_weight_mb"] = bytes / 1e6;
  result["floor_read_gb_s"] = readGbs;
  result["floor_sgemv_gb_s"] = sgemvGbs;
  result["floor_batched_gemv_gb_s"] = gemvGbs;
  result["floor_from"] = fastest;
  result["copy_gb_s"] = copyGbs;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& row = rows[i];
    const double tokens = double(row.tokensPerUnit);
    const double measured = tokens / at(i, 0);
    const double blas = tokens / at(i, 1);
    const double floor = tokens / at(i, 2);
    char from[200];
    if (row.prefill) {
      std::snprintf(from, sizeof from, "sgemm on the same shapes: %.0f GFLOP/s",
                    mirror.flops(row.tokensPerUnit, 1) / at(i, 2) / 1e9);
      result[row.key + "_vs_sgemm"] = measured / floor;
      result[row.key + "_sgemm_tok_s"] = floor;
    } else {
      std::snprintf(from, sizeof from,
                    "%.1f MB/step once at %.1f GB/s (%s; read %.1f, sgemv %.1f, batched gemv "
                    "%.1f, copy %.1f)",
                    bytes / 1e6, bytes / at(i, 2) / 1e9, fastest, readGbs, sgemvGbs, gemvGbs,
                    copyGbs);
      result[row.key + "_vs_floor"] = measured / floor;
      result[row.key + "_floor_tok_s"] = floor;
      result[row.key + "_openblas_tok_s"] = blas;
    }
    result[row.key + "_tok_s"] = measured;
    std::fprintf(table, "| %u | %s | %.0f | %.0f | %.2f | %.0f | %s |\n", tp, row.name.c_str(),
                 measured, floor, measured / floor, blas, from);
  }
  std::fflush(table);
  if (a.resultFd >= 0) {
    std::string text = result.dump();
    vsup::OwnFd out(a.resultFd);
    for (size_t done = 0; done < text.size();) {
      ssize_t n = ::write(out.get(), text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::runtime_error("writing the rank's results failed");
      done += size_t(n);
    }
  }
  static_cast<void>(probe.sink());
  return 0;
}

// --- The parent -----------------------------------------------------------------------------

std::string cpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown CPU";
}

// OpenBLAS's build and the kernel set it chose for this CPU (DYNAMIC_ARCH builds choose at load
// time; $OPENBLAS_CORETYPE overrides the choice, and doubles or halves sgemm here), for the
// machine line. Loads the same library as engine/blas.cpp does; this process computes nothing
// with it.
std::string openblasDescription() {
  void* handle = ::dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return "OpenBLAS not loadable";
  using NameFn = char* (*)();
  auto config = reinterpret_cast<NameFn>(::dlsym(handle, "openblas_get_config"));
  auto core = reinterpret_cast<NameFn>(::dlsym(handle, "openblas_get_corename"));
  std::string d = config != nullptr ? config() : "OpenBLAS (unknown build)";
  if (core != nullptr) d += std::string(", kernels for ") + core();
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  if (forced != nullptr) d += std::string(" ($OPENBLAS_CORETYPE=") + forced + ")";
  return d;
}

std::string loadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  in >> one;
  return one;
}

// Runs `tp` rank processes of this program and waits for them. Returns false if one failed;
// otherwise, with `result`, the JSON object rank 0 wrote.
bool runRanks(uint32_t tp, const std::vector<std::string>& forwarded, nlohmann::json* result) {
  // Both above 4, so that dup2 onto 3 and 4 in the child really copies them (and clears
  // close-on-exec), and neither is overwritten by the other's dup2.
  vsup::OwnFd created(createSharedCollective(tp));
  vsup::OwnFd shared(VSUP_SYSCALL(::fcntl(created.get(), F_DUPFD_CLOEXEC, 10)));
  created.reset();
  vsup::OwnFd memfd(VSUP_SYSCALL(::memfd_create("cpu_engine_bench_result", MFD_CLOEXEC)));
  vsup::OwnFd results(VSUP_SYSCALL(::fcntl(memfd.get(), F_DUPFD_CLOEXEC, 10)));
  memfd.reset();
  std::vector<pid_t> pids;
  for (uint32_t r = 0; r < tp; ++r) {
    std::vector<std::string> args = forwarded;
    args.insert(args.end(),
                {"--tp", std::to_string(tp), "--rank", std::to_string(r), "--collective-fd", "3"});
    if (r == 0) args.insert(args.end(), {"--result-fd", "4"});
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, shared.get(), 3);
    if (r == 0) posix_spawn_file_actions_adddup2(&actions, results.get(), 4);
    pid_t pid = 0;
    int rc = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, cargs.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) throw std::runtime_error("posix_spawn failed: " + std::string(strerror(rc)));
    pids.push_back(pid);
  }
  shared.reset();  // the ranks have their copies
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ok = false;
  }
  if (!ok || result == nullptr) return ok;
  std::string text;
  char buffer[4096];
  for (off_t at = 0;;) {
    ssize_t n = VSUP_SYSCALL(::pread(results.get(), buffer, sizeof buffer, at));
    if (n == 0) break;
    text.append(buffer, size_t(n));
    at += n;
  }
  *result = nlohmann::json::parse(text);
  return true;
}

std::string joined(const std::vector<int32_t>& v) {
  std::string s;
  for (int32_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cpu_engine_bench: CPU engine decode and prefill tokens/s against their floors"};
  std::string modelName = kDefaultModel;
  std::vector<uint32_t> tps{1, 2};
  std::vector<int32_t> batches, prefill;
  int runs = 5;
  int threads = 0;
  bool quick = false, json = false;
  int64_t rank = -1;
  int fd = -1, resultFd = -1;
  app.add_option("--model", modelName, "a preset or a model directory");
  app.add_option("--tp", tps, "tensor-parallel sizes, e.g. 1,2")
      ->delimiter(',')
      ->check(CLI::Range(1u, 64u));
  app.add_option("--threads", threads,
                 "compute threads per rank (OpenBLAS and the engine); default max(1, nproc / TP)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--batches", batches, "decode batch sizes, e.g. 1,8,32 (the default)")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  app.add_option("--prefill", prefill,
                 "prefill lengths in tokens, e.g. 128,512,2048 (the default, less those past the "
                 "model's context)")
      ->delimiter(',')
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--runs", runs, "repetitions (medians are reported)")->check(CLI::Range(1, 1000));
  app.add_flag("--quick", quick, "one short repetition with small sizes (smoke test)");
  app.add_flag("--json", json, "one JSON object on stdout (the table goes to stderr)");
  app.add_option("--rank", rank)->group("");            // internal: one rank process
  app.add_option("--collective-fd", fd)->group("");     // internal
  app.add_option("--result-fd", resultFd)->group("");   // internal: rank 0's JSON
  CLI11_PARSE(app, argc, argv);
  try {
    ModelSource model = resolveModel(modelName, "auto", false);
    const LlamaConfig& c = model.config;
    Sizes sizes = quick ? quickSizes() : Sizes{};
    if (!quick) sizes.runs = runs;
    if (!batches.empty()) sizes.batches = batches;
    const int64_t context = c.maxPositions;
    if (!prefill.empty()) {
      for (int32_t t : prefill) {
        if (t > context) {
          throw std::invalid_argument("--prefill " + std::to_string(t) + ": longer than model " +
                                      model.name + "'s context (" + std::to_string(context) +
                                      " positions)");
        }
      }
      sizes.prefillTokens = prefill;
    } else {
      std::vector<int32_t> fit;
      for (int32_t t : sizes.prefillTokens) {
        if (t <= context) fit.push_back(t);
      }
      if (fit.size() != sizes.prefillTokens.size() && rank < 0) {
        std::fprintf(stderr,
                     "cpu_engine_bench: prefill rows past model %s's context (%lld positions) "
                     "left out\n",
                     model.name.c_str(), static_cast<long long>(context));
      }
      if (fit.empty()) fit.push_back(int32_t(std::min<int64_t>(context, 128)));
      sizes.prefillTokens = fit;
    }
    if (kDecodePrompt + sizes.decodeSteps > context) {
      throw std::invalid_argument("model " + model.name + "'s context (" +
                                  std::to_string(context) + " positions) is shorter than the " +
                                  std::to_string(kDecodePrompt + sizes.decodeSteps) +
                                  " positions the decode rows use");
    }
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    auto threadsFor = [&](uint32_t tp) {
      return threads > 0 ? threads : int(std::max(1u, cores / tp));
    };
    if (rank >= 0) {
      RankArgs a;
      a.tp = tps.at(0);
      a.rank = uint32_t(rank);
      a.threads = threadsFor(a.tp);
      a.collectiveFd = fd;
      a.resultFd = resultFd;
      a.tableToStderr = json;
      return runRank(model, a, sizes);
    }
    for (uint32_t tp : tps) c.checkTensorParallel(tp);

    FILE* table = json ? stderr : stdout;
    const std::string machine = cpuModel(), openblas = openblasDescription();
    const std::string loadStart = loadAverage();
    std::fprintf(table, "Machine: %s, %u cores, load average %s at start; %s.\n", machine.c_str(),
                 cores, loadStart.c_str(), openblas.c_str());
    std::string threadsText = threads > 0 ? std::to_string(threads)
                                          : "max(1, " + std::to_string(cores) + " / TP)";
    std::fprintf(table,
                 "Model %s (%s weights), fp32, KV block size %d; decode after a %d-token prompt, "
                 "%d steps, forward only (no sampling). Threads per rank (OpenBLAS and the "
                 "engine) = %s. Medians of %d runs.\n\n",
                 model.name.c_str(), model.dummyWeights ? "dummy" : "safetensors", kBlockSize,
                 kDecodePrompt, sizes.decodeSteps, threadsText.c_str(), sizes.runs);
    std::fprintf(table,
                 "| TP | case | measured tok/s | floor tok/s | ratio | OpenBLAS alone tok/s "
                 "| floor from |\n");
    std::fprintf(table, "|---|---|---:|---:|---:|---:|---|\n");
    std::fflush(table);
    std::vector<std::string> forwarded{argv[0], "--model", modelName, "--runs",
                                       std::to_string(sizes.runs), "--batches",
                                       joined(sizes.batches), "--prefill",
                                       joined(sizes.prefillTokens)};
    if (threads > 0) forwarded.insert(forwarded.end(), {"--threads", std::to_string(threads)});
    if (quick) forwarded.push_back("--quick");
    if (json) forwarded.push_back("--json");
    nlohmann::json out;
    out["machine"] = machine;
    out["cores"] = cores;
    out["openblas"] = openblas;
    out["model"] = model.name;
    out["weights"] = model.dummyWeights ? "dummy" : "safetensors";
    out["runs"] = sizes.runs;
    out["decode_steps"] = sizes.decodeSteps;
    out["load_average_start"] = loadStart;
    bool ok = true;
    for (uint32_t tp : tps) {
      nlohmann::json one;
      bool done = runRanks(tp, forwarded, &one);
      if (done) out["tp" + std::to_string(tp)] = one;
      ok = done && ok;
    }
    // Other tenants' load shows up as a TP 2 "OpenBLAS alone" that falls to half of TP 1's.
    const std::string loadEnd = loadAverage();
    std::fprintf(table, "\nLoad average at the end: %s.\n", loadEnd.c_str());
    out["load_average_end"] = loadEnd;
    if (json) std::printf("%s\n", out.dump(1).c_str());
    if (!ok) std::fprintf(stderr, "cpu_engine_bench: a rank process failed\n");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cpu_engine_bench: %s\n", e.what());
    return 1;
  }
}
