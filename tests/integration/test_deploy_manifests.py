"""The Kubernetes manifests (deploy/kubernetes/) and the image (deploy/Containerfile) add up.

Every number is read out of the files themselves: the Deployment's replicas, rolling-update
bounds, probes and grace period, the flags of the container's `vsup run` arguments and of its
preStop `vsup drain` command, the PodDisruptionBudget; the tree's own stop budget comes from
supervisor/deadline_budget.h. The rules (deploy/kubernetes/README.md, "The arithmetic"):

    readiness:  periodSeconds * failureThreshold (2)  <  vsup drain --quiet-for  <=  --timeout
    grace:      terminationGracePeriodSeconds  >=  drain --timeout + --shutdown-timeout
                                                   + stop budget (+ KV timeout) + 5 s margin
    PDB:        minAvailable = replicas - maxUnavailable, 1 <= minAvailable < replicas

and the README's equations are those of the files. The flags used must exist in
`vsup run --help` and `vsup drain --help`, and the image must install a package for every
shared library a built vsup links.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
MIN_MARGIN_S = 5


def load_objects() -> list[dict]:
    files = sorted(list(KUBE.glob("*.yaml")) + list(KUBE.glob("*.yml")))
    assert files, f"no manifests in {KUBE}"
    objects = []
    for f in files:
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except yaml.YAMLError as e:
            pytest.fail(f"{f.relative_to(ROOT)} is not valid YAML: {e}", pytrace=False)
        for d in docs:
            assert isinstance(d, dict) and "kind" in d and "apiVersion" in d, \
                f"{f.relative_to(ROOT)}: a document without kind/apiVersion: {d!r}"
            d["__file__"] = str(f.relative_to(ROOT))
            objects.append(d)
    return objects


def only(objects: list[dict], kind: str, api: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[o['__file__'] for o in found]}"
    assert found[0]["apiVersion"] == api, f"{kind}: apiVersion {found[0]['apiVersion']}, want {api}"
    return found[0]


@pytest.fixture(scope="module")
def m() -> "Manifests":
    return Manifests(load_objects())


def flag(argv: list[str], name: str) -> str | None:
    """The value of --NAME in ARGV (`--name V` or `--name=V`); None when absent."""
    for i, a in enumerate(argv):
        if a == name:
            assert i + 1 < len(argv), f"{name} without a value in {argv}"
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def number(argv: list[str], name: str, what: str) -> float:
    v = flag(argv, name)
    assert v is not None, f"{what} must set {name} explicitly (the arithmetic needs it): {argv}"
    try:
        return float(v)
    except ValueError:
        pytest.fail(f"{what}: {name} {v!r} is not a number", pytrace=False)


def stop_budget_s() -> float:
    """The serving tree's stop budget after the drain (supervisor/deadline_budget.h): the API
    servers' close, engine-core's stop and the root's margin."""
    text = (ROOT / "supervisor" / "deadline_budget.h").read_text()
    total = 0
    for name in ("kApiServerCloseMs", "kEngineCoreStopMs", "kRootMarginMs"):
        found = re.search(rf"\b{name}\s*=\s*(\d+)\s*;", text)
        assert found, f"supervisor/deadline_budget.h no longer defines {name}"
        total += int(found.group(1))
    return total / 1000


