// KV transfer throughput between two ranks' caches, each transport against its floor measured
// in the same run on the same buffers:
//
//   shm: KvPuller over an abstract Unix socket (the memfd passed once, the puller copies every
//        chunk itself, plus the Pull / PullReady / Done round trips) against memcpy of the
//        same strided chunks from the same source to the same destination;
//   tcp: KvPuller over TCP loopback (sendmsg from the source mapping, recvmsg into the
//        destination chunks, plus the same round trips) against a plain sender thread that
//        sendmsg()s the same iovecs over a loopback TCP connection into a recvmsg() of the
//        same destination iovecs.
//
//   build/bench/kv_transfer_bench [--max-mib N] [--runs N] [--json]
//
// The cache is shaped like one rank of a mid-size model (8 layers, 2 KV heads of 128, 16-token
// blocks, f32): 16 KiB chunks, 256 KiB blocks, so a transfer of B bytes is B / 16 KiB chunks
// spread over the whole region. The blocks pulled are a shuffled subset of a region twice their
// size. Each size is timed `--runs` times (default 5; 3 from 256 MiB); the table shows the
// median in GB/s (1e9 bytes/s) and each transport's ratio to its floor.
//
// --json: one JSON object on stdout (the table goes to stderr): per size, shm_gbps,
// shm_floor_gbps, tcp_gbps, tcp_floor_gbps and the two ratios.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvconnector/kv_transport.h"

