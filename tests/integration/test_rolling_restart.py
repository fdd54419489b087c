"""Zero-loss rolling restart: HAProxy in front of two `vsup run --engine sim` replicas.

The deployment Kubernetes gives an inference service, in miniature: a proxy with HTTP health
checks on /health balancing over two replicas, continuous load from clients that check every
response, and each replica replaced in turn. The test asserts what vsup's shutdown promises a
client behind such a proxy: not one request fails, no client sees a connection error, and every
response arrives whole, while the replicas are restarted one after the other.

Two ways to take a replica out, both run:

- `drain`: as a rollout with a preStop hook does it. The replica is taken out of rotation first
  (HAProxy's runtime API, `set server be/rN state drain`; Kubernetes: the endpoint is removed),
  the test waits until HAProxy has no session on it, then sends SIGTERM.
- `sigterm`: the replica gets SIGTERM while still in rotation, as when a pod's endpoint removal
  races the SIGTERM. Here vsup's own behaviour keeps clients whole: /health turns 503 at once,
  in-flight requests finish, and every request that reaches the replica while it drains is
  answered 503 with `Connection: close` (never reset: the listener stays open until the drain
  ends), which HAProxy replays on the other replica (`retry-on 503`). A request that crosses
  the close of an idle keep-alive connection at the drain's end is replayed too
  (`retry-on empty-response`): vsup never read it.

Either way the old tree must exit 0 with nothing left behind, a new one is started on the same
port, HAProxy must see it UP, and it must serve load before the other replica is rolled.

The request count and latency percentiles during the roll are printed and, when the environment
variable VSUP_ROLL_REPORT names a file, written there as JSON (one key per variant).

Needs HAProxy (Debian: `apt-get install haproxy`, 2.6); the test fails, not skips, without it.
Every wait polls for an event with a hard timeout; HAProxy and every replica are stopped in
`finally` blocks and checked for leftovers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import describe, is_running, reap_adopted, wait_for
from loadgen import LoadGen, summarize
from test_serving import Serving, free_port

HAPROXY = os.environ.get("VSUP_HAPROXY", "/usr/sbin/haproxy")
MODEL = "vsup-sim"
REPLICA_ARGS = ("--sim-token-ms", "5", "--shutdown-timeout", "10")
BACKEND = "be"
SERVERS = ("r1", "r2")
# Load: keep-alive clients reuse one connection to HAProxy (which reuses its own connections to
# the replicas); connection-per-request clients open a new one each time.
KEEP_ALIVE_CLIENTS = 4
PER_REQUEST_CLIENTS = 4
# Responses the load must get from a (new) replica before the test goes on: proof that it is
# really in rotation, awaited as an event rather than slept for.
SERVED_BEFORE_NEXT_STEP = 10
# Each replica is replaced this many times, one after the other: more restarts, more chances for
# a race to show, at about a second each.
ROUNDS = 3
STEP_TIMEOUT_S = 15.0


# What HAProxy retries (`retry-on`), per variant. Either way a request is retried at most 3 times,
# each time on another server.
RETRY_ON = {
    # Taken out of rotation before SIGTERM, a replica gets no new request, so HAProxy's default
    # (retry a connect that failed, before the request was sent) is all it takes.
    "drain": "conn-failure",
    # In rotation at SIGTERM, a replica answers every request that reaches it while it drains
    # with 503 + `Connection: close` (its listener stays open, and it never resets a connection
    # whose request was sent), none of which it has handed to the engine, so replaying them on
    # the other replica is safe. HAProxy can replay a request only if it still holds its body:
    # `option http-buffer-request` below.
    # `empty-response`: when the drain ends, the replica closes its idle keep-alive connections
    # (FIN, then it reads and discards for a while, so nothing is reset). A request HAProxy sends
    # on one of them at that very moment, before its next health check has seen the 503, gets
    # no answer; vsup had not read it (it answers every request that reached it before the
    # close), so replaying it is safe. Without this HAProxy closes a reused client connection
    # silently instead (its way of handing the keep-alive race to the client), about 1 run in 15.
    "sigterm": "conn-failure empty-response 503",
}


def haproxy_config(frontend_port: int, stats_socket: Path, ports: dict[str, int],
                   retry_on: str) -> str:
    servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in ports.items())
    return f"""\
