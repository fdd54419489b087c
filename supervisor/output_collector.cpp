#include "supervisor/output_collector.h"

#include <unistd.h>

#include <cctype>
#include <cerrno>

#include "base/log.h"

namespace vsup::supervisor {
namespace {

constexpr size_t kMaxLine = 64 * 1024;

// "HH:MM:SS.mmm (": a line a vsup process logged itself; "(name pid=N) ": a line a nested
// supervisor already attributed. Either way it is not ours to prefix again.
bool hasVsupPrefix(std::string_view line) {
  if (!line.empty() && line[0] == '(') {
    size_t close = line.find(") ");
    size_t pid = line.find(" pid=");
    return close != std::string_view::npos && pid != std::string_view::npos && pid < close &&
           line.find(' ') == pid;
  }
  if (line.size() < 14) return false;
  const char* p = line.data();
  auto d = [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; };
  return d(p[0]) && d(p[1]) && p[2] == ':' && d(p[3]) && d(p[4]) && p[5] == ':' && d(p[6]) &&
         d(p[7]) && p[8] == '.' && d(p[9]) && d(p[10]) && d(p[11]) && p[12] == ' ' && p[13] == '(';
}

void writeAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // our own output is gone: nothing more to do with it
    data.remove_prefix(size_t(n));
  }
}

}  // namespace

std::string outputPrefix(const std::string& name, pid_t pid) {
  return "(" + name + " pid=" + std::to_string(pid) + ") ";
}

OutputCollector::OutputCollector(uv_loop_t* loop, OwnFd readEnd, int outFd, std::string name,
                                 pid_t pid, std::function<void()> onEof)
    : fd_(std::move(readEnd)),
      outFd_(outFd),
      name_(std::move(name)),
      pid_(pid),
      prefix_(outputPrefix(name_, pid_)),
      onEof_(std::move(onEof)) {
  poll_ = UvHandle<uv_poll_t>::make([&](uv_poll_t* h) { uv_poll_init(loop, h, fd_.get()); });
  poll_->data = this;
  uv_poll_start(poll_.get(), UV_READABLE | UV_DISCONNECT, &OutputCollector::onReadable);
  // Output alone does not keep a loop alive; the child's pidfd does.
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_.get()));
}

OutputCollector::~OutputCollector() {
  poll_.reset();
  flush();
}

void OutputCollector::onReadable(uv_poll_t* handle, int, int) {
  auto* self = static_cast<OutputCollector*>(handle->data);
  if (self != nullptr) self->drain();
}

void OutputCollector::drain() {
  if (eof_) return;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(fd_.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return;  // EAGAIN: read all there was
    if (n == 0) {
      eof_ = true;
      if (!partial_.empty()) emit(partial_);
      partial_.clear();
      poll_.reset();
      if (onEof_) {
        auto done = std::move(onEof_);
        done();  // may destroy this collector: nothing after this line
      }
      return;
    }
    partial_.append(buf, size_t(n));
    size_t start = 0;
    for (size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
      emit(std::string_view(partial_).substr(start, nl - start));
    }
    partial_.erase(0, start);
    if (partial_.size() >= kMaxLine) {
      emit(partial_);
      partial_.clear();
    }
  }
}

void OutputCollector::flush() {
  if (!eof_ && fd_) {
    char buf[16384];
    for (;;) {
      ssize_t n = ::read(fd_.get(), buf, sizeof buf);
      if (n <= 0) break;
      partial_.append(buf, size_t(n));
    }
    size_t start = 0;
    for (size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
      emit(std::string_view(partial_).substr(start, nl - start));
    }
    partial_.erase(0, start);
  }
  if (!partial_.empty()) emit(partial_);
  partial_.clear();
}

void OutputCollector::emit(std::string_view line) {
  // One write per line: lines from several collectors never interleave.
  std::string out;
  if (vsup::logFormat() == LogFormat::Json) {
    if (isJsonObjectLine(line)) {
      out.assign(line);
    } else {
      out = jsonLogLine("info", name_, pid_, line, outFd_ == 2 ? "stderr" : "stdout");
    }
  } else if (hasVsupPrefix(line)) {
    out.assign(line);
  } else {
    out = prefix_;
    out.append(line);
  }
  out.push_back('\n');
  writeAll(outFd_, out);
}

}  // namespace vsup::supervisor
