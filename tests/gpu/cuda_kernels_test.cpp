// The CUDA engine's kernels on a GPU against the CPU engine's kernels on the same inputs, in
// fp32 and bf16. Skips without a GPU (gpu_main.cpp). tests/gpu/run.sh runs it under
// compute-sanitizer too (memcheck, and racecheck for attention's shared-memory merge).
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu_kernels.h"
#include "kernels/kernel_test_util.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_math.h"

namespace vsup::kernels::cuda {
namespace {

using testing::maxRelativeError;
using testing::randomVector;

// A device copy of host values, in fp32 or as bf16, freed with it.
class Device {
 public:
  explicit Device(size_t bytes) {
    REQUIRE(cudaMalloc(&p_, std::max<size_t>(bytes, 4)) == cudaSuccess);
    REQUIRE(cudaMemset(p_, 0, std::max<size_t>(bytes, 4)) == cudaSuccess);
  }
  template <typename T>
  explicit Device(const std::vector<T>& host) : Device(host.size() * sizeof(T)) {
    REQUIRE(cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) ==
            cudaSuccess);
  }
  static Device bf16(const std::vector<float>& host) {
    std::vector<uint16_t> h(host.size());
    for (size_t i = 0; i < h.size(); ++i) h[i] = floatToBf16(host[i]);
    return Device(h);
  }
  ~Device() { cudaFree(p_); }
  Device(const Device&) = delete;
  Device(Device&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  template <typename T = float>
  T* get() const {
    return static_cast<T*>(p_);
  }
  std::vector<float> floats(size_t n) const {
    std::vector<float> out(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(out.data(), p_, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }
  std::vector<float> bf16Floats(size_t n) const {
    std::vector<uint16_t> h(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(h.data(), p_, n * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = bf16ToFloat(h[i]);
    return out;
  }

 private:
  void* p_ = nullptr;
};

std::vector<float> roundedToBf16(std::vector<float> v) {
  for (float& x : v) x = bf16ToFloat(floatToBf16(x));
  return v;
}

}  // namespace

TEST_CASE("addRmsNorm and rmsNormRows: the residual add and the norm of the CPU kernels") {
  const int rows = 5, hidden = 768;
  std::vector<float> x = randomVector(size_t(rows * hidden), 1, -3, 3);
  std::vector<float> add = randomVector(x.size(), 2);
  std::vector<float> w = randomVector(size_t(hidden), 3);
  std::vector<float> sum = x, expected(x.size());
  kernels::addInPlace(sum.data(), add.data(), int(sum.size()));
  for (int r = 0; r < rows; ++r) {
    kernels::rmsNorm(&expected[size_t(r * hidden)], &sum[size_t(r * hidden)], w.data(), hidden,
                     1e-5f);
  }
  for (DType t : {DType::F32, DType::BF16}) {
    Device dx(x), dadd(add), dw(w), out(x.size() * 4);
    addRmsNorm(dx.get(), dadd.get(), dw.get(), out.get(), t, rows, hidden, 1e-5f, nullptr);
    CHECK(maxRelativeError(dx.floats(x.size()), sum, 1e-3f) < 1e-6f);
    if (t == DType::F32) {
      CHECK(maxRelativeError(out.floats(x.size()), expected, 1e-3f) < 2e-6f);
    } else {
      CHECK(maxRelativeError(out.bf16Floats(x.size()), expected, 1e-2f) < 8e-3f);
    }
  }
  // Rows 4 and 1 only, with the add: what the last layer does for the sampled tokens.
  std::vector<int32_t> index = {4, 1};
  Device dx(x), dadd(add), dw(w), di(index), out(size_t(2 * hidden) * 4);
  rmsNormRows(dx.get(), dadd.get(), di.get<int32_t>(), dw.get(), out.get(), DType::F32, 2, hidden,
              1e-5f, nullptr);
  std::vector<float> got = out.floats(size_t(2 * hidden));
  std::vector<float> want(expected.begin() + 4 * hidden, expected.begin() + 5 * hidden);
  want.insert(want.end(), expected.begin() + hidden, expected.begin() + 2 * hidden);
  CHECK(maxRelativeError(got, want, 1e-3f) < 2e-6f);
}

TEST_CASE("siluMul and embedGather against the CPU") {
  const int tokens = 3, mlp = 1000;
  std::vector<float> gu = randomVector(size_t(tokens * 2 * mlp), 4, -8, 8);
  std::vector<float> expected(size_t(tokens * mlp));
  for (int t = 0; t < tokens; ++t) {
    kernels::siluMul(&expected[size_t(t * mlp)], &gu[size_t(t * 2 * mlp)],
                     &gu[size_t(t * 2 * mlp + mlp)], mlp);
  }
  Device dgu(gu), out(expected.size() * 4);
  siluMul(out.get(), DType::F32, dgu.get(), tokens, mlp, nullptr);
  CHECK(maxRelativeError(out.floats(expected.size()), expected, 1e-3f) < 2e-6f);

  const int vocab = 50, hidden = 96;
  std::vector<float> embed = randomVector(size_t(vocab * hidden), 5);
  std::vector<int32_t> ids = {7, 0, 49, 7};
  Device de = Device::bf16(embed), di(ids), rows(ids.size() * size_t(hidden) * 4);
  embedGather(rows.get(), de.get(), DType::BF16, di.get<int32_t>(), int(ids.size()), hidden,
              nullptr);
  std::vector<float> got = rows.floats(ids.size() * size_t(hidden));
  std::vector<float> rounded = roundedToBf16(embed);
  for (size_t t = 0; t < ids.size(); ++t) {
    for (int i = 0; i < hidden; ++i) {
      REQUIRE(got[t * size_t(hidden) + size_t(i)] ==
              rounded[size_t(ids[t]) * size_t(hidden) + size_t(i)]);
    }
  }
}

TEST_CASE("rotary, writeKv and pagedAttention: a prefill chunk and a decode token against the "
          "CPU's RopeTable, writeKv and pagedAttention") {
  const int qHeads = 8, kvHeads = 2, hd = 128, blockSize = 16, numBlocks = 20, maxPos = 512;
  const int qkvDim = (qHeads + 2 * kvHeads) * hd;
  kernels::RopeTable rope(hd, 10000.0f, maxPos);
  std::vector<float> cosT(size_t(maxPos * hd / 2)), sinT(cosT.size());
  for (int p = 0; p < maxPos; ++p) {
    for (int j = 0; j < hd / 2; ++j) {
      double a = ropeAngle(p, j, hd, 10000.0);
      cosT[size_t(p * hd / 2 + j)] = float(std::cos(a));
      sinT[size_t(p * hd / 2 + j)] = float(std::sin(a));
    }
  }
  // Two sequences: a 40-token prompt chunk at 0.., and one decode token at position 70 of a
  // sequence whose first 70 positions the CPU reference writes first.
  std::vector<int32_t> tableA = {3, 9, 14}, tableB = {0, 5, 11, 2, 19};
  kernels::PagedLayout layout{blockSize, kvHeads, hd};
  const size_t layer = size_t(numBlocks * blockSize) * size_t(kvHeads * hd);
  std::vector<float> kCpu(layer, 0.0f), vCpu(layer, 0.0f);
  std::vector<float> history = randomVector(size_t(70 * qkvDim), 6);
  for (int p = 0; p < 70; ++p) {
    float* row = &history[size_t(p * qkvDim)];
    rope.apply(row + qHeads * hd, kvHeads, p);
    kernels::writeKv(kCpu.data(), vCpu.data(), layout, tableB.data(), p, row + qHeads * hd,
                     row + (qHeads + kvHeads) * hd);
  }
  std::vector<float> step = randomVector(size_t(41 * qkvDim), 7);
  std::vector<int32_t> positions, slots, offsets;
  for (int i = 0; i < 40; ++i) {
    positions.push_back(i);
    slots.push_back(tableA[size_t(i / blockSize)] * blockSize + i % blockSize);
    offsets.push_back(0);
  }
  positions.push_back(70);
  slots.push_back(tableB[70 / blockSize] * blockSize + 70 % blockSize);
  offsets.push_back(int32_t(tableA.size()));
  std::vector<int32_t> tables = tableA;
  tables.insert(tables.end(), tableB.begin(), tableB.end());

  // The CPU reference: rotate, write, attend, token by token.
  std::vector<float> cpuStep = step, expected(size_t(41 * qHeads * hd));
  std::vector<float> scratch(128);
  for (int t = 0; t < 41; ++t) {
    float* row = &cpuStep[size_t(t * qkvDim)];
    const int32_t* table = t < 40 ? tableA.data() : tableB.data();
    rope.apply(row, qHeads + kvHeads, positions[size_t(t)]);
    kernels::writeKv(kCpu.data(), vCpu.data(), layout, table, positions[size_t(t)],
                     row + qHeads * hd, row + (qHeads + kvHeads) * hd);
  }
  for (int t = 0; t < 41; ++t) {
    const int32_t* table = t < 40 ? tableA.data() : tableB.data();
    kernels::pagedAttention(&expected[size_t(t * qHeads * hd)], &cpuStep[size_t(t * qkvDim)],
                            kCpu.data(), vCpu.data(), layout, table, positions[size_t(t)] + 1,
                            qHeads, 1.0f / std::sqrt(float(hd)), scratch.data());
  }

  // The GPU: the history's cache as the CPU wrote it, then the step's kernels.
  std::vector<float> historyK = kCpu, historyV = vCpu;
  for (size_t i = 0; i < layer; ++i) {
    // Only the history's slots: the step's own are written by the kernel under test.
    bool stepSlot = false;
    size_t slot = i / size_t(kvHeads * hd);
    for (int32_t s : slots) stepSlot |= size_t(s) == slot;
    if (stepSlot) historyK[i] = historyV[i] = 0.0f;
  }
  Device dqkv(step), dcos(cosT), dsin(sinT), dpos(positions), dslots(slots), doff(offsets),
      dtab(tables), dk(historyK), dv(historyV), out(expected.size() * 4);
  rotary(dqkv.get(), dpos.get<int32_t>(), dcos.get(), dsin.get(), 41, qHeads, kvHeads, hd,
         nullptr);
  writeKv(dk.get(), dv.get(), DType::F32, dqkv.get(), dslots.get<int32_t>(), 41, qHeads, kvHeads,
          hd, nullptr);
  CHECK(maxRelativeError(dk.floats(layer), kCpu, 1e-3f) < 1e-6f);
  CHECK(maxRelativeError(dv.floats(layer), vCpu, 1e-3f) < 1e-6f);
  pagedAttention(out.get(), DType::F32, dqkv.get(), dk.get(), dv.get(), DType::F32,
                 dpos.get<int32_t>(), dtab.get<int32_t>(), doff.get<int32_t>(), 41, qHeads,
                 kvHeads, hd, blockSize, 1.0f / std::sqrt(float(hd)), nullptr);
  CHECK(maxRelativeError(out.floats(expected.size()), expected, 0.05f) < 2e-5f);
}

TEST_CASE("argmaxRows: greedy sampling's order, ties and NaN included") {
  const int vocab = 5000;
  std::vector<float> logits = randomVector(size_t(3 * vocab), 8, -5, 5);
  logits[100] = logits[4000] = 9.0f;              // a tie in row 0: the lower index
  logits[size_t(vocab) + 7] = std::nanf("");      // NaN loses
  logits[size_t(vocab) + 8] = 9.5f;
  for (int i = 0; i < vocab; ++i) logits[size_t(2 * vocab + i)] = -INFINITY;  // none: 0
  Device d(logits), out(12);
  argmaxRows(out.get<int32_t>(), d.get(), 3, vocab, vocab, nullptr);
  std::vector<int32_t> got(3);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  REQUIRE(cudaMemcpy(got.data(), out.get(), 12, cudaMemcpyDeviceToHost) == cudaSuccess);
  std::vector<float> scratch;
  kernels::SamplingConfig greedy;
  greedy.temperature = 0;
  for (int r = 0; r < 3; ++r) {
    CHECK(got[size_t(r)] ==
          kernels::sampleToken(&logits[size_t(r * vocab)], vocab, greedy, 0, scratch));
  }
  CHECK(got[0] == 100);
  CHECK(got[1] == 8);
  CHECK(got[2] == 0);
}

TEST_CASE("joinVocabShards: the full rows from an all-gather of vocab-parallel shards") {
  const int rows = 2, tp = 3, shard = 4, vocab = 10;  // the last shard has 2 of 4 real entries
  std::vector<float> gathered(size_t(tp * rows * shard));
  for (size_t i = 0; i < gathered.size(); ++i) gathered[i] = float(i);
  Device d(gathered), out(size_t(rows * vocab) * 4);
  joinVocabShards(out.get(), d.get(), rows, tp, shard, vocab, nullptr);
  std::vector<float> got = out.floats(size_t(rows * vocab));
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < vocab; ++v) {
      CHECK(got[size_t(r * vocab + v)] == gathered[size_t((v / shard * rows + r) * shard + v % shard)]);
    }
  }
}

}  // namespace vsup::kernels::cuda
