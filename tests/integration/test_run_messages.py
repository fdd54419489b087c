"""What `vsup run` says last, and how it counts signals (tools/run_command.cpp).

The last line: when a tree ends in anything but a clean shutdown, the root's last line on stderr
names the node and the cause, in the text and in the json log format: a start failure, an
unexpected death (also of engine-core in the serving tree) and an escalation. A clean shutdown
adds no such line.

A signal delivered twice counts once: a stop signal within 50 ms of the last one counted is
logged and ignored (timeout(1) sends SIGTERM to its child and then to its process group, which
holds the child too). Two SIGTERMs back to back give the ordered shutdown of the first signal,
not the hurried one of a second; two further apart than the window still hurry.

Waits poll for a condition with a hard deadline; each test checks nothing was left behind (the
`tree` and `serving` fixtures).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import WAIT_TIMEOUT_S, wait_for
from test_serving import serving  # noqa: F401 - a fixture, found by pytest by name

MS = 1_000_000  # ns


def worker(tree, name, *probe_args, **spec):
    return {"name": name, "command": tree.probe(name, *probe_args), **spec}


def last_line(tree) -> str:
    lines = tree.stderr().splitlines()
    assert lines, "vsup run wrote nothing"
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# The last line


def test_a_start_failure_ends_with_a_line_naming_the_child_and_its_timeout(tree):
    rc = tree.run_to_exit({"children": [
        worker(tree, "first"),
        worker(tree, "late", ready="notify", start_timeout=300),
    ]})
    assert rc == 3, tree.diagnostics()
    assert last_line(tree) == ("vsup run: start failed: child 'late' did not become ready "
                               "within 300ms (start_timeout)"), tree.diagnostics()


def test_the_last_line_is_a_json_error_object_in_the_json_log_format(tree):
    tree.write_topology({"children": [worker(tree, "late", ready="notify", start_timeout=300)]})
    tree.start(extra_args=["--log-format", "json"])
    assert tree.wait_exit() == 3, tree.diagnostics()
    line = json.loads(last_line(tree))
    assert line["level"] == "error", line
    assert line["process"] == "vsup run", line
    assert line["pid"] == tree.pid, line
    assert line["message"] == ("start failed: child 'late' did not become ready within 300ms "
                               "(start_timeout)"), line


def test_an_unexpected_death_ends_with_a_line_naming_the_child_and_its_exit(tree):
    rc = tree.run_to_exit({"intensity": 0, "children": [
        worker(tree, "steady"),
        worker(tree, "crasher", "--exit-after", 100, "--exit-code", 7),
    ]})
    assert rc == 5, tree.diagnostics()
    pid = tree.pid_of("crasher")
    assert last_line(tree) == (f"vsup run: failed: child 'crasher' (pid {pid}) exited (code 7); "
                               f"intensity exceeded (1 restarts in 5.0s, intensity 0)"), \
        tree.diagnostics()


def test_an_escalation_ends_with_a_line_naming_the_child_that_was_killed(tree):
    tree.start({"children": [worker(tree, "calm"),
                             worker(tree, "stubborn", "--ignore-term", shutdown=300)]})
    tree.wait_started("calm", "stubborn")
    tree.wait_log(r"\[supervisor\] root: all 2 children ready")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 4, tree.diagnostics()
    assert last_line(tree) == ("vsup run: shutdown escalated: child 'stubborn' killed: shutdown "
                               "timeout passed"), tree.diagnostics()


def test_a_child_dying_during_the_shutdown_ends_with_a_line_naming_it(tree):
    # Stopped in reverse order: "slow" first, which takes 2 s; meanwhile "early", still waiting
    # its turn, exits on its own (1 s after its start): a failure of the shutdown.
    tree.start({"children": [worker(tree, "early", "--exit-after", 1000, "--exit-code", 9),
                             worker(tree, "slow", "--term-delay", 2000, shutdown=10000)]})
    tree.wait_started("early", "slow")
    tree.wait_log(r"\[supervisor\] root: all 2 children ready")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 5, tree.diagnostics()
    pid = tree.pid_of("early")
    assert last_line(tree) == (f"vsup run: failed: child 'early' (pid {pid}) exited (code 9) "
                               f"during the shutdown"), tree.diagnostics()


def test_a_clean_shutdown_adds_no_last_line(tree):
    tree.start({"children": [worker(tree, "a")]})
    tree.wait_started("a")
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()
    assert not any(line.startswith("vsup run:") for line in tree.stderr().splitlines()), \
        tree.diagnostics()
    assert re.search(r"\[shutdown\] root: done in .* \(clean\)", last_line(tree)), tree.diagnostics()


def test_the_serving_tree_names_engine_core_when_it_is_killed(serving):
    serving.start()
    pids = serving.remember_pids()
    core = pids["engine-core"]
    os.kill(core, signal.SIGKILL)
    rc = serving.wait_exit(30)
    assert rc != 0, serving.stderr()
    last = serving.stderr().splitlines()[-1]
    assert last.startswith(f"vsup run: failed: child 'engine-core' (pid {core}) exited "
                           f"(signal 9 (Killed))"), serving.stderr()


# ---------------------------------------------------------------------------------------------
# A signal delivered twice


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM is pending for PID (not yet read from its signalfd)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("ShdPnd:", "SigPnd:")):
                if int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                    return True
    return False


def slow_tree(tree, term_delay_ms: int):
    tree.start({"children": [worker(tree, "slow", "--term-delay", term_delay_ms, shutdown=10000)]})
    tree.wait_started("slow")
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")


def test_two_sigterms_back_to_back_count_once_the_ordered_shutdown_runs_its_course(tree):
    slow_tree(tree, 1500)
    # The first one is read from the root's signalfd before the second is sent, so the kernel
    # cannot merge them: the root sees two, microseconds apart.
    tree.signal(signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while sigterm_pending(tree.pid) and time.monotonic() < deadline:
        pass
    assert not sigterm_pending(tree.pid), "the root did not read the first SIGTERM"
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit(WAIT_TIMEOUT_S) == 0, tree.diagnostics()
    repeat = tree.find_log(r"\[shutdown\] root: SIGTERM (\d+)ms after the last one: the same "
                           r"request delivered twice, counted once \(repeats within 50ms")
    assert repeat is not None, tree.diagnostics()
    assert tree.find_log(r"second SIGTERM") is None, tree.diagnostics()
    # The ordered shutdown: slow took its 1.5 s to stop, and was not killed.
    term = tree.only("slow", "term")
    exit_ = tree.only("slow", "exit")
    assert exit_.ns - term.ns >= 1400 * MS, (term, exit_)
    assert tree.find_log(r"killing slow") is None, tree.diagnostics()


def test_two_sigterms_further_apart_than_the_window_still_hurry(tree):
    slow_tree(tree, 5000)
    t0 = tree.signal(signal.SIGTERM)
    tree.wait_log(r"\[shutdown\] root: SIGTERM received: ordered shutdown")
    tree.wait_event("slow", "term")
    # The test's input is the gap itself: 150 ms, three times the window.
    while time.clock_gettime_ns(time.CLOCK_MONOTONIC) - t0 < 150 * MS:
        time.sleep(0.005)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit(WAIT_TIMEOUT_S) == 4, tree.diagnostics()
    assert tree.find_log(r"\[shutdown\] root: second SIGTERM: abort in-flight work"), \
        tree.diagnostics()
    assert tree.find_log(r"counted once") is None, tree.diagnostics()
    assert tree.find_log(r"killing slow \(process group \d+\): shutdown timeout passed"), \
        tree.diagnostics()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="NOT TESTED: no timeout(1)")
def test_timeout_1_stopping_the_tree_is_one_sigterm(tree):
    # timeout(1) runs vsup in its own process group and, when the time is up, sends SIGTERM to
    # vsup and then to the group: the root may see two. The slow child must get the ordered
    # shutdown of one signal.
    tree.write_topology({"children": [worker(tree, "slow", "--term-delay", 1000,
                                             shutdown=10000)]})
    argv = [shutil.which("timeout"), "-s", "TERM", "2", tree.vsup_bin, "run", "--topology",
            str(tree.topology_path), "--control-socket", str(tree.socket)]
    with open(tree.stdout_path, "wb") as out, open(tree.stderr_path, "wb") as err:
        tree.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     env=tree.env(), cwd=tree.dir, start_new_session=True)
    root = tree.wait_log(r"\(root pid=(\d+)\) \[supervisor\] root: control socket").match
    tree.extra_pids.add(int(root.group(1)))
    tree.wait_started("slow")
    rc = tree.wait_exit(WAIT_TIMEOUT_S)
    assert rc == 124, f"timeout(1) says 124 when it stopped the command; got {rc}\n" + \
        tree.diagnostics()
    assert tree.find_log(r"SIGTERM received: ordered shutdown"), tree.diagnostics()
    assert tree.find_log(r"second SIGTERM") is None, tree.diagnostics()
    term = tree.only("slow", "term")
    exit_ = tree.only("slow", "exit")
    assert exit_.ns - term.ns >= 900 * MS, (term, exit_)
