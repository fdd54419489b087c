#include "engine/core/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace vsup::engine::core {
namespace {

uint64_t hashId(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace

struct Scheduler::Sequence {
  GenerateRequest request;
  std::vector<int32_t> tokens;  // the prompt, then every generated token but EOS
  int32_t promptLen = 0;
  int32_t computed = 0;  // tokens whose KV is in the cache
  uint64_t seed = 0;
  int64_t generated = 0;  // sampled tokens, EOS included
  std::unique_ptr<IncrementalDecoder> decoder;
  StopTextStream text{{}};
  bool running = false;
  uint64_t serial = 0;  // which admission this is: an id may come back after an abort
  bool holdForRemote = false;  // doRemoteDecode: hold the blocks at the end
  bool needsLoad = false;      // doRemotePrefill: the KV is still to be pulled
  uint64_t loadToken = 0;      // the load in flight (0: none)
};

Scheduler::Scheduler(SchedulerConfig config, std::shared_ptr<const Tokenizer> tokenizer)
    : config_(std::move(config)), tokenizer_(std::move(tokenizer)),
      blocks_(config_.numBlocks, config_.blockSize) {
  if (!tokenizer_) throw std::invalid_argument("the scheduler needs a tokenizer");
  if (config_.vocabSize <= 0) config_.vocabSize = int32_t(tokenizer_->vocabSize());
  for (int32_t id : config_.eosTokenIds) eos_.insert(id);
  // The chat format's end-of-turn token ends a reply too.
  for (const char* end : {"<|im_end|>", "<|eot_id|>", "<|endoftext|>"}) {
    if (auto id = tokenizer_->tokenId(end); id && tokenizer_->isSpecial(*id)) eos_.insert(*id);
  }
}

Scheduler::~Scheduler() = default;

std::optional<Rejection> Scheduler::admit(TokenizedRequest request) {
  const std::string id = request.request.id;
  if (byId_.count(id) != 0) throw std::invalid_argument("duplicate request id " + id);
  if (request.promptTokens.empty()) {
    return Rejection{RejectCode::EmptyPrompt, "the prompt is empty (it encodes to no tokens)"};
  }
  const int64_t promptLen = int64_t(request.promptTokens.size());
  // The context is the configured one, and never more than the whole cache holds: a longer
  // request could never have all its blocks at once and would preempt itself forever.
  int64_t limit = int64_t(blocks_.totalBlocks()) * blocks_.blockSize();
  if (config_.maxModelLen > 0) limit = std::min(limit, config_.maxModelLen);
  // A ceiling (no max_tokens in the request): what the context leaves after the prompt.
  auto& sampling = request.request.sampling;
  if (sampling.maxTokensToContext && !config_.unboundedContext && promptLen < limit) {
    sampling.maxTokens = std::min(sampling.maxTokens, limit - promptLen);
  }
  const int64_t maxTokens = sampling.maxTokens;
  const int64_t want = promptLen + maxTokens;
  if (config_.unboundedContext ? promptLen >= limit : want > limit) {
    return Rejection{RejectCode::ContextLengthExceeded,
                     "This model's maximum context length is " + std::to_string(limit) +
                         " tokens. However, you requested " + std::to_string(want) + " tokens (" +
                         std::to_string(promptLen) + " in the prompt, " +
                         std::to_string(maxTokens) +
                         " for the completion). Please reduce the prompt or max_tokens."};
  }
  const std::optional<KvParams>& kv = request.request.kv;
  if (kv && kv->doRemotePrefill) {
    int32_t need = blocks_.blocksFor(promptLen);
    if (int64_t(kv->remoteBlockIds.size()) != need) {
      return Rejection{RejectCode::KvTransferInvalid,
                       "kv_transfer_params.remote_block_ids has " +
                           std::to_string(kv->remoteBlockIds.size()) + " block(s), but the " +
                           std::to_string(promptLen) + "-token prompt fills " +
                           std::to_string(need) + " block(s) of " +
                           std::to_string(blocks_.blockSize()) +
                           " tokens (was the prompt sent to the prefill instance the same?)"};
    }
  }
  auto s = std::make_unique<Sequence>();
  if (kv && kv->doRemoteDecode) {
    s->holdForRemote = true;
    request.request.sampling.maxTokens = 1;  // the decode instance generates the rest
  }
  s->needsLoad = kv && kv->doRemotePrefill;
  s->tokens = std::move(request.promptTokens);
  s->promptLen = int32_t(promptLen);
  s->seed = request.request.sampling.seed.value_or(config_.defaultSeed.value_or(hashId(id)));
  s->decoder = std::make_unique<IncrementalDecoder>(*tokenizer_);
  s->text = StopTextStream(request.request.sampling.stop);
  s->serial = ++admissions_;
  s->request = std::move(request.request);
  byId_.emplace(id, std::move(s));
  waiting_.push_back(id);
  return std::nullopt;
}

bool Scheduler::abort(const std::string& id, TokenDelta* final) {
  auto it = byId_.find(id);
  if (it == byId_.end()) return false;
  if (final != nullptr) {
    final->requestId = id;
    final->promptTokens = it->second->promptLen;
    final->completionTokens = it->second->generated;
    final->finish = FinishReason::Abort;
  }
  uint64_t token = it->second->loadToken;
  if (token != 0) {
    // The load may be writing these blocks: they stay out of the free list until it ends.
    std::string holdId = "kv-load:" + std::to_string(token);
    if (!blocks_.hold(id, holdId, kNoDeadline).empty()) orphanLoads_[token] = holdId;
    loads_.erase(token);
    newLoads_.erase(std::remove_if(newLoads_.begin(), newLoads_.end(),
                                   [&](const KvLoad& l) { return l.token == token; }),
                    newLoads_.end());
  }
  remove(id);
  return true;
}

StepInput Scheduler::nextStep() {
  StepInput in;
  in.step = ++step_;
  int64_t budget = config_.maxNumBatchedTokens;
  bool preempted = false;
  // Running sequences first, oldest first; when blocks run out, the newest is preempted (its
  // blocks freed, its tokens recomputed when it is scheduled again).
  std::vector<std::string> order = running_;
  for (const std::string& id : order) {
    auto it = byId_.find(id);
    if (it == byId_.end() || !it->second->running) continue;
    Sequence& s = *it->second;
    if (s.loadToken != 0) continue;  // its KV is being pulled
    int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.computed, budget);
    if (n <= 0) continue;
    bool scheduled = true;
    while (!blocks_.reserve(id, s.computed + n)) {
      preempted = true;
      std::string victim = newestPreemptible();  // never a loading one: a load writes its blocks
      preempt(victim);
      if (victim == id) {
        scheduled = false;
        break;
      }
    }
    if (!scheduled) continue;
    budget -= n;
    in.seqs.push_back(stepFor(s, int32_t(n)));
  }
  // Then new (or preempted) requests, while there is room, unless this step had to preempt:
  // admitting one now would only take the blocks a running request is about to need.
  while (!preempted && !waiting_.empty() && running_.size() < config_.maxNumSeqs && budget > 0) {
    const std::string id = waiting_.front();
    Sequence& s = *byId_.at(id);
    if (s.needsLoad) {
      // Its prompt's blocks, to be filled by a pull; it computes once they are.
      if (!blocks_.reserve(id, s.promptLen)) break;
      s.running = true;
      s.needsLoad = false;
      s.loadToken = ++nextLoad_;
      running_.push_back(id);
      waiting_.pop_front();
      loads_[s.loadToken] = id;
      newLoads_.push_back(KvLoad{s.loadToken, id, *s.request.kv, blocks_.table(id)});
      continue;
    }
    int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.computed, budget);
    if (!blocks_.reserve(id, s.computed + n)) break;
    s.running = true;
    running_.push_back(id);
    waiting_.pop_front();
    budget -= n;
    in.seqs.push_back(stepFor(s, int32_t(n)));
  }
  current_ = in;
  currentSerials_.clear();
  for (const SeqStep& q : in.seqs) currentSerials_.push_back(byId_.at(q.id)->serial);
  return in;
}

