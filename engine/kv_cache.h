// One rank's paged KV cache as bytes: where each block's keys and values are (KvCacheLayout),
// and the memory they live in (KvCacheRegion). Every backend that transfers KV (the KV
// connector, kvconnector/) describes its cache this way, so a peer can copy blocks without
// knowing the model.
//
// Layout: [layer][k|v][block][slot][kvHead][headDim] elements. A block is therefore not
// contiguous: it is 2 × layers *chunks* of blockSize × kvHeads × headDim elements each, one per
// (layer, k|v), spread over the region with a stride of numBlocks chunks. Chunk c of a block is
// layer c / 2, keys when c is even, values when odd.
//
// The region is a sealed memfd (docs/architecture.md, "KV transfer"): engine-core creates one
// per rank, the rank maps it shared and computes in it, and the rank's KV agent maps the same
// pages to serve them to a peer (or sends the fd itself to an agent on the same host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/fd.h"

namespace vsup::engine {

struct KvCacheLayout {
  int32_t layers = 0;
  int32_t kvHeads = 0;  // on this rank
  int32_t headDim = 0;
  int32_t blockSize = 0;  // token slots per block
  int32_t numBlocks = 0;
  int32_t elementBytes = 4;  // f32
  std::string dtype = "f32";

  int32_t chunksPerBlock() const { return 2 * layers; }
  int64_t chunkBytes() const {
    return int64_t(blockSize) * kvHeads * headDim * elementBytes;
  }
  int64_t blockBytes() const { return chunkBytes() * chunksPerBlock(); }
  int64_t totalBytes() const { return blockBytes() * numBlocks; }
  // Byte offset of chunk `chunk` (0 .. chunksPerBlock() - 1) of block `block`.
  int64_t chunkOffset(int32_t chunk, int32_t block) const {
    return (int64_t(chunk) * numBlocks + block) * chunkBytes();
  }
  // Elements from one (layer, k|v) plane to the next: where the kernels' per-layer cache
  // pointers start (plane p = 2 × layer + (values ? 1 : 0)).
  int64_t planeElements() const { return int64_t(numBlocks) * chunkBytes() / elementBytes; }
};

// Bytes per element of a KV dtype: "f32" 4, "f16" and "bf16" 2; 0 for any other name.
int32_t elementBytesOf(const std::string& dtype);

// FNV-1a (64 bits) over `blocks` of the cache at `base`, chunk by chunk in block order: the same
// value on both sides of a transfer when the bytes moved intact (a test hook compares them).
uint64_t kvBlocksDigest(const std::byte* base, const KvCacheLayout& layout,
                        const std::vector<int32_t>& blocks);

// Throws std::invalid_argument naming the field unless every field is positive, the region is
// no larger than 1 TiB and dtype matches elementBytes ("f32" 4, "f16"/"bf16" 2).
void validate(const KvCacheLayout& layout);

// A new memfd named "vsup-kv" of exactly `bytes` (zero-filled, close-on-exec), sealed against
// growing, shrinking and further sealing: whoever maps it can rely on its size.
OwnFd createKvCacheRegion(int64_t bytes);

// A shared read-write mapping of a region (or, with fd -1, anonymous private memory of the same
// size, for a rank without a KV connector). Checks the fd's size against `bytes` and, for a
// memfd, that it is sealed against shrinking (a peer could otherwise truncate it under us and
// make every access a SIGBUS). Unmaps on destruction.
class KvCacheMapping {
 public:
  KvCacheMapping() = default;
  // `what` names the region in errors ("the KV cache region (fd 5)").
  KvCacheMapping(int fd, int64_t bytes, const std::string& what);
  ~KvCacheMapping();
  KvCacheMapping(KvCacheMapping&& other) noexcept;
  KvCacheMapping& operator=(KvCacheMapping&& other) noexcept;
  KvCacheMapping(const KvCacheMapping&) = delete;
  KvCacheMapping& operator=(const KvCacheMapping&) = delete;

  std::byte* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  std::byte* data_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace vsup::engine
