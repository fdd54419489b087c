"""Randomized chaos under load: seeded schedules of faults against the real serving tree.

Each schedule (tests/integration/chaos_schedule.py: a pure function of its seed) starts
`vsup run --engine sim` with TP 2, two API servers and the sim KV connector (so ranks defer their
shutdown for transfers), drives it with streaming and plain clients (and, in most schedules, a
prober that opens a new connection for a short request every 20 ms until the tree is gone), and
applies its actions as their anchors come: SIGKILL, SIGSTOP/SIGCONT, injected crashes
(VSUP_TEST_FAULT, as the fault matrix sets them), the first, second and third SIGTERM/SIGINT to
the root, in any phase (starting, serving, draining, tearing down). Then it checks:

  clients    every client got one of: a complete answer (finish_reason length with all its
             tokens, or stop); a terminal message (a stream: a chunk with finish_reason "abort" or
             an error event, then [DONE]; a plain request: 200 with "abort", or a 5xx OpenAI
             error); or a refusal before its request was sent (connect refused, or the send
             failed), or a 503 with Connection: close (turned away while draining). A request
             whose bytes were sent must get an HTTP response, and a stream that got its head must
             end with a terminal event and [DONE], unless the API server serving it was killed
             (SIGKILL, a crash, a kill at a deadline or at the third signal, or the root's
             SIGKILL): then "closed" is allowed for that server's clients only (a plain request
             with no response has no known server: any killed API server allows it). A refusal,
             an abort or a 503 needs some action applied before the client ended; an error needs
             a fault or a second or third signal.
  exit       the exit status is in the set chaos_schedule.expected_exits derives from what was
             applied and when (0 clean signal-driven stop, 3 start failure, 4 escalation, 5
             unexpected death, -9 root SIGKILLed, ...; the races that allow two are RACES)
  bound      every process of the tree gone by chaos_schedule.bound_of (from the flags)
  leftovers  the fault matrix's checks (its check_leftovers): no process of the session, no
             zombie, no memfd, nothing on the port, no control socket, no file in
             $XDG_RUNTIME_DIR, /tmp/vsup-<uid> or /dev/shm; and no fd of this process left open

It is its own suite (`meson test -C build --setup reliability --suite reliability`): it runs when
this file is named on the pytest command line or VSUP_CHAOS=1 is set, and skips itself, saying so,
when pytest collects the whole directory (the small tests of the schedule logic below run
always). It runs schedules seed after seed until VSUP_CHAOS_SECONDS (default 360) are spent or
VSUP_CHAOS_COUNT schedules ran, starting at VSUP_CHAOS_BASE (default: a random seed, printed);
VSUP_CHAOS_SEED=N[,M...] replays exactly those schedules (a failing seed is printed with that
command). The summary line is printed at the end; with VSUP_CHAOS_REPORT set it is also written
there as JSON {schedules, violations, known, by_fault, seconds, ...}.

Threads: each client and the prober run in a thread of their own and write only their own
fields; the runner's thread reads them after joining them (or, for the prober's list of results,
after it stopped). Everything else (the schedule, the tree, the checks) is the runner's thread.

`vsup run --help` is read once per session: when it has --liveness-timeout (hung-node detection),
the trees get `--liveness-timeout 1 --liveness-interval 0.2` and a SIGSTOP that is never continued
becomes a legitimate fault (detected: exit 5 within the bound); without it every SIGSTOP is
followed by its SIGCONT (VSUP_CHAOS_LIVENESS=0 draws those schedules whatever vsup has). The
schedule of a seed depends only on the seed and on that, so a replay against the same build runs
the same schedule.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import chaos_schedule as cs
from conftest import proc_stat
from test_fault_matrix import FaultTree, check_leftovers, wait_gone
from test_serving import sse_events

CLIENT_TIMEOUT_S = 40          # longer than any bound of a schedule
RUN_LIMIT_S = 60               # one schedule, whatever happens
PROBE_EVERY_S = 0.02
# What the runner learns from vsup's log (a crash, a kill at a deadline) it sees up to this late
# (the line goes through the root's output collector and the runner polls the file): a client
# may have been told before the runner saw it.
LOG_LAG_S = 0.25
LIVENESS = (1.0, 0.2)          # --liveness-timeout, --liveness-interval when vsup has them


# ---------------------------------------------------------------------------------------------
# Clients


class Client(threading.Thread):
    """One completion request on a connection of its own; records what came back (outcome)."""

    def __init__(self, port: int, kind: str, max_tokens: int, t0: float):
        super().__init__(daemon=True)
        self.port, self.kind, self.max_tokens, self.t0 = port, kind, max_tokens, t0
        self.outcome = "hung"
        self.detail = ""
        self.server: int | None = None
        self.began = self.ended = 0.0

    def run(self):
        self.began = time.monotonic() - self.t0
        try:
            self.outcome, self.detail = exchange(self)
        finally:
            self.ended = time.monotonic() - self.t0


def exchange(c) -> tuple[str, str]:
    """Sends C's request and reads the answer: (outcome, detail). Sets c.server once known."""
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=CLIENT_TIMEOUT_S)
    body = {"model": "vsup-sim", "prompt": "chaos", "max_tokens": c.max_tokens}
    if c.kind == "stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused", "connect refused"
        except OSError as e:
            return "refused", f"connect failed: {e!r}"
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
        except OSError as e:
            return "refused", f"send failed: {e!r}"
        try:
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            return "closed", f"sent, no response: {e!r}"
        rid = r.getheader("X-Request-Id", "")
        if rid.startswith("cmpl-"):
            c.server = int(rid.split("-")[1])
        if c.kind == "stream" and r.status == 200:
            return read_stream(c, r)
        try:
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            return "closed", f"{r.status}, body cut: {e!r}"
        return judge_plain(c, r, data)
    except TimeoutError:
        return "hung", "no answer within the client timeout"
    finally:
        conn.close()


