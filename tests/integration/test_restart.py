"""OTP restart semantics: restart types, strategies, intensity and auto_shutdown."""

import os
import signal
import time

MS = 1_000_000  # ns

# How long a test watches for a restart that must not happen. A restart happens at once after
# the exit is logged, so this is many times longer than one would take.
NO_RESTART_WATCH_S = 0.5


def worker(tree, name, *probe_args, **spec):
    return {"name": name, "command": tree.probe(name, *probe_args), **spec}


def ordered(tree, name, *probe_args, **spec):
    """A worker that is ready only once its probe runs, so start order shows in the event log."""
    return worker(tree, name, "--ready-after", 0, *probe_args, ready="notify",
                  start_timeout=5000, **spec)


def stop(tree, expected_status=0):
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == expected_status


def watch_for_no_restart(tree, name):
    time.sleep(NO_RESTART_WATCH_S)
    assert len(tree.events(name, "start")) == 1, f"{name} was restarted\n{tree.diagnostics()}"
    assert not tree.find_log(rf"restarting {name}\b"), tree.diagnostics()


# -- restart types ------------------------------------------------------------------------------

def test_permanent_child_is_restarted_after_exiting_with_code_0(tree):
    tree.start({"intensity": 100, "children": [
        worker(tree, "a", "--exit-after", 150, "--exit-code", 0, restart="permanent")]})
    first = tree.wait_event("a", "start", 1)
    second = tree.wait_event("a", "start", 2)
    assert second.pid != first.pid
    assert tree.find_log(r"\[supervisor\] root: restarting a\b"), tree.diagnostics()
    stop(tree)


def test_transient_child_is_restarted_after_a_non_zero_exit(tree):
    tree.start({"intensity": 100, "children": [
        worker(tree, "a", "--exit-after", 150, "--exit-code", 3, restart="transient")]})
    tree.wait_event("a", "start", 2)
    assert tree.find_log(r"\[supervisor\] root: a\b.*exited \(code 3\)"), tree.diagnostics()
    assert tree.find_log(r"\[supervisor\] root: restarting a\b"), tree.diagnostics()
    stop(tree)


def test_transient_child_is_not_restarted_after_exiting_with_code_0(tree):
    tree.start({"intensity": 100, "children": [
        worker(tree, "keep"),
        worker(tree, "a", "--exit-after", 100, "--exit-code", 0, restart="transient")]})
    tree.wait_event("a", "exit")
    tree.wait_log(r"\[supervisor\] root: a\b.*exited \(code 0\)")
    watch_for_no_restart(tree, "a")
    stop(tree)


def test_temporary_child_is_never_restarted_even_after_a_crash(tree):
    tree.start({"intensity": 100, "children": [
        worker(tree, "keep"),
        worker(tree, "a", "--crash-after", 100, restart="temporary")]})
    tree.wait_event("a", "crash")
    tree.wait_log(r"\[supervisor\] root: a\b.*exited \(signal 6\b")
    watch_for_no_restart(tree, "a")
    stop(tree)


# -- strategies ---------------------------------------------------------------------------------

def three_ordered(tree, strategy):
    tree.start({"strategy": strategy, "intensity": 10,
                "children": [ordered(tree, n) for n in "abc"]})
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    return {n: e.pid for n, e in tree.wait_started("a", "b", "c").items()}


def crash(tree, pid):
    os.kill(pid, signal.SIGKILL)


def test_one_for_one_restarts_only_the_crashed_child(tree):
    pids = three_ordered(tree, "one_for_one")
    crash(tree, pids["b"])
    tree.wait_event("b", "start", 2)
    tree.wait_log(r"\[supervisor\] root: b\b.*exited \(signal 9\b")
    for name in "ac":
        assert len(tree.events(name, "start")) == 1
        assert not tree.events(name, "term"), f"{name} was stopped\n{tree.diagnostics()}"
    stop(tree)


def test_one_for_all_stops_the_siblings_in_reverse_and_restarts_all_in_order(tree):
    pids = three_ordered(tree, "one_for_all")
    crash(tree, pids["b"])
    new = {n: tree.wait_event(n, "start", 2) for n in "abc"}
    c_term, c_exit = tree.only("c", "term"), tree.only("c", "exit")
    a_term, a_exit = tree.only("a", "term"), tree.only("a", "exit")
    assert c_term.ns < c_exit.ns < a_term.ns < a_exit.ns, "siblings not stopped one at a time in reverse"
    assert a_exit.ns < new["a"].ns < new["b"].ns < new["c"].ns, "not restarted in order after the stop"
    assert new["b"].ns > tree.events("a", "ready")[1].ns, "b restarted before the new a was ready"
    stop(tree)


def test_rest_for_one_restarts_the_crashed_child_and_the_ones_after_it_only(tree):
    pids = three_ordered(tree, "rest_for_one")
    crash(tree, pids["b"])
    new_b, new_c = tree.wait_event("b", "start", 2), tree.wait_event("c", "start", 2)
    c_exit = tree.only("c", "exit")
    assert tree.only("c", "term").ns < c_exit.ns < new_b.ns < new_c.ns
    assert len(tree.events("a", "start")) == 1
    assert not tree.events("a", "term"), f"a was stopped\n{tree.diagnostics()}"
    stop(tree)


# -- intensity ----------------------------------------------------------------------------------

def test_supervisor_gives_up_with_exit_5_when_restarts_exceed_intensity_within_period(tree):
    tree.start({"intensity": 2, "period": 1, "children": [
        worker(tree, "keep"),
        worker(tree, "a", "--exit-after", 100, "--exit-code", 1)]})
    assert tree.wait_exit() == 5
    assert tree.find_log(r"\[supervisor\] root: intensity exceeded"), tree.diagnostics()
    # Two restarts are allowed; the third exit within the period exceeds the intensity.
    assert len(tree.events("a", "start")) == 3
    assert tree.only("keep", "term"), "the other children are stopped before giving up"


def test_restarts_further_apart_than_the_period_never_exceed_the_intensity(tree):
    tree.start({"intensity": 1, "period": 0.5, "children": [
        worker(tree, "a", "--crash-after", 700)]})
    tree.wait_event("a", "start", 4, timeout=10)  # three restarts, each alone in its window
    assert tree.proc.poll() is None, tree.diagnostics()
    stop(tree)
    assert not tree.find_log(r"intensity exceeded"), tree.diagnostics()


# -- auto_shutdown ------------------------------------------------------------------------------

def test_any_significant_shuts_the_tree_down_when_a_significant_child_exits(tree):
    tree.start({"auto_shutdown": "any_significant", "children": [
        worker(tree, "keep"),
        worker(tree, "sig", "--exit-after", 200, "--exit-code", 0,
               restart="transient", significant=True)]})
    assert tree.wait_exit() == 0
    assert tree.only("keep", "term").ns > tree.only("sig", "exit").ns
    assert len(tree.events("sig", "start")) == 1


def test_all_significant_shuts_the_tree_down_only_after_every_significant_child_ended(tree):
    tree.start({"auto_shutdown": "all_significant", "children": [
        worker(tree, "keep"),
        worker(tree, "s1", "--exit-after", 100, restart="transient", significant=True),
        worker(tree, "s2", "--exit-after", 800, restart="temporary", significant=True)]})
    assert tree.wait_exit() == 0
    s1_exit, s2_exit = tree.only("s1", "exit"), tree.only("s2", "exit")
    assert s1_exit.ns < s2_exit.ns
    assert tree.only("keep", "term").ns > s2_exit.ns, "the tree stopped before s2 had ended"
