#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

#include "engine/kv_cache.h"

namespace vsup::engine {
namespace {
KvCacheLayout make(int32_t layers, int32_t heads, int32_t dim, int32_t blockSize, int32_t blocks) {
  KvCacheLayout l;
  l.layers = layers;
  l.kvHeads = heads;
  l.headDim = dim;
  l.blockSize = blockSize;
  l.numBlocks = blocks;
  return l;
}
}  // namespace

TEST_CASE("a block is 2 x layers chunks, one per (layer, k|v), a plane of blocks apart") {
  KvCacheLayout l;
  l.layers = 2;
  l.kvHeads = 3;
  l.headDim = 4;
  l.blockSize = 5;
  l.numBlocks = 7;
  validate(l);
  CHECK(l.chunksPerBlock() == 4);
  CHECK(l.chunkBytes() == 5 * 3 * 4 * 4);
  CHECK(l.blockBytes() == 4 * l.chunkBytes());
  CHECK(l.totalBytes() == 7 * l.blockBytes());
  CHECK(l.chunkOffset(0, 0) == 0);
  CHECK(l.chunkOffset(0, 6) == 6 * l.chunkBytes());
  CHECK(l.chunkOffset(1, 0) == 7 * l.chunkBytes());  // layer 0's values follow its keys
  CHECK(l.chunkOffset(3, 6) + l.chunkBytes() == l.totalBytes());
  CHECK(l.planeElements() * l.elementBytes == 7 * l.chunkBytes());
}

TEST_CASE("a layout is validated, naming the field") {
  KvCacheLayout l = make(2, 3, 4, 5, 7);
  l.kvHeads = 0;
  CHECK_THROWS_WITH_AS(validate(l), "KV cache layout: kv heads is 0; it must be positive",
                       std::invalid_argument);
  l.kvHeads = 3;
  l.dtype = "f64";
  CHECK_THROWS_WITH_AS(validate(l), doctest::Contains("not one of f32, f16, bf16"),
                       std::invalid_argument);
  l.dtype = "bf16";
  CHECK_THROWS_WITH_AS(validate(l), doctest::Contains("2-byte elements, not 4"),
                       std::invalid_argument);
  l = make(1 << 20, 1 << 10, 1 << 10, 1 << 10, 1 << 20);
  CHECK_THROWS_WITH_AS(validate(l), doctest::Contains("1 TiB"), std::invalid_argument);
}

TEST_CASE("a region is a sealed memfd that two mappings share") {
  OwnFd fd = createKvCacheRegion(1 << 16);
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  CHECK((seals & F_SEAL_SHRINK) != 0);
  CHECK((seals & F_SEAL_GROW) != 0);
  CHECK(::ftruncate(fd.get(), 1 << 12) != 0);  // the seal holds
  CHECK((::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
  KvCacheMapping a(fd.get(), 1 << 16, "a");
  KvCacheMapping b(fd.get(), 1 << 16, "b");
  std::memcpy(a.data() + 100, "kv", 2);
  CHECK(std::memcmp(b.data() + 100, "kv", 2) == 0);
  CHECK_THROWS_WITH_AS(KvCacheMapping(fd.get(), 1 << 15, "the region (fd 5)"),
                       "the region (fd 5) has 65536 bytes, expected 32768", std::runtime_error);
  // An unsealed file is refused: a peer could truncate it under the mapping.
  char path[] = "/tmp/vsup-kv-test-XXXXXX";
  OwnFd plain(::mkstemp(path));
  ::unlink(path);
  REQUIRE(::ftruncate(plain.get(), 1 << 16) == 0);
  CHECK_THROWS_WITH_AS(KvCacheMapping(plain.get(), 1 << 16, "x"),
                       "x is not a memfd sealed against shrinking", std::runtime_error);
  KvCacheMapping anon(-1, 4096, "anonymous");
  CHECK(anon.size() == 4096);
  KvCacheMapping moved = std::move(anon);
  CHECK(moved.data() != nullptr);
  CHECK(anon.data() == nullptr);
}

}  // namespace vsup::engine
