"""`vsup run` as a container's PID 1 (README, "Kubernetes"; supervisor/orphan_reaper.h).

Each test runs `unshare --pid --fork --mount-proc --kill-child vsup run ...`: vsup is PID 1 of a
new PID namespace, as in a container without tini, so every orphan in the namespace is
reparented to it and must be reaped by it. From this (the host's) namespace the namespace's
processes are vsup's descendants; their states and parents are read from /proc with host pids.
The supervised commands double-fork daemons (`( cmd & )`, with and without `setsid`): the
daemon's parent exits at once, and the daemon becomes vsup's child.

Checked: no zombie is left in the namespace while the tree runs (a zombie child of PID 1
disappears within a bound); a daemon that left its process group (setsid) is killed at once, one
that kept the group of a child of vsup is left to run with that child; PID 1's own children keep
their exit status (SIGTERM gives 0, a significant child's failure gives the tree's code 5); and
nothing outlives the namespace. Outside PID 1 the root is a child subreaper all the same, with
SIGCHLD on its signalfd, but says nothing of PID 1 (the last test); tests/integration/
test_escape.py checks what it does with the orphans there.

Needs `unshare --pid` (root, or a user namespace allowed to make PID namespaces); skipped, saying
so, where that is not permitted. Waits poll for a condition with a hard deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cmdline, render_topology, wait_for

WAIT_S = 10.0
REAP_BOUND_S = 5.0  # a zombie child of PID 1 must be gone within this (it is reaped in ms)
UNSHARE = shutil.which("unshare")


def _unshare_refusal() -> str | None:
    """Why `unshare --pid --fork --mount-proc` cannot run here; None when it can."""
    if UNSHARE is None:
        return "the unshare command (util-linux) is not installed"
    try:
        r = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "true"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed to run: {e}"
    if r.returncode != 0:
        return (f"unshare --pid --fork --mount-proc exited {r.returncode}: "
                f"{r.stderr.decode(errors='replace').strip()} (needs root or CAP_SYS_ADMIN)")
    return None


@pytest.fixture(scope="module")
def can_unshare() -> None:
    reason = _unshare_refusal()
    if reason is not None:
        pytest.skip("NOT TESTED: vsup as PID 1 of a PID namespace (container init): " + reason)


# ---------------------------------------------------------------------------------------------
# /proc, with host pids


def stat_of(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of /proc/PID/stat; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def children_of(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def blocked_signals(pid: int) -> int:
    """SigBlk of /proc/PID/status: bit n-1 is signal n."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


def blocks(pid: int, sig: int) -> bool:
    return bool(blocked_signals(pid) & (1 << (sig - 1)))


