#include "engine/config.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include <algorithm>
#include <cctype>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace vsup::engine {
namespace {

template <typename T>
void requireRange(const char* flag, T value, T lo, T hi) {
  if (value < lo || value > hi) {
    throw std::invalid_argument(std::string(flag) + " must be " + std::to_string(lo) + ".." +
                                std::to_string(hi) + ", got " + std::to_string(value));
  }
}

// A number of seconds: finite and in [lo, hi] (a nan compares false with everything, so
// requireRange would let it through).
void requireSeconds(const char* flag, double value, double lo, double hi) {
  if (!std::isfinite(value) || value < lo || value > hi) {
    std::ostringstream got;
    got << value;
    std::ostringstream range;
    range << lo << ".." << hi;
    throw std::invalid_argument(std::string(flag) + " must be " + range.str() +
                                " seconds, got " + got.str());
  }
}

}  // namespace

const char* engineName(const EngineConfig& config) {
  return std::visit(
      [](const auto& b) -> const char* {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, CpuConfig>) return "cpu";
        else if constexpr (std::is_same_v<T, SimConfig>) return "sim";
        else return "cuda";
      },
      config.backend);
}

int64_t kvHoldMs(const KvConfig& kv) {
  // The vsup connector holds the blocks of its requests only, until their leases end.
  if (kv.connector != "sim") return 0;
  double ms = kv.shutdownTimeoutS * 1000 + double(kv.simTransferMs);
  return std::max<int64_t>(1000, ms > 1e12 ? int64_t(1e12) : int64_t(ms));
}

void validate(const EngineConfig& config) {
  const CommonConfig& c = config.common;
  requireRange<uint32_t>("--tensor-parallel-size", c.tensorParallelSize, 1, 64);
  requireRange<uint32_t>("--max-num-seqs", c.maxNumSeqs, 1, 65536);
  requireRange<uint32_t>("--max-num-batched-tokens", c.maxNumBatchedTokens, 1, 1u << 20);
  if (c.maxNumBatchedTokens < c.maxNumSeqs) {
    throw std::invalid_argument("--max-num-batched-tokens (" +
                                std::to_string(c.maxNumBatchedTokens) +
                                ") must be at least --max-num-seqs (" +
                                std::to_string(c.maxNumSeqs) +
                                "): every running request needs a token per step");
  }
  requireRange<int64_t>("--max-model-len", c.maxModelLen, 0, int64_t(1) << 24);
  requireRange<int32_t>("--block-size", c.blockSize, 1, 1024);
  if (c.kvCacheBytes <= 0) {
    throw std::invalid_argument("--kv-cache-memory must be more than 0 bytes, got " +
                                std::to_string(c.kvCacheBytes));
  }
  requireRange<int64_t>("--collective-timeout-ms", c.collectiveTimeoutMs, 100, 3600000);
  requireRange<uint32_t>("--nnodes", c.nnodes, 1, 64);
  if (c.tensorParallelSize % c.nnodes != 0) {
    throw std::invalid_argument("--tensor-parallel-size " + std::to_string(c.tensorParallelSize) +
                                " is not a multiple of --nnodes " + std::to_string(c.nnodes) +
                                ": every node runs the same number of ranks");
  }
  if (c.nnodes > 1 && (c.masterAddr.empty() || c.masterAddr.size() > 253)) {
    throw std::invalid_argument("--nnodes " + std::to_string(c.nnodes) +
                                " needs --master-addr, the leader's address (or "
                                "$LWS_LEADER_ADDRESS under a LeaderWorkerSet), got '" +
                                c.masterAddr + "'");
  }
  if (c.nnodes > 1 && c.kv.connector == "vsup") {
    throw std::invalid_argument("--kv-connector vsup with --nnodes " + std::to_string(c.nnodes) +
                                ": KV transfer is built for engines on one node only so far");
  }
  if (c.nnodes > 1 && c.masterPort == 0) {
    throw std::invalid_argument("--master-port must be 1..65535 with --nnodes > 1");
  }
  auto oneOf = [](const char* flag, const std::string& v, std::initializer_list<const char*> ok) {
    std::string list;
    for (const char* o : ok) {
      if (v == o) return;
      list += std::string(list.empty() ? "" : ", ") + o;
    }
    throw std::invalid_argument(std::string(flag) + " must be one of " + list + ", got '" + v + "'");
  };
  oneOf("--kv-connector", c.kv.connector, {"none", "sim", "vsup"});
  oneOf("--kv-role", c.kv.role, {"prefill", "decode", "both"});
  oneOf("--kv-transport", c.kv.transport, {"auto", "shm", "tcp"});
  oneOf("--kv-load-failure", c.kv.loadFailure, {"fail", "recompute"});
  if (c.kv.host.empty() || c.kv.host.size() > 253) {
    throw std::invalid_argument("--kv-host must be a host name or address, got '" + c.kv.host + "'");
  }
  if (c.kv.connector == "vsup" && (c.kv.port == 0 || int(c.kv.port) + int(c.tensorParallelSize) - 1 > 65535)) {
    throw std::invalid_argument("--kv-port " + std::to_string(c.kv.port) + ": the agents listen on " +
                                "--kv-port + rank, which must be 1..65535 for every rank");
  }
  requireSeconds("--kv-lease-s", c.kv.leaseS, 0.1, 3600);
  requireSeconds("--kv-transfer-timeout", c.kv.transferTimeoutS, 0.1, 3600);
  requireSeconds("--kv-shutdown-timeout", c.kv.shutdownTimeoutS, 0, 3600);
  requireRange<uint64_t>("--sim-kv-transfer-ms", c.kv.simTransferMs, 0, 3600000);
  if (const auto* sim = std::get_if<SimConfig>(&config.backend)) {
    requireRange<uint64_t>("--sim-token-ms", sim->tokenMs, 0, 600000);
  }
  if (const auto* cuda = std::get_if<CudaConfig>(&config.backend)) {
    oneOf("--dtype", cuda->dtype, {"bfloat16", "float32"});
    oneOf("--load-format", cuda->loadFormat, {"auto", "dummy", "safetensors"});
    if (!cuda->ncclUniqueId.empty() && cuda->ncclUniqueId.size() != kNcclUniqueIdBytes) {
      throw std::invalid_argument("the NCCL unique id must be " +
                                  std::to_string(kNcclUniqueIdBytes) + " bytes, got " +
                                  std::to_string(cuda->ncclUniqueId.size()));
    }
  }
}

