// vsup-logits: runs the CPU engine's model on given token ids and prints the logits, for the
// NumPy oracle test (tests/integration/test_model_oracle.py) and for debugging a model.
//
//   vsup-logits --model DIR|PRESET [--tp N] --prompt 1,2,3 [--decode 4,5] [--block-size 4]
//
// Prints {"vocab": V, "logits": [[...], ...]}: the logits at the last prompt position after the
// prefill, then after each --decode token, fed one at a time through the paged KV cache (whose
// block table is deliberately scrambled). With --tp N it runs N rank processes (this program
// again, with --rank) joined by the same shared-memory collective as the serving workers.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/check.h"
#include "base/fd.h"
#include "engine/collective.h"
#include "engine/llama_config.h"
#include "engine/llama_model.h"
#include "engine/weights.h"

extern char** environ;

namespace {

using namespace vsup::engine;

std::vector<int32_t> parseIds(const std::string& list, const char* flag) {
  std::vector<int32_t> ids;
  size_t at = 0;
  while (at < list.size()) {
    size_t comma = list.find(',', at);
    std::string item = list.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    try {
      size_t used = 0;
      ids.push_back(std::stoi(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw std::invalid_argument(std::string(flag) + ": \"" + item + "\" is not a token id");
    }
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return ids;
}

int runRank(const ModelSource& model, uint32_t tp, uint32_t rank, int fd,
            const std::vector<int32_t>& prompt, const std::vector<int32_t>& decode,
            int32_t blockSize) {
  vsup::OwnFd region(fd);  // inherited from the parent; the mapping outlives it
  std::unique_ptr<Collective> collective =
      tp == 1 ? makeSingleRankCollective() : joinSharedCollective(region.get(), rank, tp, 30000);
  region.reset();
  auto weights = model.dummyWeights ? makeDummyWeights(0) : openSafetensors(model.directory);
  int32_t positions = int32_t(prompt.size() + decode.size());
  int32_t blocks = (positions + blockSize - 1) / blockSize;
  KvCacheShape cache;
  cache.numBlocks = 2 * blocks + 1;
  cache.blockSize = blockSize;
  LlamaShard shard(model.config, rank, tp, *weights, cache, *collective);
  // A scrambled block table: the sequence's blocks are neither contiguous nor in order.
  std::vector<int32_t> table;
  for (int32_t b = 0; b < blocks; ++b) table.push_back(cache.numBlocks - 1 - 2 * b);

  nlohmann::json out;
  out["vocab"] = model.config.vocabSize;
  out["logits"] = nlohmann::json::array();
  std::vector<float> logits;
  LlamaShard::Seq s;
  s.tokens = prompt.data();
  s.count = int32_t(prompt.size());
  s.startPos = 0;
  s.blockTable = table.data();
  s.blockCount = blocks;
  s.wantLogits = true;
  shard.forward({s}, logits);
  out["logits"].push_back(logits);
  for (size_t i = 0; i < decode.size(); ++i) {
    s.tokens = &decode[i];
    s.count = 1;
    s.startPos = int32_t(prompt.size() + i);
    shard.forward({s}, logits);
    out["logits"].push_back(logits);
  }
  if (rank == 0) std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vsup-logits: the CPU engine's logits for given token ids"};
  std::string modelName, promptList, decodeList;
  uint32_t tp = 1;
  int64_t rank = -1;
  int fd = -1;
  int32_t blockSize = 4;
  app.add_option("--model", modelName)->required();
  app.add_option("--tp", tp)->check(CLI::Range(1u, 64u));
  app.add_option("--prompt", promptList)->required();
  app.add_option("--decode", decodeList);
  app.add_option("--block-size", blockSize)->check(CLI::Range(1, 1024));
  app.add_option("--rank", rank);            // internal: one rank process
  app.add_option("--collective-fd", fd);     // internal
  CLI11_PARSE(app, argc, argv);
  try {
    ModelSource model = resolveModel(modelName, "auto", false);
    auto prompt = parseIds(promptList, "--prompt");
    auto decode = parseIds(decodeList, "--decode");
    if (prompt.empty()) throw std::invalid_argument("--prompt: at least one token id");
    if (rank >= 0 || tp == 1) {
      return runRank(model, tp, uint32_t(std::max<int64_t>(rank, 0)), fd, prompt, decode,
                     blockSize);
    }
    model.config.checkTensorParallel(tp);
    // Above 3, so that dup2 onto 3 in the child really copies it (and clears close-on-exec).
    vsup::OwnFd created(createSharedCollective(tp));
    vsup::OwnFd shared(VSUP_SYSCALL(::fcntl(created.get(), F_DUPFD_CLOEXEC, 10)));
    created.reset();
    std::vector<pid_t> pids;
    for (uint32_t r = 0; r < tp; ++r) {
      std::vector<std::string> args(argv, argv + argc);
      args.insert(args.end(), {"--rank", std::to_string(r), "--collective-fd", "3"});
      std::vector<char*> cargs;
      for (auto& a : args) cargs.push_back(a.data());
      cargs.push_back(nullptr);
      posix_spawn_file_actions_t actions;
      posix_spawn_file_actions_init(&actions);
      posix_spawn_file_actions_adddup2(&actions, shared.get(), 3);  // dup2 clears close-on-exec
      pid_t pid = 0;
      int rc = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, cargs.data(), environ);
      posix_spawn_file_actions_destroy(&actions);
      if (rc != 0) throw std::runtime_error("posix_spawn failed: " + std::string(strerror(rc)));
      pids.push_back(pid);
    }
    shared.reset();  // the ranks have their copies
    int result = 0;
    for (pid_t pid : pids) {
      int status = 0;
      ::waitpid(pid, &status, 0);
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) result = 1;
    }
    return result;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vsup-logits: %s\n", e.what());
    return 1;
  }
}
