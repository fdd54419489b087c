"""`vsup run` starts its API servers while engine-core loads (start_concurrently).

The load is held open by the test hook VSUP_TEST_FAULT="worker-tp0:pause@start" (the rank stops
itself with SIGSTOP when engine-core asks it to start): while it is stopped, engine-core cannot
be ready, and the API servers must already listen and say so. SIGCONT lets the load finish.
Every wait polls for its condition with a deadline; the fixture checks nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import proc_stat, wait_for
from test_serving import serving  # noqa: F401  (the fixture)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def paused_rank(root: int) -> int | None:
    """The pid of the tree's rank 0 once it has stopped itself (state T), else None."""
    for pid in descendants(root):
        argv = cmdline(pid)
        st = proc_stat(pid)
        if "__worker" in argv and "--rank" in argv and argv[argv.index("--rank") + 1] == "0" \
                and st is not None and st[0] in ("T", "t"):
            return pid
    return None


def launch(s, *args: str, env: dict) -> None:
    """Like Serving.start, without waiting for /health 200."""
    argv = [s.vsup_bin, "run", "--port", str(s.port), "--control-socket", str(s.socket),
            "--engine", "sim", "--model", "vsup-sim", *args]
    with open(s.stderr_path, "wb") as err:
        s.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                  start_new_session=True, env={**os.environ, **env})
    s.pids.add(s.proc.pid)


def completion_reply(s):
    c = s.connect()
    r, body = s.post("/v1/completions", {"model": "vsup-sim", "prompt": "hi", "max_tokens": 2},
                     conn=c)
    retry_after = r.getheader("Retry-After")
    c.close()
    return r.status, json.loads(body), retry_after


@pytest.mark.parametrize("tp", [1, 2])
def test_api_servers_answer_starting_while_engine_core_loads_then_serve_and_stop_first(serving, tp):
    s = serving
    launch(s, "--tensor-parallel-size", str(tp), "--api-server-count", "2",
           env={"VSUP_TEST_FAULT": "worker-tp0:pause@start"})
    rank = wait_for(lambda: paused_rank(s.proc.pid) or s.proc.poll() is not None, 30,
                    "rank 0 to pause in its start", s.stderr)
    assert s.proc.poll() is None, s.stderr()
    s.pids.add(rank)
    # The API servers listen while engine-core cannot be ready (its rank is stopped).
    status, body = wait_for(lambda: (lambda h: h if h[0] != 0 else None)(s.health()), 30,
                            "an API server to answer /health", s.stderr)
    assert status == 503, body
    assert json.loads(body)["status"] == "starting", body
    code, error, retry_after = completion_reply(s)
    assert code == 503, error
    assert "the engine is starting" in error["error"]["message"], error
    assert error["error"]["type"], error
    assert retry_after == "1"
    # Still held: engine-core is not ready, so neither is the root.
    assert paused_rank(s.proc.pid) == rank
    assert s.health()[0] == 503
    log = s.stderr()
    assert "[supervisor] root: all" not in log, log
    assert "started api-server-1" in log, log  # both started, not only the first
    os.kill(rank, signal.SIGCONT)
    wait_for(lambda: s.health()[0] == 200 or s.proc.poll() is not None, 30,
             "/health to answer 200 once engine-core is ready", s.stderr)
    assert s.proc.poll() is None, s.stderr()
    code, reply, _ = completion_reply(s)
    assert code == 200, reply
    wait_for(lambda: "[supervisor] root: all 3 children ready" in s.stderr(), 10,
             "the root to be ready", s.stderr)
    log = s.stderr()
    # The API servers were started before engine-core was ready.
    assert log.index("root: started api-server-0") < log.index("root: engine-core ready in"), log
    s.remember_pids()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(30) == 0, s.stderr()
    log = s.stderr()
    # The stop order is still the reverse of the start order: API servers, then engine-core.
    stop_api = log.index("[shutdown] root: stopping api-server-1")
    stop_api0 = log.index("[shutdown] root: stopping api-server-0")
    stop_core = log.index("[shutdown] root: stopping engine-core")
    assert stop_api < stop_api0 < stop_core, log
