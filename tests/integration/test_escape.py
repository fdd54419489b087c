"""Nothing escapes the tree (supervisor/orphan_reaper.h), the guards outlive a service manager's
"signal everyone" stop (supervisor/orphan_guard.h), and a signal delivered twice counts once
(tools/run_command.cpp).

The escapes are made by a small Python helper (escaper.py, written into the test's directory, so
that every process it makes mentions the directory in its command line and the leftover check of
conftest.py counts it as the test's): `daemon` double-forks a daemon into its own session
(fork, setsid, fork, the middle process exits), `setpgid` moves itself into a new process group.
Both ignore SIGTERM, so only a SIGKILL ends them. Without the root (or a supervisor process below
it) as a child subreaper, each outlives `vsup run`: the daemon as soon as it is made, the
setpgid one at the end, out of reach of every process-group kill.

Waits poll for a condition with a hard deadline; each test checks nothing was left behind (the
`tree` fixture, plus the escapers' pids).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import WAIT_TIMEOUT_S, cmdline, is_running, proc_stat, wait_for
from test_serving import serving  # noqa: F401 - a fixture, found by pytest by name

PYTHON = "/usr/bin/python3"

ESCAPER = r'''
import os, signal, sys, time
mode, pidfile = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def publish():
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, pidfile)
def await_pidfile():
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.005)
if mode == "daemon":
    # The classic double fork: the middle process leads a new session and exits as soon as the
    # daemon (in the middle one's group, in its session) has published its pid; the daemon is
    # an orphan from then on.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            publish()
            while True:
                time.sleep(1000)
        await_pidfile()
        os._exit(0)
    os.wait()
elif mode == "setpgid":
    os.setpgid(0, 0)
    publish()
    while True:
        time.sleep(1000)
'''

MS = 1_000_000


def write_escaper(tree) -> Path:
    path = tree.dir / "escaper.py"
    path.write_text(ESCAPER)
    return path


def read_pid(path: Path, tree) -> int:
    wait_for(path.exists, WAIT_TIMEOUT_S, f"pid file {path.name}", tree.diagnostics)
    pid = int(path.read_text())
    tree.extra_pids.add(pid)
    return pid


def killed_line(tree, pid: int) -> str:
    return (rf"\[supervisor\] \S+: killed process {pid} \([^)]*escaper\.py[^)]*\) "
            rf"that escaped its process group")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if proc_stat(p) is None:
            continue
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def sig_ignored(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def pending(pid: int, sig: int) -> bool:
    """Whether SIG is pending for the process PID (not yet read from its signalfd)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("ShdPnd:", "SigPnd:")):
                    if int(line.split()[1], 16) & (1 << (sig - 1)):
                        return True
    except OSError:
        pass
    return False


def daemonizer(tree, escaper: Path, name: str) -> tuple[dict, Path]:
    """A child that double-forks a daemon, then becomes probe NAME."""
    pidfile = tree.dir / f"{name}.daemon.pid"
    script = f'{PYTHON} "$0" daemon "$1"; shift; exec "$@"'
    return {"name": name, "command": ["/bin/sh", "-c", script, str(escaper), str(pidfile),
                                      *tree.probe(name)]}, pidfile


def setpgid_parent(tree, escaper: Path, name: str) -> tuple[dict, Path]:
    """A child (probe NAME) whose child moves itself into a new process group."""
    pidfile = tree.dir / f"{name}.setpgid.pid"
    script = f'{PYTHON} "$0" setpgid "$1" & shift; exec "$@"'
    return {"name": name, "command": ["/bin/sh", "-c", script, str(escaper), str(pidfile),
                                      *tree.probe(name)]}, pidfile


# ---------------------------------------------------------------------------------------------


