// Conversions between the data-plane Cap'n Proto structs (ipc/engine.capnp) and the engine's
// plain values. The only place in workers/ that touches those structs' fields.
#pragma once

#include <string>

#include "engine/config.h"
#include "engine/engine.h"
#include "engine/stats.h"
#include "ipc/engine.capnp.h"

namespace vsup::workers {

void encode(const engine::GenerateRequest& in, ipc::schema::GenerateRequest::Builder out);
engine::GenerateRequest decode(ipc::schema::GenerateRequest::Reader in);
void encode(const engine::KvParams& in, ipc::schema::KvParams::Builder out);
engine::KvParams decode(ipc::schema::KvParams::Reader in);
void encode(const engine::TokenDelta& in, ipc::schema::TokenDelta::Builder out);
engine::TokenDelta decode(ipc::schema::TokenDelta::Reader in);
void encode(const engine::StepInput& in, ipc::schema::StepInput::Builder out);
engine::StepInput decode(ipc::schema::StepInput::Reader in);
void encode(const engine::StepOutput& in, ipc::schema::StepOutput::Builder out);
engine::StepOutput decode(ipc::schema::StepOutput::Reader in);
void encode(const engine::Histogram& in, ipc::schema::Histogram::Builder out);
// Throws vsup::Error for a histogram that breaks engine::Histogram's rules (counts not one more
// than bounds, bounds not strictly ascending).
engine::Histogram decode(ipc::schema::Histogram::Reader in);
void encode(const engine::EngineStats& in, ipc::schema::EngineStats::Builder out);
engine::EngineStats decode(ipc::schema::EngineStats::Reader in);  // throws as decode(Histogram)
ipc::schema::RejectCode encode(engine::RejectCode code);
engine::RejectCode decode(ipc::schema::RejectCode code);

// An EngineConfig as the bytes of one Cap'n Proto message (ChildSpec::startConfig, delivered
// in Node.start) and back. decodeEngineConfig throws vsup::Error on bytes that are not one.
std::string encodeEngineConfig(const engine::EngineConfig& config);
// A start configuration's bytes (ChildSpec::startConfig) and back: one flat Cap'n Proto
// message. flatWords throws vsup::Error, naming `what`, for bytes that cannot be one; it copies
// them into words, since a string's storage need not be word-aligned.
std::string flatBytes(capnp::MessageBuilder& message);
kj::Array<capnp::word> flatWords(const std::string& bytes, const std::string& what);
engine::EngineConfig decodeEngineConfig(const std::string& bytes);

}  // namespace vsup::workers
