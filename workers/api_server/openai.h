// The OpenAI wire format: request bodies of /v1/completions and /v1/chat/completions parsed into
// engine::SamplingParams and prompts or chat messages, and responses, SSE chunks, model lists
// and errors rendered as the JSON the official OpenAI clients expect. Chat messages stay
// messages here: engine-core renders them in the model's format (engine/prompt.h), beside the
// tokenizer that must read that format.
//
// This is the only place where OpenAI JSON exists, so the wire format can change in one file:
// the HTTP front end hands bodies in and gets plain values out; nothing past it sees JSON. Bad
// client input is an expected outcome, so it comes back as a value (ApiError), never as an
// exception.
//
// Every function here is pure and thread-safe: parse bodies on a worker thread if they are big
// (the API server's loop thread must not stall on one). Rendered text is always valid UTF-8
// JSON: bytes in generated text that are not valid UTF-8 (e.g. a token that ends inside a
// multi-byte character) are replaced with U+FFFD rather than failing, so the engine should hold
// back incomplete characters between deltas if it wants them to arrive intact.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "engine/types.h"

namespace vsup::api {

// ---------------------------------------------------------------------------------------------
// Errors

// An error response. `status` is the HTTP status; the rest is the OpenAI error object. Empty
// `param` / `code` render as null.
struct ApiError {
  int status = 500;
  std::string message;
  std::string type;   // "invalid_request_error", "authentication_error", "not_found_error",
                      // "unavailable", "server_error"
  std::string code;   // machine-readable detail, e.g. "model_not_found"; may be empty
  std::string param;  // the request field at fault; empty when none
};

// {"error":{"message":...,"type":...,"param":...|null,"code":...|null}}
std::string renderError(const ApiError& error);

// Constructors for the errors the front end sends, so the status/type pairs stay consistent.
// 400 invalid_request_error.
ApiError invalidRequest(std::string message, std::string param = {}, std::string code = {});
// 404 invalid_request_error, code "model_not_found": "The model `x` does not exist.", followed
// by " Served models: `a`, `b`." when `served` is not empty.
ApiError modelNotFound(std::string_view model, const std::vector<std::string>& served = {});
// 413 invalid_request_error: the body is larger than `limitBytes`.
ApiError payloadTooLarge(uint64_t limitBytes);
// 401 authentication_error, code "invalid_api_key".
ApiError authenticationFailed(std::string message = "Incorrect API key provided.");
// 404 not_found_error: no route for `path`.
ApiError pathNotFound(std::string_view method, std::string_view path);
// 503 unavailable (e.g. draining, or the engine is not up).
ApiError unavailable(std::string message);
// 500 server_error.
ApiError serverError(std::string message);

// ---------------------------------------------------------------------------------------------
// Requests

// What the server is configured to accept.
struct Limits {
  std::string servedModel;        // the accepted value of "model" when servedModels is empty
  std::vector<std::string> servedModels;  // the accepted values of "model" (any of them)
  int64_t maxTokensLimit = 4096;  // the largest accepted max_tokens
  // Completions without max_tokens (absent or null): vLLM's legacy default.
  int64_t defaultMaxTokens = 16;
  // Chat without max_tokens and max_completion_tokens: the ceiling (never above maxTokensLimit;
  // 0: maxTokensLimit). The call then has maxTokensGiven false, and the API server lets the
  // engine lower the ceiling to what the context leaves after the prompt, as OpenAI and vLLM
  // default a chat to the rest of the context.
  int64_t defaultChatMaxTokens = 0;
};

// A parsed, validated completion or chat completion request.
struct CompletionCall {
  bool chat = false;
  std::string model;
  // Completions: the prompt string, or each string of a prompt list (choice index = position).
  // Chat: exactly one empty prompt, so there is one choice; the text is in `messages`.
  std::vector<std::string> prompts;
  // Chat: the validated messages (at least one), for engine-core to render in the model's
  // format (engine/prompt.h). Completions: empty.
  std::vector<engine::ChatMessage> messages;
  engine::SamplingParams sampling;  // every field within the ranges documented in engine/types.h
  // The request set max_tokens (or, chat, max_completion_tokens); false: sampling.maxTokens is
  // the default of Limits (a ceiling, for a chat).
  bool maxTokensGiven = false;
  bool stream = false;
  bool includeUsage = false;  // stream_options.include_usage; only ever true with stream
  bool echo = false;          // echo is not supported: a request with echo true is refused,
                              // so this is always false in a returned call
  std::optional<engine::KvParams> kv;  // kv_transfer_params (disaggregated prefill/decode)
};

// The largest number of prompts accepted in one completions request.
inline constexpr size_t kMaxPrompts = 64;
// The deepest JSON nesting accepted in a body (arrays and objects). Real requests need 4.
inline constexpr int kMaxJsonDepth = 32;

// Parses the body of POST /v1/completions (chat = false) or /v1/chat/completions (chat = true).
//
// Accepted fields (null always means "the default"):
//   model                  required string, one of limits.servedModels (else 404 naming them;
//                          absent: 400 naming them too); the call keeps the name asked for
//   prompt                 completions, required: a string or 1..64 strings (token ids: refused)
//   messages               chat, required: non-empty list of {role, content}; role is system,
//                          user or assistant ("developer" is taken as system); content is a
//                          string or a list of {"type":"text","text":...} parts (joined by "\n")
//   max_tokens             integer in [1, maxTokensLimit]; chat also takes max_completion_tokens
//                          (which wins when both are set). Absent: completions
//                          limits.defaultMaxTokens (16), chat the rest of the context, up to
//                          maxTokensLimit (see Limits.defaultChatMaxTokens)
//   temperature            number in [0, 2]
//   top_p                  number in (0, 1]
//   top_k                  integer >= -1; -1 or 0: off (vLLM's extension, not OpenAI's)
//   seed                   integer >= 0
//   stop                   a non-empty string, or a list of at most 4 non-empty strings
//   n                      only 1
//   stream                 bool
//   stream_options         {"include_usage": bool}; only with stream true
//   user                   string, ignored
//   kv_transfer_params     vLLM's disaggregated prefill/decode fields, one prompt only:
//                          {"do_remote_decode": true} to a prefill instance, or
//                          {"do_remote_prefill": true, "remote_engine_id", "remote_request_id",
//                          "remote_block_ids": [int >= 0, ...], "remote_host", "remote_port"
//                          (1..65535), "tp_size" (>= 1)} to a decode instance (every field
//                          required); other keys are ignored
// Refused when set to anything but their default, because the engine cannot honour them:
//   logprobs, top_logprobs, best_of, echo, suffix, tools, functions, presence_penalty,
//   frequency_penalty, logit_bias, response_format (only {"type":"text"}, the default, is
//   accepted), each with 400 "'<field>' is not supported", param <field>, code
//   "unsupported_parameter".
// Unknown fields are ignored: OpenAI clients send extras.
//
// Returns the call, or an ApiError whose message names the field and what was expected and
// whose param is the field name.
[[nodiscard]] std::variant<CompletionCall, ApiError> parseCompletionRequest(std::string_view body,
                                                                            bool chat,
                                                                            const Limits& limits);

// ---------------------------------------------------------------------------------------------
// Responses

struct Choice {
  int index = 0;
  std::string text;  // the whole text (non-streaming) or this chunk's text (streaming)
  engine::FinishReason finish = engine::FinishReason::None;  // None renders as null
};

struct Usage {
  int64_t prompt = 0;
  int64_t completion = 0;
};

struct CompletionResult {
  bool chat = false;
  std::string id;       // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;  // Unix seconds
  std::string model;
  std::vector<Choice> choices;
  Usage usage;
  std::optional<engine::KvParams> kvTransferParams;  // a prefill instance's answer
};

// The non-streaming response body.
// Completions: {"id","object":"text_completion","created","model",
//               "choices":[{"index","text","logprobs":null,"finish_reason"}],
//               "usage":{"prompt_tokens","completion_tokens","total_tokens"}}
//              and "kv_transfer_params":{...} when set (renderKvTransferParams)
// Chat:        "object":"chat.completion", choices [{"index",
//               "message":{"role":"assistant","content"},"logprobs":null,"finish_reason"}]
std::string renderCompletion(const CompletionResult& result);

// The JSON of one streamed chunk (wrap it with sseEvent()).
// Completions: {"id","object":"text_completion","created","model",
//               "choices":[{"index","text","logprobs":null,"finish_reason"}]}
// Chat:        {"id","object":"chat.completion.chunk","created","model",
//               "choices":[{"index","delta":{...},"logprobs":null,"finish_reason"}]}
// The chat delta holds "role":"assistant" only when `first`, and "content" when `first` or the
// text is non-empty (so the closing chunk with only a finish reason has "delta":{}, as OpenAI's).
std::string renderStreamChunk(bool chat, std::string_view id, int64_t created,
                              std::string_view model, const Choice& delta, bool first);

// The usage chunk sent last when stream_options.include_usage is true: the same envelope with
// "choices":[] and "usage":{"prompt_tokens","completion_tokens","total_tokens"}.
std::string renderUsageChunk(bool chat, std::string_view id, int64_t created,
                             std::string_view model, const Usage& usage);

// kv_transfer_params as vLLM's prefill instances answer them: {"do_remote_decode":false,
// "do_remote_prefill":true,"remote_engine_id","remote_request_id","remote_block_ids",
// "remote_host","remote_port","tp_size"}.
std::string renderKvTransferParams(const engine::KvParams& params);
// A streamed chunk with no choices that carries kv_transfer_params, sent before [DONE].
std::string renderKvParamsChunk(bool chat, std::string_view id, int64_t created,
                                std::string_view model, const engine::KvParams& params);

// "data: " + json + "\n\n". The JSON must be one line (everything rendered here is).
std::string sseEvent(std::string_view json);

// The event that ends every stream.
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// GET /v1/models, one entry per served name, as vLLM lists them:
// {"object":"list","data":[{"id":<name>,"object":"model","created","owned_by":"vsup",
//   "root":<root>,"parent":null,"max_model_len":<maxModelLen>|null (0: unbounded)}, ...]}
std::string renderModels(const std::vector<std::string>& names, std::string_view root,
                         int64_t maxModelLen, int64_t created);
// The short form, one entry without root, parent and max_model_len:
// {"object":"list","data":[{"id","object":"model","created","owned_by":"vsup"}]}
std::string renderModels(std::string_view model, int64_t created);

}  // namespace vsup::api
