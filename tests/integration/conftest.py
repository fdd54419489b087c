"""Fixtures for vsup's integration tests (contract: tests/integration/INTERFACE.md).

Every test gets a `Tree` (fixture `tree`): a private temp dir, a helper to write a topology and
start `vsup run` in its own session, bounded waits on vsup's log lines and on the events the
probes log, and, when the test ends, a check that nothing was left behind: every process the test
ever saw (the root, sub-supervisors, probes, their grandchildren) is gone, none of them is left a
zombie of ours, and the control socket file is removed.

Nothing here sleeps to synchronise: waits poll for an event (a log line, a probe event, a file)
with a small sleep inside a loop bounded by a hard timeout that fails the test.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest

WAIT_TIMEOUT_S = 10.0
POLL_S = 0.005

# This process adopts orphans (PR_SET_CHILD_SUBREAPER) so that a process whose parent died is
# reaped by us and seen by the leftover check, instead of depending on what pid 1 does in the
# container (it may never reap them).
_PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _binary(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.fail(
            f"{var} is not set: point it at the built binary "
            f"(VSUP_BIN=build/tools/vsup, VSUP_PROBE=build/tests/vsup-probe)",
            pytrace=False,
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"{var}={path} is not an executable file", pytrace=False)
    return os.path.realpath(path)


@pytest.fixture(scope="session")
def vsup_bin() -> str:
    return _binary("VSUP_BIN")


@pytest.fixture(scope="session")
def vsup_probe() -> str:
    return _binary("VSUP_PROBE")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures know at teardown whether the test itself failed.
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# Under a sanitizer build (.ci/run's TSan stage runs process-level suites against it), every
# process of every tree writes its reports to $VSUP_SANITIZER_LOG (the sanitizer's log_path: one
# file per process, PREFIX.PID) instead of a stderr that a test may never read. A test during
# which any process wrote a report fails with it, whatever else the test checked.
_SANITIZER_LOG = os.environ.get("VSUP_SANITIZER_LOG", "")


def _sanitizer_reports() -> set[Path]:
    prefix = Path(_SANITIZER_LOG)
    if not prefix.parent.is_dir():
        return set()
    return {p for p in prefix.parent.iterdir() if p.name.startswith(prefix.name + ".")}


@pytest.fixture(autouse=True)
def no_sanitizer_reports():
    if not _SANITIZER_LOG:
        yield
        return
    before = _sanitizer_reports()
    yield
    new = sorted(_sanitizer_reports() - before)
    if new:
        text = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[:80])
                         for p in new[:3])
        pytest.fail(f"{len(new)} sanitizer report(s) during this test:\n{text}", pytrace=False)


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on PORT (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                found.add(fields[9])
    return found


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# ---------------------------------------------------------------------------------------------
# Processes


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def is_running(pid: int) -> bool:
    """True while PID exists and is not a zombie (a zombie has already died)."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def reap_if_ours(pid: int) -> None:
    """Reaps PID if it is a zombie child of ours (an orphan we adopted as subreaper)."""
    st = proc_stat(pid)
    if st is not None and st[0] == "Z" and st[1] == os.getpid():
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def reap_adopted() -> None:
    """Reaps every zombie child of ours that is not a Popen's (those are waited by subprocess)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            reap_if_ours(int(entry))


def cmdline(pid: int, gone: str = "?") -> str:
    """The command line of PID, its arguments joined by spaces; GONE when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return gone


def describe(pid: int) -> str:
    st = proc_stat(pid)
    if st is None:
        return f"pid {pid} (gone)"
    return f"pid {pid} state {st[0]} ppid {st[1]}: {cmdline(pid)}"


def wait_for(predicate: Callable[[], object], timeout: float, what: str, diag: Callable[[], str]):
    """Polls PREDICATE until it returns a truthy value (returned); fails the test at TIMEOUT."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}\n{diag()}", pytrace=False)
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# Topology files


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def render_topology(table: dict, path: str = "") -> str:
    """Renders a supervisor dict (with a "children" list of dicts) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if k != "children"]
    key = f"{path}.children" if path else "children"
    for child in table.get("children", []):
        lines.append("")
        lines.append(f"[[{key}]]")
        lines.append(render_topology(child, key))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Probe events