class Manifests:
    def __init__(self, objects: list[dict]):
        self.deployment = only(objects, "Deployment", "apps/v1")
        self.service = only(objects, "Service", "v1")
        self.pdb = only(objects, "PodDisruptionBudget", "policy/v1")
        self.pod = self.deployment["spec"]["template"]["spec"]
        containers = self.pod["containers"]
        assert len(containers) == 1, "one container: vsup (its PID 1 is the pod's only init)"
        self.container = containers[0]
        c = self.container
        self.argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
        pre = self.container.get("lifecycle", {}).get("preStop", {})
        assert "exec" in pre, f"the preStop hook must exec `vsup drain`: {pre!r}"
        self.prestop = [str(a) for a in pre["exec"]["command"]]
        self.readiness = self.container["readinessProbe"]
        self.liveness = self.container["livenessProbe"]
        self.replicas = int(self.deployment["spec"]["replicas"])
        ru = self.deployment["spec"]["strategy"]
        assert ru.get("type") == "RollingUpdate", f"strategy {ru!r}"
        self.max_unavailable = ru["rollingUpdate"]["maxUnavailable"]
        self.max_surge = ru["rollingUpdate"]["maxSurge"]
        for name, v in (("maxUnavailable", self.max_unavailable), ("maxSurge", self.max_surge)):
            assert isinstance(v, int), f"rollingUpdate.{name} must be a number of pods, not {v!r}"
        self.min_available = self.pdb["spec"]["minAvailable"]
        assert isinstance(self.min_available, int), \
            f"PodDisruptionBudget minAvailable must be a number of pods, not {self.min_available!r}"
        self.grace = float(self.pod["terminationGracePeriodSeconds"])
        self.period = float(self.readiness["periodSeconds"])
        self.failure_threshold = int(self.readiness["failureThreshold"])
        self.quiet_for = number(self.prestop, "--quiet-for", "the preStop `vsup drain`")
        self.drain_timeout = number(self.prestop, "--timeout", "the preStop `vsup drain`")
        self.shutdown_timeout = number(self.argv, "--shutdown-timeout", "`vsup run`")
        connector = flag(self.argv, "--kv-connector")
        self.kv_timeout = 0.0 if connector in (None, "none") else \
            number(self.argv, "--kv-shutdown-timeout", "`vsup run` with a KV connector")
        self.stop_budget = stop_budget_s() + self.kv_timeout

    def container_port(self, port) -> int:
        """A probe's or the Service's port (a name or a number) as the container's number."""
        for p in self.container.get("ports", []):
            if port == p.get("name") or port == p["containerPort"]:
                return int(p["containerPort"])
        pytest.fail(f"port {port!r} is none of the container's ports "
                    f"{self.container.get('ports')}", pytrace=False)


def test_the_manifests_are_a_deployment_a_service_and_a_disruption_budget(m):
    labels = m.deployment["spec"]["template"]["metadata"]["labels"]
    for what, selector in (
            ("the Deployment's selector", m.deployment["spec"]["selector"]["matchLabels"]),
            ("the Service's selector", m.service["spec"]["selector"]),
            ("the PodDisruptionBudget's selector", m.pdb["spec"]["selector"]["matchLabels"])):
        assert selector and selector.items() <= labels.items(), \
            f"{what} {selector} does not select the pods (labels {labels})"


def test_the_container_runs_vsup_run_as_pid_1_on_the_port_the_service_and_probes_use(m):
    assert os.path.basename(m.argv[0]) == "vsup" and m.argv[1] == "run", \
        f"the container must run `vsup run ...` itself (PID 1, no tini): {m.argv}"
    assert not any(os.path.basename(a) in ("tini", "dumb-init") for a in m.argv), m.argv
    assert m.pod.get("shareProcessNamespace") in (None, False), \
        "shareProcessNamespace makes the pause container PID 1: vsup's orphans would go there"
    assert flag(m.argv, "--host") == "0.0.0.0", f"listen on every address of the pod: {m.argv}"
    port = int(number(m.argv, "--port", "`vsup run`"))
    assert port == m.container_port(m.container["ports"][0]["containerPort"])
    for svc_port in m.service["spec"]["ports"]:
        assert m.container_port(svc_port["targetPort"]) == port, \
            f"the Service's targetPort {svc_port['targetPort']!r} is not vsup's port {port}"
    for probe in (m.readiness, m.liveness):
        assert m.container_port(probe["httpGet"]["port"]) == port


def test_readiness_is_on_health_with_failure_threshold_2_and_liveness_on_live(m):
    assert m.readiness["httpGet"]["path"] == "/health", m.readiness
    assert m.failure_threshold == 2, f"readiness failureThreshold {m.failure_threshold}, want 2"
    assert int(m.readiness.get("successThreshold", 1)) == 1, m.readiness
    assert m.liveness["httpGet"]["path"] == "/live", m.liveness


def test_the_endpoint_leaves_the_service_before_the_drain_calls_the_traffic_quiet(m):
    detection = m.period * m.failure_threshold
    assert detection < m.quiet_for, (
        f"readiness takes up to periodSeconds * failureThreshold = {m.period:g} * "
        f"{m.failure_threshold} = {detection:g} s to take the endpoint out, not less than "
        f"vsup drain --quiet-for {m.quiet_for:g}: the drain could end while traffic still comes")
    assert m.quiet_for <= m.drain_timeout, \
        f"--quiet-for {m.quiet_for:g} > --timeout {m.drain_timeout:g}: the drain can never be quiet"


