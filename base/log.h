// The vsup logger. It is a private spdlog logger (never registered in spdlog's global registry,
// so a host that uses spdlog itself is not disturbed) writing one line per event to stderr, in
// one of two formats:
//   text (the default)  `12:00:01.234 (root pid=9518) [shutdown] root: stopping db (deadline 4.8s)`
//   json                one JSON object per line:
//                       {"time":"2026-01-02T12:00:01.234Z","level":"info","process":"root",
//                        "pid":9518,"message":"[shutdown] root: stopping db (deadline 4.8s)"}
// The prefix (text) or the "process" field (json) set with setLogProcessName() tells which
// process of the tree wrote the line. The format starts as $VSUP_LOG_FORMAT says ("text" or
// "json"; anything else: text), which is how a supervisor hands its own format to every child
// (`vsup run --log-format json`).
//
// Thread: log() may be used from any thread; the set* functions are for start-up, before other
// threads log.
#pragma once

#include <spdlog/spdlog.h>
#include <sys/types.h>

#include <string>
#include <string_view>

namespace vsup {

spdlog::logger& log();
// e.g. "root" or "engine-core": lines then start with `(engine-core pid=123)`.
void setLogProcessName(const std::string& name);
// "trace" | "debug" | "info" | "warn" | "error" | "off"; throws vsup::Error on anything else.
void setLogLevel(const std::string& level);

enum class LogFormat { Text, Json };
// "text" | "json"; throws vsup::Error on anything else.
void setLogFormat(const std::string& format);
LogFormat logFormat();
const char* nameOf(LogFormat format);  // "text" | "json"
// The environment variable that carries the format to child processes.
inline constexpr const char* kLogFormatEnv = "VSUP_LOG_FORMAT";

// One line of the json format, without its newline, stamped now: "time" (UTC, milliseconds),
// "level", "process", "pid", "message", and "stream" when not empty (the collected output of a
// child that is not a vsup process: "stdout" or "stderr"). Bytes that are not UTF-8 become
// U+FFFD.
std::string jsonLogLine(std::string_view level, std::string_view process, pid_t pid,
                        std::string_view message, std::string_view stream = {});
// True when `line` is exactly one JSON object (a line in the json format, say).
bool isJsonObjectLine(std::string_view line);

}  // namespace vsup
