"""A rehearsal, on one machine with real parts, of what a Kubernetes cluster does to `vsup run`.

What stands in for what:

- A pod is a network namespace with its own address (a veth pair to a bridge in the root
  namespace, which plays the node) running `vsup run --engine sim` as PID 1 of its own PID
  namespace (`ip netns exec NS unshare --pid --fork --mount-proc vsup run ...`), as a container's
  entrypoint is.
- The Service is what kube-proxy writes in iptables mode: a virtual IP:port in nat OUTPUT
  jumping to a chain per service, with one `-m statistic --mode random --probability 1/(n-i)`
  rule per endpoint, each to an endpoint chain that DNATs to the pod. Every change is written in
  one `iptables-restore --noflush` (the chains are declared, hence flushed, and refilled in the
  same transaction; stale endpoint chains are deleted in it); conntrack keeps an established
  connection on its pod when the rules change, as in a cluster. With no endpoint the filter
  table rejects the virtual IP (kube-proxy's "has no endpoints" rule).
- The kubelet's probes: readiness (GET /health every `period` s, failureThreshold 2,
  successThreshold 1) from start until the pod exits, and liveness (GET /live, same period,
  failureThreshold 3) from its first good readiness probe on (as behind a startupProbe).
- The endpoint controller + kube-proxy: the Service's endpoints are the ready, not terminating
  pods, each change applied `lag` s after it happened (the propagation and sync delay).
- The kubelet deleting a pod: marks it terminating, runs the preStop hook (`vsup drain`, exec'd
  in the pod's network, PID and mount namespaces), then SIGTERM to the pod's PID 1 and SIGKILL
  at terminationGracePeriodSeconds counted from the deletion; records exit status and times.
- An endpoint picker (the inference gateway's EPP): scrapes every ready pod's /metrics and
  /health every 50 ms and sends each request it is asked about to the ready pod with the least
  `vllm:num_requests_running + vllm:num_requests_waiting` (ties round-robin), never to one whose
  /health said 503 or that is terminating.
- Prometheus: every pod's /metrics scraped every 100 ms from start to exit (the drain included).
- A sampler reads the state of every process of every pod's PID namespace every 100 ms
  (zombies, counts) and, after a pod's PID 1 exited, checks its namespace is empty.
- Load: closed-loop client threads, half through the Service's virtual IP, half through the
  picker to the chosen pod's address, a new connection per request (as a router's fresh
  connections), plain and streaming completions; any non-200, reset, timeout or truncated
  stream is a failure, nothing is retried.

Everything of one run is named after a random run id (interfaces `kr<id>...`, namespaces
`kr<id>-pod<n>`, chains `KR<ID>-...`), on a /24 that overlaps nothing on the machine and is
leased by binding an abstract Unix socket named after it (freed by the kernel if the run
crashes), so parallel runs and leftovers of a crashed run cannot collide. `Cluster.close()`
tears everything down (it is safe at any point, also after a failure) and `leftovers()` says
what is still there.

Threads: the Cluster's background threads (controller, probers, scrapers, picker, sampler,
watchdog, one per deletion) share state under `Cluster.lock`; the test drives it from its own
thread. Every wait has a deadline, every subprocess and socket a timeout, and a watchdog
SIGKILLs every pod once the run's hard deadline passes, so nothing can hang. Needs root.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

import conftest

# The suite's own definition of a whole completion (loadgen.py): a plain one has a
# finish_reason and no error; a stream's events are valid JSON, one carries a finish_reason and
# the last is [DONE].
from loadgen import _check_completion, _check_stream, _Invalid

POD_PORT = 8000
SERVICE_PORT = 80
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
DRAINING = "vsup_draining"
REQUESTS_TOTAL = "vsup_requests_total"


@dataclass(frozen=True)
class Timing:
    """The cluster's clocks, each derived from the probe period and the endpoint lag.

    A router that only follows readiness stops sending to a draining pod at the latest
        failure_threshold * period   (the probe after the drain began, then one more: 2 x 0.2 s)
      + lag                          (endpoints -> kube-proxy / router: 0.3 s)
      = 0.7 s after the preStop hook started, so the drain's quiet window must be longer than that
    or the drain could end while requests are still arriving:
        quiet_for = lag + failure_threshold * period + margin = 0.3 + 0.4 + 0.3 = 1.0 s.
    The drain then ends at the latest 0.7 + 1.0 = 1.7 s after it began; its bound adds a second
    for a loaded 2-core machine:  drain_timeout = 0.7 + 1.0 + 1.0 = 2.7 s.
    After SIGTERM only in-flight requests remain (none after a quiet drain; a completion here
    lasts 0.1-0.2 s); --shutdown-timeout bounds them: 2 s. The grace period covers the drain's
    bound, the shutdown and a second:  grace = 2.7 + 2.0 + 1.0 = 5.7 s.
    A pod is expected to exit about lag + quiet_for = 1.3 s after its deletion.
    """
    period: float = 0.2
    failure_threshold: int = 2
    success_threshold: int = 1
    liveness_failure_threshold: int = 3
    probe_timeout: float = 0.5
    lag: float = 0.3
    margin: float = 0.3
    shutdown_timeout: float = 2.0
    picker_interval: float = 0.05
    scrape_interval: float = 0.1
    sample_interval: float = 0.1
    token_ms: int = 20  # the sim engine's step: a 4-token completion ~0.1 s, 8 tokens ~0.2 s

    @property
    def readiness_detection(self) -> float:
        return self.failure_threshold * self.period

    @property
    def quiet_for(self) -> float:
        return round(self.lag + self.readiness_detection + self.margin, 3)

    @property
    def drain_timeout(self) -> float:
        return round(self.lag + self.readiness_detection + self.quiet_for + 1.0, 3)

    @property
    def grace(self) -> float:
        return round(self.drain_timeout + self.shutdown_timeout + 1.0, 3)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(readiness_detection=self.readiness_detection, quiet_for=self.quiet_for,
                 drain_timeout=self.drain_timeout, grace=self.grace)
        return d


class HarnessError(RuntimeError):
    """The rehearsal could not do what it was asked (not a finding about vsup)."""


def now() -> float:
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# Commands


def still_exiting(pid: int) -> bool:
    """True while a zombie's other threads have not all exited yet (not reapable yet)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def sh(argv: list[str], *, input: str | None = None, timeout: float = 10.0,
       check: bool = True) -> subprocess.CompletedProcess:
    """Runs ARGV to its end (at most TIMEOUT s); raises HarnessError if it fails and CHECK."""
    try:
        r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL if input is None else None)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    except OSError as e:
        raise HarnessError(f"`{' '.join(argv)}` could not run: {e}") from None
    if check and r.returncode != 0:
        raise HarnessError(f"`{' '.join(argv)}` exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


TOOLS = ("ip", "unshare", "nsenter", "iptables", "iptables-save", "iptables-restore")


def preflight() -> str | None:
    """Why this machine cannot run the rehearsal, or None when it can."""
    if os.geteuid() != 0:
        return ("not root (euid %d): network namespaces, veths, a bridge and iptables rules "
                "need root" % os.geteuid())
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (Debian: iproute2, util-linux, iptables)"
    probe = f"kr{secrets.token_hex(3)}chk"
    try:
        sh(["ip", "netns", "add", probe])
    except HarnessError as e:
        return f"network namespaces are unavailable here: {e}"
    try:
        sh(["ip", "netns", "exec", probe, "unshare", "--pid", "--fork", "--mount-proc", "true"])
        sh(["ip", "link", "add", probe, "type", "bridge"])
        sh(["ip", "link", "del", probe])
        sh(["iptables", "-t", "nat", "-S", "OUTPUT"])
        sh(["iptables", "-t", "filter", "-S", "OUTPUT"])
    except HarnessError as e:
        return f"this machine cannot host the rehearsal: {e}"
    finally:
        sh(["ip", "link", "del", probe], check=False)
        sh(["ip", "netns", "del", probe], check=False)
    return None


# ---------------------------------------------------------------------------------------------
# HTTP: every call on a new connection, with a timeout


def http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def error_text(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    return f"{type(e).__name__}: {e}"


@dataclass
class Metrics:
    running: float | None  # None: the pod does not export the gauge (for this model)
    waiting: float | None
    kv_usage: float | None
    draining: float | None
    requests_total: float | None

    @property
    def load(self) -> float | None:
        """What the picker compares: running + waiting, None without both gauges."""
        return None if self.running is None or self.waiting is None else self.running + self.waiting


def parse_metrics(text: str, model: str) -> Metrics:
    """The gauges a router reads, from Prometheus text (ValueError when it does not parse)."""
    running = waiting = kv = draining = total = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (RUNNING, WAITING, KV_USAGE):
                if s.labels.get("model_name") != model:
                    continue
                if s.name == RUNNING:
                    running = (running or 0.0) + s.value
                elif s.name == WAITING:
                    waiting = (waiting or 0.0) + s.value
                else:
                    kv = s.value if kv is None else max(kv, s.value)
            elif s.name == DRAINING:
                draining = s.value if draining is None else max(draining, s.value)
            elif s.name == REQUESTS_TOTAL:
                total = (total or 0.0) + s.value
    return Metrics(running, waiting, kv, draining, total)


# ---------------------------------------------------------------------------------------------
# Processes


def pidfd_exited(fd: int, timeout: float) -> bool:
    """True once the process behind pidfd FD has exited (waits at most TIMEOUT s)."""
    r, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return bool(r)


def child_pid(ppid: int) -> int | None:
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def scan_pid_namespaces(wanted: set[int]) -> dict[int, list[tuple[int, str, str, int]]]:
    """{pid-namespace inode: [(pid, state, comm, starttime)]} for the namespaces in WANTED."""
    out: dict[int, list[tuple[int, str, str, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ino = os.stat(f"/proc/{entry}/ns/pid").st_ino
            if ino not in wanted:
                continue
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue  # gone meanwhile
        close = data.rindex(")")
        comm = data[data.index("(") + 1:close]
        fields = data[close + 2:].split()
        out.setdefault(ino, []).append((int(entry), fields[0], comm, int(fields[19])))
    return out


def cmdline(pid: int) -> str:
    return conftest.cmdline(pid, gone="")  # "": a gone process matches no pattern


# ---------------------------------------------------------------------------------------------
# The /24


def used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    addrs = sh(["ip", "-4", "-o", "addr", "show"]).stdout
    for line in addrs.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    routes = sh(["ip", "-4", "route", "show", "table", "all"]).stdout
    kinds = {"local", "broadcast", "unicast", "multicast", "anycast", "blackhole", "unreachable",
             "prohibit", "throw", "nat"}
    for line in routes.splitlines():
        parts = line.split()
        if parts and parts[0] in kinds:
            parts = parts[1:]
        if not parts or parts[0] == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(parts[0], strict=False))
        except ValueError:
            continue
    return nets


class SubnetLease:
    """A /24 under 10.231.0.0/16 that nothing on the machine uses, held for one run.

    Held by binding an abstract Unix socket named after it: another run in this network
    namespace cannot take the same one, and the kernel frees it when the holder dies."""

    def __init__(self) -> None:
        used = used_networks()
        slots = list(range(256))
        random.shuffle(slots)
        for s in slots:
            net = ipaddress.ip_network(f"10.231.{s}.0/24")
            if any(net.overlaps(u) for u in used):
                continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(f"\0vsup-k8s-rehearsal/{net}")
            except OSError:
                sock.close()
                continue
            self.network = net
            self._sock = sock
            return
        raise HarnessError("no free /24 under 10.231.0.0/16: every one overlaps a route or an "
                           "address of this machine, or is leased by another run")

    def release(self) -> None:
        self._sock.close()


# ---------------------------------------------------------------------------------------------
# The Service (kube-proxy, iptables mode)


class Service:
    """A ClusterIP service: VIP:SERVICE_PORT -> the endpoints' POD_PORT, by DNAT in nat OUTPUT."""

    def __init__(self, run_id: str, vip: str, comment: str):
        self.prefix = f"KR{run_id.upper()}"
        self.svc = f"{self.prefix}-SVC"
        self.fw = f"{self.prefix}-FW"
        self.vip = vip
        self.comment = comment
        self.seps: dict[str, str] = {}  # endpoint chain -> pod name, as written
        self._jumps = [
            ("nat", f"-A OUTPUT -d {vip}/32 -p tcp -m tcp --dport {SERVICE_PORT} "
                    f"-m comment --comment \"{comment}: cluster IP\" -j {self.svc}"),
            ("filter", f"-A OUTPUT -m comment --comment \"{comment}: no endpoints\" -j {self.fw}"),
        ]
        self.installed = False

    def _restore(self, text: str) -> None:
        sh(["iptables-restore", "--noflush"], input=text, timeout=10)

    def install(self) -> None:
        self._restore(f"*nat\n:{self.svc} - [0:0]\n{self._jumps[0][1]}\nCOMMIT\n"
                      f"*filter\n:{self.fw} - [0:0]\n{self._jumps[1][1]}\nCOMMIT\n")
        self.installed = True
        self.sync([])

    def sep_chain(self, index: int) -> str:
        return f"{self.prefix}-SEP{index}"

    def sync(self, endpoints: list[tuple[str, int, str]]) -> None:
        """Writes ENDPOINTS [(pod name, pod index, ip)] as the service's rules, atomically."""
        chains = {self.sep_chain(i): (name, ip) for name, i, ip in endpoints}
        declared = sorted(set(chains) | set(self.seps))  # declaring a chain flushes it
        nat = [f":{self.svc} - [0:0]"] + [f":{c} - [0:0]" for c in declared]
        n = len(endpoints)
        for k, (name, i, ip) in enumerate(endpoints):
            chain = self.sep_chain(i)
            pick = ("" if k == n - 1 else
                    f" -m statistic --mode random --probability {1.0 / (n - k):.10f}")
            nat.append(f"-A {self.svc} -m comment --comment \"{self.comment} -> {name}\"{pick} "
                       f"-j {chain}")
            nat.append(f"-A {chain} -p tcp -m tcp -j DNAT --to-destination {ip}:{POD_PORT}")
        nat += [f"-X {c}" for c in sorted(set(self.seps) - set(chains))]
        fw = [f":{self.fw} - [0:0]"]
        if not endpoints:
            fw.append(f"-A {self.fw} -d {self.vip}/32 -p tcp -m tcp --dport {SERVICE_PORT} "
                      f"-j REJECT --reject-with icmp-port-unreachable")
        self._restore("*nat\n" + "\n".join(nat) + "\nCOMMIT\n*filter\n" + "\n".join(fw) +
                      "\nCOMMIT\n")
        self.seps = {c: name for c, (name, _) in chains.items()}

    def uninstall(self) -> None:
        """Removes every rule and chain of the service (also after a partial install)."""
        for table, rule in self._jumps:
            sh(["iptables", "-t", table, "-D", *split_rule(rule[3:])], check=False)
        chains = [("nat", self.svc), ("filter", self.fw)] + [("nat", c) for c in self.seps]
        for table, chain in chains:
            sh(["iptables", "-t", table, "-F", chain], check=False)
        for table, chain in chains:
            sh(["iptables", "-t", table, "-X", chain], check=False)
        self.seps = {}
        self.installed = False


def split_rule(rule: str) -> list[str]:
    return shlex.split(rule)


# ---------------------------------------------------------------------------------------------
# Pods


@dataclass
class Probe:
    t: float
    kind: str  # "ready" (GET /health) or "live" (GET /live)
    status: int | None
    detail: str  # the body's start, or the error


@dataclass
class Scrape:
    t: float  # sent; the answer (or the failed connect) came between t and t_end
    ok: bool
    error: str | None = None
    metrics: Metrics | None = None
    t_end: float = 0.0


@dataclass
class Pod:
    name: str
    index: int
    generation: int
    ip: str
    netns: str
    veth: str
    socket: Path
    log: Path
    popen: subprocess.Popen | None = None
    pid: int = 0  # vsup's pid in the root PID namespace (PID 1 in its own)
    pidfd: int = -1
    pidns: int = 0  # inode of its PID namespace
    started_at: float = 0.0
    ready: bool = False
    ready_at: float | None = None
    in_endpoints_at: float | None = None
    removed_at: float | None = None  # left the Service's endpoints
    terminating: bool = False
    deleted_at: float | None = None
    prestop_start: float | None = None
    prestop_end: float | None = None
    prestop_rc: int | None = None
    prestop_output: str = ""
    sigterm_at: float | None = None
    exit_at: float | None = None
    # unshare's exit status: vsup's own, or -N when vsup died of a signal N that unshare can
    # raise again (not SIGKILL: unshare then exits 1; `killed` says when the kubelet sent it).
    exit_code: int | None = None
    killed: bool = False  # SIGKILLed at the end of the grace period
    probes: list[Probe] = field(default_factory=list)
    scrapes: list[Scrape] = field(default_factory=list)
    samples: int = 0
    max_procs: int = 0
    zombie_sightings: int = 0  # processes seen as zombies in one sample only
    zombies: list[str] = field(default_factory=list)  # zombies in two samples in a row
    left_after_exit: list[str] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)

    def __hash__(self) -> int:
        return hash(self.name)


@dataclass
class Decision:
    t: float
    chosen: str | None
    loads: dict[str, float]


class Picker:
    """The endpoint picker: least running + waiting among the ready pods, ties round-robin."""

    def __init__(self, cluster: "Cluster"):
        self.c = cluster
        # pod name -> (when scraped, /health status, running + waiting)
        self.state: dict[str, tuple[float, int | None, float | None]] = {}
        self.decisions: list[Decision] = []
        self.scrapes = 0
        self._rr = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        c = self.c
        while not c.stop.is_set():
            t0 = now()
            for pod in c.snapshot():
                if not pod.ready or pod.terminating or pod.exited.is_set():
                    with self._lock:
                        self.state.pop(pod.name, None)
                    continue
                health = load = None
                try:
                    health, _ = http_get(pod.ip, POD_PORT, "/health", c.timing.probe_timeout)
                    status, body = http_get(pod.ip, POD_PORT, "/metrics", c.timing.probe_timeout)
                    if status == 200:
                        load = parse_metrics(body.decode(errors="replace"), c.model).load
                except (OSError, http.client.HTTPException, ValueError):
                    pass
                with self._lock:
                    self.scrapes += 1
                    self.state[pod.name] = (now(), health, load)
            c.stop.wait(max(0.0, c.timing.picker_interval - (now() - t0)))

    def candidates(self) -> dict[str, float]:
        """{pod name: load} of the pods a request may go to now."""
        pods = {p.name: p for p in self.c.snapshot()}
        with self._lock:
            out = {}
            for name, (_, health, load) in self.state.items():
                p = pods.get(name)
                if (p is not None and p.ready and not p.terminating and not p.exited.is_set()
                        and health == 200 and load is not None):
                    out[name] = load
            return out

    def load_of(self, name: str) -> float | None:
        with self._lock:
            st = self.state.get(name)
            return None if st is None else st[2]

    def pick(self) -> Pod | None:
        loads = self.candidates()
        chosen = None
        with self._lock:
            if loads:
                low = min(loads.values())
                ties = sorted(n for n, v in loads.items() if v == low)
                chosen = ties[self._rr % len(ties)]
                self._rr += 1
            self.decisions.append(Decision(now(), chosen, loads))
        return None if chosen is None else self.c.pods[chosen]

    def decisions_between(self, t0: float, t1: float) -> list[Decision]:
        with self._lock:
            return [d for d in self.decisions if t0 <= d.t < t1]


# ---------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    """The node, its Service, the control plane's loops and the kubelet; see the module doc."""

    def __init__(self, vsup_bin: str, workdir: Path, *, timing: Timing = Timing(),
                 model: str = "rehearsal-sim", hard_deadline_s: float = 100.0):
        self.vsup_bin = os.path.realpath(vsup_bin)
        self.workdir = Path(workdir)
        self.timing = timing
        self.model = model
        self.run_id = secrets.token_hex(3)
        self.tag = f"kr{self.run_id}"  # interface names: at most 15 characters with a suffix
        self.bridge = f"{self.tag}br"
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.aborted: str | None = None
        self.errors: list[str] = []  # the harness could not do its job
        self.findings: list[str] = []  # what a kubelet would act on: liveness, unexpected exits
        self.pods: dict[str, Pod] = {}
        self.current: list[Pod] = []  # the Deployment's pods (not terminating)
        self.endpoint_history: list[tuple[float, tuple[str, ...]]] = []
        self.applied: tuple[str, ...] = ()
        self.sync_seconds: list[float] = []  # how long each iptables-restore took
        self.deletions: list[threading.Thread] = []
        self.picker = Picker(self)
        self.t0 = now()
        self.hard_deadline = self.t0 + hard_deadline_s
        self._threads: list[threading.Thread] = []
        self._next_index = 0
        self._lease: SubnetLease | None = None
        self._bridge_up = False
        self.service: Service | None = None
        self.pidns_seen: set[int] = set()
        self.closed = False
        sock = self.workdir / "pod-199.sock"
        if len(str(sock)) > 100:
            raise HarnessError(f"the work directory {self.workdir} is too long for the pods' "
                               f"control sockets (a Unix socket path holds 107 bytes)")

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lease = SubnetLease()
        net = self._lease.network
        self.network = str(net)
        self.gateway = str(net[1])
        self.vip = str(net[250])  # the ClusterIP: no interface has it, only the DNAT rules
        sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._bridge_up = True
        sh(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        sh(["ip", "link", "set", self.bridge, "up"])
        self.service = Service(self.run_id, self.vip, f"vsup-k8s-rehearsal {self.run_id}")
        self.service.install()
        self._spawn(self._controller, "controller")
        self._spawn(self._sampler, "sampler")
        self._spawn(self.picker.run, "picker")
        self._spawn(self._watchdog, "watchdog")

    def _spawn(self, target: Callable, name: str, *args) -> threading.Thread:
        def guarded():
            try:
                target(*args)
            except Exception:  # noqa: BLE001 - a harness thread's failure fails the run
                self.error(f"thread {name} failed:\n{traceback.format_exc()}")
        t = threading.Thread(target=guarded, name=f"k8s-{name}", daemon=True)
        with self.lock:
            self._threads.append(t)
        t.start()
        return t

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(f"+{now() - self.t0:.3f}s {text}")

    def finding(self, text: str) -> None:
        with self.lock:
            self.findings.append(f"+{now() - self.t0:.3f}s {text}")

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 3)

    def snapshot(self) -> list[Pod]:
        with self.lock:
            return list(self.pods.values())

    def abort(self, reason: str) -> None:
        """Stops everything now: every pod SIGKILLed, every wait fails."""
        with self.lock:
            if self.aborted is None:
                self.aborted = reason
        self.stop.set()
        for pod in self.snapshot():
            self._kill(pod)

    def _watchdog(self) -> None:
        while not self.stop.wait(0.1):
            if now() > self.hard_deadline:
                self.error(f"the run passed its hard deadline "
                           f"({self.hard_deadline - self.t0:.0f}s): every pod killed")
                self.abort("hard deadline passed")

    def close(self) -> None:
        """Tears everything down; safe to call at any point and more than once."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for pod in self.snapshot():
            if pod.popen is not None and not pod.exited.is_set():
                self._kill(pod)
        for pod in self.snapshot():
            if pod.popen is not None:
                try:
                    pod.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.error(f"{pod.name}: unshare (pid {pod.popen.pid}) still running 5s "
                               f"after its child's SIGKILL: killed")
                    try:
                        os.killpg(pod.popen.pid, signal.SIGKILL)
                        pod.popen.wait(5)
                    except (OSError, subprocess.TimeoutExpired):
                        pass
        with self.lock:
            threads = list(self._threads) + list(self.deletions)
        deadline = now() + 10
        for t in threads:
            t.join(max(0.0, deadline - now()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.error(f"harness threads still running 10s after stop: {stuck}")
        for pod in self.snapshot():
            self._unplug(pod)
            if pod.pidfd >= 0:
                os.close(pod.pidfd)
                pod.pidfd = -1
        if self.service is not None:
            self.service.uninstall()
        if self._bridge_up:
            sh(["ip", "link", "del", self.bridge], check=False)
            self._bridge_up = False
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def leftovers(self) -> list[str]:
        """Everything of this run still on the machine: namespaces, links, rules, processes."""
        problems = []
        for line in sh(["ip", "netns", "list"]).stdout.splitlines():
            if line.split() and line.split()[0].startswith(self.tag):
                problems.append(f"network namespace {line.split()[0]}")
        for line in sh(["ip", "-o", "link", "show"]).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(self.tag):
                problems.append(f"link {name}")
        prefix = f"KR{self.run_id.upper()}"
        for line in sh(["iptables-save"]).stdout.splitlines():
            if prefix in line or f"vsup-k8s-rehearsal {self.run_id}" in line:
                problems.append(f"iptables: {line}")
        ours = {os.getpid(), os.getppid()}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours:
                continue
            pid = int(entry)
            try:
                ino = os.stat(f"/proc/{pid}/ns/pid").st_ino
            except OSError:
                continue
            if ino in self.pidns_seen or str(self.workdir) in cmdline(pid):
                problems.append(f"process {pid}: {cmdline(pid)}")
        return problems

    # -- pods ------------------------------------------------------------------------------------

    def check(self) -> None:
        if self.aborted is not None:
            raise HarnessError(f"the run was aborted: {self.aborted}\n" + "\n".join(self.errors))

    def wait(self, predicate: Callable[[], object], timeout: float, what: str,
             diag: Callable[[], str] = lambda: ""):
        deadline = min(now() + timeout, self.hard_deadline)
        while True:
            self.check()
            v = predicate()
            if v:
                return v
            if now() >= deadline:
                raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}\n{diag()}")
            time.sleep(0.005)

    def start_pod(self, generation: int) -> Pod:
        self.check()
        with self.lock:
            n = self._next_index
            self._next_index += 1
        if n >= 200:
            raise HarnessError("more than 200 pods in one run")
        pod = Pod(name=f"pod-{n}", index=n, generation=generation,
                  ip=str(self._lease.network[10 + n]), netns=f"{self.tag}-pod{n}",
                  veth=f"{self.tag}v{n}", socket=self.workdir / f"pod-{n}.sock",
                  log=self.workdir / f"pod-{n}.log")
        with self.lock:
            self.pods[pod.name] = pod
        sh(["ip", "netns", "add", pod.netns])
        sh(["ip", "-batch", "-"], input=(
            f"link add {pod.veth} type veth peer name eth0 netns {pod.netns}\n"
            f"link set {pod.veth} master {self.bridge} up\n"))
        sh(["ip", "-n", pod.netns, "-batch", "-"], input=(
            f"addr add {pod.ip}/24 dev eth0\n"
            f"link set eth0 up\nlink set lo up\n"
            f"route add default via {self.gateway}\n"))
        t = self.timing
        argv = ["ip", "netns", "exec", pod.netns,
                "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                self.vsup_bin, "run", "--engine", "sim", "--model", self.model,
                "--sim-token-ms", str(t.token_ms), "--host", "0.0.0.0", "--port", str(POD_PORT),
                "--shutdown-timeout", str(t.shutdown_timeout),
                "--control-socket", str(pod.socket)]
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["XDG_RUNTIME_DIR"] = str(self.workdir)
        with open(pod.log, "wb") as out:
            pod.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        pod.started_at = now()
        # vsup is unshare's one child, born in the new PID namespace.
        pid = self.wait(lambda: child_pid(pod.popen.pid) or pod.popen.poll() is not None, 5,
                        f"{pod.name}: unshare to fork vsup", lambda: self.pod_log(pod))
        if pod.popen.poll() is not None:
            raise HarnessError(f"{pod.name}: exited {pod.popen.returncode} at once\n"
                               f"{self.pod_log(pod)}")
        pod.pid = pid
        pod.pidfd = os.pidfd_open(pid)
        pod.pidns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        with self.lock:
            self.pidns_seen.add(pod.pidns)
        with open(f"/proc/{pid}/status") as f:
            nspid = next((l.split()[1:] for l in f if l.startswith("NSpid:")), [])
        if nspid[-1:] != ["1"]:
            raise HarnessError(f"{pod.name}: vsup (pid {pid}) is not PID 1 of its namespace "
                               f"(NSpid {nspid})")
        self._spawn(self._watch, f"{pod.name}-exit", pod)
        self._spawn(self._prober, f"{pod.name}-probes", pod)
        self._spawn(self._scraper, f"{pod.name}-scrape", pod)
        return pod

    def pod_log(self, pod: Pod, lines: int = 30) -> str:
        try:
            text = pod.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"--- {pod.name}: no log"
        return f"--- {pod.name} log (last {lines} lines):\n" + "\n".join(text[-lines:])

    def _watch(self, pod: Pod) -> None:
        """Records the moment PID 1 exits and unshare's exit status (vsup's, or -signal)."""
        # close() SIGKILLs every pod before it joins this thread, so this ends.
        while not pidfd_exited(pod.pidfd, 0.2):
            pass
        t = now()
        try:
            code = pod.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.error(f"{pod.name}: unshare still running 5s after vsup (pid {pod.pid}) exited")
            return
        with self.lock:
            pod.exit_at, pod.exit_code, pod.ready = t, code, False
        # PID 1 is gone only after every other process of its namespace is: nothing may be left.
        left = scan_pid_namespaces({pod.pidns}).get(pod.pidns, [])
        pod.left_after_exit = [f"pid {p} {c} state {s}" for p, s, c, _ in left]
        pod.exited.set()
        if pod.deleted_at is None and not self.stop.is_set():
            self.finding(f"{pod.name} exited ({code}) without being deleted\n{self.pod_log(pod)}")

    def _kill(self, pod: Pod) -> None:
        """SIGKILL to the pod's PID 1: the kernel kills the rest of its PID namespace, unshare
        reaps it and exits. Only when PID 1 is not known yet does unshare get the SIGKILL (it
        would leave PID 1 unreaped otherwise)."""
        if pod.pidfd >= 0:
            if not pod.exited.is_set():
                try:
                    signal.pidfd_send_signal(pod.pidfd, signal.SIGKILL)
                except OSError:
                    pass
        elif pod.popen is not None and pod.popen.poll() is None:
            try:
                os.killpg(pod.popen.pid, signal.SIGKILL)  # --kill-child takes its child along
            except OSError:
                pass

    def _unplug(self, pod: Pod) -> None:
        """The sandbox's teardown: the veth (both ends) and the network namespace."""
        sh(["ip", "link", "del", pod.veth], check=False)
        sh(["ip", "netns", "del", pod.netns], check=False)

    # -- the kubelet's probes --------------------------------------------------------------------

    def _prober(self, pod: Pod) -> None:
        t = self.timing
        ok = fail = live_fail = 0
        nxt = now()
        while not self.stop.is_set() and not pod.exited.is_set():
            for kind, path in (("ready", "/health"), ("live", "/live")):
                if kind == "live" and pod.ready_at is None:
                    # As behind a startupProbe: liveness is probed once the pod has started
                    # (its first good readiness probe), not while vsup is still starting.
                    continue
                at = now()
                try:
                    status, body = http_get(pod.ip, POD_PORT, path, t.probe_timeout)
                    detail = body[:80].decode(errors="replace")
                except (OSError, http.client.HTTPException) as e:
                    status, detail = None, error_text(e)
                with self.lock:
                    pod.probes.append(Probe(at, kind, status, detail))
                    if kind == "ready":
                        if status == 200:
                            ok, fail = ok + 1, 0
                            if ok >= t.success_threshold and not pod.ready:
                                pod.ready = True
                                pod.ready_at = pod.ready_at or now()
                        else:
                            ok, fail = 0, fail + 1
                            if fail >= t.failure_threshold and pod.ready:
                                pod.ready = False
                    else:
                        live_fail = 0 if status == 200 else live_fail + 1
                        if live_fail == t.liveness_failure_threshold and pod.sigterm_at is None:
                            # A kubelet would restart the container here; the rehearsal
                            # records it (the test fails on it).
                            self.finding(f"{pod.name}: liveness failed {live_fail} times in a "
                                         f"row (last: {status} {detail})")
            nxt += t.period
            self.stop.wait(max(0.0, nxt - now()))

    def _scraper(self, pod: Pod) -> None:
        """Prometheus: /metrics every scrape_interval from start to exit, drain included."""
        t = self.timing
        nxt = now()
        while not self.stop.is_set() and not pod.exited.is_set():
            at = now()
            try:
                status, body = http_get(pod.ip, POD_PORT, "/metrics", t.probe_timeout)
                if status != 200:
                    s = Scrape(at, False, f"status {status}")
                else:
                    s = Scrape(at, True, metrics=parse_metrics(body.decode(errors="replace"),
                                                               self.model))
            except ValueError as e:
                s = Scrape(at, False, f"unparsable: {e}")
            except (OSError, http.client.HTTPException) as e:
                s = Scrape(at, False, error_text(e))
            s.t_end = now()
            with self.lock:
                pod.scrapes.append(s)
            nxt += t.scrape_interval
            self.stop.wait(max(0.0, nxt - now()))

    # -- endpoints -------------------------------------------------------------------------------

    def _controller(self) -> None:
        """Endpoints = ready and not terminating pods; each change reaches iptables `lag` later."""
        pending: list[tuple[float, tuple[str, ...]]] = []
        desired: tuple[str, ...] = ()
        while not self.stop.is_set():
            with self.lock:
                want = tuple(sorted((p.name for p in self.pods.values()
                                     if p.ready and not p.terminating and not p.exited.is_set()),
                                    key=lambda n: self.pods[n].index))
            if want != desired:
                desired = want
                pending.append((now() + self.timing.lag, want))
            due = [e for e in pending if e[0] <= now()]
            if due:
                pending = pending[len(due):]
                names = due[-1][1]
                with self.lock:
                    eps = [(n, self.pods[n].index, self.pods[n].ip) for n in names]
                before = now()
                self.service.sync(eps)
                t = now()
                self.sync_seconds.append(t - before)
                with self.lock:
                    for n in set(names) - set(self.applied):
                        self.pods[n].in_endpoints_at = self.pods[n].in_endpoints_at or t
                    for n in set(self.applied) - set(names):
                        self.pods[n].removed_at = self.pods[n].removed_at or t
                    self.applied = names
                    self.endpoint_history.append((t, names))
            self.stop.wait(0.01)

    def wait_in_endpoints(self, pod: Pod, timeout: float = 10.0) -> None:
        self.wait(lambda: pod.name in self.applied or pod.exited.is_set(), timeout,
                  f"{pod.name} to be ready and in the Service's endpoints",
                  lambda: self.pod_log(pod) + f"\nprobes: {pod.probes[-6:]}")
        if pod.exited.is_set():
            raise HarnessError(f"{pod.name} exited ({pod.exit_code}) before it was ready\n"
                               f"{self.pod_log(pod)}")

    # -- the sampler -----------------------------------------------------------------------------
    # A zombie counts only once its parent could reap it: a multi-threaded process shows "Z" as
    # soon as its main thread is gone while its other threads still exit (slowly, under a
    # sanitizer), and no waitid can reap it before they have.

    def _sampler(self) -> None:
        prev: dict[int, set[tuple[int, int]]] = {}
        while not self.stop.is_set():
            with self.lock:
                live = {p.pidns: p for p in self.pods.values()
                        if p.pidns and not p.exited.is_set()}
            if live:
                found = scan_pid_namespaces(set(live))
                for ns, pod in live.items():
                    procs = found.get(ns, [])
                    zombies = {(pid, start) for pid, state, _, start in procs if state == "Z"}
                    with self.lock:
                        pod.samples += 1
                        pod.max_procs = max(pod.max_procs, len(procs))
                        for pid, state, comm, start in procs:
                            if state != "Z" or still_exiting(pid):
                                continue
                            if (pid, start) in prev.get(ns, set()):
                                text = f"pid {pid} ({comm})"
                                if text not in pod.zombies:
                                    pod.zombies.append(text)
                            else:
                                pod.zombie_sightings += 1
                    prev[ns] = zombies
            self.stop.wait(self.timing.sample_interval)

    # -- the kubelet deleting a pod --------------------------------------------------------------

    def delete_pod(self, pod: Pod) -> threading.Thread:
        with self.lock:
            pod.deleted_at = now()
            pod.terminating = True
            if pod in self.current:
                self.current.remove(pod)
        t = self._spawn(self._terminate, f"{pod.name}-delete", pod)
        with self.lock:
            self.deletions.append(t)
        return t

    def _terminate(self, pod: Pod) -> None:
        t = self.timing
        grace_deadline = pod.deleted_at + t.grace
        argv = ["nsenter", f"--target={pod.pid}", "--net", "--pid", "--mount", "--",
                self.vsup_bin, "drain", "--socket", str(pod.socket),
                "--quiet-for", str(t.quiet_for), "--timeout", str(t.drain_timeout)]
        # The hook's output goes to a file, not a pipe: nsenter's child (the hook, in the pod's
        # PID namespace) would keep a pipe open after a timeout killed nsenter.
        out_path = self.workdir / f"{pod.name}.prestop.log"
        pod.prestop_start = now()
        with open(out_path, "wb") as out:
            try:
                pod.prestop_rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                timeout=max(0.1, grace_deadline - now())).returncode
            except subprocess.TimeoutExpired:
                pass  # prestop_rc stays None
        pod.prestop_end = now()
        pod.prestop_output = out_path.read_text(errors="replace").strip()
        if pod.prestop_rc is None:
            pod.prestop_output += " [still running at the end of the grace period: killed]"
        pod.sigterm_at = now()
        try:
            signal.pidfd_send_signal(pod.pidfd, signal.SIGTERM)
        except OSError:
            pass  # it has exited already: the watcher records how
        if not pod.exited.wait(max(0.0, grace_deadline - now())):
            pod.killed = True
            self._kill(pod)
            if not pod.exited.wait(5):
                self.error(f"{pod.name}: still running 5s after SIGKILL")
                return
        self._unplug(pod)

    def wait_deletions(self, timeout: float) -> None:
        deadline = min(now() + timeout, self.hard_deadline)
        with self.lock:
            threads = list(self.deletions)
        for th in threads:
            th.join(max(0.0, deadline - now()))
        self.check()
        left = [th.name for th in threads if th.is_alive()]
        if left:
            raise HarnessError(f"deletions not finished within {timeout:.0f}s: {left}")

    # -- the Deployment --------------------------------------------------------------------------

    def deploy(self, replicas: int) -> list[Pod]:
        pods = [self.start_pod(generation=0) for _ in range(replicas)]
        for p in pods:
            self.wait_in_endpoints(p)
        with self.lock:
            self.current = list(pods)
        return pods

    def rolling_update(self, rounds: int, on_pod: Callable[[Pod, Pod], None] | None = None) -> None:
        """maxSurge 1, maxUnavailable 0: start a new pod, wait until it is ready and in the
        endpoints, delete an old one (terminating pods do not count against the surge)."""
        for r in range(1, rounds + 1):
            with self.lock:
                old_pods = list(self.current)
            for old in old_pods:
                new = self.start_pod(generation=r)
                self.wait_in_endpoints(new)
                with self.lock:
                    self.current.append(new)
                self.delete_pod(old)
                if on_pod is not None:
                    on_pod(old, new)

    # -- the picker experiment -------------------------------------------------------------------

    def pin_and_watch(self, load: "Load", pod: Pod, n: int, max_tokens: int) -> dict:
        """Pins N long requests on POD directly and watches the picker route around it."""
        picker = self.picker
        t_pin = now()
        threads = load.send_pinned(pod, n, max_tokens)
        t_high = None
        try:
            self.wait(lambda: (picker.load_of(pod.name) or 0) >= n, 5,
                      f"the picker to see {RUNNING} + {WAITING} >= {n} on {pod.name}")
            t_high = now()
        except HarnessError as e:
            self.finding(str(e).splitlines()[0])
        deadline = now() + max_tokens * self.timing.token_ms / 1000 * 3 + 5
        for th in threads:
            th.join(max(0.0, deadline - now()))
        pinned = [r for r in load.snapshot() if r.path == "pinned" and r.t0 >= t_pin]
        done = [r.t1 for r in pinned]
        t_first_done = min(done) if len(done) == n else None
        t_done = max(done) if len(done) == n else None
        t_back = None
        if t_done is not None:
            try:
                self.wait(lambda: any(d.chosen == pod.name
                                      for d in picker.decisions_between(t_done, now())), 3,
                          f"the picker to choose {pod.name} again once its requests ended")
                t_back = min(d.t for d in picker.decisions_between(t_done, now())
                             if d.chosen == pod.name)
            except HarnessError as e:
                self.finding(str(e).splitlines()[0])
        during = picker.decisions_between(t_high, t_first_done) if t_high and t_first_done else []
        return {
            "pod": pod.name,
            "pinned": n,
            "pinned_ok": sum(1 for r in pinned if r.ok),
            "pinned_errors": [r.error for r in pinned if not r.ok][:5],
            "gauge_seen_high_after_s": None if t_high is None else round(t_high - t_pin, 3),
            "max_gauge_seen": max((d.loads.get(pod.name, 0) for d in
                                   picker.decisions_between(t_pin, now())), default=None),
            "decisions_while_high": len(during),
            "chosen_while_high": sum(1 for d in during if d.chosen == pod.name),
            "chosen_others_while_high": sorted({d.chosen for d in during if d.chosen}),
            "pinned_for_s": None if t_done is None else round(t_done - t_pin, 3),
            "chosen_again_after_s": None if t_back is None else round(t_back - t_done, 3),
        }

    # -- the report ------------------------------------------------------------------------------

    def pod_report(self, pod: Pod) -> dict:
        with self.lock:
            scrapes = list(pod.scrapes)
            probes = list(pod.probes)

        def since_delete(t):
            return None if t is None or pod.deleted_at is None else round(t - pod.deleted_at, 3)

        drain = {}
        if pod.prestop_start is not None:
            # A scrape is placed conservatively by its interval [t, t_end]: before an event only
            # if it ended before it, after an event only if it was sent after it (a stalled
            # machine can hold a scrape's thread between the two).
            ok = [s for s in scrapes if s.ok]
            last_ok = max((s.t for s in ok), default=None)
            # The drain as a scraper sees it: from the preStop hook until the API server stopped
            # answering (the last good scrape; every scrape after it failed).
            window = [s for s in scrapes if s.t >= pod.prestop_start
                      and (last_ok is None or s.t_end <= last_ok or s.ok and s.t <= last_ok)]
            before_term = [s for s in scrapes
                           if pod.prestop_start <= s.t and s.t_end < (pod.sigterm_at or 0)]
            after_last = [s for s in scrapes if last_ok is not None and s.t > last_ok]
            # The requests counter when the drain returned and at the last scrape: a request
            # that reached the pod after its drain said "quiet" shows as a difference.
            at_end = [s for s in ok if s.t <= (pod.prestop_end or 0)]
            total_end = at_end[-1].metrics.requests_total if at_end else None
            total_last = ok[-1].metrics.requests_total if ok else None
            drain_probes = [p for p in probes if p.kind == "ready"
                            and pod.prestop_start <= p.t < (pod.sigterm_at or 0)]
            drain = {
                "drain_s": round(pod.prestop_end - pod.prestop_start, 3),
                "prestop_rc": pod.prestop_rc,
                "prestop_output": pod.prestop_output[-300:],
                "scrapes_in_drain": len(window),
                "scrapes_in_drain_ok": sum(1 for s in window if s.ok),
                "scrape_errors_in_drain": [f"+{s.t - pod.prestop_start:.3f}s {s.error}"
                                           for s in window if not s.ok][:5],
                "scrapes_before_sigterm": len(before_term),
                "scrapes_before_sigterm_ok": sum(1 for s in before_term if s.ok),
                "last_scrape_ok_after_sigterm_s": (None if last_ok is None or pod.sigterm_at is None
                                                   else round(last_ok - pod.sigterm_at, 3)),
                "scrape_errors_after_last_ok": sorted({s.error for s in after_last}),
                "draining_gauge_seen": any(s.ok and s.metrics.draining == 1 for s in window),
                "late_requests": (None if total_end is None or total_last is None
                                  else total_last - total_end),
                "health_in_drain": sorted({f"{p.status} {p.detail.strip()}" for p in drain_probes}),
            }
        before_delete = [p for p in probes if pod.deleted_at is None or p.t < pod.deleted_at]
        live_answers = [p for p in probes if p.kind == "live" and p.status is not None]
        live_errors_before_term = [p for p in probes if p.kind == "live" and p.status != 200
                                   and p.t >= (pod.ready_at or float("inf"))
                                   and (pod.sigterm_at is None or p.t < pod.sigterm_at)]
        return {
            "pod": pod.name,
            "generation": pod.generation,
            "ip": pod.ip,
            "started_s": self.rel(pod.started_at),
            "ready_after_s": (None if pod.ready_at is None
                              else round(pod.ready_at - pod.started_at, 3)),
            "in_endpoints_after_s": (None if pod.in_endpoints_at is None
                                     else round(pod.in_endpoints_at - pod.started_at, 3)),
            "deleted_s": self.rel(pod.deleted_at),
            "left_endpoints_after_delete_s": since_delete(pod.removed_at),
            "sigterm_after_delete_s": since_delete(pod.sigterm_at),
            "exit_after_delete_s": since_delete(pod.exit_at),
            "exit_after_sigterm_s": (None if pod.exit_at is None or pod.sigterm_at is None
                                     else round(pod.exit_at - pod.sigterm_at, 3)),
            "grace_s": self.timing.grace,
            "exit_code": pod.exit_code,
            "killed": pod.killed,
            "requests_served": next((s.metrics.requests_total for s in reversed(scrapes) if s.ok),
                                    None),
            **drain,
            "ready_probe_failures_before_delete": sum(1 for p in before_delete
                                                      if p.kind == "ready" and p.status != 200
                                                      and p.t >= (pod.ready_at or float("inf"))),
            "live_answers_not_200": sorted({f"{p.status} {p.detail.strip()}"
                                            for p in live_answers if p.status != 200}),
            "live_errors_before_sigterm": len(live_errors_before_term),
            "samples": pod.samples,
            "max_processes": pod.max_procs,
            "zombies": pod.zombies,
            "zombie_sightings": pod.zombie_sightings,
            "left_after_exit": pod.left_after_exit,
        }


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Request:
    client: int
    path: str  # "service" (the virtual IP), "picker" (the chosen pod) or "pinned"
    kind: str  # "plain" or "stream"
    t0: float
    t1: float = 0.0
    pod: str | None = None  # the pod it was sent to (picker, pinned)
    status: int | None = None
    error: str | None = None
    category: str | None = None  # "connection", "incomplete", "invalid", "no-endpoint"

    @property
    def ok(self) -> bool:
        return self.error is None


def complete(host: str, port: int, body: str, stream: bool, timeout: float, rec: Request) -> None:
    """One completion on a new connection; fills REC's status, error and category."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "Connection": "close"})
        r = conn.getresponse()
        rec.status = r.status
        data = r.read()  # IncompleteRead on a short Content-Length or a cut chunked body
        if r.status != 200:
            raise _Invalid(f"status {r.status}: {data[:200]!r}")
        if stream:
            if not r.getheader("Content-Type", "").startswith("text/event-stream"):
                raise _Invalid(f"not an event stream: {r.getheader('Content-Type')}")
            _check_stream(data)
        else:
            _check_completion(json.loads(data))
    except (_Invalid, ValueError) as e:
        rec.error, rec.category = f"{type(e).__name__}: {e}", "invalid"
    except http.client.IncompleteRead as e:
        rec.error, rec.category = f"IncompleteRead: {e!r}", "incomplete"
    except (OSError, http.client.HTTPException) as e:
        rec.category = "connection" if rec.status is None else "incomplete"
        rec.error = error_text(e)
    finally:
        conn.close()


class Load:
    """Closed-loop clients: SERVICE_CLIENTS through the virtual IP, PICKER_CLIENTS through the
    picker; plain and streaming completions alternate; no retries."""

    def __init__(self, cluster: Cluster, *, service_clients: int = 3, picker_clients: int = 3,
                 plain_tokens: int = 4, stream_tokens: int = 8, timeout_s: float = 5.0):
        self.c = cluster
        self.timeout_s = timeout_s
        self.bodies = {
            "plain": json.dumps({"model": cluster.model, "prompt": "hello",
                                 "max_tokens": plain_tokens}),
            "stream": json.dumps({"model": cluster.model, "prompt": "hello", "stream": True,
                                  "max_tokens": stream_tokens}),
        }
        self.records: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        paths = ["service"] * service_clients + ["picker"] * picker_clients
        self.clients = len(paths)
        self._threads = [threading.Thread(target=self._run, args=(i, p), daemon=True,
                                          name=f"load-{p}-{i}") for i, p in enumerate(paths)]
        self._pinned: list[threading.Thread] = []

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        deadline = now() + timeout_s
        for t in self._threads + self._pinned:
            t.join(max(0.0, deadline - now()))
        stuck = [t.name for t in self._threads + self._pinned if t.is_alive()]
        if stuck:
            raise HarnessError(f"load clients still running {timeout_s:.0f}s after stop: {stuck}")

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.records)

    def _record(self, rec: Request) -> None:
        rec.t1 = now()
        with self._lock:
            self.records.append(rec)

    def _run(self, client: int, path: str) -> None:
        n = 0
        while not self._stop.is_set() and not self.c.stop.is_set():
            kind = "stream" if (n + client) % 2 else "plain"
            n += 1
            rec = Request(client, path, kind, now())
            if path == "service":
                complete(self.c.vip, SERVICE_PORT, self.bodies[kind], kind == "stream",
                         self.timeout_s, rec)
            else:
                pod = self.c.picker.pick()
                if pod is None:
                    rec.error, rec.category = "the picker had no ready pod", "no-endpoint"
                    self._record(rec)
                    self._stop.wait(0.05)
                    continue
                rec.pod = pod.name
                complete(pod.ip, POD_PORT, self.bodies[kind], kind == "stream", self.timeout_s,
                         rec)
            self._record(rec)

    def send_pinned(self, pod: Pod, n: int, max_tokens: int) -> list[threading.Thread]:
        """N long plain completions straight to POD's address, each in its own thread."""
        body = json.dumps({"model": self.c.model, "prompt": "hello", "max_tokens": max_tokens})
        timeout = max_tokens * self.c.timing.token_ms / 1000 * 3 + 5

        def one(i: int) -> None:
            rec = Request(1000 + i, "pinned", "plain", now(), pod=pod.name)
            complete(pod.ip, POD_PORT, body, False, timeout, rec)
            self._record(rec)

        threads = [threading.Thread(target=one, args=(i,), daemon=True, name=f"pinned-{i}")
                   for i in range(n)]
        for t in threads:
            t.start()
        self._pinned += threads
        return threads

    def summary(self) -> dict:
        recs = self.snapshot()
        out: dict = {"total": len(recs), "failed": sum(1 for r in recs if not r.ok)}
        for key in ("path", "kind", "category"):
            groups: dict[str, list[int]] = {}
            for r in recs:
                v = getattr(r, key) or "ok"
                g = groups.setdefault(v, [0, 0])
                g[0] += 1
                g[1] += 0 if r.ok else 1
            out[f"by_{key}"] = {k: {"total": a, "failed": b}
                                for k, (a, b) in sorted(groups.items())}
        by_pod: dict[str, int] = {}
        for r in recs:
            if r.pod and r.path == "picker":
                by_pod[r.pod] = by_pod.get(r.pod, 0) + 1
        out["picker_by_pod"] = dict(sorted(by_pod.items(), key=lambda kv: int(kv[0][4:])))
        lat = sorted((r.t1 - r.t0) * 1000 for r in recs if r.ok and r.path != "pinned")
        if lat:
            out["latency_ms"] = {p: round(lat[min(len(lat) - 1, int(len(lat) * q))], 1)
                                 for p, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
        slow = sorted((r for r in recs if r.path != "pinned"), key=lambda r: r.t0 - r.t1)[:8]
        out["slowest"] = [f"{(r.t1 - r.t0) * 1000:.0f} ms at +{r.t0 - self.c.t0:.3f}s: {r.path} "
                          f"{r.kind} pod={r.pod}" for r in slow]
        t0 = recs[0].t0 if recs else 0.0
        out["first_failures"] = [f"+{r.t0 - self.c.t0:.3f}s {r.path} {r.kind} pod={r.pod} "
                                 f"status={r.status}: {r.error}" for r in recs if not r.ok][:15]
        out["span_s"] = round(max((r.t1 for r in recs), default=t0) - t0, 3)
        return out


# ---------------------------------------------------------------------------------------------
# The table


def format_table(report: dict) -> str:
    req = report["requests"]
    lines = [f"k8s rehearsal {report['run_id']} on {report['network']}: "
             f"{report['replicas']} replicas x {report['rounds']} rounds in "
             f"{report['duration_s']:.1f}s (quiet-for {report['timing']['quiet_for']}s, "
             f"lag {report['timing']['lag']}s, period {report['timing']['period']}s, "
             f"grace {report['timing']['grace']}s)",
             f"requests: {req['total']} total, {req['failed']} failed; " +
             ", ".join(f"{k} {v['total']}/{v['failed']} failed"
                       for k, v in req["by_path"].items()) +
             f"; latency {req.get('latency_ms')}"]
    head = ("pod", "gen", "drain s", "rc", "left-ep s", "TERM s", "exit s", "grace", "code",
            "scrapes ok/all", "health in drain", "served", "zomb")
    rows = [head]
    for p in report["pods"]:
        if p.get("drain_s") is None:
            continue
        rows.append((p["pod"], str(p["generation"]), f"{p['drain_s']:.2f}", str(p["prestop_rc"]),
                     "-" if p["left_endpoints_after_delete_s"] is None
                     else f"{p['left_endpoints_after_delete_s']:.2f}",
                     f"{p['sigterm_after_delete_s']:.2f}",
                     "-" if p["exit_after_delete_s"] is None else f"{p['exit_after_delete_s']:.2f}",
                     f"{p['grace_s']:.1f}",
                     str(p["exit_code"]) + (" KILLED" if p["killed"] else ""),
                     f"{p['scrapes_in_drain_ok']}/{p['scrapes_in_drain']}",
                     ",".join(sorted({h.split()[0] for h in p["health_in_drain"]})) or "-",
                     "-" if p["requests_served"] is None else f"{p['requests_served']:.0f}",
                     str(len(p["zombies"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    pk = report.get("picker")
    if pk:
        lines.append(f"picker: {pk['pinned']} pinned on {pk['pod']} ({pk['pinned_ok']} ok), gauge "
                     f"max {pk['max_gauge_seen']} seen after {pk['gauge_seen_high_after_s']}s; "
                     f"{pk['decisions_while_high']} picks while high, {pk['chosen_while_high']} "
                     f"to it (others: {pk['chosen_others_while_high']}); chosen again "
                     f"{pk['chosen_again_after_s']}s after they ended")
    return "\n".join(lines)
