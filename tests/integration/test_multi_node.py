"""Tensor parallelism across nodes, rehearsed on one machine: every node is a network namespace
with an address of its own (a veth pair to a bridge in the root namespace, on a /24 leased for
the run as the Kubernetes rehearsal leases one), running its own `vsup run` tree: the leader
(node 0: API server, engine-core, its ranks) and `vsup run --headless` workers (an agent and its
ranks). Each tree runs in its own session, so what it leaves behind is found by session, and
every process of the run is also looked for by the namespace it ran in.

What is checked: TP 2 as 2 nodes x 1 rank and TP 4 as 2 x 2 give the very text TP 1 gives on one
node (greedy and seeded); a clean SIGTERM of the leader, and SIGTERM of every root at once (a
LeaderWorkerSet rollout) with requests in flight, answer every client and end every root 0;
SIGKILL of a worker's root and SIGSTOP of its agent mid-decode are noticed within the heartbeat
bound, every client is told, the leader exits non-zero; SIGKILL of the leader makes the workers
stop their ranks and exit non-zero within a second of noticing; a worker that cannot reach the
leader fails its start, naming the address, within its start timeout. Needs root (network
namespaces); skipped loudly otherwise. Every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from k8s_rehearsal import HarnessError, SubnetLease, sh
from test_cpu_engine import kill_sessions, left_behind, session_processes
from test_serving import sse_events

MODEL = ("--engine", "cpu", "--model", "vsup-tiny-4m", "--kv-cache-memory", "32MiB")
# The sim engine's ranks share no collective: a stopped node is then found by the heartbeat
# alone (the CPU engine's collective timeout would find it too).
SIM = ("--engine", "sim", "--model", "vsup-tiny-4m", "--sim-token-ms", "5")
PORT = 8000          # every leader's HTTP port (each node has its own address)
MASTER_PORT = 29500  # the leader's engine-core, for the workers
HEARTBEAT_BOUND_S = 2.5  # RemoteNodes' defaults: a ping every 0.5 s, lost after 2 s unanswered
START_S = 60


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "not root: network namespaces and veth pairs need root"
    probe = f"mn{secrets.token_hex(3)}"
    try:
        sh(["ip", "netns", "add", probe])
        sh(["ip", "netns", "del", probe])
    except HarnessError as e:
        return f"network namespaces are unavailable here: {e}"
    return None


WHY_NOT = why_not()
needs_netns = pytest.mark.skipif(WHY_NOT is not None,
                                 reason=f"MULTI-NODE REHEARSAL SKIPPED: {WHY_NOT}")


class Node:
    """One node: a network namespace with an address, and the `vsup run` tree it runs."""

    def __init__(self, fabric: "Fabric", index: int):
        self.index = index
        self.ip = str(fabric.lease.network[10 + index])
        self.netns = f"{fabric.tag}-n{index}"
        self.veth = f"{fabric.tag}v{index}"
        self.dir = fabric.tmp / f"node-{index}"
        self.dir.mkdir()
        self.log = self.dir / "vsup.log"
        self.proc: subprocess.Popen | None = None
        sh(["ip", "netns", "add", self.netns])
        sh(["ip", "-batch", "-"], input=(
            f"link add {self.veth} type veth peer name eth0 netns {self.netns}\n"
            f"link set {self.veth} master {fabric.bridge} up\n"))
        sh(["ip", "-n", self.netns, "-batch", "-"], input=(
            f"addr add {self.ip}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"))

    def start(self, vsup: str, *args: str, env: dict | None = None) -> None:
        argv = ["ip", "netns", "exec", self.netns, vsup, "run", "--control-socket",
                str(self.dir / "ctl.sock"), *args]
        with open(self.log, "wb") as out:
            # `ip netns exec` execs vsup: this pid is the root's, and its session id.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, env={**os.environ, **(env or {})})

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {self.index} did not exit within {timeout}s:\n{self.text()[-3000:]}",
                        pytrace=False)

    def processes(self, subcommand: str) -> list[int]:
        """The pids of this node's tree running `vsup SUBCOMMAND` (e.g. "__worker")."""
        found = []
        for p in session_processes(self.proc.pid):
            try:
                if subcommand.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    found.append(p)
            except OSError:
                continue  # gone meanwhile
        return found

    def pids_in_netns(self) -> list[str]:
        """Every process still in this node's network namespace."""
        try:
            ino = os.stat(f"/run/netns/{self.netns}").st_ino
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                    found.append(f"{entry}: {Path(f'/proc/{entry}/cmdline').read_bytes()!r}")
            except OSError:
                continue
        return found

    # HTTP, the leader only; every call on a new connection with a timeout.
    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.ip, PORT, timeout=timeout)

    def health(self) -> int:
        try:
            c = self.connect(2)
            c.request("GET", "/health")
            status = c.getresponse().status
            c.close()
            return status
        except OSError:
            return 0

    def complete(self, body: dict) -> tuple[int, dict]:
        c = self.connect()
        c.request("POST", "/v1/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data)


class Fabric:
    """The run's bridge and its nodes; close() removes every namespace, link and process."""

    def __init__(self, vsup: str, tmp: Path):
        self.vsup = vsup
        self.tmp = tmp
        self.tag = f"mn{secrets.token_hex(2)}"
        self.bridge = f"{self.tag}br"
        self.lease = SubnetLease()
        self.nodes: list[Node] = []
        sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        sh(["ip", "addr", "add", f"{self.lease.network[1]}/24", "dev", self.bridge])
        sh(["ip", "link", "set", self.bridge, "up"])

    def node(self) -> Node:
        n = Node(self, len(self.nodes))
        self.nodes.append(n)
        return n

    def group(self, nnodes: int, tp: int, *extra: str, model=MODEL,
              env: dict | None = None) -> list[Node]:
        """A leader and nnodes - 1 headless workers, the workers first (they wait for the
        leader), each given the same model flags; returns once the leader's /health is 200."""
        nodes = [self.node() for _ in range(nnodes)]
        leader = nodes[0]
        common = [*model, "--tensor-parallel-size", str(tp), "--nnodes", str(nnodes),
                  "--master-addr", leader.ip, "--master-port", str(MASTER_PORT),
                  "--collective-timeout-ms", "3000", *extra]
        for n in nodes[1:]:
            n.start(self.vsup, "--headless", "--node-rank", str(n.index - leader.index),
                    *common, env=env)
        leader.start(self.vsup, "--host", leader.ip, "--port", str(PORT), *common, env=env)
        wait_for(lambda: leader.health() == 200 or leader.proc.poll() is not None, START_S,
                 "the leader's /health to answer 200",
                 lambda: "\n".join(n.text()[-2000:] for n in nodes))
        assert leader.proc.poll() is None, leader.text()
        return nodes

    def left_behind(self) -> list[str]:
        sids = {n.proc.pid for n in self.nodes if n.proc is not None}
        problems = left_behind(sids, set())
        for n in self.nodes:
            problems += [f"node {n.index}: {p}" for p in n.pids_in_netns()]
        return problems

    def close(self) -> None:
        sids = {n.proc.pid for n in self.nodes if n.proc is not None}
        pids = set()
        for sid in sids:
            pids |= set(session_processes(sid))
        kill_sessions(sids, pids, self.vsup)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            sh(["ip", "netns", "del", n.netns], check=False)
            sh(["ip", "link", "del", n.veth], check=False)
        sh(["ip", "link", "del", self.bridge], check=False)
        self.lease.release()


@pytest.fixture
def fabric(tmp_path, vsup_bin):
    f = Fabric(vsup_bin, tmp_path)
    try:
        yield f
    finally:
        f.close()


def greedy(prompt: str, n: int) -> dict:
    return {"model": "vsup-tiny-4m", "prompt": prompt, "max_tokens": n, "temperature": 0}


def seeded(prompt: str, n: int, seed: int) -> dict:
    return {"model": "vsup-tiny-4m", "prompt": prompt, "max_tokens": n, "temperature": 0.8,
            "seed": seed}


REQUESTS = [greedy("Once upon a time", 24), greedy("1 2 3", 16), seeded("abc", 24, 5)]


def texts(node: Node) -> list[str]:
    out = []
    for body in REQUESTS:
        status, doc = node.complete(body)
        assert status == 200, doc
        out.append(doc["choices"][0]["text"])
    return out


class Stream(threading.Thread):
    """A streaming completion read to its end: its status, events and the error that ended it."""

    def __init__(self, node: Node, body: dict):
        super().__init__(daemon=True)
        self.node, self.body = node, {**body, "stream": True}
        self.events: list = []
        self.status = None
        self.error = None
        self.started = threading.Event()

    def run(self):
        try:
            c = self.node.connect(60)
            c.request("POST", "/v1/completions", body=json.dumps(self.body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            self.status = r.status
            for event in sse_events(r):
                self.events.append(event)
                self.started.set()
        except Exception as e:  # noqa: BLE001 - asserted on by the test
            self.error = e
        finally:
            self.started.set()

    def finish(self):
        reasons = [e["choices"][0]["finish_reason"] for e in self.events
                   if isinstance(e, dict) and e.get("choices")]
        return reasons[-1] if reasons else None

    def told_error(self) -> bool:
        """The stream ended with an error event (or a final error chunk) the client can read."""
        return any(isinstance(e, dict) and ("error" in e or (
            e.get("choices") and e["choices"][0].get("finish_reason") == "error"))
            for e in self.events)


def streams_in_flight(leader: Node, n: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(leader, greedy(f"Once upon a time {i}", max_tokens)) for i in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30), "a stream sent nothing within 30 s"
    for s in streams:
        assert s.status == 200 and s.events, (s.status, s.error, leader.text()[-2000:])
    return streams


def assert_nothing_left(fabric: Fabric) -> None:
    wait_for(lambda: not fabric.left_behind(), 3.0, "every process of every node to be gone",
             lambda: "\n".join(fabric.left_behind()))


# ---------------------------------------------------------------------------------------------


@needs_netns
def test_tp_across_nodes_gives_the_text_of_tp_1_and_a_leader_sigterm_ends_every_root_0(fabric):
    solo = fabric.node()
    solo.start(fabric.vsup, "--host", solo.ip, "--port", str(PORT), *MODEL)
    wait_for(lambda: solo.health() == 200 or solo.proc.poll() is not None, START_S,
             "the one-node tree's /health", solo.text)
    want = texts(solo)
    solo.proc.send_signal(signal.SIGTERM)
    assert solo.wait_exit(30) == 0, solo.text()

    for nnodes, tp in ((2, 2), (2, 4)):
        nodes = fabric.group(nnodes, tp)
        leader, worker = nodes
        assert texts(leader) == want, (nnodes, tp)
        # The leader's `vsup tree` shows the other node with its ranks.
        tree = subprocess.run([fabric.vsup, "tree", "--json", "--socket",
                               str(leader.dir / "ctl.sock")], capture_output=True, text=True,
                              timeout=10)
        assert tree.returncode == 0, tree.stderr
        assert f"node-1 ({worker.ip})" in tree.stdout, tree.stdout
        assert f"worker-tp{tp - 1}" in tree.stdout, tree.stdout
        t0 = time.monotonic()
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.wait_exit(30) == 0, leader.text()
        assert worker.wait_exit(10) == 0, worker.text()
        assert time.monotonic() - t0 < 15
        assert "released by the leader" in worker.text()
        assert_nothing_left(fabric)


@needs_netns
def test_sigterm_to_every_root_at_once_finishes_what_is_in_flight_and_ends_them_0(fabric):
    # NCCL's interface choice (and any other variable of the pod) reaches every rank.
    leader, worker = fabric.group(2, 2, "--shutdown-timeout", "20",
                                  env={"NCCL_SOCKET_IFNAME": "eth0"})
    for node in (leader, worker):
        ranks = node.processes("__worker")
        assert ranks
        for p in ranks:
            assert b"NCCL_SOCKET_IFNAME=eth0\0" in Path(f"/proc/{p}/environ").read_bytes()
    streams = streams_in_flight(leader, 3, 160)
    # A LeaderWorkerSet rollout: every pod of the group is signalled at the same moment.
    worker.proc.send_signal(signal.SIGTERM)
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.wait_exit(60) == 0, leader.text()
    assert worker.wait_exit(20) == 0, worker.text()
    for s in streams:
        s.join(10)
        assert not s.is_alive()
        assert s.error is None, s.error
        assert s.finish() == "length", (s.finish(), s.events[-3:])
        assert s.events[-1] == "[DONE]"
    assert "deferring: serving the leader's collectives" in worker.text(), worker.text()[-2000:]
    assert_nothing_left(fabric)


@needs_netns
@pytest.mark.parametrize("how", ["sigkill-root", "sigstop-agent", "sigstop-agent-sim",
                                 "sigkill-rank", "sigstop-rank"])
def test_a_worker_node_lost_mid_decode_fails_the_engine_within_the_heartbeat_bound(fabric, how):
    leader, worker = fabric.group(2, 2, model=SIM if how.endswith("-sim") else MODEL)
    streams = streams_in_flight(leader, 2, 1500)
    if how == "sigkill-root":
        # The root, then its whole session as a node that loses power would: nothing of it is
        # left to close connections in order.
        victims = sorted(session_processes(worker.proc.pid))
        for p in victims:
            os.kill(p, signal.SIGKILL)
    elif how.endswith("-rank"):
        rank = worker.processes("__worker")
        assert len(rank) == 1
        os.kill(rank[0], signal.SIGKILL if how == "sigkill-rank" else signal.SIGSTOP)
    else:  # sigstop-agent*
        agent = worker.processes("__node-agent")
        assert len(agent) == 1
        os.kill(agent[0], signal.SIGSTOP)
    t0 = time.monotonic()
    code = leader.wait_exit(HEARTBEAT_BOUND_S + 15)
    took = time.monotonic() - t0
    assert code != 0, leader.text()
    log = leader.text()
    if how == "sigstop-agent-sim":
        assert "node-1" in log and "no answer to a heartbeat" in log, log[-3000:]
    else:
        assert "node-1" in log or "lost the connection" in log, log[-3000:]
    for s in streams:
        s.join(10)
        assert not s.is_alive()
        # Told: an error the client can read, never a stream that just stops.
        assert s.told_error() or s.error is not None, s.events[-3:]
        assert s.finish() != "length"
    # Noticed within the heartbeat bound (a killed node's connections close at once; a stopped
    # one answers no heartbeat), then the leader stops its own ranks.
    assert took < HEARTBEAT_BOUND_S + 5, (took, log[-3000:])
    if how.startswith("sigstop-agent"):
        agent_pid = agent[0]
        os.kill(agent_pid, signal.SIGCONT)
        # Woken, the agent finds its leader gone and ends its node, non-zero.
        assert worker.wait_exit(10) != 0, worker.text()
    else:
        # The worker's agent finds its rank dead, or its leader gone, and ends its node.
        assert worker.wait_exit(10) != 0, worker.text()
    assert_nothing_left(fabric)


@needs_netns
@pytest.mark.parametrize("what", ["its-whole-tree", "its-root"])
def test_sigkill_of_the_leader_stops_every_worker_within_a_second_of_noticing(fabric, what):
    leader, worker = fabric.group(2, 2)
    streams_in_flight(leader, 1, 1500)
    # Its whole tree (as a node that loses power), or its root alone: then engine-core finds its
    # parent gone, tears down and releases the worker as failed on its way out.
    victims = sorted(session_processes(leader.proc.pid)) if what == "its-whole-tree" \
        else [leader.proc.pid]
    for p in victims:
        os.kill(p, signal.SIGKILL)
    t0 = time.monotonic()
    code = worker.wait_exit(HEARTBEAT_BOUND_S + 1 + 5)
    took = time.monotonic() - t0
    log = worker.text()
    assert code != 0, log
    assert "lost the leader" in log or "the leader's engine failed" in log, log[-2000:]
    assert took < HEARTBEAT_BOUND_S + 1, (took, log[-2000:])
    leader.wait_exit(5)
    assert_nothing_left(fabric)


@needs_netns
def test_a_worker_that_cannot_reach_the_leader_fails_its_start_naming_the_address(fabric):
    worker = fabric.node()
    nobody = str(fabric.lease.network[200])  # on the bridge's subnet, no node has it
    t0 = time.monotonic()
    worker.start(fabric.vsup, "--headless", "--node-rank", "1", *MODEL,
                 "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", nobody,
                 "--master-port", str(MASTER_PORT), "--engine-start-timeout", "2")
    code = worker.wait_exit(20)
    took = time.monotonic() - t0
    assert code == 3, worker.text()
    assert f"cannot reach the leader at {nobody}:{MASTER_PORT}" in worker.text(), worker.text()
    assert took < 12, took
    assert_nothing_left(fabric)


@needs_netns
def test_a_leader_whose_workers_never_join_fails_its_start_naming_them(fabric):
    leader = fabric.node()
    leader.start(fabric.vsup, "--host", leader.ip, "--port", str(PORT), *MODEL,
                 "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", leader.ip,
                 "--master-port", str(MASTER_PORT), "--worker-start-timeout", "2")
    code = leader.wait_exit(30)
    assert code == 3, leader.text()
    assert "node(s) 1 did not join the leader" in leader.text(), leader.text()[-2000:]
    assert "--headless --node-rank N" in leader.text()
    assert_nothing_left(fabric)


# ---------------------------------------------------------------------------------------------
# The flags, and LeaderWorkerSet's variables standing in for them (no namespaces needed)


def run_briefly(vsup: str, tmp: Path, *args: str, env: dict | None = None,
                timeout: float = 30) -> tuple[int, str]:
    """`vsup run ARGS` expected to exit by itself: (status, stderr); nothing of it may be left."""
    p = subprocess.Popen([vsup, "run", "--control-socket", str(tmp / "ctl.sock"), *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("LWS_")},
                              **(env or {})})
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_sessions({p.pid}, {p.pid}, vsup)
        p.communicate()
        pytest.fail(f"vsup run {' '.join(args)} did not exit within {timeout}s", pytrace=False)
    # Its whole session is gone with it (start_new_session: the root's pid is the session id).
    wait_for(lambda: not left_behind({p.pid}, set()), 2, "every process of the run to be gone",
             lambda: "\n".join(left_behind({p.pid}, set())))
    return p.returncode, err


@pytest.mark.parametrize("args,env,says", [
    (["--headless", "--tensor-parallel-size", "2"], {},
     "--headless needs --nnodes > 1"),
    (["--nnodes", "2", "--tensor-parallel-size", "2", "--master-addr", "127.0.0.1",
      "--node-rank", "1"], {}, "--node-rank 1 without --headless"),
    (["--nnodes", "2", "--tensor-parallel-size", "2", "--master-addr", "127.0.0.1",
      "--headless"], {}, "--headless with --node-rank 0"),
    (["--nnodes", "2", "--tensor-parallel-size", "3", "--master-addr", "127.0.0.1"], {},
     "--tensor-parallel-size 3 is not a multiple of --nnodes 2"),
    (["--nnodes", "2", "--tensor-parallel-size", "2"], {}, "needs --master-addr"),
    (["--nnodes", "2", "--tensor-parallel-size", "2", "--master-addr", "127.0.0.1",
      "--node-rank", "2", "--headless"], {}, "--node-rank 2 with --nnodes 2"),
    (["--tensor-parallel-size", "2", "--headless"], {"LWS_GROUP_SIZE": "two"},
     "LWS_GROUP_SIZE='two': must be a whole number 1..64"),
    (["--tensor-parallel-size", "2", "--headless"],
     {"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "-1"}, "LWS_WORKER_INDEX='-1'"),
    (["--kv-connector", "vsup", "--nnodes", "2", "--tensor-parallel-size", "2",
      "--master-addr", "127.0.0.1"], {}, "--kv-connector vsup with --nnodes 2"),
])
def test_multi_node_flags_that_cannot_work_are_usage_errors_naming_the_flag(vsup_bin, tmp_path,
                                                                             args, env, says):
    code, err = run_briefly(vsup_bin, tmp_path, "--port", "0", *MODEL[2:4], *args, env=env)
    assert code == 2, err
    assert says in err, err


def test_the_cuda_engine_across_nodes_gets_as_far_as_the_device(vsup_bin, tmp_path):
    """No GPU here: the leader's own rank fails its start naming the missing device (a build
    without nvcc refuses the engine instead). The NCCL id travels in the ranks' configuration,
    which the leader hands every node."""
    code, err = run_briefly(vsup_bin, tmp_path, "--port", "0", "--engine", "cuda", "--nnodes",
                            "2", "--tensor-parallel-size", "2", "--master-addr", "127.0.0.1",
                            "--master-port", "29531")
    if code == 2:
        assert "built without it" in err, err
        pytest.skip("CUDA ENGINE NOT BUILT: nvcc was not found at build time")
    assert code == 3, err
    assert "no CUDA device" in err or "libnccl" in err, err


def test_leader_worker_set_variables_stand_in_for_the_absent_flags(vsup_bin, tmp_path):
    # A worker whose leader is LWS_LEADER_ADDRESS and whose node rank is LWS_WORKER_INDEX: it
    # tries that address (nobody listens: a refused connect, retried until the start timeout)
    # and says so. A flag given wins over its variable.
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody will listen on it
    env = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    t0 = time.monotonic()
    code, err = run_briefly(vsup_bin, tmp_path, *MODEL, "--headless", "--tensor-parallel-size",
                            "2", "--master-port", str(port), "--engine-start-timeout", "1",
                            env=env)
    assert code == 3, err
    assert f"cannot reach the leader at 127.0.0.1:{port}" in err, err
    assert "connection refused" in err.lower(), err
    assert "node 1 of 2" in err, err
    assert time.monotonic() - t0 < 15


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@needs_netns
def test_a_second_node_with_a_taken_rank_and_junk_on_the_master_port_leave_the_group_serving(
        fabric):
    leader, worker = fabric.group(2, 2, model=SIM)
    core = leader.processes("__engine-core")
    assert len(core) == 1
    before = fd_count(core[0])
    # Junk, as a port scanner or a confused client would send: each connection is closed by the
    # leader (its RPC link fails), none is kept.
    for i in range(20):
        r = subprocess.run(["ip", "netns", "exec", worker.netns, "python3", "-c",
                            "import socket; s=socket.create_connection(('%s', %d), 5); "
                            "s.sendall(b'GET / HTTP/1.1\\r\\n\\r\\n' * %d); s.close()"
                            % (leader.ip, MASTER_PORT, i + 1)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
    wait_for(lambda: fd_count(core[0]) <= before, 5, "the junk connections to be closed",
             lambda: f"engine-core holds {fd_count(core[0])} fds, {before} before")
    # A node that claims a rank already taken is refused by name; the group goes on.
    twin = fabric.node()
    twin.start(fabric.vsup, "--headless", "--node-rank", "1", *SIM, "--tensor-parallel-size",
               "2", "--nnodes", "2", "--master-addr", leader.ip, "--master-port",
               str(MASTER_PORT))
    assert twin.wait_exit(20) == 3, twin.text()
    assert "has already joined" in twin.text() and "same --node-rank" in twin.text(), twin.text()
    assert leader.health() == 200
    status, doc = leader.complete({"model": "vsup-tiny-4m", "prompt": "hi", "max_tokens": 4})
    assert status == 200, doc
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.wait_exit(30) == 0, leader.text()
    assert worker.wait_exit(10) == 0, worker.text()
    assert_nothing_left(fabric)