def test_a_daemon_and_a_grandchild_that_left_its_group_are_killed_and_nothing_of_the_tree_remains(
        tree):
    escaper = write_escaper(tree)
    d_spec, d_pidfile = daemonizer(tree, escaper, "d")
    g_spec, g_pidfile = setpgid_parent(tree, escaper, "g")
    # The same two one level down, under a sub-supervisor (a `vsup __node`).
    sd_spec, sd_pidfile = daemonizer(tree, escaper, "sd")
    sg_spec, sg_pidfile = setpgid_parent(tree, escaper, "sg")
    tree.start({"children": [d_spec, g_spec,
                             {"name": "sub", "type": "supervisor", "children": [sd_spec, sg_spec]}]})
    tree.wait_started("d", "g", "sd", "sg")
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    daemons = [read_pid(p, tree) for p in (d_pidfile, sd_pidfile)]
    grandchildren = [read_pid(p, tree) for p in (g_pidfile, sg_pidfile)]
    # (A daemon may be dead already: it is killed as soon as the reaper sees it.)
    for p in grandchildren:
        assert os.getpgid(p) == p, f"{p} did not leave its group: {cmdline(p)}"

    # The daemons are orphans from the start: killed at once (within the reaper's scan period),
    # while the tree runs on, and named in the log.
    for p in daemons:
        tree.wait_log(killed_line(tree, p))
    tree.wait_gone(daemons, WAIT_TIMEOUT_S, "the double-forked daemons")
    assert tree.proc.poll() is None, "the tree must run on"
    # The setpgid grandchildren still have their parent (a probe): part of the tree, untouched.
    for p in grandchildren:
        assert is_running(p), f"grandchild {p} was killed while its parent lives"

    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()
    # Their parents stopped, they were reparented to a subreaper and killed, each logged once.
    for p in grandchildren:
        assert len(tree.find_all_log(killed_line(tree, p))) == 1, tree.diagnostics()
        assert not is_running(p), f"grandchild {p} outlived vsup run: {cmdline(p)}"
    for p in daemons:
        assert len(tree.find_all_log(killed_line(tree, p))) == 1, tree.diagnostics()
    # Nothing of the root's session either (the fixture checks every pid the test saw).
    sid = tree.pid
    left = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if p != tree.pid and is_running(p) and _sid(p) == sid]
    assert not left, [f"{p}: {cmdline(p)}" for p in left]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_when_every_process_gets_sigterm_at_once_the_guards_last_to_the_end_and_nothing_escapes(
        tree):
    # systemd's KillMode=control-group: SIGTERM to every process of the unit at the same instant.
    escaper = write_escaper(tree)
    g_spec, g_pidfile = setpgid_parent(tree, escaper, "g")
    sg_spec, sg_pidfile = setpgid_parent(tree, escaper, "sg")
    slow = {"name": "slow", "command": tree.probe("slow", "--term-delay", 800)}
    tree.start({"children": [g_spec, slow,
                             {"name": "sub", "type": "supervisor", "children": [sg_spec]}]})
    tree.wait_started("g", "slow", "sg")
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    grandchildren = [read_pid(p, tree) for p in (g_pidfile, sg_pidfile)]
    everyone = descendants(tree.pid)
    guards = [p for p in everyone if "__guard" in cmdline(p)]
    assert len(guards) == 2, [cmdline(p) for p in everyone]  # the root's and the sub's
    term_int_hup = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGHUP - 1))
    for g in guards:
        assert sig_ignored(g) & term_int_hup == term_int_hup, (
            f"guard {g} must ignore SIGTERM, SIGINT and SIGHUP: SigIgn {sig_ignored(g):x}")
    assert all(p in everyone for p in grandchildren)
    owner = {g: "root" if proc_stat(g)[1] == tree.pid else "sub" for g in guards}
    assert sorted(owner.values()) == ["root", "sub"], owner

    for p in everyone:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # Each guard is still there for the whole shutdown of its supervisor (slow takes 0.8 s to
    # stop): it lives until its supervisor has stopped its children and said goodbye.
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    watching = set(guards)
    def done_at(g: int) -> float | None:
        """When (seconds of the day, local time as the log prints it) the guard's supervisor
        logged that its shutdown was done; None before it did."""
        m = re.search(rf"^(\d\d):(\d\d):(\d\d\.\d\d\d) \({owner[g]} pid=\d+\) \[shutdown\] "
                      rf"{owner[g]}: done in", tree.stderr(), re.M)
        return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])

    def now_of_day() -> float:
        t = time.time()
        lt = time.localtime(t)
        return lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec + (t % 1)

    def supervisor_done(g: int) -> bool:
        return done_at(g) is not None

    while watching and time.monotonic() < deadline:
        for g in list(watching):
            if supervisor_done(g):
                watching.discard(g)  # its supervisor is done: the guard may go now
            elif not is_running(g):
                # Its supervisor logs "done" before the goodbye; the sub's line comes through the
                # root's output collector, so it may reach the file a little after the guard
                # went: the line's own time tells whether the guard outlived the shutdown.
                dead_at = now_of_day()
                t = time.monotonic()
                while not supervisor_done(g) and time.monotonic() - t < 2.0:
                    time.sleep(0.005)
                done = done_at(g)
                if done is None or done > dead_at + 0.002:
                    pytest.fail(f"the guard of {owner[g]} (pid {g}) died during its shutdown "
                                f"(seen dead at {dead_at:.3f}, done at {done})\n"
                                f"{tree.diagnostics()}", pytrace=False)
                watching.discard(g)
        time.sleep(0.005)
    assert not watching, f"no 'done' from the supervisors of guards {watching}"
    rc = tree.wait_exit()
    # The probes got the service manager's SIGTERM too: one that exits of it before its
    # supervisor asks is a child failure (exit 5), one asked first stops cleanly (exit 0).
    assert rc in (0, 5), tree.diagnostics()
    assert tree.find_log(r"\[shutdown\] root: SIGTERM received: ordered shutdown")
    for p in grandchildren:
        assert not is_running(p), f"{p} outlived vsup run: {cmdline(p)}"
        assert tree.find_log(killed_line(tree, p)), tree.diagnostics()
    tree.wait_gone(guards, 2.0, "the orphan guards, after their goodbye")