def test_the_grace_period_covers_the_drain_the_shutdown_and_the_trees_stop_budget(m):
    need = m.drain_timeout + m.shutdown_timeout + m.stop_budget + MIN_MARGIN_S
    assert m.grace >= need, (
        f"terminationGracePeriodSeconds {m.grace:g} < drain --timeout {m.drain_timeout:g} + "
        f"--shutdown-timeout {m.shutdown_timeout:g} + stop budget {m.stop_budget:g} + margin "
        f"{MIN_MARGIN_S} = {need:g}: Kubernetes would SIGKILL a pod that is still stopping")


def test_the_disruption_budget_agrees_with_the_rolling_update(m):
    assert m.replicas == 3, f"replicas {m.replicas}"
    assert m.max_unavailable >= 1 or m.max_surge >= 1, "a rollout that can never make progress"
    assert m.min_available == m.replicas - m.max_unavailable, (
        f"minAvailable {m.min_available} != replicas {m.replicas} - maxUnavailable "
        f"{m.max_unavailable}: a node drain and a rollout would disagree on how many may be out")
    assert 1 <= m.min_available < m.replicas, \
        f"minAvailable {m.min_available} must keep one pod and still let a node drain proceed"


def test_the_readme_states_the_numbers_of_the_files(m):
    text = (KUBE / "README.md").read_text()

    def g(x: float) -> str:
        return f"{x:g}"

    margin = m.grace - m.drain_timeout - m.shutdown_timeout - m.stop_budget
    equations = [
        f"p * f = {g(m.period)} * {m.failure_threshold} = {g(m.period * m.failure_threshold)} s",
        f"Q - p * f = {g(m.quiet_for)} - {g(m.period * m.failure_threshold)} = "
        f"{g(m.quiet_for - m.period * m.failure_threshold)} s",
        f"{g(m.drain_timeout)} + {g(m.shutdown_timeout)} + {g(m.stop_budget)} + {g(margin)} = "
        f"{g(m.grace)}",
        f"{m.replicas} - {m.max_unavailable} = {m.min_available}",
        f"maxUnavailable {m.max_unavailable} and maxSurge {m.max_surge}",
    ]
    rows = [("p", f"{g(m.period)} s"), ("f", str(m.failure_threshold)),
            ("Q", f"{g(m.quiet_for)} s"),
            ("T", f"{g(m.drain_timeout)} s"), ("D", f"{g(m.shutdown_timeout)} s"),
            ("S", f"{g(m.stop_budget)} s"), ("M", f"{g(margin)} s"), ("G", f"{g(m.grace)} s")]
    missing = [e for e in equations if e not in text]
    missing += [f"| {s} | {v} |" for s, v in rows if not re.search(
        rf"^\| {s} \| {re.escape(v)} \|", text, re.M)]
    assert not missing, f"deploy/kubernetes/README.md does not say (the files do): {missing}"


