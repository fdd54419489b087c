// The backend-agnostic scheduler, in engine-core (docs/architecture.md, "The engine"): continuous
// batching under --max-num-seqs and --max-num-batched-tokens, chunked prefill, the paged KV
// cache's block tables (KvBlockManager), preemption by recompute when blocks run out (the newest
// running request is preempted), incremental detokenizing, stop strings, EOS and max_tokens.
// A finished request's blocks can be held for a KV connector (SchedulerConfig::kvHoldMs).
// Every backend uses it as it is; a backend supplies only a ModelRunner per rank.
//
// Single-threaded (engine-core's loop thread). Prompts arrive already tokenized (engine-core
// tokenizes off its loop).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/clock.h"
#include "engine/core/kv_block_manager.h"
#include "engine/engine.h"
#include "engine/text_stream.h"
#include "engine/tokenizer.h"

namespace vsup::engine::core {

struct SchedulerConfig {
  uint32_t maxNumSeqs = 256;
  uint32_t maxNumBatchedTokens = 2048;
  // Longest prompt + completion accepted. Never more than the cache holds.
  int64_t maxModelLen = 0;
  int32_t numBlocks = 0;  // per rank (every rank has the same cache layout)
  int32_t blockSize = 16;
  std::vector<int32_t> eosTokenIds;  // the chat format's end-of-turn specials are added too
  int32_t vocabSize = 0;             // a sampled token outside [0, vocabSize) is a rank bug
  // > 0: a request that finishes by stop or length keeps its blocks in a hold for this long,
  // for the KV connector (released earlier by releaseHold()).
  int64_t kvHoldMs = 0;
  // No context length (the sim engine): any max_tokens is accepted, and a request whose tokens
  // fill the whole cache ends there with finish "length". Otherwise prompt + max_tokens must fit
  // maxModelLen and the cache, or the request is rejected.
  bool unboundedContext = false;
  // The seed of a request that names none; unset: derived from its id (so concurrent requests
  // with the same prompt draw differently). The sim engine uses 0: the same prompt always gives
  // the same text.
  std::optional<uint64_t> defaultSeed;
};

struct TokenizedRequest {
  GenerateRequest request;
  std::vector<int32_t> promptTokens;
};

struct StepResult {
  // A delta for each request in the step that produced a token (none for a prompt chunk or a
  // request aborted meanwhile); finished requests are removed (their deltas carry a finish).
  std::vector<TokenDelta> deltas;
  // Requests that finished in this step with their blocks held (kvHoldMs > 0).
  std::vector<KvTransfer> held;
};

// A decode request whose prompt's KV is to be pulled from a prefill instance: its blocks are
// reserved, and engine-core fills them (the KV agents) before the request computes anything.
struct KvLoad {
  uint64_t token = 0;  // names this load in kvLoaded / kvLoadFailed
  std::string requestId;
  KvParams remote;
  std::vector<BlockId> blocks;  // this instance's blocks, one per remote block, in order
};

struct SchedulerStats {
  int32_t totalBlocks = 0;
  int32_t freeBlocks = 0;
  size_t waiting = 0;
  size_t running = 0;
  size_t holds = 0;
  size_t loading = 0;  // requests waiting for their KV from a prefill instance
  uint64_t preemptions = 0;
};

class Scheduler {
 public:
  // Shares the tokenizer with engine-core's tokenizing thread (immutable, thread-safe).
  // Throws std::invalid_argument for a block size below 1 or a negative number of blocks.
  Scheduler(SchedulerConfig config, std::shared_ptr<const Tokenizer> tokenizer);
  ~Scheduler();  // out of line: Sequence is complete only in scheduler.cpp
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request; it joins the batch at the next step boundary. Returns the rejection of a
  // request it can never serve (too long for the context, empty prompt), queuing nothing.
  // Throws std::invalid_argument for a broken caller contract (a duplicate id).
  [[nodiscard]] std::optional<Rejection> admit(TokenizedRequest request);
  // Removes a request; its final delta (finish = Abort, text so far already sent) goes to
  // `final` when given. False if unknown (already finished).
  bool abort(const std::string& id, TokenDelta* final);
  // The next step, or an empty step (seqs empty) when nothing is waiting or running.
  StepInput nextStep();
  // Applies every rank's output for the step nextStep() returned. Throws std::runtime_error
  // when the ranks disagree or sampled a token outside the vocabulary.
  StepResult complete(const std::vector<StepOutput>& ranks);

  // Disaggregated prefill/decode (KvParams). A doRemoteDecode request computes one token
  // (max_tokens 1) and its blocks are then held, with no expiry, until releaseHold(): its
  // finished step lists it in StepResult::held. A doRemotePrefill request is admitted only
  // with one remote block per block of its prompt; when it is scheduled its blocks are
  // reserved and it is handed out once by takeKvLoads(), and it computes nothing (and is
  // never preempted) until its load ends: kvLoaded() leaves only the last prompt token to
  // compute; kvLoadFailed() makes it a local prefill (recompute) or ends it with an error
  // (its final delta returned). An aborted loading request keeps its blocks until its load
  // ends, since the load may still be writing them.
  std::vector<KvLoad> takeKvLoads();
  void kvLoaded(uint64_t token);
  std::optional<TokenDelta> kvLoadFailed(uint64_t token, bool recompute, const std::string& why);

  // KV holds (kvHoldMs > 0): release one when the transfer is done, expire the overdue ones.
  bool releaseHold(const std::string& requestId);
  std::vector<std::string> expireHolds(MonoNs now);

  size_t inFlight() const { return byId_.size(); }  // waiting + running
  int64_t maxModelLen() const { return config_.maxModelLen; }
  SchedulerStats stats() const;
  const KvBlockManager& blocks() const { return blocks_; }

 private:
  struct Sequence;
  // (private helpers and state: see scheduler.cpp)
  void preempt(const std::string& id);
  void remove(const std::string& id);
  SeqStep stepFor(const Sequence& s, int32_t n) const;
  std::string newestPreemptible() const;
  int64_t cacheTokens() const { return int64_t(blocks_.totalBlocks()) * blocks_.blockSize(); }

  SchedulerConfig config_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  KvBlockManager blocks_;
  std::set<int32_t> eos_;
  std::map<std::string, std::unique_ptr<Sequence>> byId_;
  std::deque<std::string> waiting_;
  std::vector<std::string> running_;  // in admission order
  StepInput current_;
  std::vector<uint64_t> currentSerials_;
  uint64_t step_ = 0;
  uint64_t preemptions_ = 0;
  uint64_t admissions_ = 0;
  std::vector<KvLoad> newLoads_;                 // reserved, not yet handed out
  std::map<uint64_t, std::string> loads_;        // load token -> the request loading
  std::map<uint64_t, std::string> orphanLoads_;  // aborted while loading: token -> its hold
  uint64_t nextLoad_ = 0;
};

}  // namespace vsup::engine::core