def read_stream(c, r) -> tuple[str, str]:
    events: list = []
    try:
        for event in sse_events(r):
            events.append(event)
    except TimeoutError:
        return "hung", f"stream stalled after {len(events)} events"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return "closed", f"stream broke after {len(events)} events: {e!r}"
    tail = events[-2:]
    if not events or events[-1] != "[DONE]":
        return "closed", f"no [DONE] after {len(events)} events: {tail}"
    if any(isinstance(e, dict) and "error" in e for e in events):
        return "error", str(tail)
    reasons = [e["choices"][0]["finish_reason"] for e in events
               if isinstance(e, dict) and e.get("choices")
               and e["choices"][0].get("finish_reason")]
    usage = next((e["usage"] for e in events if isinstance(e, dict) and e.get("usage")), None)
    if not reasons:
        return "bad", f"[DONE] with no terminal event: {tail}"
    return judge_finish(c, reasons[-1], usage, tail)


def judge_plain(c, r, data: bytes) -> tuple[str, str]:
    try:
        doc = json.loads(data)
    except ValueError:
        return "bad", f"{r.status}, not JSON: {data[:200]!r}"
    if r.status == 200:
        return judge_finish(c, doc["choices"][0]["finish_reason"], doc.get("usage"),
                            str(doc)[:200])
    if r.status >= 500 and isinstance(doc, dict) and "error" in doc:
        if r.status == 503 and (r.getheader("Connection") or "").lower() == "close":
            return "turned-away", f"503: {doc['error'].get('message')}"
        return "error", f"{r.status}: {doc['error'].get('message')}"
    return "bad", f"{r.status}: {data[:200]!r}"


def judge_finish(c, reason, usage, tail) -> tuple[str, str]:
    if reason == "length":
        got = (usage or {}).get("completion_tokens")
        if got != c.max_tokens:
            return "bad", f"length with {got} of {c.max_tokens} tokens: {tail}"
        return "complete", ""
    if reason == "stop":
        return "complete", ""
    if reason == "abort":
        return "abort", str(tail)
    return "bad", f"finish_reason {reason!r}: {tail}"


class Prober(threading.Thread):
    """Short requests, each on a new connection, every PROBE_EVERY_S until stopped."""

    def __init__(self, port: int, t0: float):
        super().__init__(daemon=True)
        self.port, self.t0 = port, t0
        self.kind, self.max_tokens = "plain", 2
        self.halt = threading.Event()
        self.results: list = []  # (outcome, detail, server, began, ended)
        self.server = None

    def run(self):
        while not self.halt.is_set():
            self.server = None
            began = time.monotonic() - self.t0
            outcome, detail = exchange(self)
            self.results.append((outcome, detail, self.server, began,
                                 time.monotonic() - self.t0))
            self.halt.wait(PROBE_EVERY_S)


# ---------------------------------------------------------------------------------------------
# Running one schedule

