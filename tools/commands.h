// The vsup executable's subcommands. Each returns the process exit status.
#pragma once

#include <string>

namespace vsup::tools {

struct RunOptions {
  std::string topology;
  std::string controlSocket;  // empty: the default path
};
int runTopology(const RunOptions& options);

struct TreeOptions {
  std::string socket;  // empty: find the running tree
  bool json = false;
  bool watch = false;
  double intervalSeconds = 1.0;
};
int tree(const TreeOptions& options);

// `vsup __node`: a sub-supervisor, started by its parent with the control socket on fd 3.
int nodeMain();

// The absolute path of this executable (re-executed for sub-supervisors).
std::string selfExe();

}  // namespace vsup::tools
