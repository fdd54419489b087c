// OutputCollector: reads one child's stdout or stderr through a pipe and writes it, line by
// line, to this process's own fd 1 or 2 with the child's name and pid in front:
//     (db pid=1234) db: listening
// Lines that already carry a vsup prefix (another vsup process's log line, "HH:MM:SS.mmm (")
// pass through unchanged, so a nested tree's output reaches the root once, attributed once.
// A partial line is held until its newline (at most 64 KiB) or EOF, so lines from several
// children never interleave mid-line.
// When this process logs in the json format (vsup::logFormat(), `--log-format json`), every line
// written is one JSON object: a line that already is one (a vsup child's log line) passes
// unchanged, any other is wrapped as
//     {"time":…,"level":"info","process":"db","pid":1234,"stream":"stdout","message":"listening"} Nothing is lost: the collector reads until EOF, which
// comes only when every process holding the pipe is gone.
//
// Runs on the loop thread only. Writes use plain write(2) on fd 1/2: collecting is for the vsup
// executable (which ignores SIGPIPE), not for library hosts (SupervisorOptions::collectOutput).
#pragma once

#include <sys/types.h>
#include <uv.h>

#include <functional>
#include <string>

#include "base/fd.h"
#include "ipc/uv_handle.h"

namespace vsup::supervisor {

class OutputCollector {
 public:
  // Takes the read end of the pipe; `onEof` runs once, after the last byte was written out.
  // `name` and `pid`: the child's, for the prefix. `outFd` is 1 (its stdout) or 2 (its stderr).
  OutputCollector(uv_loop_t* loop, OwnFd readEnd, int outFd, std::string name, pid_t pid,
                  std::function<void()> onEof);
  ~OutputCollector();
  OutputCollector(const OutputCollector&) = delete;
  OutputCollector& operator=(const OutputCollector&) = delete;

  // Reads what is buffered now and writes out any partial line (on shutdown).
  void flush();

 private:
  static void onReadable(uv_poll_t* handle, int status, int events);
  void drain();
  void emit(std::string_view line);

  OwnFd fd_;
  int outFd_;
  std::string name_;
  pid_t pid_;
  std::string prefix_;
  std::string partial_;
  std::function<void()> onEof_;
  UvHandle<uv_poll_t> poll_;
  bool eof_ = false;
};

// "(name pid=N) " for a child.
std::string outputPrefix(const std::string& name, pid_t pid);

}  // namespace vsup::supervisor