def test_the_guard_of_a_sigkilled_sub_supervisor_is_left_to_kill_its_groups_and_exit(tree):
    # The sub's guard (its own group, no death signal) and its leaf's grandchild (in the leaf's
    # group) are reparented to the root when the sub and the leaf die. The guard is not a
    # stranger to kill: it kills the leaf's group and exits by itself. The grandchild did not
    # escape anything (its group's leader died): it is never logged as an escape.
    tree.start({"children": [{"name": "sub", "type": "supervisor", "children": [
        {"name": "leaf", "command": tree.probe("leaf", "--grandchildren", 1)}]}]})
    tree.wait_started("leaf")
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    sub = int(tree.wait_log(r"\[supervisor\] root: started sub \(pid (\d+)\)").match.group(1))
    leaf = tree.pid_of("leaf")
    grandchild = int(tree.wait_event("leaf", "grandchild").extra)
    guards = [p for p in descendants(sub) if "__guard" in cmdline(p)]
    assert len(guards) == 1, [cmdline(p) for p in descendants(sub)]
    guard = guards[0]
    os.kill(sub, signal.SIGKILL)
    tree.wait_gone([sub, leaf, grandchild, guard], WAIT_TIMEOUT_S, "the sub's processes")
    tree.wait_log(r"\[supervisor\] root: restarting sub")
    tree.wait_event("leaf", "start", 2)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()
    assert tree.find_log(rf"killed process {guard} ") is None, tree.diagnostics()
    assert tree.find_log(rf"killed process {grandchild} .*escaped") is None, tree.diagnostics()


def _blocks_sigchld(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        blk = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    return bool(blk & (1 << (signal.SIGCHLD - 1)))


def test_every_supervisor_process_of_the_serving_tree_is_a_subreaper(serving):
    # An escape below engine-core is hard to make (its children are vsup's own ranks), so this
    # checks that it, like the root, made itself a subreaper: the debug line the Subreaper logs,
    # and SIGCHLD blocked for its signalfd. API servers and ranks are no supervisors: neither.
    serving.start("--log-level", "debug")
    pids = serving.remember_pids()
    for name in ("root", "engine-core"):
        assert re.search(rf"\[supervisor\] {name}: child subreaper: orphans of this subtree",
                         serving.stderr()), f"{name} is not a subreaper\n{serving.stderr()}"
        assert _blocks_sigchld(pids[name]), f"{name} does not block SIGCHLD"
    for name in ("api-server-0", "worker-tp0"):
        assert not _blocks_sigchld(pids[name]), f"{name} blocks SIGCHLD"
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(30) == 0, serving.stderr()


def test_a_sub_supervisor_process_is_a_subreaper(tree):
    tree.start({"children": [{"name": "sub", "type": "supervisor", "children": [
        {"name": "leaf", "command": tree.probe("leaf")}]}]}, extra_args=["--log-level", "debug"])
    tree.wait_started("leaf")
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    sub = int(tree.wait_log(r"\[supervisor\] root: started sub \(pid (\d+)\)").match.group(1))
    tree.wait_log(r"\(sub pid=\d+\) \[supervisor\] sub: child subreaper: orphans of this subtree")
    assert _blocks_sigchld(sub)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()