ANCHORS = {
    "ready": re.compile(r"root: all \d+ children ready"),
    "teardown": re.compile(r"\[shutdown\] root: stopping engine-core"),
    "escalated": re.compile(r"killing \S+ \(process group \d+\): "
                            r"(shutdown timeout|kill requested)"),
}
CRASHED = re.compile(r"(\S+): injected crash at (\S+) \(VSUP_TEST_FAULT\)")
KILLED = re.compile(r"killing (\S+) \(process group \d+\): (shutdown timeout|kill requested)"
                    r"|\] \S+: (\S+) \(pid \d+\) is unresponsive")


def signals_blocked(pid: int) -> bool:
    """True if SIGTERM and SIGINT are blocked in PID (the root reads them from a signalfd)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigBlk:"):
                mask = int(line.split()[1], 16)
                return bool(mask & (1 << (signal.SIGTERM - 1))) and \
                    bool(mask & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return True  # gone: nothing to kill by default


@dataclass
class Result:
    seed: int
    violations: list = field(default_factory=list)
    known: list = field(default_factory=list)
    exit: int | None = None
    expected: set = field(default_factory=set)
    races: list = field(default_factory=list)
    took: float = 0.0
    bound: float = 0.0
    applied: list = field(default_factory=list)
    faults: list = field(default_factory=list)   # fault_key of each applied action
    clients: dict = field(default_factory=dict)  # outcome -> count
    log: str = ""


@dataclass(frozen=True)
class Finding:
    """A violation that is vsup's fault, found by this runner and not fixed yet: a schedule whose
    every violation is of CHECKS, whose log has LINES in order and whose exit status is one of
    EXITS is counted "known" (reported with the finding, not failed)."""

    checks: tuple[str, ...]
    lines: tuple[str, ...]  # regexes of log lines that must all appear, in this order
    exits: tuple[int, ...]
    text: str


# Found by this runner and fixed since: an engine-core whose start ended early (a rank died
# while the others started) waited for a step boundary that never came (exit 4 after 10 s); a
# second signal during an in-flight step made engine-core take its own stop of the ranks for an
# engine failure (exit 5); a child that died while starting, after the shutdown began, was not
# counted (exit 0). Each now counts as a violation again.
FINDINGS: dict[str, Finding] = {}


def in_order(log: str, lines: tuple[str, ...]) -> bool:
    at = 0
    for rx in lines:
        m = re.compile(rx).search(log, at)
        if m is None:
            return False
        at = m.end()
    return True


def explain(res) -> None:
    """Moves RES's violations to res.known when one finding explains all of them."""
    if not res.violations:
        return
    for key, f in FINDINGS.items():
        if all(v.split(":")[0] in f.checks for v in res.violations) and \
                res.exit in f.exits and in_order(res.log, f.lines):
            res.known = [f"{key}: {v}" for v in res.violations]
            res.violations = []
            return


def fault_key(act: cs.Action) -> str:
    """How the summary counts an applied action: kind (and the root's own faults apart), phase."""
    if act.kind == "signal":
        return f"signal{act.ordinal} {act.phase}"
    kind = {"kill": "SIGKILL", "crash": "crash",
            "stop": "SIGSTOP" if act.arg is not None else "SIGSTOP-forever"}[act.kind]
    return f"{'root ' if act.target == 'root' else ''}{kind} {act.phase}"


class Collector:
    """What check_leftovers of the fault matrix reports into: (name, ok, detail)."""

    def __init__(self):
        self.results = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, bool(ok), detail))
        return bool(ok)


