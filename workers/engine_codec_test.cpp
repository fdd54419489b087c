// The engine configuration as engine-core sends it to its ranks (Node.start): each backend's
// part survives the trip, and the CUDA engine's NCCL unique id, which engine-core makes once
// (Backend::prepareRanks) and every rank joins its communicator with, arrives byte for byte.
#include <doctest/doctest.h>

#include <string>
#include <variant>

#include "engine/registry.h"
#include "workers/engine_codec.h"

using namespace vsup;

TEST_CASE("engine codec: the cuda configuration round-trips, a binary NCCL id included") {
  engine::EngineConfig c;
  c.common.tensorParallelSize = 2;
  engine::CudaConfig cuda;
  cuda.loadFormat = "dummy";
  cuda.weightSeed = 42;
  cuda.dtype = "float32";
  for (int i = 0; i < 128; ++i) cuda.ncclUniqueId.push_back(char(i * 7));  // NULs included
  c.backend = cuda;
  engine::EngineConfig back = workers::decodeEngineConfig(workers::encodeEngineConfig(c));
  const auto& b = std::get<engine::CudaConfig>(back.backend);
  CHECK(b.loadFormat == "dummy");
  CHECK(b.weightSeed == 42);
  CHECK(b.dtype == "float32");
  CHECK(b.ncclUniqueId == cuda.ncclUniqueId);
  CHECK(back.common.tensorParallelSize == 2);
}

TEST_CASE("engine codec: the cpu and sim parts still round-trip, with no cuda part") {
  engine::EngineConfig c;
  engine::CpuConfig cpu;
  cpu.loadFormat = "safetensors";
  cpu.weightSeed = 3;
  c.backend = cpu;
  auto back = workers::decodeEngineConfig(workers::encodeEngineConfig(c));
  CHECK(std::get<engine::CpuConfig>(back.backend).loadFormat == "safetensors");
  CHECK(std::get<engine::CpuConfig>(back.backend).weightSeed == 3);
  c.backend = engine::SimConfig{7};
  back = workers::decodeEngineConfig(workers::encodeEngineConfig(c));
  CHECK(std::get<engine::SimConfig>(back.backend).tokenMs == 7);
}

TEST_CASE("engine codec: the multi-node layout round-trips, and a config without one means one node") {
  engine::EngineConfig c;
  c.common.tensorParallelSize = 4;
  c.common.nnodes = 2;
  c.common.masterAddr = "leader-0.vsup.default.svc";
  c.common.masterPort = 29511;
  auto back = workers::decodeEngineConfig(workers::encodeEngineConfig(c));
  CHECK(back.common.nnodes == 2);
  CHECK(back.common.masterAddr == "leader-0.vsup.default.svc");
  CHECK(back.common.masterPort == 29511);
  CHECK(back.common.ranksPerNode() == 2);
  back = workers::decodeEngineConfig(workers::encodeEngineConfig(engine::EngineConfig{}));
  CHECK(back.common.nnodes == 1);
  CHECK(back.common.ranksPerNode() == 1);
}

#ifdef VSUP_HAVE_CUDA
TEST_CASE("engine-core's prepareRanks gives a cuda engine at TP 2 an NCCL id that reaches every "
          "rank intact, made without a GPU; at TP 1 there is none") {
  engine::EngineConfig c = engine::makeEngineConfig("cuda", engine::CommonConfig{}, "64MiB",
                                                    "--kv-cache-memory", engine::CpuConfig{},
                                                    engine::SimConfig{});
  const engine::Backend& backend = engine::backendFor(c);
  engine::EngineConfig one = c;
  backend.prepareRanks(one);
  CHECK(std::get<engine::CudaConfig>(one.backend).ncclUniqueId.empty());

  c.common.tensorParallelSize = 2;
  engine::EngineConfig forRanks = c;
  backend.prepareRanks(forRanks);  // ncclGetUniqueId: NCCL's host side only
  const std::string id = std::get<engine::CudaConfig>(forRanks.backend).ncclUniqueId;
  REQUIRE(id.size() == engine::kNcclUniqueIdBytes);
  CHECK(id != std::string(engine::kNcclUniqueIdBytes, '\0'));
  const std::string wire = workers::encodeEngineConfig(forRanks);
  for (int rank = 0; rank < 2; ++rank) {
    auto got = workers::decodeEngineConfig(wire);
    CHECK(std::get<engine::CudaConfig>(got.backend).ncclUniqueId == id);
    CHECK_NOTHROW(engine::validate(got));
  }
  // A second engine gets a communicator of its own.
  engine::EngineConfig other = c;
  backend.prepareRanks(other);
  CHECK(std::get<engine::CudaConfig>(other.backend).ncclUniqueId != id);
}
#endif