namespace {

using namespace vsup;
using namespace vsup::kv;

engine::KvCacheLayout shape(int32_t blocks) {
  engine::KvCacheLayout l;
  l.layers = 8;
  l.kvHeads = 2;
  l.headDim = 128;
  l.blockSize = 16;
  l.numBlocks = blocks;
  return l;
}

KvCompat compatOf(const engine::KvCacheLayout& l) { return compatFor(l, "bench", 2, 1); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<iovec> chunks(const engine::KvCacheLayout& l, std::byte* base,
                          const std::vector<int32_t>& blocks) {
  std::vector<iovec> iov;
  for (int32_t b : blocks) {
    for (int32_t c = 0; c < l.chunksPerBlock(); ++c) {
      iov.push_back({base + l.chunkOffset(c, b), size_t(l.chunkBytes())});
    }
  }
  return iov;
}

void advance(std::vector<iovec>& iov, size_t& first, size_t n) {
  while (n > 0) {
    size_t k = std::min(n, iov[first].iov_len);
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + k;
    iov[first].iov_len -= k;
    n -= k;
    if (iov[first].iov_len == 0) ++first;
  }
}

void sendAllIov(int fd, std::vector<iovec> iov) {
  size_t first = 0;
  while (first < iov.size()) {
    msghdr m{};
    m.msg_iov = iov.data() + first;
    m.msg_iovlen = std::min<size_t>(1024, iov.size() - first);
    ssize_t n = ::sendmsg(fd, &m, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::perror("sendmsg");
      std::exit(1);
    }
    advance(iov, first, size_t(n));
  }
}

void recvAllIov(int fd, std::vector<iovec> iov) {
  size_t first = 0;
  while (first < iov.size()) {
    msghdr m{};
    m.msg_iov = iov.data() + first;
    m.msg_iovlen = std::min<size_t>(1024, iov.size() - first);
    ssize_t n = ::recvmsg(fd, &m, MSG_WAITALL);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      std::perror("recvmsg");
      std::exit(1);
    }
    advance(iov, first, size_t(n));
  }
}

void blocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t maxMib = 1024;
  int runs = 5;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--max-mib" && i + 1 < argc) {
      maxMib = std::atoll(argv[++i]);
    } else if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--max-mib N] [--runs N] [--json]\n", argv[0]);
      return 2;
    }
  }
  FILE* table = json ? stderr : stdout;
  const engine::KvCacheLayout unit = shape(1);
  int32_t maxBlocks = int32_t(std::max<int64_t>(1, (maxMib << 20) / unit.blockBytes()));
  engine::KvCacheLayout src = shape(2 * maxBlocks);
  engine::KvCacheLayout dst = shape(2 * maxBlocks);
  OwnFd region = engine::createKvCacheRegion(src.totalBytes());
  engine::KvCacheMapping srcMap(region.get(), src.totalBytes(), "the source cache");
  engine::KvCacheMapping dstMap(-1, dst.totalBytes(), "the destination cache");
  std::memset(srcMap.data(), 0x5a, size_t(src.totalBytes()));  // touch every page, both sides
  std::memset(dstMap.data(), 0, size_t(dst.totalBytes()));

  LeaseBook book(int64_t(600) * 1000 * kNsPerMs, nullptr);
  std::string name = "vsup-kv-bench/" + std::to_string(::getpid());
  OwnFd tcpListener = listenTcp("127.0.0.1", 0);
  uint16_t port = boundPort(tcpListener.get());
  KvSource source{src, srcMap.data(), region.get(), "bench-engine", 0, compatOf(src)};
  KvServer server(source, book, listenUnixAbstract(name), std::move(tcpListener));
  MonoNs far = kNoDeadline;
  KvPuller shm(connectUnixAbstract(name, far), Transport::Shm, compatOf(src), 0, "", dst, far);
  KvPuller tcp(connectTcp("127.0.0.1", port, far), Transport::Tcp, compatOf(src), 0, "", dst, far);

  // The TCP floor's connection: a plain loopback pair, sender on a thread of its own.
  OwnFd floorListen = listenTcp("127.0.0.1", 0);
  blocking(floorListen.get());
  OwnFd floorTx = connectTcp("127.0.0.1", boundPort(floorListen.get()), far);
  blocking(floorTx.get());
  OwnFd floorRx(::accept4(floorListen.get(), nullptr, nullptr, SOCK_CLOEXEC));

  std::mt19937 rng(1);
  nlohmann::json out = nlohmann::json::array();
  std::fprintf(table, "%10s %10s %10s %7s %10s %10s %7s\n", "size", "shm GB/s", "memcpy", "ratio",
               "tcp GB/s", "socket", "ratio");
  uint64_t lease = 0;
  for (int32_t blocks = 1; blocks <= maxBlocks; blocks *= 4) {
    int reps = blocks * unit.blockBytes() >= (int64_t(256) << 20) ? std::min(runs, 3) : runs;
    std::vector<int32_t> all(size_t(src.numBlocks));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> from(all.begin(), all.begin() + blocks);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> to(all.begin(), all.begin() + blocks);
    double bytes = double(blocks) * double(unit.blockBytes());
    std::vector<double> memcpyS, shmS, tcpS, sockS;
    for (int r = 0; r < reps; ++r) {
      MonoNs t = monoNow();
      for (int32_t i = 0; i < blocks; ++i) {
        for (int32_t c = 0; c < src.chunksPerBlock(); ++c) {
          std::memcpy(dstMap.data() + dst.chunkOffset(c, to[size_t(i)]),
                      srcMap.data() + src.chunkOffset(c, from[size_t(i)]), size_t(src.chunkBytes()));
        }
      }
      memcpyS.push_back(double(monoNow() - t) / 1e9);

      std::string id = "lease-" + std::to_string(++lease);
      book.grant(id, from);
      t = monoNow();
      shm.pull(id, from, to, dstMap.data(), dst, far);
      shmS.push_back(double(monoNow() - t) / 1e9);

      id = "lease-" + std::to_string(++lease);
      book.grant(id, from);
      t = monoNow();
      tcp.pull(id, from, to, dstMap.data(), dst, far);
      tcpS.push_back(double(monoNow() - t) / 1e9);

      t = monoNow();
      std::thread tx([&] { sendAllIov(floorTx.get(), chunks(src, srcMap.data(), from)); });
      recvAllIov(floorRx.get(), chunks(dst, dstMap.data(), to));
      tx.join();
      sockS.push_back(double(monoNow() - t) / 1e9);
    }
    double shmG = bytes / median(shmS) / 1e9, memG = bytes / median(memcpyS) / 1e9;
    double tcpG = bytes / median(tcpS) / 1e9, sockG = bytes / median(sockS) / 1e9;
    std::string size = bytes >= double(1 << 30) ? std::to_string(int64_t(bytes) >> 30) + " GiB"
                       : bytes >= double(1 << 20) ? std::to_string(int64_t(bytes) >> 20) + " MiB"
                                                  : std::to_string(int64_t(bytes) >> 10) + " KiB";
    std::fprintf(table, "%10s %10.2f %10.2f %7.2f %10.2f %10.2f %7.2f\n", size.c_str(), shmG, memG,
                 shmG / memG, tcpG, sockG, tcpG / sockG);
    out.push_back({{"bytes", int64_t(bytes)},
                   {"shm_gbps", shmG},
                   {"shm_floor_gbps", memG},
                   {"shm_ratio", shmG / memG},
                   {"tcp_gbps", tcpG},
                   {"tcp_floor_gbps", sockG},
                   {"tcp_ratio", tcpG / sockG}});
  }
  shm.flush(far);
  tcp.flush(far);
  auto c = book.counts();
  if (c.done != lease || c.live != 0) {
    std::fprintf(stderr, "kv_transfer_bench: %llu of %llu leases ended done\n",
                 (unsigned long long)c.done, (unsigned long long)lease);
    return 1;
  }
  if (json) std::printf("%s\n", nlohmann::json{{"kv_transfer", out}}.dump(2).c_str());
  return 0;
}
