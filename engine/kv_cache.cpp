#include "engine/kv_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "base/check.h"
#include "base/error.h"

namespace vsup::engine {

int32_t elementBytesOf(const std::string& dtype) {
  if (dtype == "f32") return 4;
  if (dtype == "f16" || dtype == "bf16") return 2;
  return 0;
}

void validate(const KvCacheLayout& l) {
  auto positive = [](const char* field, int64_t v) {
    if (v <= 0) {
      throw std::invalid_argument(std::string("KV cache layout: ") + field + " is " +
                                  std::to_string(v) + "; it must be positive");
    }
  };
  positive("layers", l.layers);
  positive("kv heads", l.kvHeads);
  positive("head size", l.headDim);
  positive("block size", l.blockSize);
  positive("blocks", l.numBlocks);
  int32_t expected = elementBytesOf(l.dtype);
  if (expected == 0) {
    throw std::invalid_argument("KV cache layout: dtype \"" + l.dtype +
                                "\" is not one of f32, f16, bf16");
  }
  if (l.elementBytes != expected) {
    throw std::invalid_argument("KV cache layout: dtype " + l.dtype + " has " +
                                std::to_string(expected) + "-byte elements, not " +
                                std::to_string(l.elementBytes));
  }
  // In doubles: the int64 products of five 31-bit fields could overflow.
  double bytes = double(l.blockSize) * l.kvHeads * l.headDim * l.elementBytes * 2.0 * l.layers *
                 l.numBlocks;
  if (bytes > double(int64_t(1) << 40)) {
    throw std::invalid_argument("KV cache layout: the region would be more than 1 TiB");
  }
}

OwnFd createKvCacheRegion(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("KV cache region: size must be positive");
  OwnFd fd(int(VSUP_SYSCALL(
      ::syscall(SYS_memfd_create, "vsup-kv", MFD_CLOEXEC | MFD_ALLOW_SEALING))));
  VSUP_SYSCALL(::ftruncate(fd.get(), off_t(bytes)));
  VSUP_SYSCALL(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL));
  return fd;
}

KvCacheMapping::KvCacheMapping(int fd, int64_t bytes, const std::string& what) {
  if (bytes <= 0) throw std::invalid_argument(what + ": size must be positive");
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (fd >= 0) {
    struct stat st {};
    VSUP_SYSCALL(::fstat(fd, &st));
    if (st.st_size != bytes) {
      throw std::runtime_error(what + " has " + std::to_string(st.st_size) + " bytes, expected " +
                               std::to_string(bytes));
    }
    int seals = ::fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      throw std::runtime_error(what + " is not a memfd sealed against shrinking");
    }
    flags = MAP_SHARED;
  }
  void* p = ::mmap(nullptr, size_t(bytes), PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    throw SysError("mmap of " + what + " (" + std::to_string(bytes) + " bytes): " +
                       std::strerror(err),
                   err);
  }
  data_ = static_cast<std::byte*>(p);
  size_ = bytes;
}

KvCacheMapping::~KvCacheMapping() {
  if (data_ != nullptr) ::munmap(data_, size_t(size_));
}

KvCacheMapping::KvCacheMapping(KvCacheMapping&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

KvCacheMapping& KvCacheMapping::operator=(KvCacheMapping&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) ::munmap(data_, size_t(size_));
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

uint64_t kvBlocksDigest(const std::byte* base, const KvCacheLayout& layout,
                        const std::vector<int32_t>& blocks) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t b : blocks) {
    for (int32_t c = 0; c < layout.chunksPerBlock(); ++c) {
      const std::byte* p = base + layout.chunkOffset(c, b);
      for (int64_t i = 0; i < layout.chunkBytes(); ++i) {
        h = (h ^ uint64_t(p[i])) * 1099511628211ull;
      }
    }
  }
  return h;
}

}  // namespace vsup::engine