class ChaosRun:
    def __init__(self, sched: cs.Schedule, vsup_bin: str, tmp: Path):
        self.sched = sched
        self.ft = FaultTree(vsup_bin, tmp)
        self.t0 = 0.0
        self.anchors: dict[str, float] = {}
        self.applied: list[cs.Applied] = []
        self.clients: list[Client] = []
        self.prober: Prober | None = None
        self.conts: list = []  # [due, pid, Applied]
        self.kills: dict[str, float] = {}  # node -> when a supervisor was first seen killing it

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- actions ----------------------------------------------------------------------------

    def node_pid(self, name: str) -> int | None:
        return self.ft.started().get(name)

    def fire(self, act: cs.Action, log: str) -> None:
        ft = self.ft
        if act.kind == "signal":
            # A signal for a stopped root waits for its SIGCONT (a stopped root would merge two
            # pending signals of the same kind into one).
            for entry in [c for c in self.conts if c[1] == ft.proc.pid]:
                self.cont(entry)
            if ft.proc.poll() is not None:
                return
            blocked = signals_blocked(ft.proc.pid)
            ft.proc.send_signal(getattr(signal, act.arg))
            # The root counts the signals it got: this one's number, whatever the schedule meant.
            n = 1 + sum(a.action.kind == "signal" for a in self.applied)
            self.applied.append(cs.Applied(dataclasses.replace(act, ordinal=n), self.now(),
                                           {"blocked": blocked}))
            self.anchors[f"sig{n}"] = self.now()
            return
        if act.target == "root":
            pid = ft.proc.pid
            running = ft.proc.poll() is None
        else:
            pid = self.node_pid(act.target)
            st = proc_stat(pid) if pid else None
            running = st is not None and st[0] not in ("Z", "X")
        if not running or (act.kind == "stop" and pid in ft.stopped):
            return  # gone, or stopped already (its SIGCONT is the first stop's)
        parent = self.node_pid("engine-core") if act.target.startswith("worker") else \
            None if act.target == "root" else ft.proc.pid
        facts = {"running": True, "ready": "ready" in self.anchors,
                 "parent_stopped": parent in ft.stopped,
                 "exiting": re.search(rf"{re.escape(act.target)}: stopped in|: "
                                      rf"{re.escape(act.target)} stopped in", log) is not None,
                 "root_done": "root: done in" in log}
        try:
            if act.kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                ft.signal_node(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        applied = cs.Applied(act, self.now(), facts)
        self.applied.append(applied)
        if act.kind == "stop":
            applied.facts["until"] = None
            if act.arg is not None:
                self.conts.append([self.now() + act.arg, pid, applied])

    def observe(self, log: str, now: float, crashes: dict) -> None:
        """Records what vsup's log says happened: kills by a supervisor, injected crashes."""
        for m in KILLED.finditer(log):
            self.kills.setdefault(m.group(1) or m.group(3), now)
        for m in CRASHED.finditer(log):
            act = crashes.pop((m.group(1), m.group(2)), None)
            if act is not None:
                self.applied.append(cs.Applied(act, now))

    def due(self, act: cs.Action) -> float:
        """When ACT is due (its anchor has come); a signal also waits SIGNAL_GAP_S after the last
        one sent."""
        at = self.anchors[act.anchor] + act.delay
        if act.kind == "signal":
            sent = [a.t for a in self.applied if a.action.kind == "signal"]
            if sent:
                at = max(at, max(sent) + cs.SIGNAL_GAP_S)
        return at

    def cont(self, entry) -> None:
        _, pid, applied = entry
        self.conts.remove(entry)
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
        self.ft.stopped.discard(pid)
        applied.facts["until"] = self.now()

    # -- the run -----------------------------------------------------------------------------

    def execute(self) -> Result:
        sched, ft = self.sched, self.ft
        res = Result(sched.seed)
        env = {"XDG_RUNTIME_DIR": str(ft.xdg)}
        if sched.crash_env():
            env["VSUP_TEST_FAULT"] = sched.crash_env()
        shm_before = set(os.listdir("/dev/shm"))
        fds_before = set(os.listdir("/proc/self/fd"))
        pending = [a for a in sched.actions if a.kind != "crash"]
        crashes = {(a.target, a.arg): a for a in sched.actions if a.kind == "crash"}
        plans = list(sched.clients)
        spawn_wall = time.time()
        ft.spawn(*sched.flags.argv(), env=env)
        self.t0 = time.monotonic()
        # Files another process with the same pid left long ago (the pid was recycled) are not
        # this tree's: the leftover check below must not count them.
        run_dir = Path(f"/tmp/vsup-{os.getuid()}")
        stale = {str(p) for p in run_dir.glob(f"*-{ft.proc.pid}.sock")
                 if p.stat().st_mtime < spawn_wall - 1.0} if run_dir.is_dir() else set()
        self.anchors["spawn"] = 0.0
        gone_at = None
        try:
            while True:
                log = ft.stderr()
                now = self.now()
                for name, rx in ANCHORS.items():
                    if name not in self.anchors and rx.search(log):
                        self.anchors[name] = now
                for m in re.finditer(r"\] \S+: started (\S+) \(pid \d+\)", log):
                    self.anchors.setdefault(f"started:{m.group(1)}", now)
                self.observe(log, now, crashes)
                if "ready" in self.anchors:
                    ready = self.anchors["ready"]
                    for p in [p for p in plans if now >= ready + p.delay]:
                        plans.remove(p)
                        c = Client(ft.port, p.kind, p.max_tokens, self.t0)
                        c.start()
                        self.clients.append(c)
                    if sched.prober and self.prober is None:
                        self.prober = Prober(ft.port, self.t0)
                        self.prober.start()
                for entry in [c for c in self.conts if now >= c[0]]:
                    self.cont(entry)
                due = [a for a in pending if a.anchor in self.anchors
                       and now >= self.due(a)]
                for act in sorted(due, key=self.due):
                    pending.remove(act)
                    self.fire(act, log)
                ft.remember(every=0.1)
                if ft.proc.poll() is not None and not ft.alive():
                    ft.reap()
                    if not ft.adopted_zombies():
                        gone_at = self.now()
                        break
                if now > RUN_LIMIT_S:
                    break
                time.sleep(0.003)
        finally:
            for entry in list(self.conts):
                self.cont(entry)
            ft.resume_stopped()
            if self.prober:
                self.prober.halt.set()
        res.log = ft.stderr()
        # What the last lines said (written after the loop's last read).
        self.observe(res.log, self.now(), crashes)
        escalated = self.anchors.get("escalated")
        res.expected, res.races = cs.expected_exits(sched, self.applied, escalated)
        res.bound = cs.bound_of(sched, self.applied)
        res.applied = [a.action.describe().split(" [")[0] + f" @{a.t:.3f}s" for a in self.applied]
        res.faults = [fault_key(a.action) for a in self.applied]
        if gone_at is None:
            res.violations.append(f"hang: the tree was not gone after {RUN_LIMIT_S}s")
            ft.kill_session()
            wait_gone(ft, time.monotonic() + 10)
        res.exit = ft.proc.returncode
        res.took = gone_at if gone_at is not None else self.now()
        if res.exit not in res.expected:
            res.violations.append(f"exit: got {res.exit}, expected one of "
                                  f"{sorted(res.expected)} (races: {res.races or 'none'})")
        if gone_at is not None and gone_at > res.bound:
            res.violations.append(f"bound: gone {gone_at:.2f}s after spawn, bound {res.bound:.2f}s")
        for c in self.clients + ([self.prober] if self.prober else []):
            c.join(5)
        self.check_clients(res)
        leftovers = Collector()
        root_killed = any(a.action.kind == "kill" and a.action.target == "root"
                          for a in self.applied)
        check_leftovers(leftovers, ft, types.SimpleNamespace(
            target="root", fault="SIGKILL" if root_killed or res.exit in (-15, -2) else "-"),
            shm_before)
        for n, ok, d in leftovers.results:
            if not ok and n == "files" and stale:
                files = [str(p) for p in ft.xdg.rglob("*")]
                files += [str(p) for p in run_dir.glob(f"*-{ft.proc.pid}.sock")
                          if str(p) not in stale] if run_dir.is_dir() else []
                files += [f"/dev/shm/{f}" for f in set(os.listdir("/dev/shm")) - shm_before
                          if "vsup" in f]
                ok = not files
            if not ok:
                res.violations.append(f"{n}: {d}")
        fds = set(os.listdir("/proc/self/fd")) - fds_before
        left = {f: os.readlink(f"/proc/self/fd/{f}") for f in fds
                if os.path.exists(f"/proc/self/fd/{f}")}
        if left:
            res.violations.append(f"fds: the runner holds {left} after the run")
        explain(res)
        if res.violations:
            ft.kill_session()
        return res

    # -- clients -------------------------------------------------------------------------------

    def check_clients(self, res: Result) -> None:
        applied = self.applied
        t1 = self.anchors.get("sig1")
        escalation_kills = self.kills
        killed: dict[int, float] = {}  # API server index -> when it was killed (earliest)
        everything_killed = None       # root SIGKILLed or the third signal
        for a in applied:
            act = a.action
            if act.kind == "kill" and act.target == "root" or \
                    act.kind == "signal" and act.ordinal == 3:
                everything_killed = min(everything_killed or a.t, a.t)
            elif act.kind in ("kill", "crash") and act.target in cs.API_SERVERS:
                i = int(act.target.rsplit("-", 1)[1])
                t = a.t - (LOG_LAG_S if act.kind == "crash" else 0.0)
                killed[i] = min(killed.get(i, t), t)
        for name, t in escalation_kills.items():
            t -= LOG_LAG_S
            if name in cs.API_SERVERS:
                i = int(name.rsplit("-", 1)[1])
                killed[i] = min(killed.get(i, t), t)

        def before(end: float, pred) -> bool:
            return any(a.t - (LOG_LAG_S if a.action.kind == "crash" else 0.0) <= end and pred(a)
                       for a in applied)

        def fault(a) -> bool:
            return a.action.kind in ("kill", "stop", "crash") or a.action.ordinal >= 2

        def judge(outcome: str, detail: str, server, ended: float, what: str) -> None:
            ok = {
                "complete": True,
                "refused": before(ended, lambda a: True),
                "turned-away": before(ended, lambda a: True),
                "abort": before(ended, lambda a: True),
                "error": before(ended, fault)
                         or any(t - LOG_LAG_S <= ended for t in escalation_kills.values()),
                "closed": (everything_killed is not None and everything_killed <= ended)
                          or (server is not None and killed.get(server, 1e9) <= ended)
                          or (server is None and any(t <= ended for t in killed.values())),
            }.get(outcome, False)
            res.clients[outcome] = res.clients.get(outcome, 0) + 1
            if not ok:
                where = f" on api-server-{server}" if server is not None else ""
                res.violations.append(f"client: {what}{where} ended {outcome} at {ended:.3f}s "
                                      f"(first signal at {t1 and round(t1, 3)}): {detail}")

        for c in self.clients:
            outcome = "hung" if c.is_alive() else c.outcome
            judge(outcome, c.detail, c.server, c.ended if not c.is_alive() else 1e9,
                  f"{c.kind}({c.max_tokens}) sent at {c.began:.3f}s")
        if self.prober:
            if self.prober.is_alive():
                judge("hung", "the prober did not stop", None, 1e9, "prober")
            for outcome, detail, server, began, ended in self.prober.results:
                judge(outcome, detail, server, ended, f"probe sent at {began:.3f}s")


# ---------------------------------------------------------------------------------------------
# The runner


def _selected(config) -> bool:
    if os.environ.get("VSUP_CHAOS") == "1" or os.environ.get("VSUP_CHAOS_SEED"):
        return True
    here = os.path.realpath(__file__)
    return any(os.path.realpath(a.split("::")[0]) == here for a in config.args)


_LIVENESS: dict = {}


def liveness_flags(vsup_bin: str) -> tuple[float, float] | None:
    """LIVENESS if this vsup has hung-node detection (read from `vsup run --help`, once)."""
    if vsup_bin not in _LIVENESS:
        out = subprocess.run([vsup_bin, "run", "--help"], capture_output=True, text=True,
                             timeout=10).stdout
        _LIVENESS[vsup_bin] = LIVENESS if ("--liveness-timeout" in out
                                           and "--liveness-interval" in out) else None
    return _LIVENESS[vsup_bin]


def replay_command(seed: int) -> str:
    off = "VSUP_CHAOS_LIVENESS=0 " if os.environ.get("VSUP_CHAOS_LIVENESS") == "0" else ""
    return (f"{off}VSUP_CHAOS_SEED={seed} VSUP_BIN=build/tools/vsup /usr/bin/python3 -m pytest "
            f"-q tests/integration/test_chaos.py -k runner")


def test_the_chaos_runner_keeps_every_invariant_under_random_faults(request, tmp_path,
                                                                     vsup_bin):
    if not _selected(request.config):
        pytest.skip("the chaos runner is its own suite (minutes): name this file on the pytest "
                    "command line, or set VSUP_CHAOS=1 (VSUP_CHAOS_SEED=N replays one schedule)")
    # VSUP_CHAOS_LIVENESS=0: schedules as for a vsup without hung-node detection.
    liveness = liveness_flags(vsup_bin) if os.environ.get("VSUP_CHAOS_LIVENESS") != "0" else None
    replay = os.environ.get("VSUP_CHAOS_SEED")
    seconds = float(os.environ.get("VSUP_CHAOS_SECONDS", "360"))
    count = int(os.environ.get("VSUP_CHAOS_COUNT", "0")) or None
    base = int(os.environ.get("VSUP_CHAOS_BASE", "0")) or random.SystemRandom().randrange(1, 10**9)
    seeds = [int(s) for s in replay.split(",")] if replay else None
    started = time.monotonic()
    results: list[Result] = []
    by_fault: dict[str, int] = {}
    i = 0
    while True:
        if seeds is not None:
            if i >= len(seeds):
                break
            seed = seeds[i]
        else:
            if time.monotonic() - started >= seconds or (count and i >= count):
                break
            seed = base + i
        i += 1
        sched = cs.draw(seed, liveness)
        tmp = tmp_path / f"s{seed}"
        tmp.mkdir()
        res = ChaosRun(sched, vsup_bin, tmp).execute()
        results.append(res)
        for key in res.faults:
            by_fault[key] = by_fault.get(key, 0) + 1
        if res.known:
            print(f"\nKNOWN seed {seed}: {res.known}")
        if res.violations:
            print(f"\nVIOLATION seed {seed}: replay with `{replay_command(seed)}`\n"
                  f"{sched.describe()}\n  applied: {res.applied}\n  exit {res.exit}, expected "
                  f"{sorted(res.expected)}, gone at {res.took:.2f}s (bound {res.bound:.2f}s)\n  "
                  + "\n  ".join(res.violations))
            if seeds is not None:
                print(res.log)
            else:
                print("\n".join(res.log.splitlines()[-60:]))
    took = time.monotonic() - started
    bad = [r for r in results if r.violations]
    known: dict[str, list] = {}
    for r in results:
        for k in sorted({k.split(":")[0] for k in r.known}):
            known.setdefault(k, []).append(r.seed)
    outcomes: dict[str, int] = {}
    exits: dict[str, int] = {}
    for r in results:
        for k, v in r.clients.items():
            outcomes[k] = outcomes.get(k, 0) + v
        exits[str(r.exit)] = exits.get(str(r.exit), 0) + 1
    summary = (f"chaos: {len(results)} schedules in {took:.0f}s, {len(bad)} with violations "
               f"(seeds {'replayed' if seeds else f'{base}..{base + len(results) - 1}'}; "
               f"liveness {'on' if liveness else 'off'}); known findings (seeds) "
               f"{known or 'none'}; exits {dict(sorted(exits.items()))}; "
               f"clients {dict(sorted(outcomes.items()))}; faults {dict(sorted(by_fault.items()))}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + summary)
    path = os.environ.get("VSUP_CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps({
            "schedules": len(results), "violations": len(bad), "seconds": round(took, 1),
            "base": base, "liveness": bool(liveness), "by_fault": by_fault, "exits": exits,
            "known": known, "findings": {k: f.text for k, f in FINDINGS.items()},
            "clients": outcomes,
            "failing": [{"seed": r.seed, "replay": replay_command(r.seed),
                         "violations": r.violations} for r in bad]}, indent=1) + "\n")
    assert not bad, f"{len(bad)} schedule(s) broke an invariant: seeds " \
                    f"{[r.seed for r in bad]} (replay: {replay_command(bad[0].seed)})"