@dataclass(frozen=True)
class Event:
    ns: int  # CLOCK_MONOTONIC, comparable with now_ns()
    name: str
    event: str
    pid: int
    extra: str


def parse_events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 4:
            continue  # only a torn last line could be short; the next read sees it whole
        events.append(Event(int(parts[0]), parts[1], parts[2], int(parts[3]),
                            parts[4] if len(parts) > 4 else ""))
    return events


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass
class LogLine:
    index: int  # line number in vsup's stderr
    text: str
    match: re.Match
    seen_ns: int  # CLOCK_MONOTONIC when this process first saw it (within ~POLL_S)


class Tree:
    """One `vsup run` under test, with its files in a private temp dir."""

    def __init__(self, tmp: Path, vsup_bin: str, vsup_probe: str):
        self.dir = tmp
        self.vsup_bin = vsup_bin
        self.vsup_probe = vsup_probe
        self.probe_log = tmp / "probe.log"
        self.socket = tmp / "ctl.sock"
        self.stdout_path = tmp / "vsup.stdout"
        self.stderr_path = tmp / "vsup.stderr"
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.topology_path: Path | None = None
        # Set to False by a test whose root cannot remove its socket (the root was SIGKILLed).
        self.expect_socket_removed = True
        self.extra_pids: set[int] = set()
        self._seen_lines: dict[int, int] = {}

    # -- topology and probes ------------------------------------------------------------------

    def probe(self, name: str, *args: str) -> list[str]:
        """The command array of a probe that logs to this test's event log."""
        return [self.vsup_probe, "--name", name, "--log", str(self.probe_log), *map(str, args)]

    def write_topology(self, topology: dict | str, filename: str = "topology.toml") -> Path:
        text = topology if isinstance(topology, str) else render_topology(topology)
        path = self.dir / filename
        path.write_text(text + "\n")
        self.topology_path = path
        return path

    # -- running vsup --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["XDG_RUNTIME_DIR"] = str(self.dir)
        return env

    def start(self, topology: dict | str | None = None, *, control_socket: bool = True,
              extra_args: Iterable[str] = (), preexec_fn=None, pass_fds=()) -> subprocess.Popen:
        if topology is not None:
            self.write_topology(topology)
        assert self.topology_path is not None, "write a topology first"
        argv = [self.vsup_bin, "run", "--topology", str(self.topology_path)]
        if control_socket:
            argv += ["--control-socket", str(self.socket)]
        argv += list(extra_args)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env(),
                cwd=self.dir, start_new_session=True, preexec_fn=preexec_fn, pass_fds=pass_fds)
        return self.proc

    def run_to_exit(self, topology: dict | str, timeout: float = WAIT_TIMEOUT_S, **kw) -> int:
        self.start(topology, **kw)
        return self.wait_exit(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> int:
        """Sends SIG to the root alone; returns the CLOCK_MONOTONIC time it was sent."""
        t = now_ns()
        os.kill(self.pid, sig)
        return t

    def signal_group(self, sig: int) -> int:
        """Sends SIG to the root's process group, as a terminal's Ctrl-C would."""
        t = now_ns()
        os.killpg(self.pid, sig)
        return t

    def wait_exit(self, timeout: float = WAIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vsup run did not exit within {timeout:.1f}s\n{self.diagnostics()}",
                        pytrace=False)
        return self.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    # -- log lines -----------------------------------------------------------------------------

    def log_lines(self) -> list[str]:
        lines = self.stderr().splitlines()
        t = now_ns()
        for i in range(len(lines)):
            self._seen_lines.setdefault(i, t)
        return lines

    def find_log(self, pattern: str, start: int = 0) -> LogLine | None:
        rx = re.compile(pattern)
        for i, line in enumerate(self.log_lines()):
            if i < start:
                continue
            m = rx.search(line)
            if m:
                return LogLine(i, line, m, self._seen_lines[i])
        return None

    def find_all_log(self, pattern: str) -> list[LogLine]:
        rx = re.compile(pattern)
        out = []
        for i, line in enumerate(self.log_lines()):
            m = rx.search(line)
            if m:
                out.append(LogLine(i, line, m, self._seen_lines[i]))
        return out

    def wait_log(self, pattern: str, timeout: float = WAIT_TIMEOUT_S, start: int = 0) -> LogLine:
        """Waits for a line of vsup's stderr matching the regex PATTERN."""
        def probe():
            found = self.find_log(pattern, start)
            if found is None and self.proc is not None and self.proc.poll() is not None:
                found = self.find_log(pattern, start)  # the last lines before it exited
                if found is None:
                    pytest.fail(f"vsup exited ({self.proc.returncode}) without logging "
                                f"/{pattern}/\n{self.diagnostics()}", pytrace=False)
            return found
        return wait_for(probe, timeout, f"log line /{pattern}/", self.diagnostics)

    # -- probe events --------------------------------------------------------------------------

    def events(self, name: str | None = None, event: str | None = None) -> list[Event]:
        return [e for e in parse_events(self.probe_log)
                if (name is None or e.name == name) and (event is None or e.event == event)]

    def wait_event(self, name: str, event: str, count: int = 1,
                   timeout: float = WAIT_TIMEOUT_S) -> Event:
        """Waits until probe NAME has logged EVENT COUNT times; returns the COUNT-th one."""
        def probe():
            evs = self.events(name, event)
            if len(evs) < count and self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.05)  # a probe may log a last event while the root exits
                evs = self.events(name, event)
                if len(evs) < count:
                    pytest.fail(f"vsup exited ({self.proc.returncode}) before probe event "
                                f"'{name} {event}' #{count}\n{self.diagnostics()}", pytrace=False)
            return evs[count - 1] if len(evs) >= count else None
        return wait_for(probe, timeout, f"probe event '{name} {event}' #{count}", self.diagnostics)

    def wait_started(self, *names: str) -> dict[str, Event]:
        """Waits for each named probe's first `start` (its SIGTERM handler is then in place)."""
        return {n: self.wait_event(n, "start") for n in names}

    def pid_of(self, name: str, instance: int = 1) -> int:
        return self.wait_event(name, "start", instance).pid

    def only(self, name: str, event: str) -> Event:
        evs = self.events(name, event)
        assert len(evs) == 1, f"expected one '{name} {event}', got {evs}\n{self.diagnostics()}"
        return evs[0]

    # -- process helpers -----------------------------------------------------------------------

    def wait_gone(self, pids: Iterable[int], timeout: float, what: str = "processes") -> dict[int, int]:
        """Waits until every pid has died; returns pid -> CLOCK_MONOTONIC time first seen dead."""
        pids = list(pids)
        dead: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            t = now_ns()
            for p in pids:
                if p not in dead and not is_running(p):
                    dead[p] = t
            if len(dead) == len(pids):
                return dead
            if time.monotonic() >= deadline:
                left = [describe(p) for p in pids if p not in dead]
                pytest.fail(f"{what} still running {timeout:.1f}s later: {left}\n"
                            f"{self.diagnostics()}", pytrace=False)
            time.sleep(POLL_S)

    def tree_json(self, timeout: float = 5.0) -> dict:
        r = subprocess.run([self.vsup_bin, "tree", "--socket", str(self.socket), "--json"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                           env=self.env())
        assert r.returncode == 0, (f"vsup tree --json exited {r.returncode}: "
                                   f"{r.stderr.decode(errors='replace')}")
        return json.loads(r.stdout)

    def wait_socket(self, timeout: float = WAIT_TIMEOUT_S) -> None:
        wait_for(self.socket.exists, timeout, f"control socket {self.socket}", self.diagnostics)

    # -- bookkeeping ---------------------------------------------------------------------------

    def seen_pids(self) -> set[int]:
        pids = set(self.extra_pids)
        if self.proc is not None:
            pids.add(self.proc.pid)
        for e in self.events():
            pids.add(e.pid)
            if e.event == "grandchild":
                pids.add(int(e.extra))
        for line in self.stderr().splitlines():
            for m in re.finditer(r"\bpid[ =](\d+)", line):
                pids.add(int(m.group(1)))
        return pids

    def diagnostics(self) -> str:
        rc = None if self.proc is None else self.proc.poll()
        log = self.stderr().splitlines()
        events = self.probe_log.read_text(errors="replace").splitlines() if self.probe_log.exists() else []
        return ("--- vsup run: returncode " + str(rc) + "; stderr (last 60 lines):\n" +
                "\n".join(log[-60:]) + "\n--- probe events (last 60):\n" + "\n".join(events[-60:]))

    def kill_everything(self) -> None:
        """After a failure: SIGKILL the root's group, then every process and group we saw."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.seen_pids():
            if self.proc is not None and pid == self.proc.pid:
                continue
            if is_running(pid) and self._is_ours(pid):
                for kill in (lambda: os.killpg(pid, signal.SIGKILL),
                             lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        kill()
                    except (ProcessLookupError, PermissionError):
                        pass
        # Reap what we adopted, so no zombie outlives the test (pid 1 may never reap it).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            pids = [p for p in self.seen_pids() if is_running(p) and self._is_ours(p)]
            if not pids:
                break
            time.sleep(POLL_S)
        reap_adopted()

    def _is_ours(self, pid: int) -> bool:
        """True if PID runs one of our binaries or mentions this test's directory."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        if exe in (self.vsup_bin, self.vsup_probe):
            return True
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return str(self.dir).encode() in f.read()
        except OSError:
            return False

    def leftovers(self, grace: float = 0.5) -> list[str]:
        problems = []
        pids = self.seen_pids()
        deadline = time.monotonic() + grace
        while True:
            alive = [p for p in pids if is_running(p) and self._is_ours(p)
                     and not (self.proc is not None and p == self.proc.pid)]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        problems += [f"left running: {describe(p)}" for p in alive]
        # Zombies: a process that died after its parent is adopted by us (subreaper) and reaped
        # here; a zombie whose parent is still alive means that parent did not reap.
        for p in pids:
            reap_if_ours(p)
            st = proc_stat(p)
            if st is not None and st[0] == "Z" and self._is_ours(p):
                problems.append(f"unreaped zombie: {describe(p)}")
        # Children of ours (adopted as subreaper): a tree's orphan guard exits right after the
        # root, so give them the same grace before calling one left behind.
        def runner_children():
            out = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    st = proc_stat(int(entry))
                    if st is not None and st[1] == os.getpid():
                        reap_if_ours(int(entry))
                        if is_running(int(entry)):
                            out.append(int(entry))
            return out
        deadline = time.monotonic() + max(grace, 2.0)
        while runner_children() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for pid in runner_children():
            if pid not in alive:
                problems.append(f"child of the test runner left running: {describe(pid)}")
        if self.expect_socket_removed and self.proc is not None and self.socket.exists():
            problems.append(f"control socket {self.socket} was not removed")
        return problems


@pytest.fixture
def tree(request, tmp_path, vsup_bin, vsup_probe):
    t = Tree(tmp_path, vsup_bin, vsup_probe)
    yield t
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if t.proc is not None and t.proc.poll() is None:
        # A test ends with the root gone; if it is not, the test failed (or forgot to stop it).
        t.kill_everything()
        if not failed:
            pytest.fail("the test left vsup run running (killed now)\n" + t.diagnostics(),
                        pytrace=False)
        return
    problems = t.leftovers()
    if problems:
        t.kill_everything()
        if not failed:
            pytest.fail("left behind:\n  " + "\n  ".join(problems) + "\n" + t.diagnostics(),
                        pytrace=False)