def _help(vsup_bin: str, *cmd: str) -> str:
    r = subprocess.run([vsup_bin, *cmd, "--help"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"vsup {' '.join(cmd)} --help exited {r.returncode}: {r.stderr}"
    return r.stdout


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_every_flag_of_the_manifests_exists_in_vsup(m, vsup_bin):
    assert os.path.basename(m.prestop[0]) == "vsup" and m.prestop[1] == "drain", \
        f"the preStop hook must be `vsup drain ...`: {m.prestop}"
    for argv in (m.argv, m.prestop):
        cmd = argv[1]
        text = _help(vsup_bin, cmd)
        unknown = [f for f in _flags(argv[2:])
                   if not re.search(rf"(?<![\w-]){re.escape(f)}\b", text)]
        assert not unknown, f"`vsup {cmd}` has no {unknown} (vsup {cmd} --help):\n{text}"


def _containerfile_stages() -> list[str]:
    text = CONTAINERFILE.read_text()
    # Line continuations joined, comments dropped.
    lines = [l for l in text.replace("\\\n", " ").splitlines() if not l.lstrip().startswith("#")]
    stages, cur = [], None
    for line in lines:
        if re.match(r"\s*FROM\s", line, re.I):
            cur = [line]
            stages.append(cur)
        elif cur is not None:
            cur.append(line)
    return ["\n".join(s) for s in stages]


def test_the_image_is_debian_12_and_runs_vsup_without_an_init_in_front():
    stages = _containerfile_stages()
    assert stages, "deploy/Containerfile has no FROM"
    final = stages[-1]
    assert re.match(r"\s*FROM\s+(docker\.io/)?(library/)?debian:(12|bookworm)", final, re.I), \
        f"the runtime stage must be Debian 12: {final.splitlines()[0]}"
    entry = re.search(r"^\s*ENTRYPOINT\s+(.*)$", final, re.M)
    assert entry and "vsup" in entry.group(1), "ENTRYPOINT must be vsup itself"
    assert not re.search(r"tini|dumb-init", final), "no init in front of vsup: it reaps as PID 1"
    assert re.search(r"COPY\s+--from=\S+\s+\S*tools/vsup\s+/usr/local/bin/vsup", final), \
        "the runtime stage copies the built vsup to /usr/local/bin"


def _runtime_packages() -> set[str]:
    final = _containerfile_stages()[-1]
    pkgs = set()
    for m_ in re.finditer(r"apt-get\s+install\s+([^&;\n]*)", final):
        pkgs |= {w for w in m_.group(1).split() if not w.startswith("-")}
    return pkgs


def test_the_image_installs_a_package_for_every_library_vsup_links(vsup_bin):
    if shutil.which("ldd") is None or shutil.which("dpkg") is None:
        pytest.skip("NOT TESTED: needs ldd and dpkg (a Debian host) to map libraries to packages")
    pkgs = _runtime_packages()
    assert "libopenblas0" in pkgs, "the CPU engine dlopens libopenblas.so.0 (libopenblas0)"
    out = subprocess.run(["ldd", vsup_bin], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    libs = [l.split("=>", 1)[1].split()[0] for l in out.stdout.splitlines()
            if "=>" in l and "/" in l.split("=>", 1)[1]]
    assert libs, f"ldd found no libraries: {out.stdout}"
    missing = {}
    for lib in libs:
        real = os.path.realpath(lib)
        owner = None
        for path in (lib, real, "/usr" + lib if not lib.startswith("/usr") else lib[4:]):
            r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                owner = r.stdout.split(":", 1)[0].strip()
                break
        assert owner is not None, f"no Debian package owns {lib} (is vsup linked to a local build?)"
        # libc6 is in every image; a sanitizer runtime means this vsup is a sanitizer build,
        # which the image never is.
        if owner == "libc6" or re.match(r"lib(a|ub|t|l)san\d*$", owner):
            continue
        if owner not in pkgs:
            missing[lib] = owner
    assert not missing, (f"deploy/Containerfile's runtime stage does not install the package of "
                         f"{missing} (it installs {sorted(pkgs)})")


# ---------------------------------------------------------------------------------------------
# Across nodes: deploy/kubernetes/multi-node/leaderworkerset.yaml (README.md, "Across nodes")

MULTI = KUBE / "multi-node" / "leaderworkerset.yaml"


class Group:
    """The LeaderWorkerSet's leader and worker pods, and the Service in front of them."""

    def __init__(self):
        docs = [d for d in yaml.safe_load_all(MULTI.read_text()) if d is not None]
        for d in docs:
            d["__file__"] = str(MULTI.relative_to(ROOT))
        self.lws = only(docs, "LeaderWorkerSet", "leaderworkerset.x-k8s.io/v1")
        self.service = only(docs, "Service", "v1")
        t = self.lws["spec"]["leaderWorkerTemplate"]
        self.size = int(t["size"])
        self.restart = t.get("restartPolicy")
        self.leader_meta, self.leader = t["leaderTemplate"]["metadata"], t["leaderTemplate"]["spec"]
        self.worker_meta, self.worker = t["workerTemplate"]["metadata"], t["workerTemplate"]["spec"]
        self.lc, self.wc = (self._container(p) for p in (self.leader, self.worker))
        self.largv, self.wargv = (self._argv(c) for c in (self.lc, self.wc))

    @staticmethod
    def _container(pod: dict) -> dict:
        assert len(pod["containers"]) == 1, "one container per pod: vsup as PID 1"
        return pod["containers"][0]

    @staticmethod
    def _argv(c: dict) -> list[str]:
        return [str(a) for a in c.get("command", []) + c.get("args", [])]


@pytest.fixture(scope="module")
def g() -> Group:
    return Group()


def test_the_group_recreates_itself_whole_and_its_size_divides_the_tensor_parallel_size(g):
    assert g.restart == "RecreateGroupOnPodRestart", \
        f"restartPolicy {g.restart!r}: a group must never run with a node missing"
    assert g.size >= 2
    for argv in (g.largv, g.wargv):
        assert os.path.basename(argv[0]) == "vsup" and argv[1] == "run", argv
        tp = int(number(argv, "--tensor-parallel-size", "`vsup run` of the group"))
        assert tp % g.size == 0, f"--tensor-parallel-size {tp} is not a multiple of size {g.size}"
        # LWS says where the leader is, how many nodes and which one this is: the flags that
        # would contradict it are left out.
        for f in ("--nnodes", "--master-addr", "--node-rank"):
            assert flag(argv, f) is None, f"{f} is LWS's to give (LWS_*): {argv}"
    assert "--headless" in g.wargv and "--headless" not in g.largv
    for f in ("--tensor-parallel-size", "--master-port"):
        assert flag(g.largv, f) == flag(g.wargv, f), f"leader and worker disagree on {f}"
    assert g.largv[2] == g.wargv[2], "leader and worker serve different models"


def test_only_the_leader_serves_http_and_has_probes_and_a_drain(g):
    port = int(number(g.largv, "--port", "the leader's `vsup run`"))
    ports = {p["name"]: int(p["containerPort"]) for p in g.lc["ports"]}
    assert ports.get("http") == port
    assert ports.get("tp") == int(flag(g.largv, "--master-port")), \
        "the leader must expose --master-port: the workers' agents connect there"
    assert g.lc["readinessProbe"]["httpGet"]["path"] == "/health"
    assert g.lc["livenessProbe"]["httpGet"]["path"] == "/live"
    assert "readinessProbe" not in g.wc and "livenessProbe" not in g.wc, \
        "a worker serves no HTTP: a probe would only fail"
    sel = g.service["spec"]["selector"]
    assert sel.items() <= g.leader_meta["labels"].items(), "the Service must select the leader"
    assert not sel.items() <= g.worker_meta["labels"].items(), \
        "the Service must not select workers (they serve no HTTP)"


def _group_numbers(g: Group) -> dict:
    pre = [str(a) for a in g.lc["lifecycle"]["preStop"]["exec"]["command"]]
    return {
        "T": number(pre, "--timeout", "the leader's preStop `vsup drain`"),
        "Q": number(pre, "--quiet-for", "the leader's preStop `vsup drain`"),
        "D": number(g.largv, "--shutdown-timeout", "the leader's `vsup run`"),
        "W": number(g.wargv, "--shutdown-timeout", "the worker's `vsup run`"),
        "S": stop_budget_s(),
        "G": float(g.leader["terminationGracePeriodSeconds"]),
        "GW": float(g.worker["terminationGracePeriodSeconds"]),
        "p": float(g.lc["readinessProbe"]["periodSeconds"]),
        "f": int(g.lc["readinessProbe"]["failureThreshold"]),
    }


def test_the_worker_outlasts_the_leaders_drain_and_both_grace_periods_cover_their_stops(g):
    n = _group_numbers(g)
    assert n["p"] * n["f"] < n["Q"] <= n["T"]
    assert n["G"] >= n["T"] + n["D"] + n["S"] + MIN_MARGIN_S, n
    # A rollout signals the worker when the leader's preStop starts: the worker keeps serving
    # the leader's collectives for up to its own --shutdown-timeout, which must cover the
    # leader's drain and shutdown, or the leader's in-flight requests would fail.
    assert n["W"] >= n["T"] + n["D"], n
    assert n["GW"] >= n["W"] + n["S"] + MIN_MARGIN_S, n


def test_the_readme_states_the_numbers_of_the_group(g):
    n = _group_numbers(g)
    text = (KUBE / "README.md").read_text()

    def v(x: float) -> str:
        return f"{x:g}"

    want = [
        f"W ≥ T + D: {v(n['W'])} ≥ {v(n['T'])} + {v(n['D'])}",
        f"G ≥ T + D + S + M: {v(n['G'])} ≥ {v(n['T'])} + {v(n['D'])} + {v(n['S'])} + "
        f"{v(n['G'] - n['T'] - n['D'] - n['S'])}",
        f"G_w ≥ W + S + M: {v(n['GW'])} ≥ {v(n['W'])} + {v(n['S'])} + "
        f"{v(n['GW'] - n['W'] - n['S'])}",
    ]
    missing = [w for w in want if w not in text]
    assert not missing, f"deploy/kubernetes/README.md does not say (the files do): {missing}"


def test_every_flag_of_the_group_exists_in_vsup(g, vsup_bin):
    text = _help(vsup_bin, "run")
    for argv in (g.largv, g.wargv):
        unknown = [f for f in _flags(argv[2:])
                   if not re.search(rf"(?<![\w-]){re.escape(f)}\b", text)]
        assert not unknown, f"`vsup run` has no {unknown}"