def ns_pids(pid: int) -> list[int]:
    """NSpid of /proc/PID/status: the pid in each namespace, outermost first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


class Namespace:
    """One `vsup run` as PID 1 of its own PID namespace, under `unshare --kill-child`."""

    def __init__(self, tmp: Path, vsup_bin: str):
        self.tmp = tmp
        self.vsup_bin = vsup_bin
        self.stderr_path = tmp / "vsup.stderr"
        self.socket = tmp / "ctl.sock"
        self.proc: subprocess.Popen | None = None  # unshare
        self.init: int | None = None  # vsup's host pid (PID 1 inside)
        self.seen: dict[int, int] = {}  # host pid -> starttime of every process seen inside

    def start(self, *vsup_args: str) -> int:
        argv = [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child",
                self.vsup_bin, "run", "--control-socket", str(self.socket), *vsup_args]
        env = {**os.environ, "XDG_RUNTIME_DIR": str(self.tmp)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=self.tmp, env=env, start_new_session=True)

        def vsup_started():
            kids = children_of(self.proc.pid)
            if not kids and self.proc.poll() is not None:
                pytest.fail(f"unshare exited {self.proc.returncode}\n{self.stderr()}",
                            pytrace=False)
            for k in kids:
                if os.path.realpath(f"/proc/{k}/exe") == os.path.realpath(self.vsup_bin):
                    return k
            return None

        self.init = wait_for(vsup_started, WAIT_S, "vsup to start under unshare", self.stderr)
        assert ns_pids(self.init)[-1] == 1, f"vsup is not PID 1 inside: NSpid {ns_pids(self.init)}"
        self.remember()
        return self.init

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def diagnostics(self) -> str:
        procs = "\n".join(f"  {p} {stat_of(p)} {cmdline(p)}" for p in self.descendants())
        return f"--- processes in the namespace:\n{procs}\n--- vsup's stderr:\n{self.stderr()}"

    def wait_log(self, pattern: str, timeout: float = WAIT_S) -> re.Match:
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.stderr()), timeout, f"log line /{pattern}/",
                        self.diagnostics)

    def descendants(self) -> list[int]:
        """Every process of the namespace: PID 1 and everything below it (orphans included)."""
        if self.init is None:
            return []
        out, todo = [], [self.init]
        while todo:
            p = todo.pop()
            if stat_of(p) is None:
                continue
            out.append(p)
            todo += children_of(p)
        return out

    def remember(self) -> list[int]:
        pids = self.descendants()
        for p in pids:
            st = stat_of(p)
            if st is not None:
                self.seen.setdefault(p, st[2])
        return pids

    def zombies(self) -> list[int]:
        """Zombies in the namespace (any parent)."""
        return [p for p in self.remember() if (stat_of(p) or ("?",))[0] == "Z"]

    def alive(self, pid: int) -> bool:
        """PID, as first seen (same start time), still exists (a zombie counts: not reaped)."""
        st = stat_of(pid)
        return st is not None and st[2] == self.seen.get(pid, st[2])

    def wait_no_zombie(self, what: str) -> None:
        wait_for(lambda: not self.zombies(), REAP_BOUND_S, f"no zombie in the namespace ({what})",
                 self.diagnostics)

    def sigterm(self) -> None:
        os.kill(self.init, signal.SIGTERM)

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vsup (PID 1) did not exit within {timeout}s\n{self.diagnostics()}",
                        pytrace=False)

    def left_behind(self) -> list[str]:
        return [f"{p}: {stat_of(p)} {cmdline(p)}" for p in self.seen if self.alive(p)]


@pytest.fixture
def ns(request, can_unshare, tmp_path, vsup_bin):
    n = Namespace(tmp_path, vsup_bin)
    yield n
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    running = n.proc is not None and n.proc.poll() is None
    if running:
        # PID 1 killed: the kernel kills the whole namespace.
        if n.init is not None:
            os.kill(n.init, signal.SIGKILL)
        n.proc.wait(10)
    # Nothing outlives the namespace's init.
    left = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        left = n.left_behind()
        if not left:
            break
        time.sleep(0.01)
    if failed:
        return
    if running:
        pytest.fail("the test left vsup running (killed now)\n" + n.diagnostics(), pytrace=False)
    assert not left, f"left behind after PID 1 exited: {left}"


def orphans_of(n: Namespace, command: str) -> list[int]:
    """Children of PID 1 whose command line starts with COMMAND (daemons it did not spawn)."""
    return [p for p in children_of(n.init) if cmdline(p).startswith(command)]


def release(fifo: Path) -> None:
    """Opens and closes the FIFO for writing: every process blocked opening it to read wakes up
    and reads EOF."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


# ---------------------------------------------------------------------------------------------


def killed_pids(n: Namespace) -> set[int]:
    """Pids (as PID 1's namespace numbers them) the reaper logged as killed escapes."""
    return {int(m) for m in re.findall(r"killed process (\d+) \([^)]*\) that escaped its process "
                                         r"group", n.stderr())}


def reaped_pids(n: Namespace) -> list[int]:
    return [int(m) for m in re.findall(r"reaped orphan pid (\d+) \(", n.stderr())]