StepResult Scheduler::complete(const std::vector<StepOutput>& ranks) {
  checkRankOutputs(current_, ranks);
  StepResult result;
  for (size_t i = 0; i < current_.seqs.size(); ++i) {
    const SeqStep& q = current_.seqs[i];
    auto it = byId_.find(q.id);
    // Aborted while the step ran (and perhaps its id admitted again since).
    if (it == byId_.end() || it->second->serial != currentSerials_[i]) continue;
    Sequence& s = *it->second;
    s.computed = int32_t(q.startPos + q.tokens.size());
    if (!q.sample) continue;  // a prompt chunk: nothing to say yet
    int32_t token = ranks[0].tokens[i];
    if (token < 0 || token >= config_.vocabSize) {
      throw std::runtime_error("rank 0 sampled token " + std::to_string(token) +
                               " outside the vocabulary");
    }
    s.generated++;
    TokenDelta d;
    d.requestId = s.request.id;
    d.promptTokens = s.promptLen;
    d.completionTokens = s.generated;
    if (eos_.count(token) != 0) {
      s.text.append(s.decoder->flush());
      d.finish = FinishReason::Stop;
    } else {
      s.tokens.push_back(token);
      if (s.text.append(s.decoder->push(token))) {
        d.finish = FinishReason::Stop;
      } else if (s.generated >= s.request.sampling.maxTokens ||
                 (config_.unboundedContext && int64_t(s.tokens.size()) >= cacheTokens())) {
        d.finish = s.text.append(s.decoder->flush()) ? FinishReason::Stop : FinishReason::Length;
      }
    }
    d.text = s.text.take(d.finish != FinishReason::None);
    const FinishReason finish = d.finish;
    result.deltas.push_back(std::move(d));
    if (finish == FinishReason::None) continue;
    // A hold under this id that is still pending (an earlier request with the same id whose
    // transfer has not finished) keeps its lease; this request's blocks are simply freed, so
    // that one id never names two transfers at once.
    if ((config_.kvHoldMs > 0 || s.holdForRemote) && blocks_.heldBlocks(q.id).empty()) {
      // A remote decode's lease ends when the prefill instance's agents say so, never here.
      MonoNs until = s.holdForRemote ? kNoDeadline : monoNow() + config_.kvHoldMs * kNsPerMs;
      std::vector<BlockId> held = blocks_.hold(q.id, q.id, until);
      if (!held.empty()) result.held.push_back(KvTransfer{q.id, std::move(held)});
    }
    remove(q.id);
  }
  current_.seqs.clear();  // applied: completing this step again is a caller error
  currentSerials_.clear();
  return result;
}

