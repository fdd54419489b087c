#include "workers/api_server/openai.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

namespace vsup::api {

namespace {

using json = nlohmann::json;
// Output keeps insertion order so responses read like OpenAI's (id, object, created, ...).
using ojson = nlohmann::ordered_json;

// Every rendered body goes through here: one line, and bytes that are not UTF-8 become U+FFFD
// instead of throwing (generated text may split a character; a parse error may quote raw bytes).
std::string dumpJson(const ojson& value) {
  return value.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

// The value as an error message quotes it: scalars as JSON, strings cut at ~40 bytes (on a
// character boundary), containers only by kind so a huge body never lands in a message.
std::string describe(const json& value) {
  switch (value.type()) {
    case json::value_t::array:
      if (value.empty()) return "an empty array";
      return "an array of " + std::to_string(value.size()) +
             (value.size() == 1 ? " item" : " items");
    case json::value_t::object:
      return "an object";
    case json::value_t::string: {
      constexpr size_t kMaxQuoted = 40;
      const auto& text = value.get_ref<const std::string&>();
      if (text.size() <= kMaxQuoted) {
        return value.dump(-1, ' ', false, json::error_handler_t::replace);
      }
      size_t cut = kMaxQuoted;
      while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
      return json(text.substr(0, cut)).dump(-1, ' ', false, json::error_handler_t::replace) + "...";
    }
    default:
      return value.dump(-1, ' ', false, json::error_handler_t::replace);
  }
}

// "'field' must be <expected>, got <value>" with param = field.
ApiError mustBe(const std::string& field, std::string_view expected, const json& got,
                std::string code = "invalid_value") {
  return invalidRequest(
      "'" + field + "' must be " + std::string(expected) + ", got " + describe(got), field,
      std::move(code));
}

ApiError notSupported(const std::string& field) {
  return invalidRequest("'" + field + "' is not supported", field, "unsupported_parameter");
}

ApiError missing(const std::string& field) {
  return invalidRequest("'" + field + "' is required", field, "missing_required_parameter");
}

// The member, or nullptr when it is absent or null (null means "the default" for every field).
const json* member(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

// An integral JSON number as int64, or nothing. Accepts 5.0 (some clients serialize all numbers
// as doubles); unsigned values beyond int64 saturate so that range checks still reject them.
std::optional<int64_t> asInteger(const json& value) {
  if (value.is_number_unsigned()) {
    const auto u = value.get<uint64_t>();
    return u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
               ? std::numeric_limits<int64_t>::max()
               : static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float()) {
    const double d = value.get<double>();
    // 2^63 is exactly representable; anything at or past it saturates.
    if (std::trunc(d) != d) return std::nullopt;
    if (d >= 9223372036854775808.0) return std::numeric_limits<int64_t>::max();
    if (d < -9223372036854775808.0) return std::numeric_limits<int64_t>::min();
    return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

// Nesting depth, checked before parsing: nlohmann's dump and copy recurse, so a body of 100k
// '[' would otherwise reach them with an unbounded depth.
std::optional<ApiError> checkDepth(std::string_view body) {
  int depth = 0;
  bool inString = false;
  bool escaped = false;
  for (const char c : body) {
    if (inString) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        inString = false;
      }
      continue;
    }
    if (c == '"') {
      inString = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return invalidRequest(
            "invalid JSON: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels", {},
            "invalid_json");
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::nullopt;
}

// Fields the engine cannot honour: refused unless they hold their default, so a client never
// silently gets something other than what it asked for.
struct UnsupportedField {
  const char* name;
  bool (*isDefault)(const json&);
};

bool isFalseOrZero(const json& v) {
  return (v.is_boolean() && !v.get<bool>()) || (v.is_number() && v.get<double>() == 0.0);
}
bool isOne(const json& v) { return v.is_number() && v.get<double>() == 1.0; }
bool isEmptyStringOrContainer(const json& v) {
  return (v.is_string() && v.get_ref<const std::string&>().empty()) ||
         ((v.is_array() || v.is_object()) && v.empty());
}

// response_format: {"type":"text"} is what every request gets; json_object and json_schema
// (structured output) are not supported yet.
bool isTextFormat(const json& v) {
  if (!v.is_object()) return false;
  const auto type = v.find("type");
  return type != v.end() && type->is_string() && type->get_ref<const std::string&>() == "text";
}

constexpr UnsupportedField kUnsupported[] = {
    // logprobs: completions take an integer, chat a bool. 0 still asks for the sampled token's
    // logprob, so only false means "off".
    {"logprobs", [](const json& v) { return v.is_boolean() && !v.get<bool>(); }},
    {"top_logprobs", isFalseOrZero},
    {"best_of", isOne},
    {"echo", [](const json& v) { return v.is_boolean() && !v.get<bool>(); }},
    {"suffix", isEmptyStringOrContainer},
    {"tools", isEmptyStringOrContainer},
    {"response_format", isTextFormat},
    {"functions", isEmptyStringOrContainer},
    {"presence_penalty", isFalseOrZero},
    {"frequency_penalty", isFalseOrZero},
    {"logit_bias", isEmptyStringOrContainer},
};

std::optional<ApiError> parsePrompt(const json& root, CompletionCall& call) {
  const json* prompt = member(root, "prompt");
  if (prompt == nullptr) return missing("prompt");
  if (prompt->is_string()) {
    call.prompts.push_back(prompt->get<std::string>());
    return std::nullopt;
  }
  if (!prompt->is_array()) {
    return mustBe("prompt", "a string or a non-empty array of strings", *prompt, "invalid_type");
  }
  if (prompt->empty()) return mustBe("prompt", "a string or a non-empty array of strings", *prompt);
  // Token ids: [1, 2, 3] or [[1, 2], [3]]. Checked before the size so the message says why.
  for (const json& item : *prompt) {
    if (item.is_number() || item.is_array()) {
      return invalidRequest("token-id prompts are not supported", "prompt",
                            "unsupported_parameter");
    }
  }
  if (prompt->size() > kMaxPrompts) {
    return mustBe("prompt", "an array of at most " + std::to_string(kMaxPrompts) + " strings",
                  *prompt);
  }
  for (size_t i = 0; i < prompt->size(); ++i) {
    const json& item = (*prompt)[i];
    if (!item.is_string()) {
      return mustBe("prompt[" + std::to_string(i) + "]", "a string", item, "invalid_type");
    }
    call.prompts.push_back(item.get<std::string>());
  }
  return std::nullopt;
}

std::optional<ApiError> parseMessages(const json& root, CompletionCall& call) {
  const json* messages = member(root, "messages");
  if (messages == nullptr) return missing("messages");
  if (!messages->is_array() || messages->empty()) {
    return mustBe("messages", "a non-empty array of messages", *messages,
                  messages->is_array() ? "invalid_value" : "invalid_type");
  }
  std::vector<engine::ChatMessage> parsed;
  parsed.reserve(messages->size());
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& message = (*messages)[i];
    const std::string path = "messages[" + std::to_string(i) + "]";
    if (!message.is_object()) {
      return mustBe(path, "an object with 'role' and 'content'", message, "invalid_type");
    }
    engine::ChatMessage out;
    const json* role = member(message, "role");
    if (role == nullptr) return missing(path + ".role");
    const std::string roleName = role->is_string() ? role->get<std::string>() : std::string();
    if (roleName == "system" || roleName == "developer") {
      // "developer" is what newer OpenAI clients send instead of "system" for some models.
      out.role = "system";
    } else if (roleName == "user" || roleName == "assistant") {
      out.role = roleName;
    } else {
      return mustBe(path + ".role", "one of \"system\", \"user\", \"assistant\"", *role);
    }
    const json* content = member(message, "content");
    const std::string contentPath = path + ".content";
    if (content == nullptr) return missing(contentPath);
    if (content->is_string()) {
      out.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        const std::string partPath = contentPath + "[" + std::to_string(j) + "]";
        if (!part.is_object()) {
          return mustBe(partPath, "a text part {\"type\":\"text\",\"text\":...}", part,
                        "invalid_type");
        }
        const json* type = member(part, "type");
        if (type == nullptr || !type->is_string() ||
            type->get_ref<const std::string&>() != "text") {
          return invalidRequest("'" + partPath + ".type' must be \"text\" (only text content is " +
                                    "supported), got " + (type ? describe(*type) : "nothing"),
                                partPath + ".type", "unsupported_parameter");
        }
        const json* text = member(part, "text");
        if (text == nullptr) return missing(partPath + ".text");
        if (!text->is_string())
          return mustBe(partPath + ".text", "a string", *text, "invalid_type");
        if (j > 0) out.content += '\n';
        out.content += text->get_ref<const std::string&>();
      }
    } else {
      return mustBe(contentPath, "a string or an array of text parts", *content, "invalid_type");
    }
    parsed.push_back(std::move(out));
  }
  call.messages = std::move(parsed);
  call.prompts.emplace_back();
  return std::nullopt;
}

std::optional<ApiError> parseMaxTokens(const json& root, bool chat, const Limits& limits,
                                       CompletionCall& call) {
  // Absent: completions get vLLM's legacy default; a chat may use the rest of the context, up
  // to the largest max_tokens accepted (the engine lowers it to what the prompt leaves).
  call.sampling.maxTokens =
      chat ? std::min(limits.maxTokensLimit,
                      limits.defaultChatMaxTokens > 0 ? limits.defaultChatMaxTokens
                                                      : limits.maxTokensLimit)
           : limits.defaultMaxTokens;
  // Chat clients send max_completion_tokens now (max_tokens is deprecated there); it wins.
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (!chat && std::string_view(name) == "max_completion_tokens") continue;
    const json* value = member(root, name);
    if (value == nullptr) continue;
    const std::optional<int64_t> n = asInteger(*value);
    if (!n || *n < 1 || *n > limits.maxTokensLimit) {
      return mustBe(name, "an integer between 1 and " + std::to_string(limits.maxTokensLimit),
                    *value, n ? "invalid_value" : "invalid_type");
    }
    call.sampling.maxTokens = *n;
    call.maxTokensGiven = true;
  }
  return std::nullopt;
}

std::optional<ApiError> parseSampling(const json& root, CompletionCall& call) {
  engine::SamplingParams& sampling = call.sampling;
  if (const json* v = member(root, "temperature")) {
    if (!v->is_number()) return mustBe("temperature", "a number between 0 and 2", *v, "invalid_type");
    sampling.temperature = v->get<double>();
  }
  if (const json* v = member(root, "top_p")) {
    if (!v->is_number()) {
      return mustBe("top_p", "a number greater than 0 and at most 1", *v, "invalid_type");
    }
    sampling.topP = v->get<double>();
  }
  if (const json* v = member(root, "top_k")) {  // vLLM's extension; -1 and 0 mean off
    const std::optional<int64_t> n = asInteger(*v);
    if (!n || *n < -1 || *n > (int64_t(1) << 30)) {  // (outside int32: checkSampling can't see it)
      return mustBe("top_k", "an integer >= -1 (-1 or 0: off)", *v,
                    n ? "invalid_value" : "invalid_type");
    }
    sampling.topK = int32_t(*n);
  }
  if (const json* v = member(root, "seed")) {
    if (v->is_number_unsigned()) {
      sampling.seed = v->get<uint64_t>();
    } else {
      const std::optional<int64_t> n = asInteger(*v);
      if (!n || *n < 0) {
        return mustBe("seed", "a non-negative integer", *v, n ? "invalid_value" : "invalid_type");
      }
      sampling.seed = static_cast<uint64_t>(*n);
    }
  }
  if (const json* v = member(root, "stop")) {
    constexpr std::string_view kExpected =
        "a non-empty string or an array of at most 4 non-empty strings";
    if (v->is_string()) {
      if (v->get_ref<const std::string&>().empty()) return mustBe("stop", kExpected, *v);
      sampling.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      for (size_t i = 0; i < v->size(); ++i) {
        const json& item = (*v)[i];
        if (!item.is_string()) {
          return mustBe("stop[" + std::to_string(i) + "]", "a non-empty string", item,
                        "invalid_type");
        }
        sampling.stop.push_back(item.get<std::string>());
      }
    } else {
      return mustBe("stop", kExpected, *v, "invalid_type");
    }
  }
  // The ranges: the one check the embedded library (vsup::LLM) makes too, so that the same
  // value gets the same message on both paths. (max_tokens was checked against its JSON value.)
  if (auto bad = engine::checkSampling(sampling)) {
    return invalidRequest(bad->message, bad->field, "invalid_value");
  }
  return std::nullopt;
}

std::optional<ApiError> parseKvTransferParams(const json& root, CompletionCall& call) {
  const json* v = member(root, "kv_transfer_params");
  if (v == nullptr) return std::nullopt;
  const std::string base = "kv_transfer_params";
  if (!v->is_object()) return mustBe(base, "an object", *v, "invalid_type");
  engine::KvParams kv;
  auto flag = [&](const char* name, bool& out) -> std::optional<ApiError> {
    if (const json* f = member(*v, name)) {
      if (!f->is_boolean()) return mustBe(base + "." + name, "a boolean", *f, "invalid_type");
      out = f->get<bool>();
    }
    return std::nullopt;
  };
  if (auto e = flag("do_remote_decode", kv.doRemoteDecode)) return e;
  if (auto e = flag("do_remote_prefill", kv.doRemotePrefill)) return e;
  if (kv.doRemoteDecode && kv.doRemotePrefill) {
    return invalidRequest("'kv_transfer_params' cannot ask for both do_remote_decode and "
                          "do_remote_prefill", base, "invalid_value");
  }
  if (!kv.doRemoteDecode && !kv.doRemotePrefill) return std::nullopt;  // nothing asked
  if (call.prompts.size() > 1) {
    return invalidRequest("'kv_transfer_params' needs a single prompt, got " +
                              std::to_string(call.prompts.size()),
                          "prompt", "invalid_value");
  }
  if (kv.doRemotePrefill) {
    auto text = [&](const char* name, std::string& out) -> std::optional<ApiError> {
      const json* f = member(*v, name);
      if (f == nullptr) return missing(base + "." + name);
      if (!f->is_string() || f->get_ref<const std::string&>().empty() || f->get_ref<const std::string&>().size() > 4096) {
        return mustBe(base + "." + name, "a non-empty string", *f, "invalid_type");
      }
      out = f->get<std::string>();
      return std::nullopt;
    };
    auto integer = [&](const char* name, int64_t lo, int64_t hi) -> std::variant<int64_t, ApiError> {
      const json* f = member(*v, name);
      if (f == nullptr) return missing(base + "." + name);
      std::optional<int64_t> n = asInteger(*f);
      if (!n || *n < lo || *n > hi) {
        return mustBe(base + "." + name,
                      "an integer from " + std::to_string(lo) + " to " + std::to_string(hi), *f);
      }
      return *n;
    };
    if (auto e = text("remote_engine_id", kv.remoteEngineId)) return e;
    if (auto e = text("remote_request_id", kv.remoteRequestId)) return e;
    if (auto e = text("remote_host", kv.remoteHost)) return e;
    auto port = integer("remote_port", 1, 65535);
    if (auto* e = std::get_if<ApiError>(&port)) return *e;
    kv.remotePort = uint16_t(std::get<int64_t>(port));
    auto tp = integer("tp_size", 1, 64);
    if (auto* e = std::get_if<ApiError>(&tp)) return *e;
    kv.tpSize = uint32_t(std::get<int64_t>(tp));
    const json* blocks = member(*v, "remote_block_ids");
    if (blocks == nullptr) return missing(base + ".remote_block_ids");
    if (!blocks->is_array() || blocks->empty() || blocks->size() > 65536) {
      return mustBe(base + ".remote_block_ids", "a non-empty array of at most 65536 block ids",
                    *blocks, "invalid_type");
    }
    for (size_t i = 0; i < blocks->size(); ++i) {
      std::optional<int64_t> b = asInteger((*blocks)[i]);
      if (!b || *b < 0 || *b > std::numeric_limits<int32_t>::max()) {
        return mustBe(base + ".remote_block_ids[" + std::to_string(i) + "]",
                      "an integer 0 or more", (*blocks)[i]);
      }
      kv.remoteBlockIds.push_back(int32_t(*b));
    }
  }
  call.kv = std::move(kv);
  return std::nullopt;
}

std::optional<ApiError> parseOptions(const json& root, CompletionCall& call) {
  if (const json* v = member(root, "n")) {
    const std::optional<int64_t> n = asInteger(*v);
    if (!n) return mustBe("n", "an integer", *v, "invalid_type");
    if (*n < 1) return mustBe("n", "at least 1", *v);
    if (*n > 1) return invalidRequest("n > 1 is not supported", "n", "unsupported_parameter");
  }
  if (const json* v = member(root, "stream")) {
    if (!v->is_boolean()) return mustBe("stream", "a boolean", *v, "invalid_type");
    call.stream = v->get<bool>();
  }
  if (const json* v = member(root, "stream_options")) {
    if (!v->is_object()) return mustBe("stream_options", "an object", *v, "invalid_type");
    if (!call.stream) {
      return invalidRequest("'stream_options' is only allowed when 'stream' is true",
                            "stream_options", "invalid_value");
    }
    if (const json* usage = member(*v, "include_usage")) {
      if (!usage->is_boolean()) {
        return mustBe("stream_options.include_usage", "a boolean", *usage, "invalid_type");
      }
      call.includeUsage = usage->get<bool>();
    }
  }
  if (const json* v = member(root, "user")) {
    if (!v->is_string()) return mustBe("user", "a string", *v, "invalid_type");
  }
  for (const UnsupportedField& field : kUnsupported) {
    const json* v = member(root, field.name);
    if (v != nullptr && !field.isDefault(*v)) return notSupported(field.name);
  }
  return std::nullopt;
}

ojson finishReason(engine::FinishReason finish) {
  if (finish == engine::FinishReason::None) return nullptr;
  return engine::nameOf(finish);
}

ojson usageJson(const Usage& usage) {
  ojson out = ojson::object();
  out["prompt_tokens"] = usage.prompt;
  out["completion_tokens"] = usage.completion;
  out["total_tokens"] = usage.prompt + usage.completion;
  return out;
}

ojson envelope(std::string_view object, std::string_view id, int64_t created,
               std::string_view model) {
  ojson out = ojson::object();
  out["id"] = std::string(id);
  out["object"] = std::string(object);
  out["created"] = created;
  out["model"] = std::string(model);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Errors

std::string renderError(const ApiError& error) {
  ojson body = ojson::object();
  body["message"] = error.message;
  body["type"] = error.type;
  body["param"] = error.param.empty() ? ojson(nullptr) : ojson(error.param);
  body["code"] = error.code.empty() ? ojson(nullptr) : ojson(error.code);
  ojson out = ojson::object();
  out["error"] = std::move(body);
  return dumpJson(out);
}

ApiError invalidRequest(std::string message, std::string param, std::string code) {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(code),
                  std::move(param)};
}

static std::string servedList(const std::vector<std::string>& served) {
  std::string out;
  for (const auto& name : served) {
    if (!out.empty()) out += ", ";
    out += "`" + name + "`";
  }
  return out;
}

ApiError modelNotFound(std::string_view model, const std::vector<std::string>& served) {
  std::string message = "The model `" + std::string(model) + "` does not exist.";
  if (!served.empty()) message += " Served models: " + servedList(served) + ".";
  return ApiError{404, std::move(message), "invalid_request_error", "model_not_found", "model"};
}

ApiError payloadTooLarge(uint64_t limitBytes) {
  return ApiError{413,
                  "request body is larger than " + std::to_string(limitBytes) + " bytes",
                  "invalid_request_error",
                  "payload_too_large",
                  {}};
}

ApiError authenticationFailed(std::string message) {
  return ApiError{401, std::move(message), "authentication_error", "invalid_api_key", {}};
}

ApiError pathNotFound(std::string_view method, std::string_view path) {
  return ApiError{404,
                  "no route for " + std::string(method) + " " + std::string(path),
                  "not_found_error",
                  {},
                  {}};
}

ApiError unavailable(std::string message) {
  return ApiError{503, std::move(message), "unavailable", {}, {}};
}

ApiError serverError(std::string message) {
  return ApiError{500, std::move(message), "server_error", {}, {}};
}

// ---------------------------------------------------------------------------------------------
// Requests

std::variant<CompletionCall, ApiError> parseCompletionRequest(std::string_view body, bool chat,
                                                              const Limits& limits) {
  if (std::optional<ApiError> error = checkDepth(body)) return *std::move(error);
  json root;
  try {
    root = json::parse(body);
  } catch (const json::exception& e) {
    // nlohmann reports the position only through its exception; this is the edge where client
    // bytes become values, so the catch belongs here. parse_error is the usual one, but a number
    // like 1e400 throws out_of_range. Drop the "[json.exception...] " prefix.
    std::string_view what = e.what();
    if (const size_t end = what.find("] "); end != std::string_view::npos) {
      what.remove_prefix(end + 2);
    }
    return invalidRequest("invalid JSON: " + std::string(what), {}, "invalid_json");
  }
  if (!root.is_object()) {
    return invalidRequest("request body must be a JSON object, got " + describe(root), {},
                          "invalid_type");
  }

  CompletionCall call;
  call.chat = chat;

  const std::vector<std::string> served =
      limits.servedModels.empty() ? std::vector<std::string>{limits.servedModel}
                                  : limits.servedModels;
  const json* model = member(root, "model");
  if (model == nullptr) {
    ApiError error = missing("model");
    error.message += " (served models: " + servedList(served) + ")";
    return error;
  }
  if (!model->is_string()) return mustBe("model", "a string", *model, "invalid_type");
  call.model = model->get<std::string>();
  if (std::find(served.begin(), served.end(), call.model) == served.end()) {
    return modelNotFound(call.model, served);
  }

  std::optional<ApiError> error = chat ? parseMessages(root, call) : parsePrompt(root, call);
  if (!error) error = parseMaxTokens(root, chat, limits, call);
  if (!error) error = parseSampling(root, call);
  if (!error) error = parseOptions(root, call);
  if (!error) error = parseKvTransferParams(root, call);
  if (error) return *std::move(error);
  return call;
}

// ---------------------------------------------------------------------------------------------
// Responses

namespace {
ojson kvParamsJson(const engine::KvParams& p) {
  ojson o = ojson::object();
  o["do_remote_decode"] = p.doRemoteDecode;
  o["do_remote_prefill"] = p.doRemotePrefill;
  o["remote_engine_id"] = p.remoteEngineId;
  o["remote_request_id"] = p.remoteRequestId;
  o["remote_block_ids"] = p.remoteBlockIds;
  o["remote_host"] = p.remoteHost;
  o["remote_port"] = p.remotePort;
  o["tp_size"] = p.tpSize;
  return o;
}
}  // namespace

std::string renderKvTransferParams(const engine::KvParams& params) {
  return dumpJson(kvParamsJson(params));
}

std::string renderKvParamsChunk(bool chat, std::string_view id, int64_t created,
                                std::string_view model, const engine::KvParams& params) {
  ojson out = envelope(chat ? "chat.completion.chunk" : "text_completion", id, created, model);
  out["choices"] = ojson::array();
  out["kv_transfer_params"] = kvParamsJson(params);
  return dumpJson(out);
}

std::string renderCompletion(const CompletionResult& result) {
  ojson out = envelope(result.chat ? "chat.completion" : "text_completion", result.id,
                       result.created, result.model);
  ojson choices = ojson::array();
  for (const Choice& choice : result.choices) {
    ojson c = ojson::object();
    c["index"] = choice.index;
    if (result.chat) {
      ojson message = ojson::object();
      message["role"] = "assistant";
      message["content"] = choice.text;
      c["message"] = std::move(message);
    } else {
      c["text"] = choice.text;
    }
    c["logprobs"] = nullptr;
    c["finish_reason"] = finishReason(choice.finish);
    choices.push_back(std::move(c));
  }
  out["choices"] = std::move(choices);
  out["usage"] = usageJson(result.usage);
  if (result.kvTransferParams) out["kv_transfer_params"] = kvParamsJson(*result.kvTransferParams);
  return dumpJson(out);
}

std::string renderStreamChunk(bool chat, std::string_view id, int64_t created,
                              std::string_view model, const Choice& delta, bool first) {
  ojson out = envelope(chat ? "chat.completion.chunk" : "text_completion", id, created, model);
  ojson c = ojson::object();
  c["index"] = delta.index;
  if (chat) {
    ojson d = ojson::object();
    if (first) d["role"] = "assistant";
    if (first || !delta.text.empty()) d["content"] = delta.text;
    c["delta"] = std::move(d);
  } else {
    c["text"] = delta.text;
  }
  c["logprobs"] = nullptr;
  c["finish_reason"] = finishReason(delta.finish);
  out["choices"] = ojson::array({std::move(c)});
  return dumpJson(out);
}

std::string renderUsageChunk(bool chat, std::string_view id, int64_t created,
                             std::string_view model, const Usage& usage) {
  ojson out = envelope(chat ? "chat.completion.chunk" : "text_completion", id, created, model);
  out["choices"] = ojson::array();
  out["usage"] = usageJson(usage);
  return dumpJson(out);
}

std::string sseEvent(std::string_view json) {
  std::string out;
  out.reserve(json.size() + 8);
  out += "data: ";
  out += json;
  out += "\n\n";
  return out;
}

std::string renderModels(const std::vector<std::string>& names, std::string_view root,
                         int64_t maxModelLen, int64_t created) {
  ojson data = ojson::array();
  for (const auto& name : names) {
    ojson entry = ojson::object();
    entry["id"] = name;
    entry["object"] = "model";
    entry["created"] = created;
    entry["owned_by"] = "vsup";
    entry["root"] = std::string(root);
    entry["parent"] = nullptr;
    entry["max_model_len"] = maxModelLen > 0 ? ojson(maxModelLen) : ojson(nullptr);
    data.push_back(std::move(entry));
  }
  ojson out = ojson::object();
  out["object"] = "list";
  out["data"] = std::move(data);
  return dumpJson(out);
}

std::string renderModels(std::string_view model, int64_t created) {
  ojson entry = ojson::object();
  entry["id"] = std::string(model);
  entry["object"] = "model";
  entry["created"] = created;
  entry["owned_by"] = "vsup";
  ojson out = ojson::object();
  out["object"] = "list";
  out["data"] = ojson::array({std::move(entry)});
  return dumpJson(out);
}

}  // namespace vsup::api
