"""vsup-aware children (ChildRuntime): readiness over RPC, shutdown hooks that defer, start
failures reported over RPC, and sub-supervisors that ignore signals sent to them directly."""

import os
import signal

from conftest import is_running, wait_for


def aware(name, *args, **spec):
    probe = os.environ.get("VSUP_AWARE_PROBE")
    assert probe, "VSUP_AWARE_PROBE is not set: run through meson test"
    return {"name": name, "vsup_aware": True, "command": [os.path.realpath(probe), *args], **spec}


def with_log(tree, name, *args, **spec):
    return aware(name, "--name", name, "--log", str(tree.probe_log), *args, **spec)


def test_a_vsup_aware_child_is_ready_only_when_its_start_returns_over_rpc(tree):
    tree.start({"children": [
        with_log(tree, "slow", "--ready-after", "300"),
        {"name": "next", "command": tree.probe("next")},
    ]})
    nxt = tree.wait_event("next", "start")
    ready = tree.wait_event("slow", "ready")
    assert ready.ns <= nxt.ns, "the next child started before the vsup-aware one was ready"
    assert nxt.ns - tree.only("slow", "start").ns >= 300_000_000
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_a_deferring_shutdown_hook_is_shown_in_vsup_tree_and_logged_and_ends_clean(tree):
    tree.start({"children": [
        with_log(tree, "kv", "--defer-ms", "1200", "--defer-reason", "kv: 3 transfers pending",
                 shutdown=5000),
    ]})
    tree.wait_log(r"\[supervisor\] root: kv ready")
    tree.signal(signal.SIGTERM)

    def deferring():
        doc = tree.tree_json()
        kv = next(c for c in doc["children"] if c["name"] == "kv")
        d = kv["deferral"]
        return d if d and "transfers pending" in d["reason"] and "of" in d["progress"] else None

    d = wait_for(deferring, 5.0, "kv's deferral in vsup tree --json", tree.diagnostics)
    assert d["reason"] == "kv: 3 transfers pending"
    tree.wait_log(r"\[shutdown\] kv: deferring: kv: 3 transfers pending \(\d+ of \d+ done\)")
    tree.wait_event("kv", "hook_done")
    assert tree.wait_exit() == 0, "a hook that finished in time is a clean shutdown"


def test_a_hook_deferring_past_the_childs_deadline_is_cut_short_and_reported_as_an_escalation(tree):
    tree.start({"children": [
        with_log(tree, "kv", "--defer-ms", "20000", shutdown=600),
    ]})
    tree.wait_log(r"\[supervisor\] root: kv ready")
    sent = tree.signal(signal.SIGTERM)
    stopped = tree.wait_log(r"\[shutdown\] root: kv stopped in")
    assert (stopped.seen_ns - sent) < 1_500_000_000, "the 20 s hook was not bounded by shutdown=600"
    assert tree.wait_exit() == 4


def test_a_vsup_aware_child_that_refuses_to_start_fails_the_start_with_its_message(tree):
    code = tree.run_to_exit({"children": [
        # Ready only once it handles SIGTERM, so its stop is observable.
        {"name": "first", "command": tree.probe("first", "--ready-after", "0"), "ready": "notify"},
        with_log(tree, "broken", "--fail-start"),
    ]})
    assert code == 3
    assert "broken" in tree.stderr() and "refused to start" in tree.stderr()
    first = tree.only("first", "term")
    assert first is not None, "the started child was not stopped"


def test_a_sub_supervisor_ignores_sigterm_sent_to_it_directly(tree):
    tree.start({"children": [
        {"name": "sub", "type": "supervisor",
         "children": [{"name": "leaf", "command": tree.probe("leaf")}]},
    ]})
    tree.wait_log(r"\[supervisor\] root: all 1 children ready")
    sub = int(tree.wait_log(r"root: started sub \(pid (\d+)\)").match.group(1))
    os.kill(sub, signal.SIGTERM)
    os.kill(sub, signal.SIGINT)
    os.kill(sub, signal.SIGHUP)
    # It is stopped over RPC only: still serving its subtree after the signals.
    doc = tree.tree_json()
    assert doc["children"][0]["state"] == "running"
    assert doc["children"][0]["children"][0]["state"] == "running"
    assert is_running(sub)
    assert not tree.events("leaf", "term"), "the leaf was stopped by a signal to its supervisor"
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0


def test_vsup_tree_finds_the_only_running_tree_and_asks_when_there_are_several(tree, vsup_bin):
    import subprocess
    runtime = tree.dir  # the harness runs vsup with XDG_RUNTIME_DIR set to the test's own dir
    env = tree.env()
    topo = tree.write_topology({"children": [{"name": "a", "command": tree.probe("a")}]})
    tree.start(control_socket=False)
    wait_for(lambda: list((runtime / "vsup").glob("*.sock")), 5.0, "the default control socket",
             tree.diagnostics)
    one = subprocess.run([vsup_bin, "tree", "--json"], env=env, capture_output=True, text=True,
                         timeout=10)
    assert one.returncode == 0, one.stderr
    assert '"name":"root"' in one.stdout.replace(" ", "")
    second = subprocess.Popen([vsup_bin, "run", "--topology", str(topo)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(lambda: len(list((runtime / "vsup").glob("*.sock"))) == 2, 5.0,
                 "a second control socket", tree.diagnostics)
        several = subprocess.run([vsup_bin, "tree"], env=env, capture_output=True, text=True,
                                 timeout=10)
        assert several.returncode == 2
        assert "2 trees are running" in several.stderr
        assert several.stderr.count(".sock") == 2
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=10) == 0
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    assert not list((runtime / "vsup").glob("*.sock")), "a control socket was left behind"
