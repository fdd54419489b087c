#include "workers/engine_codec.h"

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
  auto stop = out.initStop(unsigned(in.sampling.stop.size()));
  for (unsigned i = 0; i < in.sampling.stop.size(); ++i) stop.set(i, in.sampling.stop[i]);
}

engine::GenerateRequest decode(schema::GenerateRequest::Reader in) {
  engine::GenerateRequest r;
  r.id = in.getId();
  r.prompt = in.getPrompt();
  r.sampling.maxTokens = in.getMaxTokens();
  r.sampling.temperature = in.getTemperature();
  r.sampling.topP = in.getTopP();
  if (in.getHasSeed()) r.sampling.seed = in.getSeed();
  r.sampling.topK = in.getTopK();
  for (auto s : in.getStop()) r.sampling.stop.emplace_back(s);
  return r;
}

void encode(const engine::TokenDelta& in, schema::TokenDelta::Builder out) {
  out.setRequestId(in.requestId);
  out.setText(in.text);
  out.setPromptTokens(in.promptTokens);
  out.setCompletionTokens(in.completionTokens);
  out.setFinish(static_cast<schema::FinishReason>(in.finish));
  out.setError(in.error);
}

engine::TokenDelta decode(schema::TokenDelta::Reader in) {
  engine::TokenDelta d;
  d.requestId = in.getRequestId();
  d.text = in.getText();
  d.promptTokens = in.getPromptTokens();
  d.completionTokens = in.getCompletionTokens();
  d.finish = static_cast<engine::FinishReason>(in.getFinish());
  d.error = in.getError();
  return d;
}

void encode(const engine::StepInput& in, schema::StepInput::Builder out) {
  out.setStep(in.step);
  auto seqs = out.initSeqs(unsigned(in.seqs.size()));
  for (unsigned i = 0; i < in.seqs.size(); ++i) {
    const auto& s = in.seqs[i];
    seqs[i].setId(s.id);
    seqs[i].setPromptHash(s.promptHash);
    seqs[i].setPosition(s.position);
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
  for (unsigned i = 0; i < in.kvTransfers.size(); ++i) kv.set(i, in.kvTransfers[i]);
  out.setKvGiveUpAtNs(in.kvGiveUpAtNs);
}

engine::StepInput decode(schema::StepInput::Reader in) {
  engine::StepInput s;
  s.step = in.getStep();
  for (auto q : in.getSeqs()) {
    engine::SeqStep step;
    step.id = q.getId();
    step.promptHash = q.getPromptHash();
    step.position = q.getPosition();
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
  for (auto id : in.getKvTransfers()) s.kvTransfers.emplace_back(id);
  s.kvGiveUpAtNs = in.getKvGiveUpAtNs();
  return s;
}

void encode(const engine::StepOutput& in, schema::StepOutput::Builder out) {
  out.setStep(in.step);
  out.setRank(in.rank);
  auto tokens = out.initTokens(unsigned(in.tokens.size()));
  for (unsigned i = 0; i < in.tokens.size(); ++i) tokens.set(i, in.tokens[i]);
}

engine::StepOutput decode(schema::StepOutput::Reader in) {
  engine::StepOutput o;
  o.step = in.getStep();
  o.rank = in.getRank();
  for (auto t : in.getTokens()) o.tokens.push_back(t);
  return o;
}

}  // namespace vsup::workers