# ---------------------------------------------------------------------------------------------
# The schedule logic itself (no processes: these run in the default suite)


def test_a_seed_draws_the_same_schedule_every_time_and_seeds_cover_every_fault():
    for seed in range(300):
        assert cs.draw(seed) == cs.draw(seed)
        assert cs.draw(seed).describe() == cs.draw(seed).describe()
        assert cs.draw(seed, LIVENESS) == cs.draw(seed, LIVENESS)
    assert len({cs.draw(s).describe() for s in range(300)}) == 300
    seen = {(a.kind, a.phase) for s in range(300) for a in cs.draw(s).actions}
    for kind in ("kill", "stop", "crash"):
        for phase in cs.PHASES:
            assert (kind, phase) in seen, (kind, phase)
    assert {a.ordinal for s in range(300) for a in cs.draw(s).actions if a.kind == "signal"} \
        == {1, 2, 3}
    # A node stopped for good is found by the pings before the first signal comes.
    for s in range(300):
        sched = cs.draw(s, LIVENESS)
        for a in sched.actions:
            if a.kind == "stop" and a.arg is None and sched.actions[0].anchor == "ready":
                wait = a.delay + sum(LIVENESS) + cs.LIVENESS_MARGIN_S
                assert sched.actions[0].delay >= wait - 1e-6
    # Without liveness detection every SIGSTOP is continued; with it some are not.
    assert all(a.arg is not None for s in range(300) for a in cs.draw(s).actions
               if a.kind == "stop")
    assert any(a.arg is None for s in range(300) for a in cs.draw(s, LIVENESS).actions
               if a.kind == "stop")
    for s in range(300):
        sig = sorted((a for a in cs.draw(s).actions if a.kind == "signal"),
                     key=lambda a: a.ordinal)
        assert [a.ordinal for a in sig] in ([1], [1, 2], [1, 2, 3])


