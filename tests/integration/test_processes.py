"""What a child process inherits, what happens to its descendants, nested supervisors,
deferrals, the control socket and `vsup tree`."""

import os
import re
import signal
import stat
import time

from conftest import is_running, now_ns, wait_for

MS = 1_000_000  # ns


def worker(tree, name, *probe_args, **spec):
    return {"name": name, "command": tree.probe(name, *probe_args), **spec}


def nested(tree, sub_extra=None, leaf_args=(), leaf_spec=None):
    """root: a, sub (a supervisor process) with leaves l1 and l2."""
    return {"children": [
        worker(tree, "a"),
        {"name": "sub", "type": "supervisor", **(sub_extra or {}), "children": [
            worker(tree, "l1"),
            worker(tree, "l2", *leaf_args, **(leaf_spec or {})),
        ]},
    ]}


def start_nested(tree, **kw):
    tree.start(nested(tree, **kw))
    tree.wait_log(r"\[supervisor\] root: all 2 children ready")
    pids = {n: e.pid for n, e in tree.wait_started("a", "l1", "l2").items()}
    pids["sub"] = int(tree.wait_log(r"\[supervisor\] root: started sub \(pid (\d+)\)").match.group(1))
    return pids


def test_a_generic_child_gets_fds_0_1_2_its_own_group_default_signals_and_a_notify_socket(tree):
    def ignore_sigusr1():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    r, w = os.pipe()  # an inherited fd that must not reach the child
    try:
        tree.start({"children": [worker(tree, "a", "--report")]},
                   preexec_fn=ignore_sigusr1, pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    a = tree.wait_event("a", "notify_socket")
    report = {e.event: e.extra for e in tree.events("a")}
    assert report["fds"] == "0,1,2"
    assert os.readlink(f"/proc/{a.pid}/fd/0") == "/dev/null"
    assert int(report["pgid"]) == a.pid, "the child is not the leader of its own process group"
    assert int(report["sigign"], 16) == 0, f"ignored signals leaked into the child: {report['sigign']}"
    assert int(report["sigblk"], 16) == 0, f"blocked signals leaked into the child: {report['sigblk']}"
    assert report["notify_socket"].startswith("@"), report["notify_socket"]
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_grandchildren_are_gone_when_their_parent_child_is_stopped(tree):
    tree.start({"children": [worker(tree, "first"), worker(tree, "a", "--grandchildren", 2)]})
    tree.wait_started("first")
    grand = [int(tree.wait_event("a", "grandchild", n).extra) for n in (1, 2)]
    assert all(is_running(p) for p in grand)
    tree.signal(signal.SIGTERM)
    stopped = tree.wait_log(r"\[shutdown\] root: a stopped")
    dead = tree.wait_gone(grand, timeout=2, what="grandchildren")
    for p in grand:
        assert dead[p] - stopped.seen_ns < 1000 * MS
    assert tree.wait_exit() == 0


def test_grandchildren_are_killed_when_their_parent_child_exits_on_its_own(tree):
    tree.start({"children": [
        worker(tree, "keep"),
        worker(tree, "a", "--grandchildren", 2, "--exit-after", 300, restart="temporary")]})
    grand = [int(tree.wait_event("a", "grandchild", n).extra) for n in (1, 2)]
    exited = tree.wait_log(r"\[supervisor\] root: a\b.*exited \(code 0\)")
    dead = tree.wait_gone(grand, timeout=2, what="grandchildren")
    for p in grand:
        assert dead[p] - exited.seen_ns < 1000 * MS
    assert tree.proc.poll() is None
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_a_nested_supervisor_stops_its_leaves_in_reverse_before_it_is_logged_stopped(tree):
    pids = start_nested(tree)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    l1_exit, l2_exit = tree.only("l1", "exit"), tree.only("l2", "exit")
    assert tree.only("l2", "term").ns < l2_exit.ns < tree.only("l1", "term").ns < l1_exit.ns
    sub_stopped = tree.find_log(r"\[shutdown\] root: sub stopped")
    assert sub_stopped, tree.diagnostics()
    for leaf in ("l1", "l2"):
        leaf_stopped = tree.find_log(rf"\[shutdown\] \S*sub: {leaf} stopped")
        assert leaf_stopped and leaf_stopped.index < sub_stopped.index, tree.diagnostics()
    # a started before sub, so it stops after the whole subtree is gone.
    assert tree.only("a", "term").ns > l1_exit.ns
    assert not is_running(pids["sub"])


def find_nodes(node, predicate):
    found = [node] if predicate(node) else []
    for child in node.get("children") or []:
        found += find_nodes(child, predicate)
    return found


def test_a_child_that_extends_its_stop_timeout_shows_as_deferring_in_vsup_tree(tree):
    # Without the extension a would be killed 500 ms after its SIGTERM; it asks for 1 s more
    # three times, 300 ms apart, then exits by itself.
    tree.start({"children": [worker(tree, "a", "--on-term-extend", 1_000_000, "--extend-count", 3,
                                    "--extend-every", 300, "--status", "kv: 3 transfers pending",
                                    shutdown=500)]})
    tree.wait_started("a")
    tree.wait_socket()
    tree.signal(signal.SIGTERM)
    tree.wait_event("a", "extend")

    def deferring_node():
        nodes = find_nodes(tree.tree_json(), lambda n: n.get("deferral")
                           and "transfers pending" in n["deferral"].get("reason", ""))
        return nodes[0] if nodes else None

    node = wait_for(deferring_node, 5, "a deferral in `vsup tree --json`", tree.diagnostics)
    assert node["name"] == "a"
    assert node["state"] == "stopping"
    assert isinstance(node["deferral"]["progress"], str)
    assert tree.wait_exit() == 0, "the extension was not honoured"
    assert tree.only("a", "exit").extra == "0"
    assert tree.find_log(r"\[shutdown\] (\S+/)?a: deferring: .*transfers pending"), tree.diagnostics()


def test_a_leaf_deferring_past_its_parents_deadline_is_killed_and_the_subtree_is_gone_in_time(tree):
    pids = start_nested(tree, sub_extra={"shutdown": 800},
                        leaf_args=("--on-term-extend", 10_000_000, "--extend-every", 100,
                                   "--extend-count", 1000, "--never-exit"))
    sent = tree.signal(signal.SIGTERM)
    tree.wait_event("l2", "extend")
    subtree = [pids[n] for n in ("sub", "l1", "l2")]
    dead = tree.wait_gone(subtree, timeout=5, what="the subtree")
    for pid in subtree:
        assert dead[pid] - sent < (800 + 1000) * MS, (
            f"{pid} gone {(dead[pid] - sent) / MS:.0f}ms after SIGTERM; sub's deadline was 800ms")
    assert tree.wait_exit() == 4, tree.diagnostics()
    assert not tree.events("l2", "exit")


def test_killing_the_root_with_sigkill_takes_every_descendant_down_within_a_second(tree):
    pids = start_nested(tree)
    tree.expect_socket_removed = False  # a SIGKILLed root cannot remove its socket
    killed = tree.signal(signal.SIGKILL)
    assert tree.wait_exit() == -signal.SIGKILL
    dead = tree.wait_gone(pids.values(), timeout=3, what="descendants of the killed root")
    for name, pid in pids.items():
        assert dead[pid] - killed < 1000 * MS, f"{name} outlived the root by {(dead[pid] - killed) / MS:.0f}ms"


TREE_KEYS = {"name", "pid", "type", "state", "uptime_s", "restarts", "deferral", "children"}


def test_vsup_tree_json_shows_the_running_nested_tree(tree):
    pids = start_nested(tree)
    tree.wait_log(r"\[supervisor\] \S*sub: all 2 children ready")
    tree.wait_socket()
    root = tree.tree_json()

    def check(node, name, type_, pid):
        assert set(node) == TREE_KEYS, f"{name}: keys {sorted(node)}"
        assert node["name"] == name
        assert node["type"] == type_
        assert node["pid"] == pid and is_running(pid), f"{name}: pid {node['pid']}, expected {pid}"
        assert node["state"] == "running"
        assert isinstance(node["uptime_s"], (int, float)) and node["uptime_s"] >= 0
        assert node["restarts"] == 0
        assert node["deferral"] is None
        return {c["name"]: c for c in node["children"]}

    top = check(root, "root", "supervisor", tree.pid)
    assert list(top) == ["a", "sub"]
    assert check(top["a"], "a", "worker", pids["a"]) == {}
    leaves = check(top["sub"], "sub", "supervisor", pids["sub"])
    assert list(leaves) == ["l1", "l2"]
    for leaf in ("l1", "l2"):
        assert check(leaves[leaf], leaf, "worker", pids[leaf]) == {}
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_the_control_socket_has_mode_0600_and_is_removed_at_exit(tree):
    tree.start({"children": [worker(tree, "a")]})
    tree.wait_socket()
    st = os.stat(tree.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(stat.S_IMODE(st.st_mode))
    tree.wait_started("a")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    assert not tree.socket.exists()


def test_the_default_control_socket_is_in_xdg_runtime_dir_and_is_removed_at_exit(tree):
    tree.start({"name": "deftree", "children": [worker(tree, "a")]}, control_socket=False)
    expected = tree.dir / "vsup" / f"deftree-{tree.pid}.sock"
    wait_for(expected.exists, 10, f"control socket {expected}", tree.diagnostics)
    assert stat.S_IMODE(os.stat(expected).st_mode) == 0o600
    tree.wait_started("a")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    assert not expected.exists()
