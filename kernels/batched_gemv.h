// Batched matrix-vector products for small batches: y[t, o] = Σ_k x[t, k] · w[o, k] for T
// inputs at once, reading each row of w once for the whole batch (sgemm at a small T repacks
// the weights on every call; T sgemv calls would read them T times).
//
// Rows of w are taken in blocks of a few (the block stays in L1 while every input tile is
// multiplied by it; the inputs stay in L2), each output a dot product in vector lanes summed in
// a fixed tree at the end. Every output is computed in the same order whatever T, the tile it
// falls in or the thread that computes it: a row's result does not depend on the batch around
// it or on the number of threads (it does depend on the instruction set, below, in the last
// bits: FMA contraction and the lane count).
//
// Built for AVX-512, AVX2 + FMA and the x86-64 baseline (SSE2); the widest the CPU and the OS
// support is chosen once per process (no ifunc: it runs under the sanitizers too). Defining
// VSUP_KERNEL_CLONES empty on the command line (as kernels/meson.build does under a sanitizer)
// builds the baseline only.
//
// Thread rules: batchedGemvRows is a pure function (any thread). BatchedGemv owns threads - 1
// worker threads, started in its constructor and joined in its destructor; run() is called by
// one thread at a time (it computes a share itself), and is not reentrant.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace vsup::kernels {

enum class GemvIsa { kBaseline, kAvx2, kAvx512 };

// The instruction sets this CPU and OS can run, baseline first; the last is what
// batchedGemvRows uses.
const std::vector<GemvIsa>& gemvIsas();
const char* gemvIsaName(GemvIsa isa);

// y[t * ldy + o] = Σ_k x[t * ldx + k] · w[o * in + k] for t < T and rowBegin <= o < rowEnd.
// x rows are ldx >= in floats apart, y rows ldy floats apart; any alignment.
void batchedGemvRows(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                     const float* w, int64_t in, int64_t rowBegin, int64_t rowEnd);
// The same with a given instruction set (one of gemvIsas(); for the tests).
void batchedGemvRows(GemvIsa isa, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T,
                     const float* w, int64_t in, int64_t rowBegin, int64_t rowEnd);

// batchedGemvRows over all `out` rows, split into chunks that the calling thread and the
// workers take in turn (dynamic, so that a thread preempted by another process delays the call
// by at most a chunk). Workers spin briefly after a call (the next product of a step follows
// within microseconds), then sleep on a futex until the next.
class BatchedGemv {
 public:
  explicit BatchedGemv(int threads);
  ~BatchedGemv();
  BatchedGemv(const BatchedGemv&) = delete;
  BatchedGemv& operator=(const BatchedGemv&) = delete;

  int threads() const { return int(workers_.size()) + 1; }
  void run(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t T, const float* w,
           int64_t out, int64_t in);

 private:
  struct Job {
    float* y;
    int64_t ldy;
    const float* x;
    int64_t ldx;
    int64_t T;
    const float* w;
    int64_t out, in, chunkRows, chunks;
  };
  void work(uint32_t generation);
  void workerLoop();

  Job job_{};
  // (generation << 32) | next chunk: a worker claims a chunk of the generation it woke for only,
  // so one that wakes late never touches the next call's job.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint32_t> generation_{0};  // what sleeping workers wait on
  std::atomic<int64_t> done_{0};          // chunks of the current call finished
  std::atomic<bool> stop_{false};
  std::vector<std::thread> workers_;
};

}  // namespace vsup::kernels
