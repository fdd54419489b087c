// The CUDA engine's module (libvsup-cuda.so): one rank's shard of a Llama model on one GPU. The
// matrix products on cuBLAS (bf16 or fp32 inputs, fp32 accumulation and outputs), the rest in
// kernels/cuda/, the tensor-parallel collectives on NCCL through a non-blocking communicator
// that only this shard's device thread touches, every wait bounded by the CommGuard.
//
// Thread: every CUDA, cuBLAS and NCCL call runs on the shard's own device thread (created with
// it, joined by its destructor); the public methods hand their work to it and wait, so a caller
// on any thread gets the same rule: one thread talks to the GPU and to NCCL.
#include "engine/cuda/cuda_shard.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "engine/collective.h"
#include "engine/comm_guard.h"
#include "engine/cuda/nccl_device.h"
#include "engine/cuda/step_layout.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_math.h"

namespace vsup::engine::cuda {
namespace {

namespace k = vsup::kernels::cuda;

std::string cudaText(cudaError_t e) {
  return std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaText(e));
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(what) + ": " + cublasGetStatusString(s));
  }
}

// Which GPU rank `rank` computes on, or why there is none: the message the user sees when
// `vsup run --engine cuda` starts on a machine without one.
// This node's GPU for its rank `localRank` of `localRanks`.
int selectDevice(uint32_t localRank, uint32_t localRanks) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    std::string why = "cudaGetDeviceCount: " + cudaText(e);
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice) {
      void* driver = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
      if (driver == nullptr) driver = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
      if (driver == nullptr) {
        why += "; the NVIDIA driver's libcuda.so.1 cannot be loaded: no NVIDIA driver is "
               "installed on this machine (or its library is not on the loader's path)";
      } else {
        ::dlclose(driver);
        why += "; the NVIDIA driver is installed, but sees no usable GPU (check nvidia-smi "
               "and CUDA_VISIBLE_DEVICES)";
      }
    }
    throw std::runtime_error("no CUDA device: " + why);
  }
  if (count == 0) {
    throw std::runtime_error("no CUDA device: the CUDA runtime sees no GPU (check nvidia-smi and "
                             "CUDA_VISIBLE_DEVICES)");
  }
  if (localRanks > uint32_t(count)) {
    throw std::runtime_error(std::to_string(localRanks) +
                             " ranks on this node (--tensor-parallel-size / --nnodes): each "
                             "needs a GPU of its own, and this machine shows " +
                             std::to_string(count) + " (CUDA_VISIBLE_DEVICES)");
  }
  return int(localRank);
}

// Runs jobs on one thread, in order; run() waits for its job and rethrows what it threw.
class DeviceThread {
 public:
  DeviceThread() : thread_([this] { loop(); }) {}
  ~DeviceThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  void run(const std::function<void()>& job) {
    std::exception_ptr error;
    bool done = false;
    std::mutex m;
    std::condition_variable cv;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back([&] {
        try {
          job();
        } catch (...) {
          error = std::current_exception();
        }
        std::lock_guard<std::mutex> l(m);
        done = true;
        cv.notify_all();
      });
    }
    wake_.notify_all();
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
    if (error) std::rethrow_exception(error);
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

// A device allocation that grows (scratch reused between steps).
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

class CudaShard final : public Shard {
 public:
  explicit CudaShard(const ShardSpec& spec) : spec_(spec) {
    const LlamaConfig& c = spec_.model;
    if (c.headDim % 32 != 0 || c.headDim > k::kMaxHeadDim) {
      throw std::invalid_argument("the CUDA engine needs head_dim a multiple of 32 up to " +
                                  std::to_string(k::kMaxHeadDim) + ", the model has " +
                                  std::to_string(c.headDim));
    }
    dtype_ = spec_.bf16 ? k::DType::BF16 : k::DType::F32;
    elem_ = spec_.bf16 ? 2 : 4;
    try {
      thread_.run([this] { open(); });
    } catch (...) {
      thread_.run([this] { close(); });  // what open() took before it failed
      throw;
    }
  }

  ~CudaShard() override {
    thread_.run([this] { close(); });
  }

