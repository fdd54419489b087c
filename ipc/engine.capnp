# The serving tree's data plane: API servers ↔ engine-core (one socketpair per API server,
# made by the root at spawn), and engine-core ↔ each tensor-parallel worker (through the
# worker's Node.service). Tokens flow once per step per API server, never once per token per
# request (DESIGN.md, notes/machine-floors.md).
@0xd445dcdf53664d95;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("vsup::ipc::schema");

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
}

enum FinishReason { none @0; stop @1; length @2; abort @3; error @4; }

struct TokenDelta {
  requestId @0 :Text;
  text @1 :Text;
  promptTokens @2 :Int64;
  completionTokens @3 :Int64;
  finish @4 :FinishReason;
  error @5 :Text;
}

# Implemented by the API server: engine-core sends every delta for this server's requests,
# one call per step.
interface TokenSink {
  deltas @0 (deltas :List(TokenDelta)) -> ();
  # The engine cannot serve any more (a rank died, a step failed): /health must say so now,
  # before the tree is torn down. Sent after the failed requests' final deltas.
  engineFailed @1 (reason :Text) -> ();
}

# Served by engine-core on each API server's connection.
interface Engine {
  # Before the first submit. Returns what the API server needs about the model: its context
  # length (0: unbounded) and how chat prompts are written ("plain", "chatml", "llama3").
  attach @0 (sink :TokenSink) -> (maxModelLen :Int64, chatFormat :Text);
  # Throws when engine-core is stopping or failed. `rejected` is set (and nothing queued) for a
  # request the engine can never serve as asked: the API server answers 400 with it.
  submit @1 (request :GenerateRequest) -> (rejected :Text);
  abort @2 (id :Text) -> ();                    # the final delta (finish = abort) follows via the sink
}

struct SeqStep {
  id @0 :Text;
  promptHash @1 :UInt64;
  position @2 :UInt32;
  seed @3 :UInt64;
  temperature @4 :Float64;
  topP @5 :Float64;
  topK @6 :Int32;
  tokens @7 :List(Int32);     # real engines: this step's tokens at positions startPos..
  startPos @8 :UInt32;
  blockTable @9 :List(Int32);
  sample @10 :Bool;           # sample the next token after these
}

struct StepInput {
  step @0 :UInt64;
  seqs @1 :List(SeqStep);
  kvTransfers @2 :List(Text);
  kvGiveUpAtNs @3 :Int64;   # 0: not shutting down
}

struct StepOutput {
  step @0 :UInt64;
  rank @1 :UInt32;
  tokens @2 :List(Int32);
}

# A tensor-parallel rank (its Node.service). Every rank takes part in every step.
interface Worker {
  step @0 (input :StepInput) -> (output :StepOutput);
}
