#include "engine/config.h"

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "engine/registry.h"

namespace vsup::engine {
namespace {

std::string messageOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(no std::invalid_argument)";
}

}  // namespace

TEST_CASE("engineName names the backend part of the configuration") {
  EngineConfig c;
  CHECK(std::string(engineName(c)) == "cpu");
  c.backend = SimConfig{};
  CHECK(std::string(engineName(c)) == "sim");
  c.backend = CudaConfig{};
  CHECK(std::string(engineName(c)) == "cuda");
}

TEST_CASE("validate accepts the defaults and refuses each value out of range, naming the flag") {
  CHECK_NOTHROW(validate(EngineConfig{}));
  struct Case {
    std::function<void(EngineConfig&)> change;
    std::string message;
  };
  Case cases[] = {
      {[](EngineConfig& c) { c.common.tensorParallelSize = 0; },
       "--tensor-parallel-size must be 1..64, got 0"},
      {[](EngineConfig& c) { c.common.tensorParallelSize = 65; },
       "--tensor-parallel-size must be 1..64, got 65"},
      {[](EngineConfig& c) { c.common.maxNumSeqs = 0; }, "--max-num-seqs must be 1..65536, got 0"},
      {[](EngineConfig& c) { c.common.maxNumBatchedTokens = (1u << 20) + 1; },
       "--max-num-batched-tokens must be 1..1048576, got 1048577"},
      {[](EngineConfig& c) { c.common.maxModelLen = -1; },
       "--max-model-len must be 0..16777216, got -1"},
      {[](EngineConfig& c) { c.common.blockSize = 0; }, "--block-size must be 1..1024, got 0"},
      {[](EngineConfig& c) { c.common.blockSize = 1025; }, "--block-size must be 1..1024, got 1025"},
      {[](EngineConfig& c) { c.common.kvCacheBytes = 0; },
       "--kv-cache-memory must be more than 0 bytes, got 0"},
      {[](EngineConfig& c) { c.common.collectiveTimeoutMs = 99; },
       "--collective-timeout-ms must be 100..3600000, got 99"},
      {[](EngineConfig& c) { c.common.kv.connector = "nixl"; },
       "--kv-connector must be one of none, sim, vsup, got 'nixl'"},
      {[](EngineConfig& c) { c.common.kv.role = "both2"; },
       "--kv-role must be one of prefill, decode, both, got 'both2'"},
      {[](EngineConfig& c) { c.common.kv.transport = "rdma"; },
       "--kv-transport must be one of auto, shm, tcp, got 'rdma'"},
      {[](EngineConfig& c) { c.common.kv.loadFailure = "retry"; },
       "--kv-load-failure must be one of fail, recompute, got 'retry'"},
      {[](EngineConfig& c) { c.common.kv.host = ""; },
       "--kv-host must be a host name or address, got ''"},
      {[](EngineConfig& c) {
         c.common.kv.connector = "vsup";
         c.common.tensorParallelSize = 2;
         c.common.kv.port = 65535;
       },
       "--kv-port 65535: the agents listen on --kv-port + rank, which must be 1..65535 for every rank"},
      {[](EngineConfig& c) { c.common.kv.leaseS = 0; },
       "--kv-lease-s must be 0.1..3600 seconds, got 0"},
      {[](EngineConfig& c) { c.common.kv.transferTimeoutS = 1e9; },
       "--kv-transfer-timeout must be 0.1..3600 seconds, got 1e+09"},
      {[](EngineConfig& c) { c.backend = SimConfig{600001}; },
       "--sim-token-ms must be 0..600000, got 600001"},
  };
  for (const Case& k : cases) {
    CAPTURE(k.message);
    EngineConfig c;
    k.change(c);
    CHECK(messageOf([&] { validate(c); }) == k.message);
  }
}

TEST_CASE("validate refuses a token budget below max_num_seqs") {
  EngineConfig c;
  c.common.maxNumSeqs = 16;
  c.common.maxNumBatchedTokens = 8;
  std::string msg = messageOf([&] { validate(c); });
  CHECK(msg.find("--max-num-batched-tokens (8)") != std::string::npos);
  CHECK(msg.find("--max-num-seqs (16)") != std::string::npos);
}

TEST_CASE("the KV hold lease is 0 without a connector and at least a second with one") {
  KvConfig kv;
  CHECK(kvHoldMs(kv) == 0);
  kv.connector = "sim";
  kv.shutdownTimeoutS = 10;
  kv.simTransferMs = 200;
  CHECK(kvHoldMs(kv) == 10200);
  kv.shutdownTimeoutS = 0;
  kv.simTransferMs = 0;
  CHECK(kvHoldMs(kv) == 1000);
}