int64_t parseByteSize(const std::string& text, const std::string& field) {
  const std::string accepted = " (e.g. 268435456, 256MiB, 2GiB, 500MB; units: B, KiB, MiB, GiB, "
                               "TiB, KB, MB, GB, TB)";
  const std::string tooLarge =
      "is more than 1 PiB (" + std::to_string(kMaxByteSize) + " bytes), the largest size accepted";
  auto refuse = [&](const std::string& why) -> int64_t {
    throw std::invalid_argument(field + " \"" + text + "\" " + why);
  };
  // A number first: std::strtod alone would also take leading spaces, "inf", "nan" and hex.
  if (text.empty() || !(std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '.' ||
                        text[0] == '-' || text[0] == '+')) {
    return refuse("is not a size" + accepted);
  }
  if (text.find("0x") != std::string::npos || text.find("0X") != std::string::npos) {
    return refuse("is not a size" + accepted);  // std::strtod would read hex
  }
  char* end = nullptr;
  errno = 0;
  double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str()) return refuse("is not a size" + accepted);
  if (errno == ERANGE && std::fabs(value) > 1) {
    return refuse(tooLarge);
  }
  size_t used = size_t(end - text.c_str());
  std::string unit = text.substr(used);
  if (!unit.empty() && unit[0] == ' ') unit.erase(0, 1);
  struct Unit {
    const char* name;
    double scale;
  };
  static constexpr Unit kUnits[] = {
      {"", 1},       {"B", 1},      {"KiB", 0x1p10}, {"MiB", 0x1p20}, {"GiB", 0x1p30},
      {"TiB", 0x1p40}, {"KB", 1e3},  {"MB", 1e6},     {"GB", 1e9},     {"TB", 1e12},
  };
  double scale = 0;
  for (const Unit& u : kUnits) {
    if (unit == u.name) scale = u.scale;
  }
  if (scale == 0) return refuse("is not a size" + accepted);
  if (!std::isfinite(value)) return refuse("is not a size" + accepted);
  double bytes = value * scale;
  if (!(bytes >= 1)) return refuse("must be more than 0 bytes");
  if (bytes > double(kMaxByteSize)) {
    return refuse(tooLarge);
  }
  return int64_t(bytes);
}

}  // namespace vsup::engine
