"""Hung vsup-aware nodes below the root: a liveness ping that goes unanswered kills the hung node
(named in the log, with its pid) within interval + timeout, and `vsup tree` names a hung node
deep in the tree as itself, "unresponsive", while its ancestors still answer."""

import os
import re
import signal

from conftest import now_ns, wait_for

MS = 1_000_000  # ns


def aware(tree, name, *args, **spec):
    probe = os.environ.get("VSUP_AWARE_PROBE")
    assert probe, "VSUP_AWARE_PROBE is not set: run through meson test"
    return {"name": name, "vsup_aware": True,
            "command": [os.path.realpath(probe), "--name", name, "--log", str(tree.probe_log),
                        *args], **spec}


def find(node, name):
    if node["name"] == name:
        return node
    for c in node["children"]:
        found = find(c, name)
        if found is not None:
            return found
    return None


def test_a_hung_leaf_two_levels_down_is_killed_by_its_supervisor_within_interval_plus_timeout(tree):
    tree.start({"intensity": 0, "children": [
        {"name": "mid", "type": "supervisor", "intensity": 0, "children": [
            aware(tree, "hangs", liveness_timeout=300, liveness_interval=200),
            aware(tree, "fine", liveness_timeout=300, liveness_interval=200),
        ]},
    ]})
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    pid = tree.wait_event("hangs", "start").pid
    # Pings answered: nothing happens for several intervals.
    quiet_until = now_ns() + 1500 * MS
    wait_for(lambda: now_ns() >= quiet_until or tree.find_log("unresponsive"), 3, "1.5 s",
             tree.diagnostics)
    assert tree.find_log("unresponsive") is None, tree.diagnostics()

    os.kill(pid, signal.SIGSTOP)
    stopped = now_ns()
    line = tree.wait_log(r"\[supervisor\] mid: hangs \(pid (\d+)\) is unresponsive: no answer to "
                         r"a liveness ping in 300ms: killing it", timeout=5)
    assert int(line.match.group(1)) == pid
    took = (line.seen_ns - stopped) / MS
    print(f"hung leaf detected in {took:.0f} ms (interval 200 + timeout 300)")
    assert took <= 200 + 300 + 400, f"detected {took:.0f} ms after the hang\n{tree.diagnostics()}"
    # Its death is an unexpected one: intensity 0 stops mid, then the root: exit 5.
    assert tree.wait_exit() == 5
    assert tree.find_log(r"\[supervisor\] mid: intensity exceeded")
    assert tree.find_log(r"\[supervisor\] root: intensity exceeded")


def test_vsup_tree_shows_a_hung_node_deep_in_the_tree_as_itself_and_its_parents_running(tree):
    tree.start({"children": [
        {"name": "mid", "type": "supervisor", "children": [
            {"name": "low", "type": "supervisor", "children": [
                aware(tree, "stuck", shutdown=300),
                aware(tree, "ok"),
            ]},
        ]},
    ]})
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    pid = tree.wait_event("stuck", "start").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        began = now_ns()
        doc = tree.tree_json()
        took = (now_ns() - began) / MS
        stuck, low, mid = find(doc, "stuck"), find(doc, "low"), find(doc, "mid")
        assert stuck is not None and low is not None and mid is not None, doc
        assert stuck["state"] == "unresponsive", doc
        assert stuck["pid"] == pid
        assert low["state"] == "running" and mid["state"] == "running", doc
        assert find(doc, "ok")["state"] == "running", doc
        # The root's budget is 1 s; each level gives the next 3/4 of its own.
        assert took < 1500, f"vsup tree took {took:.0f} ms"
    finally:
        os.kill(pid, signal.SIGCONT)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