TEST_CASE("the registry knows cpu, sim and cuda, and this build has cpu and sim") {
  std::string names;
  for (const EngineInfo& e : knownEngines()) {
    names += std::string(e.name) + (e.built ? "+ " : "- ");
  }
#ifdef VSUP_HAVE_CUDA
  CHECK(names == "cpu+ sim+ cuda+ ");
  CHECK_NOTHROW(requireEngineBuilt("cuda"));
#else
  CHECK(names == "cpu+ sim+ cuda- ");
#endif
  CHECK_NOTHROW(requireEngineBuilt("cpu"));
  CHECK_NOTHROW(requireEngineBuilt("sim"));
}

TEST_CASE("an unknown engine name is refused with the accepted ones") {
  std::string msg = messageOf([] { requireEngineBuilt("xyz"); });
  CHECK(msg.rfind("--engine 'xyz': ", 0) == 0);
  CHECK(msg.find("cpu, sim") != std::string::npos);
}

#ifndef VSUP_HAVE_CUDA
TEST_CASE("a build without the cuda engine refuses it with how to get it") {
  std::string msg = messageOf([] { requireEngineBuilt("cuda"); });
  CHECK(msg.rfind("--engine 'cuda': ", 0) == 0);
  CHECK(msg.find("nvcc was not found") != std::string::npos);
  CHECK(msg.find("/usr/local/cuda") != std::string::npos);
  CHECK(msg.find("meson setup") != std::string::npos);
}
#endif

TEST_CASE("--dtype: cuda computes in bfloat16 unless told float32; cpu and sim refuse bfloat16") {
  CpuConfig cpu;
  cpu.loadFormat = "dummy";
  cpu.weightSeed = 7;
#ifdef VSUP_HAVE_CUDA
  auto cuda = std::get<CudaConfig>(backendConfigFor("cuda", cpu, SimConfig{}, "auto"));
  CHECK(cuda.dtype == "bfloat16");
  CHECK(cuda.loadFormat == "dummy");  // --load-format and --seed are the CPU engine's flags too
  CHECK(cuda.weightSeed == 7);
  CHECK(std::get<CudaConfig>(backendConfigFor("cuda", cpu, SimConfig{}, "float32")).dtype ==
        "float32");
  CHECK(messageOf([&] { backendConfigFor("cuda", cpu, SimConfig{}, "fp8"); }) ==
        "--dtype 'fp8': accepted with --engine cuda: auto (bfloat16), bfloat16, float32");
#endif
  CHECK(std::holds_alternative<CpuConfig>(backendConfigFor("cpu", cpu, SimConfig{}, "float32")));
  CHECK(messageOf([&] { backendConfigFor("cpu", cpu, SimConfig{}, "bfloat16"); }) ==
        "--dtype 'bfloat16': the cpu engine computes in float32 (accepted with --engine cpu: "
        "auto, float32)");
  CHECK(messageOf([&] { backendConfigFor("sim", cpu, SimConfig{}, "bfloat16"); })
            .find("the sim engine computes in float32") != std::string::npos);
}

TEST_CASE("validate refuses a cuda configuration with a bad dtype or a malformed NCCL id") {
  EngineConfig c;
  CudaConfig cuda;
  cuda.dtype = "half";
  c.backend = cuda;
  CHECK(messageOf([&] { validate(c); }) ==
        "--dtype must be one of bfloat16, float32, got 'half'");
  cuda.dtype = "float32";
  cuda.ncclUniqueId = std::string(100, 'x');
  c.backend = cuda;
  CHECK(messageOf([&] { validate(c); }) == "the NCCL unique id must be 128 bytes, got 100");
  cuda.ncclUniqueId = std::string(128, '\0');
  c.backend = cuda;
  CHECK_NOTHROW(validate(c));
}

}  // namespace vsup::engine

