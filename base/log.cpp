#include "base/log.h"

#include <unistd.h>

#include <spdlog/details/log_msg.h>
#include <spdlog/formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>

#include "base/check.h"

namespace vsup {
namespace {

// ISO 8601 in UTC with milliseconds: "2026-01-02T12:00:01.234Z".
std::string isoTime(std::chrono::system_clock::time_point t) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  std::time_t secs = std::time_t(ms / 1000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[96];  // room for any int the compiler can imagine in each field
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, int(ms % 1000));
  return buf;
}

std::string jsonLine(std::chrono::system_clock::time_point t, std::string_view level,
                     std::string_view process, pid_t pid, std::string_view message,
                     std::string_view stream) {
  nlohmann::ordered_json j;
  j["time"] = isoTime(t);
  j["level"] = level;
  j["process"] = process;
  j["pid"] = pid;
  if (!stream.empty()) j["stream"] = stream;
  j["message"] = message;
  // Whatever a process printed (invalid UTF-8 included) still makes one valid JSON line.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The words of --log-level (not spdlog's "warning"/"critical").
std::string_view levelName(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace: return "trace";
    case spdlog::level::debug: return "debug";
    case spdlog::level::info: return "info";
    case spdlog::level::warn: return "warn";
    case spdlog::level::err: return "error";
    case spdlog::level::critical: return "critical";
    default: return "off";
  }
}

class JsonFormatter final : public spdlog::formatter {
 public:
  JsonFormatter(std::string process, pid_t pid) : process_(std::move(process)), pid_(pid) {}
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string line = jsonLine(msg.time, levelName(msg.level), process_, pid_,
                                std::string_view(msg.payload.data(), msg.payload.size()), {});
    line.push_back('\n');
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>(process_, pid_);
  }

 private:
  std::string process_;
  pid_t pid_;
};

struct State {
  std::shared_ptr<spdlog::logger> logger;
  std::string process;  // empty until setLogProcessName()
  LogFormat format = LogFormat::Text;
};

// Installs the formatter the current format and process name call for.
void apply(State& s) {
  if (s.format == LogFormat::Json) {
    s.logger->set_formatter(
        std::make_unique<JsonFormatter>(s.process.empty() ? "vsup" : s.process, ::getpid()));
  } else if (s.process.empty()) {
    s.logger->set_pattern("%H:%M:%S.%e %v");
  } else {
    s.logger->set_pattern("%H:%M:%S.%e (" + s.process + " pid=" + std::to_string(::getpid()) +
                          ") %v");
  }
}

State makeState() {
  State s;
  // stderr_sink_mt writes each line with one fwrite to an unbuffered stream: lines from several
  // processes sharing the terminal do not interleave mid-line.
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  s.logger = std::make_shared<spdlog::logger>("vsup", std::move(sink));
  s.logger->set_level(spdlog::level::info);
  s.logger->flush_on(spdlog::level::trace);
  const char* format = std::getenv(kLogFormatEnv);
  if (format != nullptr && std::string_view(format) == "json") s.format = LogFormat::Json;
  apply(s);
  return s;
}

State& state() {
  static State s = makeState();
  return s;
}

}  // namespace

spdlog::logger& log() { return *state().logger; }

void setLogProcessName(const std::string& name) {
  State& s = state();
  s.process = name;
  apply(s);
}

void setLogLevel(const std::string& level) {
  auto parsed = spdlog::level::from_str(level);
  VSUP_REQUIRE(parsed != spdlog::level::off || level == "off",
               "unknown log level '" + level + "' (accepted: trace, debug, info, warn, error, off)");
  state().logger->set_level(parsed);
}

void setLogFormat(const std::string& format) {
  VSUP_REQUIRE(format == "text" || format == "json",
               "unknown log format '" + format + "' (accepted: text, json)");
  State& s = state();
  s.format = format == "json" ? LogFormat::Json : LogFormat::Text;
  apply(s);
}

LogFormat logFormat() { return state().format; }

const char* nameOf(LogFormat format) { return format == LogFormat::Json ? "json" : "text"; }

std::string jsonLogLine(std::string_view level, std::string_view process, pid_t pid,
                        std::string_view message, std::string_view stream) {
  return jsonLine(std::chrono::system_clock::now(), level, process, pid, message, stream);
}

bool isJsonObjectLine(std::string_view line) {
  // Cheap test first: most lines of a text-format child are not even candidates.
  size_t first = line.find_first_not_of(" \t\r");
  if (first == std::string_view::npos || line[first] != '{') return false;
  auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  return parsed.is_object();
}

}  // namespace vsup
