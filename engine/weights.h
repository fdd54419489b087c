// Where a model's weights come from: a seeded generator (--load-format dummy) or a Hugging Face
// safetensors directory. A rank asks only for its own shard of each tensor (a row range and a
// column range), so no rank ever holds the whole model, and the values are converted to fp32 as
// they are copied out.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vsup::engine {

// The part of a tensor to copy: rows [rowBegin, rowEnd) and columns [colBegin, colEnd) of a
// 2-D tensor stored row-major as [rows, cols]. A 1-D tensor of length n is addressed as
// [1, n]: rows [0, 1), columns = the element range.
struct TensorSlice {
  int64_t rowBegin = 0;
  int64_t rowEnd = 0;
  int64_t colBegin = 0;
  int64_t colEnd = 0;
  int64_t rows() const { return rowEnd - rowBegin; }
  int64_t cols() const { return colEnd - colBegin; }
};

// Interface. Thread-compatible (one loader thread at a time).
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool has(const std::string& name) const = 0;
  // Copies `slice` of tensor `name`, whose full shape must be `shape` (1 or 2 dims), into `out`
  // (slice.rows() * slice.cols() floats, row-major), converting to fp32.
  // Throws std::runtime_error naming the file and the tensor when the tensor is missing, its
  // shape differs from `shape`, its dtype is unsupported, or the slice is out of range.
  virtual void read(const std::string& name, const std::vector<int64_t>& shape,
                    const TensorSlice& slice, float* out) const = 0;
  // What the weights are, for messages: "dummy (seed 0)" or the directory.
  virtual std::string describe() const = 0;
};

// Seeded weights: element (r, c) of tensor `name` is a pure function of (seed, name, r, c), so
// every rank's shard is exactly the matching part of the TP = 1 tensor. Values are uniform in
// ±sqrt(3 / cols) (unit variance of x·w for unit-variance x), and tensors whose name ends in
// "norm.weight" are all ones, so activations stay well-conditioned through any depth.
std::unique_ptr<WeightSource> makeDummyWeights(uint64_t seed);

// A Hugging Face model directory's safetensors: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json`, or every `*.safetensors` in the directory. Files are
// memory-mapped (read-only, MAP_PRIVATE) and only the requested slices are touched. F32, F16 and
// BF16 are supported. Throws std::runtime_error naming the directory/file when there is no
// safetensors file or a header is malformed.
std::unique_ptr<WeightSource> openSafetensors(const std::string& directory);

}  // namespace vsup::engine