  void loadGlobals(const std::vector<float>& embedding, const std::vector<float>& lmHead,
                   const std::vector<float>& finalNorm) override {
    thread_.run([&] {
      embed_ = upload(embedding, true);
      lmHead_ = upload(lmHead, true);
      finalNorm_ = upload(finalNorm, false);
    });
  }

  void loadLayer(int64_t i, const ShardLayerWeights& w) override {
    thread_.run([&] {
      Layer& l = layers_.at(size_t(i));
      l.inputNorm = upload(w.inputNorm, false);
      l.postNorm = upload(w.postNorm, false);
      l.qkv = upload(w.qkv, true);
      l.o = upload(w.o, true);
      l.gateUp = upload(w.gateUp, true);
      l.down = upload(w.down, true);
    });
  }

  void forward(const std::vector<SeqInput>& batch, std::vector<float>& logits,
               std::vector<int32_t>& argmax) override {
    thread_.run([&] { step(batch, logits, argmax); });
  }

  int64_t deviceBytes() const override { return int64_t(allocated_); }

 private:
  struct Layer {
    Buffer inputNorm, postNorm, qkv, o, gateUp, down;
  };

  // ---- on the device thread --------------------------------------------------------------

  void open() {
    const LlamaConfig& c = spec_.model;
    device_ = selectDevice(spec_.localRank, spec_.localRanks);
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate");
    nccl_.done = done_;
    check(cublasCreate(&blas_), "cublasCreate");
    check(cublasSetStream(blas_, stream_), "cublasSetStream");
    // Strict fp32 products in fp32 mode (no TF32), for parity with the CPU engine.
    check(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    layers_.resize(size_t(c.numLayers));
    // The KV cache: per layer K then V, each [numBlocks * blockSize][kvHeads][headDim].
    layerKvElems_ = size_t(spec_.numBlocks) * size_t(spec_.blockSize) *
                    size_t(spec_.shard.kvHeads) * size_t(c.headDim);
    kv_ = allocate(layerKvElems_ * 2 * size_t(c.numLayers) * elem_, "the KV cache");
    check(cudaMemsetAsync(kv_.data, 0, kv_.bytes, stream_), "cudaMemset");
    // Rotary tables, from the CPU RopeTable's formula.
    const int half = int(c.headDim / 2);
    const int64_t positions = std::max<int64_t>(1, spec_.maxPositions);
    std::vector<float> cosT(size_t(positions * half)), sinT(cosT.size());
    for (int64_t p = 0; p < positions; ++p) {
      for (int j = 0; j < half; ++j) {
        double a = k::ropeAngle(int(p), j, int(c.headDim), c.ropeTheta);
        cosT[size_t(p * half + j)] = float(std::cos(a));
        sinT[size_t(p * half + j)] = float(std::sin(a));
      }
    }
    cos_ = upload(cosT, false);
    sin_ = upload(sinT, false);
    check(cudaMallocHost(&pinned_, kPinnedBytes), "cudaMallocHost");
    CommGuardOptions o;
    o.rank = spec_.rank;
    o.timeoutMs = spec_.collectiveTimeoutMs;
    o.cancel = spec_.cancel;
    o.deadPeer = spec_.deadPeer;
    guard_ = std::make_unique<CommGuard>(nccl_, o);
    if (spec_.tp > 1) {
      if (spec_.ncclUniqueId.size() != sizeof(ncclUniqueId)) {
        throw std::runtime_error("rank " + std::to_string(spec_.rank) +
                                 ": no NCCL unique id from engine-core");
      }
      ncclUniqueId id;
      std::memcpy(&id, spec_.ncclUniqueId.data(), sizeof id);
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      ncclResult_t r = ncclCommInitRankConfig(&nccl_.comm, int(spec_.tp), id, int(spec_.rank),
                                              &config);
      if (r != ncclSuccess && r != ncclInProgress) {
        throw std::runtime_error("ncclCommInitRankConfig: " + std::string(ncclGetErrorString(r)));
      }
      guard_->awaitInit(spec_.initTimeoutMs);
    }
    check(cudaStreamSynchronize(stream_), "the KV cache's initialisation");
  }

  void close() {
    // Finalize when the communicator is healthy (every rank is being stopped at the same step
    // boundary), bounded; abort otherwise. The guard never leaves it behind.
    if (guard_ && !guard_->closed() && nccl_.comm != nullptr) {
      try {
        guard_->finalize();
      } catch (const std::exception&) {
        // aborted by the guard; the rank is going away anyway
      }
    }
    guard_.reset();
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    allocated_ = 0;
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    pinned_ = nullptr;
    blas_ = nullptr;
    done_ = nullptr;
    stream_ = nullptr;
  }

  Buffer allocate(size_t bytes, const char* what) {
    Buffer b;
    if (bytes == 0) return b;
    cudaError_t e = cudaMalloc(&b.data, bytes);
    if (e != cudaSuccess) {
      throw std::runtime_error("rank " + std::to_string(spec_.rank) + ": cannot allocate " +
                               std::to_string(bytes >> 20) + " MiB on GPU " +
                               std::to_string(device_) + " for " + what + ": " + cudaText(e));
    }
    b.bytes = bytes;
    owned_.push_back(b.data);
    allocated_ += bytes;
    return b;
  }

  // A scratch buffer of at least `bytes`, reallocated (after the stream drains) when it must
  // grow.
  void ensure(Buffer& b, size_t bytes) {
    if (b.bytes >= bytes) return;
    if (b.data != nullptr) {
      check(cudaStreamSynchronize(stream_), "a step's scratch");
      owned_.erase(std::find(owned_.begin(), owned_.end(), b.data));
      allocated_ -= b.bytes;
      cudaFree(b.data);
    }
    b = allocate(std::max(bytes, b.bytes * 2), "a step's scratch");
  }

  // Host fp32 to the device: in the engine's dtype (`weights`) or fp32.
  Buffer upload(const std::vector<float>& host, bool weights) {
    const bool bf16 = weights && spec_.bf16;
    Buffer b = allocate(host.size() * (bf16 ? 2 : 4), "the weights");
    if (!bf16) {
      check(cudaMemcpy(b.data, host.data(), b.bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
      return b;
    }
    std::vector<uint16_t> half(host.size());
    for (size_t i = 0; i < host.size(); ++i) half[i] = k::floatToBf16(host[i]);
    check(cudaMemcpy(b.data, half.data(), b.bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    return b;
  }

  // y[T, out] = x[T, in] · w[out, in]ᵀ (row-major), x in the dtype, y fp32.
  void gemm(float* y, const void* x, int64_t T, const Buffer& w, int64_t out, int64_t in) {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = spec_.bf16 ? CUDA_R_16BF : CUDA_R_32F;
    check(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(T), int(in), &one, w.data,
                       t, int(in), x, t, int(in), &zero, y, CUDA_R_32F, int(out),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  }

  void nccl(ncclResult_t r, const char* what) {
    if (r == ncclInProgress) {
      guard_->awaitComm();
      return;
    }
    if (r != ncclSuccess) guard_->failNow(std::string(what) + ": " + ncclGetErrorString(r));
  }

  void allReduce(float* data, size_t n) {
    if (spec_.tp == 1) return;
    nccl(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, nccl_.comm, stream_),
         "ncclAllReduce");
  }

  void step(const std::vector<SeqInput>& batch, std::vector<float>& logits,
            std::vector<int32_t>& argmax) {
    if (guard_->broken()) guard_->awaitStep();  // throws the first failure again
    const LlamaConfig& c = spec_.model;
    const RankShard& s = spec_.shard;
    const int64_t H = c.hiddenSize, hd = c.headDim;
    const int64_t qkvDim = (s.qHeads + 2 * s.kvHeads) * hd, attnDim = s.qHeads * hd;
    // The step's int32 inputs, staged in pinned memory (step_layout.h).
    const StepLayout layout = layOutStep(c, spec_.numBlocks, spec_.blockSize, batch);
    const std::vector<int32_t>& tokens = layout.tokens;
    const std::vector<int32_t>& positions = layout.positions;
    const std::vector<int32_t>& tables = layout.tables;
    const std::vector<int32_t>& rows = layout.rows;
    const std::vector<bool>& greedy = layout.greedy;
    const int T = int(tokens.size()), R = int(rows.size());
    logits.clear();
    argmax.assign(size_t(R), -1);
    if (T == 0) return;
    for (int32_t p : positions) {
      if (p >= spec_.maxPositions) {
        throw std::invalid_argument("position " + std::to_string(p) +
                                    " is past the served context (" +
                                    std::to_string(spec_.maxPositions) + ")");
      }
    }
    const size_t sampled = layout.sampledRows();
    if (size_t(R) * 4 + sampled * size_t(c.vocabSize) * 4 > kPinnedBytes) {
      throw std::invalid_argument(std::to_string(sampled) + " sampled rows of " +
                                  std::to_string(c.vocabSize) +
                                  " logits exceed the 64 MiB staging buffer: lower --max-num-seqs");
    }
    // Inputs: one copy.
    const std::vector<int32_t> packed = layout.packed();
    ensure(ints_, packed.size() * 4);
    if (packed.size() * 4 > kPinnedBytes / 2) {
      check(cudaMemcpyAsync(ints_.data, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice,
                            stream_),
            "cudaMemcpyAsync");
      check(cudaStreamSynchronize(stream_), "the step's inputs");
    } else {
      std::memcpy(pinned_, packed.data(), packed.size() * 4);
      check(cudaMemcpyAsync(ints_.data, pinned_, packed.size() * 4, cudaMemcpyHostToDevice,
                            stream_),
            "cudaMemcpyAsync");
    }
    const int32_t* dTokens = ints_.as<int32_t>();
    const int32_t* dPositions = dTokens + T;
    const int32_t* dSlots = dPositions + T;
    const int32_t* dOffsets = dSlots + T;
    const int32_t* dTables = dOffsets + T;
    const int32_t* dRows = dTables + tables.size();

    ensure(x_, size_t(T * H) * 4);
    ensure(normed_, size_t(T * H) * elem_);
    ensure(qkv_, size_t(T * qkvDim) * 4);
    ensure(attn_, size_t(T * attnDim) * elem_);
    ensure(proj_, size_t(T * H) * 4);
    ensure(gateUp_, size_t(T * 2 * s.mlp) * 4);
    ensure(act_, size_t(T * s.mlp) * elem_);
    float* x = x_.as<float>();
    float* proj = proj_.as<float>();
    const float eps = float(c.rmsEps);
    const float scale = 1.0f / std::sqrt(float(hd));

    k::embedGather(x, embed_.data, dtype_, dTokens, T, int(H), stream_);
    for (int64_t li = 0; li < c.numLayers; ++li) {
      const Layer& l = layers_[size_t(li)];
      char* kCache = static_cast<char*>(kv_.data) + size_t(2 * li) * layerKvElems_ * elem_;
      char* vCache = kCache + layerKvElems_ * elem_;
      k::addRmsNorm(x, li == 0 ? nullptr : proj, l.inputNorm.as<float>(), normed_.data, dtype_,
                    T, int(H), eps, stream_);
      gemm(qkv_.as<float>(), normed_.data, T, l.qkv, qkvDim, H);
      k::rotary(qkv_.as<float>(), dPositions, cos_.as<float>(), sin_.as<float>(), T,
                int(s.qHeads), int(s.kvHeads), int(hd), stream_);
      k::writeKv(kCache, vCache, dtype_, qkv_.as<float>(), dSlots, T, int(s.qHeads),
                 int(s.kvHeads), int(hd), stream_);
      k::pagedAttention(attn_.data, dtype_, qkv_.as<float>(), kCache, vCache, dtype_, dPositions,
                        dTables, dOffsets, T, int(s.qHeads), int(s.kvHeads), int(hd),
                        spec_.blockSize, scale, stream_);
      gemm(proj, attn_.data, T, l.o, H, attnDim);
      allReduce(proj, size_t(T * H));
      k::addRmsNorm(x, proj, l.postNorm.as<float>(), normed_.data, dtype_, T, int(H), eps,
                    stream_);
      gemm(gateUp_.as<float>(), normed_.data, T, l.gateUp, 2 * s.mlp, H);
      k::siluMul(act_.data, dtype_, gateUp_.as<float>(), T, int(s.mlp), stream_);
      gemm(proj, act_.data, T, l.down, H, s.mlp);
      allReduce(proj, size_t(T * H));
    }
    if (R > 0) {
      // The last token of each sampled sequence: its residual, the final norm, this rank's
      // vocabulary slice, then the full rows from every rank.
      ensure(lastRows_, size_t(R * H) * elem_);
      ensure(shardLogits_, size_t(R * s.vocabShard) * 4);
      k::rmsNormRows(x, proj, dRows, finalNorm_.as<float>(), lastRows_.data, dtype_, R, int(H),
                     eps, stream_);
      gemm(shardLogits_.as<float>(), lastRows_.data, R, lmHead_, s.vocabShard, H);
      const float* full = shardLogits_.as<float>();
      if (spec_.tp > 1) {
        ensure(gathered_, size_t(spec_.tp) * size_t(R * s.vocabShard) * 4);
        ensure(logits_, size_t(R * c.vocabSize) * 4);
        nccl(ncclAllGather(shardLogits_.data, gathered_.data, size_t(R * s.vocabShard),
                           ncclFloat32, nccl_.comm, stream_),
             "ncclAllGather");
        k::joinVocabShards(logits_.as<float>(), gathered_.as<float>(), R, int(spec_.tp),
                           int(s.vocabShard), int(c.vocabSize), stream_);
        full = logits_.as<float>();
      }
      ensure(argmax_, size_t(R) * 4);
      k::argmaxRows(argmax_.as<int32_t>(), full, R, int(c.vocabSize), int(c.vocabSize), stream_);
      // Results to the host: every argmax, and the rows that are sampled on the host.
      auto* hostArgmax = static_cast<int32_t*>(pinned_);
      auto* hostLogits = reinterpret_cast<float*>(static_cast<char*>(pinned_) + size_t(R) * 4);
      check(cudaMemcpyAsync(hostArgmax, argmax_.data, size_t(R) * 4, cudaMemcpyDeviceToHost,
                            stream_),
            "cudaMemcpyAsync");
      size_t row = 0;
      for (int r = 0; r < R; ++r) {
        if (greedy[size_t(r)]) continue;
        check(cudaMemcpyAsync(hostLogits + row * size_t(c.vocabSize),
                              full + size_t(r) * size_t(c.vocabSize),
                              size_t(c.vocabSize) * 4, cudaMemcpyDeviceToHost, stream_),
              "cudaMemcpyAsync");
        ++row;
      }
      cudaError_t launch = cudaPeekAtLastError();
      if (launch != cudaSuccess) guard_->failNow("a kernel launch: " + cudaText(launch));
      check(cudaEventRecord(done_, stream_), "cudaEventRecord");
      guard_->awaitStep();
      logits.assign(hostLogits, hostLogits + sampled * size_t(c.vocabSize));
      for (int r = 0; r < R; ++r) argmax[size_t(r)] = greedy[size_t(r)] ? hostArgmax[r] : -1;
      return;
    }
    cudaError_t launch = cudaPeekAtLastError();
    if (launch != cudaSuccess) guard_->failNow("a kernel launch: " + cudaText(launch));
    check(cudaEventRecord(done_, stream_), "cudaEventRecord");
    guard_->awaitStep();
  }

  static constexpr size_t kPinnedBytes = size_t(64) << 20;

  ShardSpec spec_;
  k::DType dtype_ = k::DType::BF16;
  size_t elem_ = 2;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  NcclDevice nccl_;
  std::unique_ptr<CommGuard> guard_;
  std::vector<void*> owned_;
  size_t allocated_ = 0;
  void* pinned_ = nullptr;
  Buffer embed_, lmHead_, finalNorm_, cos_, sin_, kv_;
  size_t layerKvElems_ = 0;
  std::vector<Layer> layers_;
  Buffer ints_, x_, normed_, qkv_, attn_, proj_, gateUp_, act_, lastRows_, shardLogits_,
      gathered_, logits_, argmax_;
  DeviceThread thread_;  // last: joined first, while everything above is still there
};

}  // namespace
}  // namespace vsup::engine::cuda

extern "C" __attribute__((visibility("default"))) vsup::engine::cuda::Shard* vsup_cuda_make_shard(
    const vsup::engine::cuda::ShardSpec& spec) {
  return new vsup::engine::cuda::CudaShard(spec);
}
