"""Starting and stopping a tree: order, readiness, shutdown timeouts and the root's signals."""

import signal

from conftest import now_ns, wait_for

MS = 1_000_000  # ns


def worker(tree, name, *probe_args, **spec):
    return {"name": name, "command": tree.probe(name, *probe_args), **spec}


def assert_stopped_one_at_a_time_in_reverse(tree, names_in_start_order):
    """Each child's SIGTERM comes after the previously stopped child has exited."""
    order = list(reversed(names_in_start_order))
    for name in order:
        term, exit_ = tree.only(name, "term"), tree.only(name, "exit")
        assert term.ns < exit_.ns
    for earlier, later in zip(order, order[1:]):
        assert tree.only(later, "term").ns > tree.only(earlier, "exit").ns, (
            f"{later} got SIGTERM before {earlier} had exited\n{tree.diagnostics()}")


def test_children_start_in_order_each_after_the_previous_is_ready(tree):
    tree.start({"children": [
        worker(tree, "a", "--ready-after", 200, ready="notify", start_timeout=5000),
        worker(tree, "b", "--ready-after", 100, ready="notify", start_timeout=5000),
        worker(tree, "c", "--ready-after", 10, ready="notify", start_timeout=5000),
    ]})
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    a, b, c = (tree.only(n, "start") for n in "abc")
    assert b.ns > tree.only("a", "ready").ns, "b started before a was ready"
    assert c.ns > tree.only("b", "ready").ns, "c started before b was ready"
    assert b.ns - a.ns >= 190 * MS, "b did not wait for a's readiness delay"
    started = [line.match.group(1) for line in tree.find_all_log(r"\[supervisor\] root: started (\w+) \(pid")]
    assert started == ["a", "b", "c"]
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_start_concurrently_below_the_root_reaches_the_sub_supervisor(tree):
    # root -> mid -> (slow: ready after 400 ms, start_concurrently; fast; last). mid is a
    # `vsup node` that gets its spec over the control protocol: the field must travel with it.
    tree.start({"children": [
        {"name": "mid", "type": "supervisor", "start_timeout": 10000, "children": [
            worker(tree, "slow", "--ready-after", 400, ready="notify", start_timeout=5000,
                   start_concurrently=True),
            worker(tree, "fast", "--ready-after", 0, ready="notify", start_timeout=5000),
            worker(tree, "last", "--ready-after", 0, ready="notify", start_timeout=5000),
        ]},
    ]})
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    slow_ready = tree.only("slow", "ready").ns
    assert tree.only("fast", "start").ns < slow_ready, f"fast waited for slow\n{tree.diagnostics()}"
    assert tree.only("last", "start").ns < slow_ready, tree.diagnostics()
    assert tree.only("last", "start").ns > tree.only("fast", "ready").ns  # fast is serial
    # mid is ready only once all three are, slow included.
    assert tree.find_log(r"\[supervisor\] mid: all 3 children ready"), tree.diagnostics()
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    assert_stopped_one_at_a_time_in_reverse(tree, ["slow", "fast", "last"])


def test_sigterm_stops_children_in_reverse_order_one_at_a_time_and_exits_0(tree):
    tree.start({"children": [worker(tree, n) for n in "abc"]})
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    tree.wait_started("a", "b", "c")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    assert_stopped_one_at_a_time_in_reverse(tree, ["a", "b", "c"])
    stopped = [l.match.group(1) for l in tree.find_all_log(r"\[shutdown\] root: (\w+) stopped")]
    assert stopped == ["c", "b", "a"]
    assert tree.find_log(r"\[shutdown\] root: done .*clean"), tree.diagnostics()


def test_child_that_ignores_sigterm_is_killed_at_its_shutdown_timeout_and_exit_is_4(tree):
    tree.start({"children": [worker(tree, "a", "--ignore-term", shutdown=300)]})
    a = tree.wait_started("a")["a"]
    tree.signal(signal.SIGTERM)
    term = tree.wait_event("a", "term")
    died = tree.wait_gone([a.pid], timeout=5)[a.pid]
    assert 250 * MS <= died - term.ns <= 2000 * MS, f"killed {(died - term.ns) / MS:.0f}ms after SIGTERM"
    assert tree.wait_exit() == 4
    assert not tree.events("a", "exit")
    assert tree.find_log(r"\[shutdown\] root: killing a\b"), tree.diagnostics()