namespace vsup::engine {
namespace {

TEST_CASE("makeEngineConfig keeps only the chosen backend's part and parses the KV cache size") {
  CommonConfig common;
  common.tensorParallelSize = 2;
  SimConfig sim;
  sim.tokenMs = 7;
  EngineConfig c = makeEngineConfig("sim", common, "64MiB", "--kv-cache-memory", CpuConfig{}, sim);
  REQUIRE(std::holds_alternative<SimConfig>(c.backend));
  CHECK(std::get<SimConfig>(c.backend).tokenMs == 7);
  CHECK(c.common.kvCacheBytes == int64_t(64) << 20);
  CHECK(c.common.tensorParallelSize == 2);
  CpuConfig cpu;
  cpu.weightSeed = 9;
  EngineConfig d = makeEngineConfig("cpu", common, "", "kvCacheMemory", cpu, sim);
  REQUIRE(std::holds_alternative<CpuConfig>(d.backend));
  CHECK(std::get<CpuConfig>(d.backend).weightSeed == 9);
  CHECK(d.common.kvCacheBytes == CommonConfig{}.kvCacheBytes);  // empty: the default kept
}

TEST_CASE("makeEngineConfig refuses a malformed size naming the caller's field, and a bad engine") {
  CHECK_THROWS_WITH_AS(
      makeEngineConfig("cpu", CommonConfig{}, "lots", "kvCacheMemory", CpuConfig{}, SimConfig{}),
      "kvCacheMemory \"lots\" is not a size (e.g. 268435456, 256MiB, 2GiB, 500MB; units: B, "
      "KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
      std::invalid_argument);
  CHECK_THROWS_WITH_AS(
      makeEngineConfig("tpu", CommonConfig{}, "", "--kv-cache-memory", CpuConfig{}, SimConfig{}),
      doctest::Contains("--engine 'tpu'"), std::invalid_argument);
  CommonConfig bad;
  bad.blockSize = 0;
  CHECK_THROWS_WITH_AS(
      makeEngineConfig("sim", bad, "", "--kv-cache-memory", CpuConfig{}, SimConfig{}),
      doctest::Contains("--block-size"), std::invalid_argument);
}

TEST_CASE("parseByteSize reads binary and decimal units up to TiB and TB") {
  CHECK(parseByteSize("1048576", "--kv-cache-memory") == 1048576);
  CHECK(parseByteSize("512B", "--kv-cache-memory") == 512);
  CHECK(parseByteSize("4KiB", "--kv-cache-memory") == 4096);
  CHECK(parseByteSize("256MiB", "--kv-cache-memory") == int64_t(256) << 20);
  CHECK(parseByteSize("256 MiB", "--kv-cache-memory") == int64_t(256) << 20);
  CHECK(parseByteSize("1.5GiB", "--kv-cache-memory") == int64_t(3) << 29);
  CHECK(parseByteSize("2TiB", "--kv-cache-memory") == int64_t(2) << 40);
  CHECK(parseByteSize("500MB", "--kv-cache-memory") == 500000000);
  CHECK(parseByteSize("3TB", "--kv-cache-memory") == 3000000000000);
  CHECK(parseByteSize("1024TiB", "--kv-cache-memory") == kMaxByteSize);
}

TEST_CASE("parseByteSize refuses malformed, non-positive and absurd sizes, naming the field") {
  const std::string units = " (e.g. 268435456, 256MiB, 2GiB, 500MB; units: B, KiB, MiB, GiB, "
                            "TiB, KB, MB, GB, TB)";
  struct Case {
    const char* text;
    std::string why;
  };
  const std::string tooLarge = "is more than 1 PiB (1125899906842624 bytes), the largest size "
                               "accepted";
  Case cases[] = {
      {"", "is not a size" + units},
      {"lots", "is not a size" + units},
      {"nan", "is not a size" + units},
      {"inf", "is not a size" + units},
      {"-nan", "is not a size" + units},
      {"0x100", "is not a size" + units},
      {" 5MiB", "is not a size" + units},
      {"5PiB", "is not a size" + units},
      {"5mib", "is not a size" + units},
      {"5MiB!", "is not a size" + units},
      {"1e999", tooLarge},
      {"2048TiB", tooLarge},
      {"99999999999999999999", tooLarge},
      {"0", "must be more than 0 bytes"},
      {"0.5", "must be more than 0 bytes"},
      {"-1GiB", "must be more than 0 bytes"},
      {"1e-999", "must be more than 0 bytes"},
  };
  for (const Case& k : cases) {
    CAPTURE(k.text);
    CHECK(messageOf([&] { parseByteSize(k.text, "--kv-cache-memory"); }) ==
          "--kv-cache-memory \"" + std::string(k.text) + "\" " + k.why);
  }
}

TEST_CASE("validate refuses a nan or out-of-range KV shutdown timeout and transfer time") {
  EngineConfig c;
  c.common.kv.shutdownTimeoutS = std::nan("");
  CHECK(messageOf([&] { validate(c); }) ==
        "--kv-shutdown-timeout must be 0..3600 seconds, got nan");
  c.common.kv.shutdownTimeoutS = -1;
  CHECK(messageOf([&] { validate(c); }) ==
        "--kv-shutdown-timeout must be 0..3600 seconds, got -1");
  c.common.kv.shutdownTimeoutS = 1e300 * 1e300;
  CHECK(messageOf([&] { validate(c); }) ==
        "--kv-shutdown-timeout must be 0..3600 seconds, got inf");
  c.common.kv.shutdownTimeoutS = 10;
  c.common.kv.simTransferMs = 3600001;
  CHECK(messageOf([&] { validate(c); }) ==
        "--sim-kv-transfer-ms must be 0..3600000, got 3600001");
}

}  // namespace
}  // namespace vsup::engine
