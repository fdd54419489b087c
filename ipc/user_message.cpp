#include "ipc/user_message.h"

#include <regex>

namespace vsup::ipc {

namespace {

// "src/x.c++:12: failed: ", "(remote):0: ", "engine.cpp:7: disconnected (peer): ".
const std::regex& locationRe() {
  static const std::regex re(
      R"((?:\(remote\)|\(unknown\)|[A-Za-z0-9_./+-]+\.(?:c\+\+|cpp|cc|cxx|h|hpp|capnp)):-?[0-9]+:\s*)"
      R"((?:(?:failed|disconnected|overloaded|unimplemented)(?: \([^)]*\))?:\s*)?)");
  return re;
}

// A trailing stack trace ("stack: 7f12 7f34" or "; stack: ...").
const std::regex& stackRe() {
  static const std::regex re(R"(\s*;?\s*stack:(?:\s+[0-9a-fA-Fx]+)*\s*$)");
  return re;
}

// KJ_REQUIRE's "expected <condition>; " where the condition reads as code (an operator, a call,
// a member, an identifier alone), at the start of a message or after a ": ".
const std::regex& expectedRe() {
  static const std::regex re(
      R"((^|: )expected (?:[^;]*(?:[()<>=!&|\[\]_]|::|->)[^;]*|[A-Za-z_][A-Za-z0-9_.]*); )");
  return re;
}

// KJ's "; name = " rendering of a non-literal argument.
const std::regex& argumentRe() {
  static const std::regex re(R"(; [A-Za-z_][A-Za-z0-9_.:>()\[\]-]* = )");
  return re;
}

// The same at the very start (a KJ_FAIL_REQUIRE whose only argument is an expression): only
// when it reads as code for sure (a call or a member), never a person's "x = 3".
const std::regex& leadingArgumentRe() {
  static const std::regex re(R"(^[A-Za-z_][A-Za-z0-9_:]*(?:\.|->|\()[A-Za-z0-9_.:>()\[\]-]* = )");
  return re;
}

void eraseAll(std::string& text, std::string_view what) {
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at)) {
    text.erase(at, what.size());
  }
}

}  // namespace

std::string userMessage(std::string_view description) {
  std::string text(description);
  text = std::regex_replace(text, locationRe(), "");
  text = std::regex_replace(text, stackRe(), "");
  eraseAll(text, "remote exception: ");
  eraseAll(text, "std::exception: ");
  text = std::regex_replace(text, expectedRe(), "$1");
  text = std::regex_replace(text, leadingArgumentRe(), "");
  text = std::regex_replace(text, argumentRe(), ": ");
  size_t first = text.find_first_not_of(" \t\n;:");
  if (first == std::string::npos) return {};
  size_t last = text.find_last_not_of(" \t\n;:");
  return text.substr(first, last - first + 1);
}

std::string userMessage(const kj::Exception& e) {
  std::string text = userMessage(std::string_view(e.getDescription().cStr()));
  if (!text.empty()) return text;
  switch (e.getType()) {
    case kj::Exception::Type::DISCONNECTED: return "the connection was lost";
    case kj::Exception::Type::OVERLOADED: return "an internal error (overloaded)";
    case kj::Exception::Type::UNIMPLEMENTED: return "an internal error (unimplemented)";
    case kj::Exception::Type::FAILED: break;
  }
  return "an internal error (failed)";
}

kj::Exception failure(const std::string& why) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(why.c_str()));
}

}  // namespace vsup::ipc