def test_brutal_kill_child_is_killed_at_once_without_sigterm(tree):
    tree.start({"children": [worker(tree, "a", "--ignore-term", "--term-delay", 5000,
                                    shutdown="brutal_kill")]})
    a = tree.wait_started("a")["a"]
    sent = tree.signal(signal.SIGTERM)
    died = tree.wait_gone([a.pid], timeout=5)[a.pid]
    assert died - sent < 1000 * MS
    # brutal_kill is the configured way to stop this child, not an escalation.
    assert tree.wait_exit() == 0, tree.diagnostics()
    assert not tree.events("a", "term"), "a brutal_kill child must not be sent SIGTERM"
    assert not tree.events("a", "exit")


def test_infinity_shutdown_waits_for_a_slow_child_to_exit_by_itself(tree):
    tree.start({"children": [worker(tree, "a", "--term-delay", 1500, shutdown="infinity")]})
    tree.wait_started("a")
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    term, exit_ = tree.only("a", "term"), tree.only("a", "exit")
    assert exit_.extra == "0"
    assert exit_.ns - term.ns >= 1400 * MS


def test_child_that_never_becomes_ready_stops_the_earlier_ones_in_reverse_and_exits_3(tree):
    tree.start({"children": [
        worker(tree, "a"),
        worker(tree, "b"),
        worker(tree, "late", ready="notify", start_timeout=300),
    ]})
    assert tree.wait_exit() == 3
    assert tree.only("late", "start")
    assert not tree.events("late", "ready")
    assert_stopped_one_at_a_time_in_reverse(tree, ["a", "b"])
    assert tree.only("b", "term").ns > tree.only("late", "start").ns + 250 * MS
    assert "late" in tree.stderr()


def test_ctrl_c_reaches_only_the_root_which_stops_children_one_at_a_time(tree):
    tree.start({"children": [worker(tree, n) for n in "abc"]})
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    tree.wait_started("a", "b", "c")
    tree.signal_group(signal.SIGINT)
    assert tree.wait_exit() == 0
    # Had the children been in the root's process group, all three would have seen the SIGINT
    # (and died of it, logging nothing) at once.
    assert_stopped_one_at_a_time_in_reverse(tree, ["a", "b", "c"])


def stubborn_tree(tree):
    tree.start({"children": [worker(tree, n, "--ignore-term", shutdown=10000) for n in "abc"]})
    tree.wait_log(r"\[supervisor\] root: all 3 children ready")
    return {n: e.pid for n, e in tree.wait_started("a", "b", "c").items()}


def test_second_signal_shortens_every_remaining_stop_timeout_to_half_a_second(tree):
    pids = stubborn_tree(tree)
    first = tree.signal(signal.SIGTERM)
    tree.wait_event("c", "term")
    # Further apart than the root's 50 ms repeat window (a repeat within it counts once).
    wait_for(lambda: now_ns() - first > 100 * MS, 1.0, "100 ms after the first", tree.diagnostics)
    second = tree.signal(signal.SIGTERM)
    dead = tree.wait_gone(pids.values(), timeout=5)
    assert tree.wait_exit() == 4
    assert now_ns() - first < 4000 * MS
    # c had already been sent SIGTERM; its remaining wait is cut to 500 ms.
    assert dead[pids["c"]] - second <= 900 * MS, (
        f"c died {(dead[pids['c']] - second) / MS:.0f}ms after the second signal\n{tree.diagnostics()}")
    # b and a are still sent SIGTERM first, then killed 500 ms later, one at a time.
    for name, before in (("b", "c"), ("a", "b")):
        term = tree.only(name, "term")
        assert term.ns >= dead[pids[before]] - 20 * MS, f"{name} got SIGTERM before {before} died"
        assert 400 * MS <= dead[pids[name]] - term.ns <= 900 * MS, (
            f"{name} died {(dead[pids[name]] - term.ns) / MS:.0f}ms after its SIGTERM\n{tree.diagnostics()}")


def test_third_signal_kills_every_child_at_once(tree):
    pids = stubborn_tree(tree)
    first = tree.signal(signal.SIGTERM)
    tree.wait_event("c", "term")
    # SIGINT and SIGTERM count alike. Each further apart than the root's 50 ms repeat window
    # (a repeat within it counts once).
    wait_for(lambda: now_ns() - first > 100 * MS, 1.0, "100 ms after the first", tree.diagnostics)
    second = tree.signal(signal.SIGINT)
    wait_for(lambda: now_ns() - second > 100 * MS, 1.0, "100 ms after the second", tree.diagnostics)
    third = tree.signal(signal.SIGTERM)
    dead = tree.wait_gone(pids.values(), timeout=5)
    assert tree.wait_exit() == 4
    for name, pid in pids.items():
        assert dead[pid] - third < 400 * MS, f"{name} died {(dead[pid] - third) / MS:.0f}ms after the third signal"
    assert not tree.events("a", "term") and not tree.events("b", "term"), (
        "a and b were still waiting their turn: the third signal kills them without SIGTERM")
