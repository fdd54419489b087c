#include "workers/engine_codec.h"

#include "ipc/user_message.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>

#include <cstring>
#include <string>

#include "base/error.h"

namespace vsup::workers {

namespace schema = ipc::schema;

void encode(const engine::GenerateRequest& in, schema::GenerateRequest::Builder out) {
  out.setId(in.id);
  out.setPrompt(in.prompt);
  out.setMaxTokens(in.sampling.maxTokens);
  out.setTemperature(in.sampling.temperature);
  out.setTopP(in.sampling.topP);
  out.setHasSeed(in.sampling.seed.has_value());
  out.setSeed(in.sampling.seed.value_or(0));
  out.setTopK(in.sampling.topK);
  out.setMaxTokensToContext(in.sampling.maxTokensToContext);
  auto stop = out.initStop(unsigned(in.sampling.stop.size()));
  for (unsigned i = 0; i < in.sampling.stop.size(); ++i) stop.set(i, in.sampling.stop[i]);
  auto messages = out.initMessages(unsigned(in.messages.size()));
  for (unsigned i = 0; i < in.messages.size(); ++i) {
    messages[i].setRole(in.messages[i].role);
    messages[i].setContent(in.messages[i].content);
  }
  if (in.kv) encode(*in.kv, out.initKv());
}

void encode(const engine::KvParams& in, schema::KvParams::Builder out) {
  out.setDoRemoteDecode(in.doRemoteDecode);
  out.setDoRemotePrefill(in.doRemotePrefill);
  out.setRemoteEngineId(in.remoteEngineId);
  out.setRemoteRequestId(in.remoteRequestId);
  auto blocks = out.initRemoteBlockIds(unsigned(in.remoteBlockIds.size()));
  for (unsigned i = 0; i < in.remoteBlockIds.size(); ++i) blocks.set(i, in.remoteBlockIds[i]);
  out.setRemoteHost(in.remoteHost);
  out.setRemotePort(in.remotePort);
  out.setTpSize(in.tpSize);
}

engine::KvParams decode(schema::KvParams::Reader in) {
  engine::KvParams p;
  p.doRemoteDecode = in.getDoRemoteDecode();
  p.doRemotePrefill = in.getDoRemotePrefill();
  p.remoteEngineId = in.getRemoteEngineId();
  p.remoteRequestId = in.getRemoteRequestId();
  for (int32_t b : in.getRemoteBlockIds()) p.remoteBlockIds.push_back(b);
  p.remoteHost = in.getRemoteHost();
  p.remotePort = in.getRemotePort();
  p.tpSize = in.getTpSize();
  return p;
}

engine::GenerateRequest decode(schema::GenerateRequest::Reader in) {
  engine::GenerateRequest r;
  r.id = in.getId();
  r.prompt = in.getPrompt();
  r.sampling.maxTokens = in.getMaxTokens();
  r.sampling.maxTokensToContext = in.getMaxTokensToContext();
  r.sampling.temperature = in.getTemperature();
  r.sampling.topP = in.getTopP();
  if (in.getHasSeed()) r.sampling.seed = in.getSeed();
  r.sampling.topK = in.getTopK();
  for (auto s : in.getStop()) r.sampling.stop.emplace_back(s);
  for (auto m : in.getMessages()) r.messages.push_back({m.getRole(), m.getContent()});
  if (in.hasKv()) r.kv = decode(in.getKv());
  return r;
}

void encode(const engine::TokenDelta& in, schema::TokenDelta::Builder out) {
  out.setRequestId(in.requestId);
  out.setText(in.text);
  out.setPromptTokens(in.promptTokens);
  out.setCompletionTokens(in.completionTokens);
  out.setFinish(static_cast<schema::FinishReason>(in.finish));
  out.setError(in.error);
  if (in.kvParams) encode(*in.kvParams, out.initKvParams());
}

engine::TokenDelta decode(schema::TokenDelta::Reader in) {
  engine::TokenDelta d;
  d.requestId = in.getRequestId();
  d.text = in.getText();
  d.promptTokens = in.getPromptTokens();
  d.completionTokens = in.getCompletionTokens();
  d.finish = static_cast<engine::FinishReason>(in.getFinish());
  d.error = in.getError();
  if (in.hasKvParams()) d.kvParams = decode(in.getKvParams());
  return d;
}

void encode(const engine::StepInput& in, schema::StepInput::Builder out) {
  out.setStep(in.step);
  auto seqs = out.initSeqs(unsigned(in.seqs.size()));
  for (unsigned i = 0; i < in.seqs.size(); ++i) {
    const auto& s = in.seqs[i];
    seqs[i].setId(s.id);
    seqs[i].setSeed(s.seed);
    seqs[i].setTemperature(s.temperature);
    seqs[i].setTopP(s.topP);
    seqs[i].setTopK(s.topK);
    auto tokens = seqs[i].initTokens(unsigned(s.tokens.size()));
    for (unsigned t = 0; t < s.tokens.size(); ++t) tokens.set(t, s.tokens[t]);
    seqs[i].setStartPos(s.startPos);
    auto table = seqs[i].initBlockTable(unsigned(s.blockTable.size()));
    for (unsigned b = 0; b < s.blockTable.size(); ++b) table.set(b, s.blockTable[b]);
    seqs[i].setSample(s.sample);
  }
  auto kv = out.initKvTransfers(unsigned(in.kvTransfers.size()));
  for (unsigned i = 0; i < in.kvTransfers.size(); ++i) {
    kv[i].setRequestId(in.kvTransfers[i].requestId);
    auto blocks = kv[i].initBlocks(unsigned(in.kvTransfers[i].blocks.size()));
    for (unsigned b = 0; b < in.kvTransfers[i].blocks.size(); ++b) {
      blocks.set(b, in.kvTransfers[i].blocks[b]);
    }
  }
  out.setKvGiveUpAtNs(in.kvGiveUpAtNs);
}

engine::StepInput decode(schema::StepInput::Reader in) {
  engine::StepInput s;
  s.step = in.getStep();
  for (auto q : in.getSeqs()) {
    engine::SeqStep step;
    step.id = q.getId();
    step.seed = q.getSeed();
    step.temperature = q.getTemperature();
    step.topP = q.getTopP();
    step.topK = q.getTopK();
    for (auto t : q.getTokens()) step.tokens.push_back(t);
    step.startPos = q.getStartPos();
    for (auto b : q.getBlockTable()) step.blockTable.push_back(b);
    step.sample = q.getSample();
    s.seqs.push_back(std::move(step));
  }
  for (auto t : in.getKvTransfers()) {
    engine::KvTransfer transfer;
    transfer.requestId = t.getRequestId();
    for (auto b : t.getBlocks()) transfer.blocks.push_back(b);
    s.kvTransfers.push_back(std::move(transfer));
  }
  s.kvGiveUpAtNs = in.getKvGiveUpAtNs();
  return s;
}

void encode(const engine::StepOutput& in, schema::StepOutput::Builder out) {
  out.setStep(in.step);
  out.setRank(in.rank);
  auto tokens = out.initTokens(unsigned(in.tokens.size()));
  for (unsigned i = 0; i < in.tokens.size(); ++i) tokens.set(i, in.tokens[i]);
  auto done = out.initKvDone(unsigned(in.kvDone.size()));
  for (unsigned i = 0; i < in.kvDone.size(); ++i) done.set(i, in.kvDone[i]);
}

engine::StepOutput decode(schema::StepOutput::Reader in) {
  engine::StepOutput o;
  o.step = in.getStep();
  o.rank = in.getRank();
  for (auto t : in.getTokens()) o.tokens.push_back(t);
  for (auto id : in.getKvDone()) o.kvDone.emplace_back(id);
  return o;
}

void encode(const engine::Histogram& in, schema::Histogram::Builder out) {
  auto bounds = out.initBounds(unsigned(in.bounds.size()));
  for (unsigned i = 0; i < in.bounds.size(); ++i) bounds.set(i, in.bounds[i]);
  auto counts = out.initCounts(unsigned(in.counts.size()));
  for (unsigned i = 0; i < in.counts.size(); ++i) counts.set(i, in.counts[i]);
  out.setSum(in.sum);
  out.setCount(in.count);
}

engine::Histogram decode(schema::Histogram::Reader in) {
  engine::Histogram h;
  auto bounds = in.getBounds();
  auto counts = in.getCounts();
  if (counts.size() != bounds.size() + 1) {
    throw Error("engine stats: a histogram with " + std::to_string(counts.size()) +
                " bucket counts for " + std::to_string(bounds.size()) +
                " bounds (expected one count per bound, plus +Inf)");
  }
  h.bounds.reserve(bounds.size());
  for (double b : bounds) {
    if (!h.bounds.empty() && !(h.bounds.back() < b)) {
      throw Error("engine stats: histogram bounds not strictly ascending (" +
                  std::to_string(h.bounds.back()) + " then " + std::to_string(b) + ")");
    }
    h.bounds.push_back(b);
  }
  h.counts.reserve(counts.size());
  for (uint64_t c : counts) h.counts.push_back(c);
  h.sum = in.getSum();
  h.count = in.getCount();
  return h;
}

void encode(const engine::EngineStats& in, schema::EngineStats::Builder out) {
  out.setRunning(in.running);
  out.setWaiting(in.waiting);
  out.setTotalBlocks(in.totalBlocks);
  out.setFreeBlocks(in.freeBlocks);
  out.setBlockSize(in.blockSize);
  out.setPromptTokens(in.promptTokens);
  out.setGenerationTokens(in.generationTokens);
  out.setPreemptions(in.preemptions);
  out.setFinishedStop(in.finishedStop);
  out.setFinishedLength(in.finishedLength);
  out.setFinishedAbort(in.finishedAbort);
  out.setFinishedError(in.finishedError);
  encode(in.timeToFirstToken, out.initTimeToFirstToken());
  encode(in.interTokenLatency, out.initInterTokenLatency());
  encode(in.e2eLatency, out.initE2eLatency());
  encode(in.queueTime, out.initQueueTime());
  out.setKvLeasesHeld(in.kv.leasesHeld);
  out.setKvLeasesGranted(in.kv.leasesGranted);
  out.setKvLeasesDone(in.kv.leasesDone);
  out.setKvLeasesGaveUp(in.kv.leasesGaveUp);
  out.setKvLeasesDisconnected(in.kv.leasesDisconnected);
  out.setKvLeasesExpired(in.kv.leasesExpired);
  out.setKvLeasesAbandoned(in.kv.leasesAbandoned);
  out.setKvPullsOk(in.kv.pullsOk);
  out.setKvPullsFailed(in.kv.pullsFailed);
  out.setKvPullBytes(in.kv.pullBytes);
}

engine::EngineStats decode(schema::EngineStats::Reader in) {
  engine::EngineStats s;
  s.running = in.getRunning();
  s.waiting = in.getWaiting();
  s.totalBlocks = in.getTotalBlocks();
  s.freeBlocks = in.getFreeBlocks();
  s.blockSize = in.getBlockSize();
  s.promptTokens = in.getPromptTokens();
  s.generationTokens = in.getGenerationTokens();
  s.preemptions = in.getPreemptions();
  s.finishedStop = in.getFinishedStop();
  s.finishedLength = in.getFinishedLength();
  s.finishedAbort = in.getFinishedAbort();
  s.finishedError = in.getFinishedError();
  // A histogram the peer left unset keeps its empty default (vLLM's buckets, nothing counted).
  if (in.hasTimeToFirstToken()) s.timeToFirstToken = decode(in.getTimeToFirstToken());
  if (in.hasInterTokenLatency()) s.interTokenLatency = decode(in.getInterTokenLatency());
  if (in.hasE2eLatency()) s.e2eLatency = decode(in.getE2eLatency());
  if (in.hasQueueTime()) s.queueTime = decode(in.getQueueTime());
  s.kv.leasesHeld = in.getKvLeasesHeld();
  s.kv.leasesGranted = in.getKvLeasesGranted();
  s.kv.leasesDone = in.getKvLeasesDone();
  s.kv.leasesGaveUp = in.getKvLeasesGaveUp();
  s.kv.leasesDisconnected = in.getKvLeasesDisconnected();
  s.kv.leasesExpired = in.getKvLeasesExpired();
  s.kv.leasesAbandoned = in.getKvLeasesAbandoned();
  s.kv.pullsOk = in.getKvPullsOk();
  s.kv.pullsFailed = in.getKvPullsFailed();
  s.kv.pullBytes = in.getKvPullBytes();
  return s;
}

schema::RejectCode encode(engine::RejectCode code) {
  switch (code) {
    case engine::RejectCode::None: return schema::RejectCode::NONE;
    case engine::RejectCode::ContextLengthExceeded: return schema::RejectCode::CONTEXT_LENGTH_EXCEEDED;
    case engine::RejectCode::EmptyPrompt: return schema::RejectCode::EMPTY_PROMPT;
    case engine::RejectCode::KvTransferInvalid: return schema::RejectCode::KV_TRANSFER_INVALID;
  }
  return schema::RejectCode::NONE;
}

engine::RejectCode decode(schema::RejectCode code) {
  switch (code) {
    case schema::RejectCode::NONE: return engine::RejectCode::None;
    case schema::RejectCode::CONTEXT_LENGTH_EXCEEDED: return engine::RejectCode::ContextLengthExceeded;
    case schema::RejectCode::EMPTY_PROMPT: return engine::RejectCode::EmptyPrompt;
    case schema::RejectCode::KV_TRANSFER_INVALID: return engine::RejectCode::KvTransferInvalid;
  }
  // A code from a newer peer: still a rejection, with its message.
  return engine::RejectCode::EmptyPrompt;
}

std::string encodeEngineConfig(const engine::EngineConfig& config) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<schema::EngineConfig>();
  const engine::CommonConfig& c = config.common;
  out.setModel(c.model);
  out.setTensorParallelSize(c.tensorParallelSize);
  out.setMaxNumSeqs(c.maxNumSeqs);
  out.setMaxNumBatchedTokens(c.maxNumBatchedTokens);
  out.setMaxModelLen(c.maxModelLen);
  out.setKvCacheBytes(c.kvCacheBytes);
  out.setBlockSize(c.blockSize);
  out.setCollectiveTimeoutMs(c.collectiveTimeoutMs);
  out.setStepTimeoutMs(c.stepTimeoutMs);
  out.setNnodes(c.nnodes);
  out.setMasterAddr(c.masterAddr);
  out.setMasterPort(c.masterPort);
  out.setKvConnector(c.kv.connector);
  out.setKvSimTransferMs(c.kv.simTransferMs);
  out.setKvShutdownTimeoutS(c.kv.shutdownTimeoutS);
  out.setKvRole(c.kv.role);
  out.setKvHost(c.kv.host);
  out.setKvPort(c.kv.port);
  out.setKvTransport(c.kv.transport);
  out.setKvLeaseS(c.kv.leaseS);
  out.setKvTransferTimeoutS(c.kv.transferTimeoutS);
  out.setKvLoadFailure(c.kv.loadFailure);
  auto backend = out.initBackend();
  if (auto* cpu = std::get_if<engine::CpuConfig>(&config.backend)) {
    auto b = backend.initCpu();
    b.setLoadFormat(cpu->loadFormat);
    b.setWeightSeed(cpu->weightSeed);
  } else if (auto* sim = std::get_if<engine::SimConfig>(&config.backend)) {
    backend.initSim().setTokenMs(sim->tokenMs);
  } else if (auto* cuda = std::get_if<engine::CudaConfig>(&config.backend)) {
    auto b = backend.initCuda();
    b.setLoadFormat(cuda->loadFormat);
    b.setWeightSeed(cuda->weightSeed);
    b.setDtype(cuda->dtype);
    b.setNcclUniqueId(kj::arrayPtr(reinterpret_cast<const kj::byte*>(cuda->ncclUniqueId.data()),
                                   cuda->ncclUniqueId.size()));
  }
  return flatBytes(message);
}

