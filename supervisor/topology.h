// The TOML topology format of `vsup run --topology FILE` (README "Topology files").
#pragma once

#include <string>
#include <string_view>

#include "supervisor/spec.h"

namespace vsup::supervisor {

// Parses and validates. Throws vsup::Error with `origin:line: child '...': field '...': ...`.
SupervisorSpec parseTopology(std::string_view text, const std::string& origin);
SupervisorSpec loadTopology(const std::string& path);

}  // namespace vsup::supervisor
