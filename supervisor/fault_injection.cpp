#include "supervisor/fault_injection.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <set>

namespace vsup::supervisor {
namespace {

const std::set<std::string>& faults() {
  static const std::set<std::string> parsed = []() {
    std::set<std::string> out;
    const char* env = std::getenv("VSUP_TEST_FAULT");
    if (env == nullptr) return out;
    std::string all = env;
    size_t at = 0;
    while (at <= all.size()) {
      size_t comma = all.find(',', at);
      if (comma == std::string::npos) comma = all.size();
      if (comma > at) out.insert(all.substr(at, comma - at));
      at = comma + 1;
    }
    return out;
  }();
  return parsed;
}

}  // namespace

bool faultInjected(const std::string& node, const std::string& action) {
  const auto& f = faults();
  return !f.empty() && f.count(node + ":" + action) != 0;
}

void crashIfInjected(const std::string& node, const std::string& point) {
  if (!faultInjected(node, "crash@" + point)) return;
  std::fprintf(stderr, "%s: injected crash at %s (VSUP_TEST_FAULT)\n", node.c_str(),
               point.c_str());
  std::fflush(stderr);
  ::_exit(1);
}

void pauseIfInjected(const std::string& node, const std::string& point) {
  if (!faultInjected(node, "pause@" + point)) return;
  std::fprintf(stderr, "%s: injected pause at %s (VSUP_TEST_FAULT): stopped until SIGCONT\n",
               node.c_str(), point.c_str());
  std::fflush(stderr);
  ::raise(SIGSTOP);
}

}  // namespace vsup::supervisor