def test_pid1_reaps_every_orphan_kills_the_escaped_ones_and_a_sigterm_still_exits_0(ns, tmp_path):
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    marker = tmp_path / "spawned"
    # Three daemons that keep the daemonizer's process group and wait for the test (blocked
    # opening the FIFO), three that leave it (setsid) and would wait too, then 20 that exit at
    # once: every one's parent (a subshell) exits first, so all 26 end up children of PID 1.
    script = (
        "for i in 1 2 3; do ( sh -c 'read x < \"$1\"' daemon-stays \"$1\" & ); done; "
        "for i in 1 2 3; do ( setsid sh -c 'read x < \"$1\"' daemon-escapes \"$1\" & ); done; "
        "i=0; while [ $i -lt 20 ]; do ( setsid true & ); i=$((i+1)); done; "
        "echo done > \"$2\"; exec sleep 1000"
    )
    topology = tmp_path / "pid1.toml"
    topology.write_text(render_topology({
        "name": "root",
        "children": [{"name": "daemonizer",
                      "command": ["/bin/sh", "-c", script, "sh", str(fifo), str(marker)]}],
    }) + "\n")
    ns.start("--topology", str(topology), "--log-level", "debug")
    ns.wait_log(r"\[supervisor\] root: running as PID 1")
    # As PID 1 the root reads SIGCHLD from its signalfd, with SIGTERM and SIGINT.
    assert blocks(ns.init, signal.SIGCHLD) and blocks(ns.init, signal.SIGTERM)
    wait_for(marker.exists, WAIT_S, "the daemonizer to have forked its daemons", ns.diagnostics)

    def three_daemons():
        found = orphans_of(ns, "sh -c read x")
        return found if len(found) == 3 else None

    # The ones in the daemonizer's group run on, children of PID 1.
    daemons = wait_for(three_daemons, WAIT_S, "three daemons reparented to PID 1", ns.diagnostics)
    ns.remember()
    for d in daemons:
        assert stat_of(d)[1] == ns.init, f"daemon {d} is not PID 1's child: {stat_of(d)}"
        assert "daemon-stays" in cmdline(d), f"an escaped daemon still runs: {cmdline(d)}"
    # The escaped ones are killed as soon as the reaper sees them, and reaped; the 20 quick ones
    # exit at once (some may be seen alive and be killed first): each is reaped, none is left a
    # zombie of PID 1.
    wait_for(lambda: len(set(reaped_pids(ns))) >= 23, REAP_BOUND_S,
             "the 3 escaped daemons and the 20 quick orphans to be reaped", ns.diagnostics)
    ns.wait_no_zombie("20 orphans that exited at once, 3 that were killed")
    assert len(reaped_pids(ns)) == 23 == len(set(reaped_pids(ns))), ns.stderr()
    assert len(killed_pids(ns)) >= 3, ns.stderr()
    # (A daemon killed before setsid(1) exec'd its shell is logged with setsid's command line.)
    assert len(re.findall(r"killed process \d+ \((?:setsid )?sh -c read x < \S+ daemon-escapes",
                          ns.stderr())) == 3, ns.stderr()
    assert all(ns.alive(d) for d in daemons), ns.diagnostics()

    release(fifo)
    wait_for(lambda: not any(ns.alive(d) for d in daemons), REAP_BOUND_S,
             "the released daemons to exit and be reaped (not left zombies)", ns.diagnostics)
    ns.wait_no_zombie("3 daemons that exited")
    # vsup's own children, untouched by the reaper, still run.
    kids = children_of(ns.init)
    assert any("sleep 1000" in cmdline(k) for k in kids), ns.diagnostics()
    assert any("__guard" in cmdline(k) for k in kids), ns.diagnostics()

    ns.sigterm()
    rc = ns.wait_exit()
    err = ns.stderr()
    assert rc == 0, f"exit status {rc} after SIGTERM, expected 0\n{err}"
    assert re.search(r"\[shutdown\] root: daemonizer stopped in .* \(signal 15", err), err
    assert re.search(r"\[shutdown\] root: done in .* \(clean\)", err), err
    assert "reaped 26 orphaned processes as PID 1" in err, err
    assert len(reaped_pids(ns)) == 26, err


