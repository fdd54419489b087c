#include "base/log.h"

#include <unistd.h>

#include <spdlog/sinks/stdout_sinks.h>

#include "base/check.h"

namespace vsup {
namespace {

std::shared_ptr<spdlog::logger> makeLogger() {
  // stderr_sink_mt writes each line with one fwrite to an unbuffered stream: lines from several
  // processes sharing the terminal do not interleave mid-line.
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("vsup", std::move(sink));
  logger->set_pattern("%H:%M:%S.%e %v");
  logger->set_level(spdlog::level::info);
  logger->flush_on(spdlog::level::trace);
  return logger;
}

spdlog::logger& instance() {
  static std::shared_ptr<spdlog::logger> logger = makeLogger();
  return *logger;
}

}  // namespace

spdlog::logger& log() { return instance(); }

void setLogProcessName(const std::string& name) {
  instance().set_pattern("%H:%M:%S.%e (" + name + " pid=" + std::to_string(::getpid()) + ") %v");
}

void setLogLevel(const std::string& level) {
  auto parsed = spdlog::level::from_str(level);
  VSUP_REQUIRE(parsed != spdlog::level::off || level == "off",
               "unknown log level '" + level + "' (accepted: trace, debug, info, warn, error, off)");
  instance().set_level(parsed);
}

}  // namespace vsup