global
    # The runtime API: take a server out of rotation and back, read its state and sessions.
    stats socket {stats_socket} mode 600 level admin
    # One thread: the machine is small, and one is plenty for this load.
    nbthread 1
    # One line per request on stderr (a file): when a client sees a failure, this says what
    # HAProxy saw (termination flags, retries; a `+` before the retry count marks a redispatch).
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    # Loopback connects complete at once. This also bounds the turn-around delay HAProxy waits
    # before a retry (min(timeout connect, 1 s)), which would otherwise add 1 s to the latency of
    # a request retried after a refused connect.
    timeout connect 100ms
    # Long enough never to cut a request or close an idle client connection during the test:
    # every failure a client sees must come from the replicas, not from these timers.
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    # Generous: with `fall 1` one slow answer on a busy machine would take a healthy replica out.
    timeout check 2s
    # A request whose connect to a replica is refused (its listener has just closed and no
    # health check has noticed yet) is retried, up to 3 times...
    retries 3
    # ...each time on another server (by default only the last retry would be): the refusing
    # replica is on its way out.
    option redispatch 1
    retry-on {retry_on}

frontend fe
    bind 127.0.0.1:{frontend_port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    # Readiness: a replica is in rotation while GET /health answers 200. From SIGTERM on, vsup
    # answers it 503 "draining" (its listener stays open until the drain ends; after that a
    # check's connect is refused): either takes the replica out.
    # Keep each request's body until the response starts, so that a 503 can be replayed.
    option http-buffer-request
    option httpchk GET /health
    http-check expect status 200
    # Check every 200 ms; one failed check takes a server out, one good check puts it back.
    default-server check inter 200ms fastinter 200ms downinter 200ms fall 1 rise 1
    # Which replica answered: lets the test see load reach a new replica.
    http-response set-header X-Served-By %s
{servers}
"""


def require_haproxy() -> None:
    if not (os.path.isfile(HAPROXY) and os.access(HAPROXY, os.X_OK)):
        pytest.fail(f"HAProxy is not installed at {HAPROXY}: this test runs it in front of the "
                    f"replicas (Debian: apt-get install haproxy; or set VSUP_HAPROXY)",
                    pytrace=False)


class HAProxy:
    """HAProxy in the foreground (`-db`), a child of the test, with its runtime API."""

    def __init__(self, tmp: Path, ports: dict[str, int], retry_on: str):
        self.port = free_port()
        self.stats_socket = tmp / "haproxy.sock"
        self.config = tmp / "haproxy.cfg"
        self.log_path = tmp / "haproxy.log"
        self.config.write_text(haproxy_config(self.port, self.stats_socket, ports, retry_on))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        require_haproxy()
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True,
                               text=True, timeout=10)
        assert check.returncode == 0, f"haproxy -c rejected the config:\n{check.stdout}{check.stderr}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-f", str(self.config), "-db"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or self._answers(), 10,
                 "HAProxy's runtime API", self.log)
        assert self.proc.poll() is None, f"haproxy exited at start-up:\n{self.log()}"

    def _answers(self) -> bool:
        try:
            return "pxname" in self.command("show stat")
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One runtime API command; returns its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def set_state(self, server: str, state: str) -> None:
        answer = self.command(f"set server {BACKEND}/{server} state {state}")
        assert answer.strip() == "", f"set server {server} state {state}: {answer}"

    def stat(self, server: str) -> dict[str, str]:
        """The `show stat` row of SERVER: status (UP, DOWN, DRAIN, MAINT...), scur, chkdown..."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == BACKEND and row["svname"] == server:
                return row
        raise AssertionError(f"no server {BACKEND}/{server} in show stat:\n{text}")

    def log(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "--- haproxy log (last 40 lines):\n" + "\n".join(lines[-40:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # hard stop: the test is over
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Replica:
    """The replica behind HAProxy server NAME: a `vsup run` tree on a fixed port, replaceable."""

    def __init__(self, name: str, vsup_bin: str, tmp: Path):
        self.name, self.vsup_bin, self.tmp = name, vsup_bin, tmp
        self.port = free_port()
        self.generations: list[Serving] = []

    @property
    def current(self) -> Serving:
        return self.generations[-1]

    def start(self) -> None:
        d = self.tmp / f"{self.name}-{len(self.generations)}"
        d.mkdir()
        s = Serving(self.vsup_bin, d)
        s.port = self.port  # the same address every generation, as a pod's Service port
        self.generations.append(s)
        s.start(*REPLICA_ARGS)

    def stop_gracefully(self) -> tuple[float, int]:
        """SIGTERM; the tree must exit 0 with nothing left. Returns the seconds it took and the
        number of requests it had in flight (and drained)."""
        s = self.current
        t = time.monotonic()
        s.signal(signal.SIGTERM)
        try:
            code = s.wait_exit(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name}: vsup did not exit within 15 s of SIGTERM\n{s.stderr()}",
                        pytrace=False)
        took = time.monotonic() - t
        assert code == 0, f"{self.name}: vsup exited {code} after SIGTERM\n{s.stderr()}"
        wait_for(lambda: not s.leftovers(), 2.0, f"{self.name}: every process of the tree gone",
                 lambda: f"left: {[describe(p) for p in s.leftovers()]}\n{s.stderr()}")
        drained = re.search(r"\[shutdown\] api-server-0: draining (\d+) request", s.stderr())
        assert drained, f"{self.name}: no drain in the log\n{s.stderr()}"
        return took, int(drained.group(1))

    def kill_everything(self) -> None:
        for s in self.generations:
            s.kill_everything()


def wait_served(load: LoadGen, server: str, since: float, what: str, diag) -> None:
    """Waits until the load has had SERVED_BEFORE_NEXT_STEP good responses from SERVER, sent
    after SINCE."""
    wait_for(lambda: load.count(lambda r: r.ok and r.server == server and r.t0 >= since)
             >= SERVED_BEFORE_NEXT_STEP, STEP_TIMEOUT_S, what, diag)


def roll(haproxy: HAProxy, replica: Replica, load: LoadGen, variant: str, diag) -> dict:
    """Replaces REPLICA under load; returns the step timings (seconds) for the report."""
    name = replica.name
    steps: dict = {"replica": name}
    t = time.monotonic()
    if variant == "drain":
        # Out of rotation first: no new request goes to it, those under way go on.
        haproxy.set_state(name, "drain")
        wait_for(lambda: haproxy.stat(name)["scur"] == "0", STEP_TIMEOUT_S,
                 f"HAProxy to have no session left on {name}", diag)
        steps["drain_s"] = round(time.monotonic() - t, 3)
    downs = int(haproxy.stat(name)["chkdown"])
    took, steps["in_flight_at_sigterm"] = replica.stop_gracefully()
    steps["exit_s"] = round(took, 3)
    if variant == "drain":
        assert steps["in_flight_at_sigterm"] == 0, "HAProxy had no session, vsup had requests"

    t = time.monotonic()
    replica.start()
    steps["start_s"] = round(time.monotonic() - t, 3)
    # UP to the health check: "DRAIN" while still drained by hand (its checks go on), else "UP".
    expect = "DRAIN" if variant == "drain" else "UP"
    wait_for(lambda: haproxy.stat(name)["status"] == expect, STEP_TIMEOUT_S,
             f"HAProxy to see the new {name} {expect}", diag)
    steps["seen_up_s"] = round(time.monotonic() - t, 3)
    # Without a manual drain, the health check is what takes the replica out of rotation.
    steps["marked_down_by_check"] = int(haproxy.stat(name)["chkdown"]) > downs
    if variant == "drain":
        haproxy.set_state(name, "ready")
    back = time.monotonic()
    wait_served(load, name, back, f"the new {name} to serve load", diag)
    steps["serving_s"] = round(time.monotonic() - back, 3)
    return steps


def write_report(variant: str, report: dict) -> None:
    path = os.environ.get("VSUP_ROLL_REPORT")
    if not path:
        return
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        doc = {}
    doc[variant] = report
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------


class RequestsLost(AssertionError):
    """Some client saw a failed request, a connection error or an incomplete response."""


@pytest.mark.parametrize("variant", ["drain", "sigterm"])
def test_a_rolling_restart_behind_haproxy_loses_no_request(tmp_path, vsup_bin, variant):
    require_haproxy()
    replicas = {name: Replica(name, vsup_bin, tmp_path) for name in SERVERS}
    haproxy = HAProxy(tmp_path, {name: r.port for name, r in replicas.items()}, RETRY_ON[variant])
    load = LoadGen("127.0.0.1", haproxy.port, keep_alive_clients=KEEP_ALIVE_CLIENTS,
                   per_request_clients=PER_REQUEST_CLIENTS, model=MODEL, timeout_s=STEP_TIMEOUT_S)
    load_started = False
    lost: str | None = None  # what the clients saw, when some request was lost

    def diag() -> str:
        failed = [r for r in load.snapshot() if not r.ok][:10]
        return (haproxy.log() + "\n--- failed requests: " + repr(failed) + "\n" +
                "\n".join(f"--- {r.name} stderr:\n{r.current.stderr()[-3000:]}"
                          for r in replicas.values() if r.generations))

    try:
        for r in replicas.values():
            r.start()
        haproxy.start()
        for name in SERVERS:
            wait_for(lambda: haproxy.stat(name)["status"] == "UP", STEP_TIMEOUT_S,
                     f"HAProxy to see {name} UP", diag)

        load.start()
        load_started = True
        began = time.monotonic()
        for name in SERVERS:
            wait_served(load, name, began, f"{name} to serve load", diag)

        # The roll: the load runs from just before the first replica is taken out until the
        # last new one has served it.
        roll_start = time.monotonic()
        steps = [roll(haproxy, replicas[name], load, variant, diag)
                 for _ in range(ROUNDS) for name in SERVERS]
        roll_s = time.monotonic() - roll_start
        load.stop(STEP_TIMEOUT_S + 5)
        load_started = False

        stats = {name: haproxy.stat(name) for name in SERVERS}
        summary = summarize(load.snapshot())
        report = {
            "variant": variant,
            "roll_s": round(roll_s, 3),
            "steps": steps,
            "haproxy": {name: {"retries": int(s["wretr"]), "redispatches": int(s["wredis"]),
                               "sessions": int(s["stot"])} for name, s in stats.items()},
            **summary.as_dict(),
        }
        print(f"\nrolling restart ({variant}): {json.dumps(report, indent=2)}")
        write_report(variant, report)

        # The new trees stop as cleanly as the old ones did: exit 0, nothing left.
        for r in replicas.values():
            r.stop_gracefully()

        assert summary.requests > 0
        # Every replica, old and new, served: the load really went through the roll.
        assert all(summary.by_server.get(name, 0) >= 2 * SERVED_BEFORE_NEXT_STEP
                   for name in SERVERS), summary.by_server
        if summary.failures or summary.connection_errors:
            lost = (f"{summary.failures} of {summary.requests} requests failed "
                    f"({summary.connection_errors} connection errors, {summary.incomplete} "
                    f"incomplete, {summary.invalid} invalid):\n  " +
                    "\n  ".join(summary.first_failures) + "\n" + haproxy.log())
    finally:
        if load_started:
            load.stop(STEP_TIMEOUT_S + 5)
        haproxy.stop()
        for r in replicas.values():
            if r.generations and r.current.proc.poll() is None:
                r.current.signal(signal.SIGTERM)
                try:
                    r.current.wait_exit(15)
                except subprocess.TimeoutExpired:
                    pass
            r.kill_everything()

    # Nothing left behind (after a failure too): every tree of every generation, and HAProxy.
    reap_adopted()
    left = [describe(p) for r in replicas.values() for s in r.generations for p in s.leftovers()]
    assert not left, f"left behind: {left}"
    assert haproxy.proc.poll() is not None and not is_running(haproxy.proc.pid)
    # Zero failed requests, zero connection errors, every response whole.
    if lost is not None:
        raise RequestsLost(lost)