def test_pid1_exits_with_the_trees_code_when_a_significant_child_fails(ns, tmp_path):
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    marker = tmp_path / "ready"
    # The job leaves a quick orphan and a daemon that never exits, then fails with code 3 when
    # released: intensity 0, so the tree stops and vsup exits 5 (README, exit statuses).
    script = (
        "( setsid true & ); ( setsid sleep 1000 < /dev/null > /dev/null 2>&1 & ); "
        "echo ready > \"$2\"; read x < \"$1\"; exit 3"
    )
    topology = tmp_path / "pid1.toml"
    topology.write_text(render_topology({
        "name": "root",
        "intensity": 0,
        "auto_shutdown": "any_significant",
        "children": [{"name": "job", "restart": "transient", "significant": True,
                      "command": ["/bin/sh", "-c", script, "sh", str(fifo), str(marker)]}],
    }) + "\n")
    ns.start("--topology", str(topology), "--log-level", "debug")
    wait_for(marker.exists, WAIT_S, "the job to have forked", ns.diagnostics)
    # The daemon left its group: killed as soon as it is seen, while the job still runs.
    # (Logged with setsid(1)'s command line when it is killed before setsid exec'd the sleep.)
    ns.wait_log(r"killed process \d+ \((?:setsid )?sleep 1000\) that escaped its process group")
    wait_for(lambda: len(reaped_pids(ns)) == 2, REAP_BOUND_S, "both orphans reaped",
             ns.diagnostics)
    ns.wait_no_zombie("one orphan that exited at once, one killed")
    assert not orphans_of(ns, "sleep 1000"), ns.diagnostics()

    release(fifo)
    rc = ns.wait_exit()
    err = ns.stderr()
    assert rc == 5, f"exit status {rc}, expected 5 (a significant child failed)\n{err}"
    assert re.search(r"job \(pid \d+\) exited \(code 3\)", err), err
    assert "intensity exceeded" in err, err
    assert "reaped 2 orphaned processes as PID 1" in err, err
    assert err.splitlines()[-1].startswith("vsup run: failed: child 'job' (pid "), err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pid1_serves_and_a_sigterm_drains_and_exits_0(ns):
    # The serving tree (engine-core, its rank, an API server: vsup-aware children) as PID 1.
    port = _free_port()
    ns.start("--engine", "sim", "--model", "vsup-sim", "--sim-token-ms", "1", "--port", str(port))
    ns.wait_log(r"running as PID 1")

    def health() -> int:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            status = c.getresponse().status
            c.close()
            return status
        except OSError:
            return 0

    wait_for(lambda: health() == 200, 30, "/health to answer 200", ns.diagnostics)
    ns.remember()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/completions",
              body=json.dumps({"model": "vsup-sim", "prompt": "hi", "max_tokens": 4}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    assert r.status == 200, body
    assert body["choices"][0]["finish_reason"] == "length", body
    assert not ns.zombies(), ns.diagnostics()

    ns.sigterm()
    rc = ns.wait_exit(60)
    err = ns.stderr()
    assert rc == 0, f"exit status {rc} after SIGTERM, expected 0\n{err}"
    assert re.search(r"\[shutdown\] root: done in .* \(clean\)", err), err
    assert "reaped 0 orphaned processes as PID 1" in err, err


def test_outside_pid_1_vsup_run_is_a_subreaper_all_the_same_and_says_nothing_of_pid_1(tree):
    # The same root outside a PID namespace's init: a child subreaper (the orphans of its tree
    # come to it: test_escape.py), so SIGCHLD is on its signalfd too; nothing to reap here.
    tree.start({"children": [{"name": "a", "command": tree.probe("a")}]})
    tree.wait_started("a")
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    assert tree.pid != 1
    assert blocks(tree.pid, signal.SIGTERM), "the root reads SIGTERM from its signalfd"
    assert blocks(tree.pid, signal.SIGCHLD), "the root, a subreaper, reads SIGCHLD from a signalfd"
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    err = tree.stderr()
    assert "running as PID 1" not in err and "reaped orphan" not in err, err
    assert "killed process" not in err, err
