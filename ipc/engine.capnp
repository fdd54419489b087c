# The serving tree's data plane: API servers ↔ engine-core (one socketpair per API server,
# made by the root at spawn), and engine-core ↔ each tensor-parallel worker (through the
# worker's Node.service). Tokens flow once per step per API server, never once per token per
# request: one RPC per token per request would cost more than the step itself.
@0xd445dcdf53664d95;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("vsup::ipc::schema");
using Node = import "node.capnp";

# A chat carries its messages and an empty prompt: engine-core renders them in the model's
# format, next to the tokenizer that reads them.
struct GenerateRequest {
  id @0 :Text;
  prompt @1 :Text;
  maxTokens @2 :Int64;
  temperature @3 :Float64;
  topP @4 :Float64;
  hasSeed @5 :Bool;
  seed @6 :UInt64;
  stop @7 :List(Text);
  topK @8 :Int32;
  messages @9 :List(ChatMessage);
  maxTokensToContext @10 :Bool;   # maxTokens is a ceiling: lowered to what the context leaves
  kv @11 :KvParams;               # kv_transfer_params; unset: none
}

# engine::KvParams: vLLM's kv_transfer_params (disaggregated prefill/decode).
struct KvParams {
  doRemoteDecode @0 :Bool;
  doRemotePrefill @1 :Bool;
  remoteEngineId @2 :Text;
  remoteRequestId @3 :Text;
  remoteBlockIds @4 :List(Int32);
  remoteHost @5 :Text;
  remotePort @6 :UInt16;
  tpSize @7 :UInt32;
}

struct ChatMessage {
  role @0 :Text;
  content @1 :Text;
}

enum FinishReason { none @0; stop @1; length @2; abort @3; error @4; }

# Why the engine refused a request (engine::RejectCode).
enum RejectCode { none @0; contextLengthExceeded @1; emptyPrompt @2; kvTransferInvalid @3; }

# What submitMany answers for one request: the same as submit's results, or `refused` (non-empty)
# where submit would have thrown (stopping, failed, a duplicate id): the request was not taken.
struct SubmitOutcome {
  rejected @0 :Text;
  rejectCode @1 :RejectCode;
  refused @2 :Text;
}

struct TokenDelta {
  requestId @0 :Text;
  text @1 :Text;
  promptTokens @2 :Int64;
  completionTokens @3 :Int64;
  finish @4 :FinishReason;
  error @5 :Text;
  kvParams @6 :KvParams;    # a prefill instance's final delta: where its blocks are; unset: none
}

# Implemented by the API server: engine-core sends every delta for this server's requests,
# one call per step.
interface TokenSink {
  deltas @0 (deltas :List(TokenDelta)) -> ();
  # The engine cannot serve any more (a rank died, a step failed): /health must say so now,
  # before the tree is torn down. Sent after the failed requests' final deltas.
  engineFailed @1 (reason :Text) -> ();
}

# engine::Histogram: `counts` has one more entry than `bounds` (the +Inf bucket), per bucket.
struct Histogram {
  bounds @0 :List(Float64);
  counts @1 :List(UInt64);
  sum @2 :Float64;
  count @3 :UInt64;
}

# engine::EngineStats (engine/stats.h): what /metrics reports about the engine. Every API
# server asks engine-core on each scrape, so every one serves the same numbers.
struct EngineStats {
  running @0 :UInt32;
  waiting @1 :UInt32;
  totalBlocks @2 :Int32;
  freeBlocks @3 :Int32;
  blockSize @4 :Int32;
  promptTokens @5 :UInt64;
  generationTokens @6 :UInt64;
  preemptions @7 :UInt64;
  finishedStop @8 :UInt64;
  finishedLength @9 :UInt64;
  finishedAbort @10 :UInt64;
  finishedError @11 :UInt64;
  timeToFirstToken @12 :Histogram;
  interTokenLatency @13 :Histogram;
  e2eLatency @14 :Histogram;
  queueTime @15 :Histogram;
  kvLeasesHeld @16 :UInt64;
  kvLeasesGranted @17 :UInt64;
  kvLeasesDone @18 :UInt64;
  kvLeasesGaveUp @19 :UInt64;
  kvLeasesDisconnected @20 :UInt64;
  kvLeasesExpired @21 :UInt64;
  kvLeasesAbandoned @22 :UInt64;
  kvPullsOk @23 :UInt64;
  kvPullsFailed @24 :UInt64;
  kvPullBytes @25 :UInt64;
}