std::string flatBytes(capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  kj::ArrayPtr<const kj::byte> bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

kj::Array<capnp::word> flatWords(const std::string& bytes, const std::string& what) {
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0) {
    throw Error(what + ": " + std::to_string(bytes.size()) +
                " bytes is not a Cap'n Proto message (started without one?)");
  }
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  return words;
}

engine::EngineConfig decodeEngineConfig(const std::string& bytes) {
  kj::Array<capnp::word> words = flatWords(bytes, "engine configuration");
  engine::EngineConfig config;
  try {
    capnp::FlatArrayMessageReader message(words);
    auto in = message.getRoot<schema::EngineConfig>();
    engine::CommonConfig& c = config.common;
    c.model = in.getModel();
    c.tensorParallelSize = in.getTensorParallelSize();
    c.maxNumSeqs = in.getMaxNumSeqs();
    c.maxNumBatchedTokens = in.getMaxNumBatchedTokens();
    c.maxModelLen = in.getMaxModelLen();
    c.kvCacheBytes = in.getKvCacheBytes();
    c.blockSize = in.getBlockSize();
    c.collectiveTimeoutMs = in.getCollectiveTimeoutMs();
    c.stepTimeoutMs = in.getStepTimeoutMs();
    c.nnodes = in.getNnodes();
    c.masterAddr = in.getMasterAddr();
    c.masterPort = in.getMasterPort();
    c.kv.connector = in.getKvConnector();
    c.kv.simTransferMs = in.getKvSimTransferMs();
    c.kv.shutdownTimeoutS = in.getKvShutdownTimeoutS();
    c.kv.role = in.getKvRole();
    c.kv.host = in.getKvHost();
    c.kv.port = in.getKvPort();
    c.kv.transport = in.getKvTransport();
    c.kv.leaseS = in.getKvLeaseS();
    c.kv.transferTimeoutS = in.getKvTransferTimeoutS();
    c.kv.loadFailure = in.getKvLoadFailure();
    auto backend = in.getBackend();
    switch (backend.which()) {
      case schema::EngineConfig::Backend::CPU: {
        engine::CpuConfig cpu;
        cpu.loadFormat = backend.getCpu().getLoadFormat();
        cpu.weightSeed = backend.getCpu().getWeightSeed();
        config.backend = cpu;
        break;
      }
      case schema::EngineConfig::Backend::SIM:
        config.backend = engine::SimConfig{backend.getSim().getTokenMs()};
        break;
      case schema::EngineConfig::Backend::CUDA: {
        auto b = backend.getCuda();
        engine::CudaConfig cuda;
        cuda.loadFormat = b.getLoadFormat();
        cuda.weightSeed = b.getWeightSeed();
        cuda.dtype = b.getDtype();
        auto id = b.getNcclUniqueId();
        cuda.ncclUniqueId.assign(reinterpret_cast<const char*>(id.begin()), id.size());
        config.backend = cuda;
        break;
      }
    }
  } catch (const kj::Exception& e) {
    throw Error("engine configuration: not a valid message: " + ipc::userMessage(e));
  }
  return config;
}

}  // namespace vsup::workers