std::vector<KvLoad> Scheduler::takeKvLoads() { return std::exchange(newLoads_, {}); }

void Scheduler::kvLoaded(uint64_t token) {
  if (auto o = orphanLoads_.find(token); o != orphanLoads_.end()) {
    blocks_.releaseHold(o->second);  // aborted meanwhile: the blocks are free now
    orphanLoads_.erase(o);
    return;
  }
  auto it = loads_.find(token);
  if (it == loads_.end()) return;
  Sequence& s = *byId_.at(it->second);
  loads_.erase(it);
  s.loadToken = 0;
  // Every prompt position's KV is in place; the last prompt token is computed again, here, to
  // get the logits its first token is sampled from.
  s.computed = s.promptLen - 1;
}

std::optional<TokenDelta> Scheduler::kvLoadFailed(uint64_t token, bool recompute,
                                                  const std::string& why) {
  if (orphanLoads_.count(token) != 0) {
    kvLoaded(token);  // the same: release what the aborted request left
    return std::nullopt;
  }
  auto it = loads_.find(token);
  if (it == loads_.end()) return std::nullopt;
  std::string id = it->second;
  Sequence& s = *byId_.at(id);
  loads_.erase(it);
  s.loadToken = 0;
  if (recompute) {
    s.computed = 0;  // a local prefill, in the blocks it already has
    return std::nullopt;
  }
  TokenDelta d;
  d.requestId = id;
  d.promptTokens = s.promptLen;
  d.finish = FinishReason::Error;
  d.error = why;
  remove(id);
  return d;
}

bool Scheduler::releaseHold(const std::string& requestId) { return blocks_.releaseHold(requestId); }

std::vector<std::string> Scheduler::expireHolds(MonoNs now) { return blocks_.expireHolds(now); }

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  st.totalBlocks = blocks_.totalBlocks();
  st.freeBlocks = blocks_.freeBlocks();
  st.waiting = waiting_.size();
  st.running = running_.size();
  st.holds = blocks_.holdCount();
  st.loading = loads_.size();
  st.preemptions = preemptions_;
  return st;
}

// Recompute preemption: the sequence keeps its tokens (prompt and output) and goes back to the
// front of the queue; its KV is rebuilt by a prefill when it runs again.
void Scheduler::preempt(const std::string& id) {
  Sequence& s = *byId_.at(id);
  blocks_.release(id);
  s.computed = 0;
  s.running = false;
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  waiting_.push_front(id);
  ++preemptions_;
}

void Scheduler::remove(const std::string& id) {
  blocks_.release(id);
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  byId_.erase(id);
}

std::string Scheduler::newestPreemptible() const {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    if (byId_.at(*it)->loadToken == 0) return *it;
  }
  return {};
}

SeqStep Scheduler::stepFor(const Sequence& s, int32_t n) const {
  SeqStep q;
  q.id = s.request.id;
  q.seed = s.seed;
  q.temperature = s.request.sampling.temperature;
  q.topP = s.request.sampling.topP;
  q.topK = s.request.sampling.topK;
  q.startPos = uint32_t(s.computed);
  q.tokens.assign(s.tokens.begin() + s.computed, s.tokens.begin() + s.computed + n);
  q.blockTable = blocks_.table(s.request.id);
  q.sample = s.computed + n == int32_t(s.tokens.size());
  return q;
}

}  // namespace vsup::engine::core
