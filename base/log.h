// The vsup logger. It is a private spdlog logger (never registered in spdlog's global registry,
// so a host that uses spdlog itself is not disturbed) writing one line per event to stderr.
// Lines look like `[shutdown] root: stopping db (deadline 4.8s)`; the prefix set with
// setLogProcessName() tells which process of the tree wrote it.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace vsup {

spdlog::logger& log();
// e.g. "root" or "engine-core": lines then start with `(engine-core pid=123)`.
void setLogProcessName(const std::string& name);
// "trace" | "debug" | "info" | "warn" | "error" | "off"; throws vsup::Error on anything else.
void setLogLevel(const std::string& level);

}  // namespace vsup