# Served by engine-core on each API server's connection.
interface Engine {
  # Before the first submit. Returns what the API server needs about the model: its context
  # length (0: unbounded), and, for information only, the chat format engine-core renders
  # chats in ("plain", "chatml", "llama3").
  attach @0 (sink :TokenSink) -> (maxModelLen :Int64, chatFormat :Text);
  # Throws when engine-core is stopping or failed. `rejectCode` is set (and nothing queued) for
  # a request the engine can never serve as asked, `rejected` its message: the API server
  # answers 400 with both.
  submit @1 (request :GenerateRequest) -> (rejected :Text, rejectCode :RejectCode);
  abort @2 (id :Text) -> ();                    # the final delta (finish = abort) follows via the sink
  # The serving figures of the whole engine (all API servers' requests), for /metrics.
  stats @3 () -> (stats :EngineStats);
  # submit for several requests in one call (what the API server took in one turn of its loop):
  # each RPC costs three messages and a wakeup or two of each process, so a burst of requests
  # pays them once. Taken in list order, exactly as that many submit calls would be; outcomes[i]
  # answers requests[i].
  submitMany @4 (requests :List(GenerateRequest)) -> (outcomes :List(SubmitOutcome));
}

struct SeqStep {
  id @0 :Text;
  seed @1 :UInt64;
  temperature @2 :Float64;
  topP @3 :Float64;
  topK @4 :Int32;
  tokens @5 :List(Int32);     # this step's tokens at positions startPos..
  startPos @6 :UInt32;
  blockTable @7 :List(Int32);
  sample @8 :Bool;            # sample the next token after these
}

struct KvTransfer {
  requestId @0 :Text;
  blocks @1 :List(Int32);
}

struct StepInput {
  step @0 :UInt64;
  seqs @1 :List(SeqStep);
  kvTransfers @2 :List(KvTransfer);
  kvGiveUpAtNs @3 :Int64;   # 0: not shutting down
}

struct StepOutput {
  step @0 :UInt64;
  rank @1 :UInt32;
  tokens @2 :List(Int32);
  kvDone @3 :List(Text);    # transfers this rank finished since its last answer
}

# engine::EngineConfig: what engine-core and every rank get in Node.start (its `config`), never
# as argv. A rank's copy carries only its own backend's part.
struct EngineConfig {
  model @0 :Text;
  tensorParallelSize @1 :UInt32;
  maxNumSeqs @2 :UInt32;
  maxNumBatchedTokens @3 :UInt32;
  maxModelLen @4 :Int64;
  kvCacheBytes @5 :Int64;
  blockSize @6 :Int32;
  collectiveTimeoutMs @7 :Int64;
  stepTimeoutMs @8 :UInt64;
  kvConnector @9 :Text;
  kvSimTransferMs @10 :UInt64;
  kvShutdownTimeoutS @11 :Float64;
  backend :union {
    cpu @12 :CpuConfig;
    sim @13 :SimConfig;
    cuda @14 :CudaConfig;
  }
  kvRole @15 :Text;
  kvHost @16 :Text;
  kvPort @17 :UInt16;
  kvTransport @18 :Text;
  kvLeaseS @19 :Float64;
  kvTransferTimeoutS @20 :Float64;
  kvLoadFailure @21 :Text;
  nnodes @22 :UInt32 = 1;      # tensor parallelism across this many nodes
  masterAddr @23 :Text;        # the leader's address (engine-core listens there for the nodes)
  masterPort @24 :UInt16;
  struct CpuConfig {
    loadFormat @0 :Text;
    weightSeed @1 :UInt64;
  }
  struct SimConfig {
    tokenMs @0 :UInt64;
  }
  struct CudaConfig {
    loadFormat @0 :Text;
    weightSeed @1 :UInt64;
    dtype @2 :Text;
    ncclUniqueId @3 :Data;   # engine-core's, for its ranks at TP > 1; empty otherwise
  }
}

# A tensor-parallel rank (its Node.service). Every rank takes part in every step.
interface Worker {
  step @0 (input :StepInput) -> (output :StepOutput);
  # Across nodes (nnodes > 1) only. How this rank's peers on other nodes reach it
  # (engine/cross_node_collective.h): known once its start has listened.
  collectiveAddress @1 () -> (address :Data);
  # Every rank's collectiveAddress, in rank order: connects this rank to its peers on other
  # nodes, returning once it is connected (bounded by the collective timeout). Once, before the
  # first step.
  joinCollective @2 (addresses :List(Data)) -> ();
}