def _run(*applied, liveness=None, escalated=None):
    sched = cs.Schedule(1, cs.Flags(4, 0.5, 200, 0.3, liveness), 0.3, (), False,
                        tuple(a for a, _, _ in applied))
    runs = [cs.Applied(a, t, dict(f)) for a, t, f in applied]
    return cs.expected_exits(sched, runs, escalated)[0], cs.bound_of(sched, runs)


def test_the_expected_exit_status_follows_from_what_was_applied():
    sig = lambda n: cs.Action("signal", "root", "ready", 0, "serving", "SIGTERM", n)  # noqa
    kill = lambda n: cs.Action("kill", n, "ready", 0, "serving")  # noqa
    crash = lambda n, p: cs.Action("crash", n, "env", 0, "serving", p)  # noqa
    stop = lambda n, d: cs.Action("stop", n, "ready", 0, "serving", d)  # noqa
    ready = {"running": True, "ready": True}
    assert _run((sig(1), 1.0, {}))[0] == {0}
    # An unexpected death while serving, before or after the signal: 5; also with a later
    # second signal (its possible escalation does not outrank the death).
    assert _run((kill("engine-core"), 0.5, ready), (sig(1), 1.0, {}))[0] == {5}
    assert _run((sig(1), 1.0, {}), (crash("api-server-1", "drain"), 1.2, {}),
                (sig(2), 1.5, {}))[0] == {5}
    # A death while starting: start failure or death, as the ready lines raced; crash@start: 3.
    assert _run((kill("worker-tp0"), 0.02, {"running": True}), (sig(1), 1.0, {}))[0] == {3, 5}
    assert _run((crash("api-server-1", "start"), 0.05, {}))[0] == {3}
    # The first forced outcome wins: a start failure, then a death.
    assert _run((crash("api-server-0", "start"), 0.05, {}),
                (kill("engine-core"), 0.5, ready))[0] == {3}
    # A second signal may escalate, a third too; a death after the third may be its kill.
    assert _run((sig(1), 1.0, {}), (sig(2), 1.4, {}))[0] == {0, 4}
    assert _run((sig(1), 1.0, {}), (sig(2), 1.4, {}), (sig(3), 1.8, {}),
                (kill("worker-tp1"), 1.85, ready))[0] == {0, 4, 5}
    # A rank's death is reported by engine-core's exit: a later second signal may kill it first.
    assert _run((sig(1), 1.0, {}), (kill("worker-tp0"), 1.1, ready), (sig(2), 1.3, {}))[0] \
        == {4, 5}
    assert _run((sig(1), 1.0, {}), (kill("api-server-0"), 1.1, ready), (sig(2), 1.3, {}))[0] \
        == {5}
    # The root's SIGKILL decides alone; a signal before the root blocked it may kill it.
    assert _run((sig(1), 1.0, {}), (kill("root"), 1.1, {"running": True}))[0] == {-9}
    assert _run((sig(1), 0.001, {"blocked": False}))[0] == {0, -15}
    # A short SIGSTOP while serving changes nothing; one that reaches into the shutdown may.
    assert _run((stop("engine-core", 0.3), 0.2, {**ready, "until": 0.5}),
                (sig(1), 1.0, {}))[0] == {0}
    assert _run((stop("api-server-0", 0.8), 0.9, {**ready, "until": 1.7}),
                (sig(1), 1.0, {}))[0] == {0, 4}
    # A node hung for good: detected (5), or killed at its deadline when the shutdown came first.
    assert _run((stop("engine-core", None), 0.2, {**ready, "until": None}), (sig(1), 2.5, {}),
                liveness=LIVENESS)[0] == {5}
    assert _run((stop("engine-core", None), 0.2, {**ready, "until": None}), (sig(1), 0.5, {}),
                liveness=LIVENESS)[0] == {4, 5}
    # Bounds: the first signal's D + 15 s + K; a second signal's 3 s; slack on top.
    assert _run((sig(1), 1.0, {}))[1] == 1.0 + 0.5 + 15 + 0.3 + cs.BOUND_SLACK_S
    assert _run((sig(1), 1.0, {}), (sig(2), 1.4, {}))[1] == \
        1.4 + cs.SECOND_SIGNAL_BOUND_S + cs.BOUND_SLACK_S
