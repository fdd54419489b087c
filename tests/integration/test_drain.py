"""`vsup drain`: the preStop hook that watches traffic instead of sleeping.

`vsup drain` calls Node.leaveRotation on the root of a running tree (every API server then
answers /health with 503 "draining" while it keeps serving every request), then polls the
tree's status until no new request arrived for --quiet-for seconds (with --wait: and nothing
is in flight), or gives up at --timeout with exit status 124. Each serving test starts its own
tree (the `serving` fixture of test_serving.py, which checks at the end that every process is
gone); waits poll for a condition with a hard timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from test_aware import with_log
from test_serving import (  # noqa: F401 - `serving` is a fixture, found by pytest by name
    HTTP_TIMEOUT_S,
    PlainClient,
    Serving,
    completion,
    serving,
)

DRAIN_TIMEOUT_EXIT = 124


class Traffic(threading.Thread):
    """Completions one after another, each on a new connection (as a load balancer's would be),
    until stopped; every outcome is recorded."""

    def __init__(self, serving: Serving):
        super().__init__(daemon=True)
        self.serving = serving
        self.ok = 0
        self.failures: list = []
        self.last_sent = 0.0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.last_sent = time.monotonic()
            conn = self.serving.connect()
            try:
                r, data = self.serving.post("/v1/completions", completion(2), conn=conn)
                doc = json.loads(data)
                if r.status == 200 and doc["choices"][0]["finish_reason"] == "length":
                    self.ok += 1
                else:
                    self.failures.append((r.status, data[:200]))
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                self.failures.append(repr(e))
            finally:
                conn.close()

    def stop(self) -> float:
        """Stops sending; returns when the last request has been answered (its monotonic time)."""
        self._halt.set()
        self.join(HTTP_TIMEOUT_S)
        assert not self.is_alive(), "the traffic thread did not stop"
        return time.monotonic()


class Drain:
    """One `vsup drain` against the serving tree, its stderr in a file."""

    def __init__(self, serving: Serving, *args: str, name: str = "drain"):
        self.stderr_path = serving.tmp / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [serving.vsup_bin, "drain", "--socket", str(serving.socket), *args],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        serving.pids.add(self.proc.pid)
        self.started = time.monotonic()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"vsup drain did not return within {timeout}s:\n{self.stderr()}",
                        pytrace=False)

    def wait_out_of_rotation(self):
        wait_for(lambda: "out of rotation:" in self.stderr() or self.proc.poll() is not None, 10,
                 "vsup drain to take the tree out of rotation", self.stderr)
        assert "out of rotation:" in self.stderr(), self.stderr()


def api_servers(doc: dict) -> list[dict]:
    return [c for c in doc["children"] if c["name"].startswith("api-server-")]


def test_drain_leaves_the_rotation_keeps_serving_and_returns_once_the_traffic_stops(serving):
    serving.start("--sim-token-ms", "2", "--api-server-count", "2")
    before = serving.tree()
    assert all(s["out_of_rotation"] is False for s in api_servers(before)), before
    assert "out_of_rotation" not in before and "requests_total" not in before  # the root serves none
    traffic = Traffic(serving)
    traffic.start()
    wait_for(lambda: traffic.ok >= 5, 10, "the first completions", serving.stderr)

    drain = Drain(serving, "--quiet-for", "1", "--timeout", "20")
    drain.wait_out_of_rotation()
    # Every API server (a new connection lands on either) answers 503 "draining" at once...
    for _ in range(10):
        status, body = serving.health()
        assert status == 503 and json.loads(body)["status"] == "draining", (status, body)
    # ...and goes on serving: new connections, new requests, every one of them answered.
    served_then = traffic.ok
    wait_for(lambda: traffic.ok >= served_then + 20, 10, "20 more completions out of rotation",
             serving.stderr)
    doc = serving.tree()
    servers = api_servers(doc)
    assert len(servers) == 2 and all(s["out_of_rotation"] is True for s in servers), doc
    assert sum(s["requests_total"] for s in servers) >= served_then + 20, doc
    assert drain.proc.poll() is None, f"drain returned while requests kept coming:\n{drain.stderr()}"

    stopped = traffic.stop()
    last_sent = traffic.last_sent
    code = drain.wait(10)
    returned = time.monotonic()
    assert code == 0, drain.stderr()
    assert traffic.failures == [], traffic.failures[:5]
    # Quiet for --quiet-for after the last request, and not much longer than that.
    assert returned - last_sent >= 1.0, "drain returned before a second without a request"
    assert returned - stopped < 1.0 + 1.0, f"drain took {returned - stopped:.2f}s after the last request"
    text = drain.stderr()
    assert "quiet for" in text, text  # the progress lines
    assert "no new request for" in text, text
    assert "out of rotation: 2 of 2 API servers" in text, text

    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
    assert "leaving the load balancers' rotation (vsup drain)" in serving.stderr()


def test_drain_wait_also_waits_for_the_requests_in_flight(serving):
    serving.start("--sim-token-ms", "20")
    long = PlainClient(serving, completion(150))  # 150 steps of 20 ms: about 3 s
    long.start()
    wait_for(lambda: serving.tree()["children"][-1].get("in_flight", 0) >= 1, 10,
             "the long request in flight", serving.stderr)

    # Without --wait: no new request for 0.3 s is enough, whatever is still running.
    quick = Drain(serving, "--quiet-for", "0.3", "--timeout", "10", name="quick")
    assert quick.wait(10) == 0, quick.stderr()
    assert long.is_alive(), "the request finished before the drain without --wait returned"

    # With --wait: also until nothing is in flight (leaveRotation is idempotent: a second drain).
    waiting = Drain(serving, "--quiet-for", "0.3", "--timeout", "20", "--wait", name="waiting")
    assert waiting.wait(20) == 0, waiting.stderr()
    long.join(1)  # answered by now: the drain saw nothing in flight only after its response
    assert not long.is_alive(), "drain --wait returned while the request was still running"
    assert long.error is None and long.status == 200, (long.error, long.json)
    assert long.json["choices"][0]["finish_reason"] == "length"
    assert "1 in flight" in waiting.stderr(), waiting.stderr()
    assert "and nothing in flight" in waiting.stderr(), waiting.stderr()
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()


def test_drain_gives_up_at_its_timeout_while_requests_keep_coming(serving):
    serving.start("--sim-token-ms", "2")
    traffic = Traffic(serving)
    traffic.start()
    wait_for(lambda: traffic.ok >= 5, 10, "the first completions", serving.stderr)
    drain = Drain(serving, "--quiet-for", "1", "--timeout", "2")
    code = drain.wait(10)
    took = time.monotonic() - drain.started
    traffic.stop()
    assert code == DRAIN_TIMEOUT_EXIT, drain.stderr()
    assert 2.0 <= took < 2.0 + 1.5, f"returned after {took:.2f}s for --timeout 2"
    assert "still receiving requests at --timeout 2.0s" in drain.stderr(), drain.stderr()
    assert traffic.failures == [], traffic.failures[:5]
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()


def test_a_tree_that_exits_while_drain_waits_is_a_success(serving):
    serving.start("--sim-token-ms", "2")
    drain = Drain(serving, "--quiet-for", "30", "--timeout", "60")
    drain.wait_out_of_rotation()
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
    assert drain.wait(10) == 0, drain.stderr()
    assert "the tree has exited" in drain.stderr(), drain.stderr()


@pytest.mark.parametrize("args, named", [
    (["--quiet-for", "-1"], "--quiet-for"),
    (["--quiet-for", "nan"], "--quiet-for"),
    (["--timeout", "-0.5"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--quiet-for", "10", "--timeout", "5"], "--quiet-for 10 is longer than --timeout 5"),
    (["--quiet-for", "soon"], "--quiet-for"),
])
def test_drain_usage_errors_exit_2_naming_the_flag(vsup_bin, tmp_path, args, named):
    r = subprocess.run([vsup_bin, "drain", "--socket", str(tmp_path / "none.sock"), *args],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert named in r.stderr, r.stderr


def test_drain_without_a_running_tree_says_so(vsup_bin, tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([vsup_bin, "drain"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=10, env=env)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "no running vsup tree found" in r.stderr, r.stderr
    r = subprocess.run([vsup_bin, "drain", "--socket", str(tmp_path / "gone.sock")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "cannot connect" in r.stderr, (r.returncode, r.stderr)


def test_leave_rotation_reaches_children_of_a_sub_supervisor_and_a_slow_child_is_skipped(tree):
    # A topology: the root's leaveRotation goes to every vsup-aware child, and a sub-supervisor
    # passes it on to its own; a child slow to answer holds nobody up for long.
    tree.start({"children": [
        {"name": "sub", "type": "supervisor",
         "children": [with_log(tree, "leaf", "--rotation")]},
        with_log(tree, "slow", "--rotation", "--leave-rotation-ms", "20000"),
        {"name": "plain", "command": tree.probe("plain")},
    ]})
    tree.wait_log(r"\[supervisor\] root: slow ready")
    began = time.monotonic()
    r = subprocess.run([tree.vsup_bin, "drain", "--socket", str(tree.socket), "--quiet-for",
                        "0.2", "--timeout", "10"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=20, env=tree.env())
    took = time.monotonic() - began
    assert r.returncode == 0, r.stderr
    assert took < 5, f"a slow child held vsup drain up for {took:.1f}s"
    tree.wait_event("leaf", "leave_rotation")
    assert tree.events("slow", "leave_rotation") == []
    tree.wait_log(r"\[shutdown\] root: slow did not answer the request to leave the rotation")
    # Both rotation-aware probes count requests (0 each); the one under `sub` left.
    assert "out of rotation: 1 of 2 API servers" in r.stderr, r.stderr

    doc = tree.tree_json()
    sub = next(c for c in doc["children"] if c["name"] == "sub")
    assert sub["children"][0]["out_of_rotation"] is True, doc
    assert sub["children"][0]["requests_total"] == 0, doc
    plain = next(c for c in doc["children"] if c["name"] == "plain")
    assert "out_of_rotation" not in plain and "requests_total" not in plain, doc
    text = subprocess.run([tree.vsup_bin, "tree", "--socket", str(tree.socket)],
                          capture_output=True, text=True, timeout=10, env=tree.env()).stdout
    leaf_line = next(line for line in text.splitlines() if "leaf" in line)
    assert "out of rotation" in leaf_line and "requests 0" in leaf_line, text
    plain_line = next(line for line in text.splitlines() if "plain" in line)
    assert "rotation" not in plain_line and "requests" not in plain_line, text

    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()


def test_drain_progress_is_json_in_the_json_log_format(serving):
    serving.start("--sim-token-ms", "2")
    path = Path(serving.tmp / "drain-json.stderr")
    with open(path, "wb") as err:
        r = subprocess.run([serving.vsup_bin, "--log-format", "json", "drain", "--socket",
                            str(serving.socket), "--quiet-for", "1.2", "--timeout", "10"],
                           stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=20)
    assert r.returncode == 0, path.read_text()
    lines = path.read_text().splitlines()
    assert len(lines) >= 3, lines  # out of rotation, a progress line, done
    for line in lines:
        doc = json.loads(line)
        assert doc["process"] == "vsup drain" and doc["message"] and doc["level"] == "info", doc
        assert isinstance(doc["pid"], int) and doc["pid"] > 0, doc
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