# Across nodes (docs/architecture.md, "Across nodes"). The leader's engine-core listens on
# --master-addr:--master-port (TCP); each other node's agent (`vsup __node-agent`, under that
# node's `vsup run --headless` root) connects and is served Leader as the link's bootstrap.
# Each side pings the other: a side whose ping goes unanswered for timeoutMs takes the other
# for lost (a host gone, a process stopped, a partition), whatever TCP says.
interface Leader {
  # The agent of node `nodeRank` (1 ..) introduces itself, giving the leader its NodeAgent.
  # Answered at once, with the heartbeat both sides keep. Refused for a node rank out of range
  # or already taken, and for a node whose build or layout differs (`layout`: "<nnodes>x<ranks
  # per node>").
  join @0 (nodeRank :UInt32, agent :NodeAgent, host :Text, layout :Text)
      -> (heartbeatMs :Int64, timeoutMs :Int64);
  ping @1 () -> ();
}

interface NodeAgent {
  # Starts this node's ranks, firstRank .. firstRank + count - 1, each given `config` (an
  # EngineConfig message) in its Node.start; answers their Worker capabilities in rank order
  # once every one is ready, or fails naming the rank that did not start.
  startRanks @0 (config :Data, firstRank :UInt32, count :UInt32) -> (workers :List(Worker));
  ping @1 () -> ();
  # The leader is done with this node (at a step boundary, or after the engine failed): stop
  # the ranks and exit: 0 after a normal stop whose ranks all stopped in time, 4 when one had
  # to be killed, 1 when the engine failed (`failed`). Answered once the ranks are stopped,
  # within stopMs.
  release @2 (stopMs :Int64, failed :Bool) -> ();
  # This node's agent and its ranks, for `vsup tree` on the leader.
  status @3 (budgetMs :Int64) -> (status :Node.NodeStatus);
}

# A KV agent's start configuration (vsup __kv-agent, one per rank beside worker-tpR, under
# engine-core), in Node.start: which rank's cache it serves or fills, and everything a peer
# must agree with (kvconnector/kv_protocol.h, KvCompat).
struct KvAgentConfig {
  rank @0 :UInt32;
  role @1 :Text;               # prefill, decode, both
  host @2 :Text;               # where it listens (prefill, both)
  port @3 :UInt16;             # the instance's --kv-port; this rank listens on port + rank
  transport @4 :Text;          # auto, shm, tcp (how it pulls)
  leaseMs @5 :Int64;
  transferTimeoutMs @6 :Int64;
  engineId @7 :Text;
  layers @8 :Int32;
  kvHeads @9 :Int32;           # on this rank
  headDim @10 :Int32;
  blockSize @11 :Int32;
  numBlocks @12 :Int32;
  dtype @13 :Text;
  model @14 :Text;
  modelKvHeads @15 :UInt32;
  tpSize @16 :UInt32;
  shutdownTimeoutMs @17 :Int64;  # how long its shutdown may defer while leases are held
}

struct KvLease {
  id @0 :Text;
  blocks @1 :List(Int32);
}

struct KvEnded {
  id @0 :Text;
  reason @1 :Text;             # done, gave up, disconnected, expired, abandoned
}

struct KvAgentStats {
  live @0 :UInt64;
  pulling @1 :UInt64;
  granted @2 :UInt64;
  done @3 :UInt64;
  gaveUp @4 :UInt64;
  disconnected @5 :UInt64;
  expired @6 :UInt64;
  abandoned @7 :UInt64;
  bytesSent @8 :UInt64;
  pullsServed @9 :UInt64;
  pullsRefused @10 :UInt64;
  pullsDone @11 :UInt64;
  pullsFailed @12 :UInt64;
  bytesPulled @13 :UInt64;
}

# A KV agent (its Node.service), called by engine-core only.
interface KvAgent {
  # Prefill: lease these blocks to decode instances. Returns once the leases are live, so that
  # their ids may be handed out.
  grant @0 (leases :List(KvLease)) -> ();
  # Prefill: the leases that ended since the last call; waits until there is at least one.
  nextEnded @1 () -> (ended :List(KvEnded));
  # Decode: copies a prefill instance's blocks of one request into this rank's blocks
  # `localBlocks`, from the agent of the same rank at remotePort + rank. `error` is empty on
  # success; else what failed, and `code` the refusal's name when the peer refused.
  pull @2 (remoteEngineId :Text, remoteRequestId :Text, remoteHost :Text, remotePort :UInt16,
           remoteBlocks :List(Int32), localBlocks :List(Int32)) -> (error :Text, code :Text, bytes :UInt64);
  # Decode: tells the prefill instance that this request's blocks will not be pulled.
  giveUp @3 (remoteEngineId :Text, remoteRequestId :Text, remoteHost :Text, remotePort :UInt16) -> ();
  stats @4 () -> (stats :KvAgentStats);
}
