"""Disaggregated prefill/decode with the vsup KV connector, on real instances of the CPU engine.

Each test starts `vsup run` trees on free ports: a prefill instance (--kv-role prefill), a decode
instance (--kv-role decode) and, where output is compared, a plain single instance. A request goes
to the prefill instance with kv_transfer_params {"do_remote_decode": true}; its answer's
kv_transfer_params go to the decode instance with the same request, as a router would send them.
The decode instance's agents pull the blocks (over shared memory or TCP, --kv-transport), and
its output must equal the single instance's token for token.

Every tree is stopped at the end and nothing of it may be left (the `trees` fixture); each test
also checks that the KV caches are empty again (vllm:kv_cache_usage_perc 0 on both sides: no
lease and no block left held). Waits poll with hard timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import wait_for
from test_cpu_engine import Trees, get_json, trees  # noqa: F401  (the fixture)

MODEL = "vsup-tiny-4m"
BLOCK = 16
COMMON = ("--engine", "cpu", "--model", MODEL, "--kv-cache-memory", "16MiB",
          "--max-model-len", "256", "--block-size", str(BLOCK))


def free_ports(n: int) -> int:
    """A base port P with P .. P+n-1 all free (the KV agents listen on P + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    pytest.fail("no run of free ports")


def post(s, body: dict) -> tuple[int, dict]:
    r, data = s.post("/v1/completions", body)
    return r.status, json.loads(data)


def request(prompt: str, max_tokens: int = 8, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def metric(s, name: str, label: str = "") -> float:
    c = s.connect()
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(r"^" + re.escape(name) + r"\{[^}]*" + re.escape(label) + r"[^}]*\} (\S+)$",
                  text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def caches_empty(*servings) -> None:
    for s in servings:
        wait_for(lambda: metric(s, "vllm:kv_cache_usage_perc") == 0.0, 5,
                 "every KV block to be free again", s.stderr)


class PD:
    """A prefill and a decode instance of the same model, and a single instance to compare with."""

    def __init__(self, trees: Trees, tp: int = 1, transport: str = "auto",
                 prefill_args: tuple = (), decode_args: tuple = (), single: bool = True,
                 env: dict | None = None):
        tps = ("--tensor-parallel-size", str(tp))
        self.kv_port = free_ports(tp)
        self.prefill = trees.serve(*COMMON, *tps, "--kv-connector", "vsup", "--kv-role", "prefill",
                                   "--kv-port", str(self.kv_port), *prefill_args, env=env)
        self.decode = trees.serve(*COMMON, *tps, "--kv-connector", "vsup", "--kv-role", "decode",
                                  "--kv-port", str(free_ports(tp)), "--kv-transport", transport,
                                  *decode_args, env=env)
        self.single = trees.serve(*COMMON, *tps) if single else None

    def prefill_params(self, body: dict) -> dict:
        status, doc = post(self.prefill, {**body, "kv_transfer_params": {"do_remote_decode": True}})
        assert status == 200, doc
        assert doc["usage"]["completion_tokens"] == 1  # max_tokens 1 on the prefill side
        kv = doc["kv_transfer_params"]
        assert kv["do_remote_prefill"] is True
        assert kv["remote_port"] == self.kv_port
        return kv

    def via_pd(self, body: dict) -> dict:
        kv = self.prefill_params(body)
        status, doc = post(self.decode, {**body, "kv_transfer_params": kv})
        assert status == 200, doc
        return doc


# Prompt lengths around a block (16 tokens: the byte tokenizer makes one token per byte) and
# near the 256-token context.
PROMPTS = ["a", "x" * (BLOCK - 1), "Hello, world! 12", "Hello, world! 123", "q" * 240]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_pd_output_equals_a_single_instance(trees, tp, transport):
    pd = PD(trees, tp=tp, transport=transport)
    for prompt in PROMPTS:
        max_tokens = 8 if len(prompt) < 200 else 256 - len(prompt)
        for extra in ({"temperature": 0}, {"temperature": 0.8, "seed": 7, "top_p": 0.9}):
            body = request(prompt, max_tokens, **extra)
            single = post(pd.single, body)
            assert single[0] == 200, single
            got = pd.via_pd(body)
            assert got["choices"][0]["text"] == single[1]["choices"][0]["text"], (prompt, extra)
            assert got["usage"] == single[1]["usage"]
    # The blocks really are what the output comes from: another prompt's blocks (same length)
    # give another text.
    a, b = request("0123456789abcdefghij"), request("ABCDEFGHIJ0123456789")
    kv_b = pd.prefill_params(b)
    status, wrong = post(pd.decode, {**a, "kv_transfer_params": kv_b})
    assert status == 200, wrong
    assert wrong["choices"][0]["text"] != post(pd.single, a)[1]["choices"][0]["text"]
    caches_empty(pd.prefill, pd.decode)
    # /metrics counts it all: every lease granted ended done (the last one's end may still be
    # on its way), every pull succeeded and moved the bytes of its blocks on every rank.
    pulls = 2 * len(PROMPTS) + 1
    wait_for(lambda: metric(pd.prefill, "vsup_kv_leases_held") == 0, 5, "every lease to end",
             pd.prefill.stderr)
    assert metric(pd.prefill, "vsup_kv_leases_granted_total") == pulls
    assert metric(pd.prefill, 'vsup_kv_leases_ended_total', 'reason="done"') == pulls
    assert metric(pd.decode, "vsup_kv_pulls_total", 'outcome="ok"') == pulls
    assert metric(pd.decode, "vsup_kv_pulls_total", 'outcome="failed"') == 0
    assert metric(pd.decode, "vsup_kv_pull_bytes_total") > 0
    # `vsup tree` says what each agent did.
    def agent_detail(s, r):
        def find(node):
            if node["name"] == f"kv-agent-tp{r}":
                return node
            for c in node["children"]:
                if (f := find(c)) is not None:
                    return f
        return find(s.tree())["detail"]
    for r in range(tp):
        assert f"leases 0 held (0 pulling), {pulls} done" in agent_detail(pd.prefill, r)
        assert f"pulls {pulls} done, 0 failed" in agent_detail(pd.decode, r)
    # Pulled over the transport asked for, one connection per rank, kept for every request.
    log = pd.decode.stderr()
    for r in range(tp):
        assert log.count(f"kv-agent-tp{r}: connected to engine") == 1, log
        assert f"rank {r} at " in log and f"over {transport}" in log, log
    for s in (pd.prefill, pd.decode, pd.single):
        assert trees.stop(s) == 0, s.stderr()


def test_pd_bad_kv_transfer_params_are_refused_naming_why(trees):
    pd = PD(trees, prefill_args=("--kv-shutdown-timeout", "1"), single=False)
    kv = pd.prefill_params(request("Hello, world! 123"))
    # The prompt does not fill as many blocks as the prefill sent.
    status, doc = post(pd.decode, {**request("short"), "kv_transfer_params": kv})
    assert status == 400, doc
    assert doc["error"]["code"] == "invalid_kv_transfer_params"
    assert "2 block(s), but the 5-token prompt fills 1 block(s)" in doc["error"]["message"]
    # A tensor-parallel size that is not this instance's.
    status, doc = post(pd.decode, {**request("Hello, world! 123"),
                                   "kv_transfer_params": {**kv, "tp_size": 2}})
    assert status == 400 and "tp_size 2" in doc["error"]["message"], doc
    # Each role refuses the other's request.
    status, doc = post(pd.prefill, {**request("x"), "kv_transfer_params": kv})
    assert status == 400 and "needs a decode instance" in doc["error"]["message"], doc
    status, doc = post(pd.decode, {**request("x"),
                                   "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 400 and "needs a prefill instance" in doc["error"]["message"], doc
    # The lease nobody pulled is still held (its blocks too) until it ends: here, the stop below
    # abandons it at the KV deadline and says so.
    assert metric(pd.prefill, "vllm:kv_cache_usage_perc") > 0
    t0 = time.monotonic()
    assert trees.stop(pd.prefill, timeout=20) == 0
    assert time.monotonic() - t0 < 5
    assert "1 lease(s) abandoned" in pd.prefill.stderr()
    assert trees.stop(pd.decode) == 0


def test_pd_a_restarted_prefill_is_told_apart_and_stale_parameters_fail_fast(trees):
    pd = PD(trees, prefill_args=("--kv-shutdown-timeout", "1"), single=False)
    body = request("Hello, world! 123")
    first = pd.via_pd(body)  # the decode agent now keeps a connection to this prefill
    stale = pd.prefill_params(body)
    assert trees.stop(pd.prefill, timeout=20) == 0
    again = trees.serve(*COMMON, "--kv-connector", "vsup", "--kv-role", "prefill",
                        "--kv-port", str(pd.kv_port))
    t0 = time.monotonic()
    status, doc = post(pd.decode, {**body, "kv_transfer_params": stale})
    took = time.monotonic() - t0
    assert status == 500, doc
    assert "remote engine restarted" in doc["error"]["message"], doc
    assert took < 1.0, f"a stale pull took {took:.2f}s to fail"
    fresh = post(again, {**body, "kv_transfer_params": {"do_remote_decode": True}})[1]
    status, doc = post(pd.decode, {**body, "kv_transfer_params": fresh["kv_transfer_params"]})
    assert status == 200, doc
    assert doc["choices"][0]["text"] == first["choices"][0]["text"]
    caches_empty(again, pd.decode)


def test_pd_an_expired_lease_is_refused_or_recomputed(trees):
    pd = PD(trees, prefill_args=("--kv-lease-s", "0.3"), decode_args=("--kv-load-failure", "recompute"))
    body = request("Hello, world! 123")
    kv = pd.prefill_params(body)
    wait_for(lambda: metric(pd.prefill, "vllm:kv_cache_usage_perc") == 0.0, 5,
             "the unpulled lease to expire and free its blocks", pd.prefill.stderr)
    status, doc = post(pd.decode, {**body, "kv_transfer_params": kv})
    assert status == 200, doc  # recomputed here: the same text as a single instance
    assert doc["choices"][0]["text"] == post(pd.single, body)[1]["choices"][0]["text"]
    assert "lease expired" in pd.decode.stderr()
    caches_empty(pd.prefill, pd.decode)


def test_pd_prefill_sigterm_defers_while_a_lease_is_held_then_gives_up_at_the_deadline(trees):
    pd = PD(trees, prefill_args=("--kv-shutdown-timeout", "1.5"), single=False)
    pd.prefill_params(request("Hello, world! 123"))  # never pulled
    t0 = time.monotonic()
    pd.prefill.signal(signal.SIGTERM)
    wait_for(lambda: "deferring: kv: 1 lease(s) held (0 of 1 released)" in pd.prefill.stderr(),
             5, "the agent to defer for its lease", pd.prefill.stderr)
    code = pd.prefill.wait_exit(15)
    took = time.monotonic() - t0
    assert code == 0, pd.prefill.stderr()
    assert 1.4 <= took < 4.0, f"stopped after {took:.2f}s; the KV deadline was 1.5s"
    assert "kv: giving up: 1 lease(s) abandoned" in pd.prefill.stderr()
    trees.wait_nothing_left(pd.prefill)
    assert trees.stop(pd.decode) == 0


def test_pd_prefill_sigterm_finishes_as_soon_as_its_leases_are_pulled(trees):
    pd = PD(trees, prefill_args=("--kv-shutdown-timeout", "20"), single=False)
    body = request("Hello, world! 123")
    kv = pd.prefill_params(body)
    t0 = time.monotonic()
    pd.prefill.signal(signal.SIGTERM)
    wait_for(lambda: "deferring: kv: 1 lease(s) held" in pd.prefill.stderr(), 5,
             "the agent to defer for its lease", pd.prefill.stderr)
    status, doc = post(pd.decode, {**body, "kv_transfer_params": kv})  # served while deferring
    assert status == 200, doc
    code = pd.prefill.wait_exit(15)
    assert code == 0
    assert time.monotonic() - t0 < 10, "the prefill waited past its last lease"
    assert "kv: all 1 lease(s) released" in pd.prefill.stderr()
    trees.wait_nothing_left(pd.prefill)
    caches_empty(pd.decode)
    assert trees.stop(pd.decode) == 0


# ---------------------------------------------------------------------------------------------
# Faults: either side dies or stops mid-transfer


def agent_pid(s, rank: int = 0) -> int:
    return s.remember_pids()[f"kv-agent-tp{rank}"]


def in_thread(fn):
    """Runs fn() on a thread; returns a function that joins it (bounded) and gives its result."""
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    t.start()

    def join(timeout: float = 20):
        t.join(timeout)
        assert not t.is_alive(), "the request did not end"
        return out["v"]
    return join


def test_pd_prefill_agent_killed_mid_pull_ends_the_request_at_once_and_decode_lives_on(trees):
    pd = PD(trees, single=False)
    body = request("Hello, world! 123")
    kv = pd.prefill_params(body)
    agent = agent_pid(pd.prefill)
    os.kill(agent, signal.SIGSTOP)  # the pull starts, and hangs on the stopped agent
    try:
        answer = in_thread(lambda: post(pd.decode, {**body, "kv_transfer_params": kv}))
        wait_for(lambda: metric(pd.decode, "vllm:num_requests_running") == 1, 5,
                 "the decode request to wait for its KV", pd.decode.stderr)
        killed_at = time.monotonic()
        os.kill(agent, signal.SIGKILL)
    finally:
        try:
            os.kill(agent, signal.SIGCONT)
        except ProcessLookupError:
            pass
    status, doc = answer()
    took = time.monotonic() - killed_at
    assert status == 500, doc
    assert "KV transfer from 127.0.0.1:%d failed" % pd.kv_port in doc["error"]["message"], doc
    assert took < 1.0, f"the decode request ended {took:.2f}s after the agent died"
    # The decode instance is healthy: blocks free, and it serves a plain request.
    caches_empty(pd.decode)
    assert pd.decode.health()[0] == 200
    assert post(pd.decode, request("plain"))[0] == 200
    # The prefill instance lost a rank's agent: its engine fails, and the tree exits by itself.
    code = pd.prefill.wait_exit(15)
    assert code != 0
    assert "a tensor-parallel worker or KV agent died" in pd.prefill.stderr()
    assert "kv-agent-tp0" in pd.prefill.stderr()
    trees.wait_nothing_left(pd.prefill)
    assert trees.stop(pd.decode) == 0


# A decode side speaking the KV protocol by hand over TCP: Hello, one Pull, then it waits to be
# killed (argv: port, compat fields, engine id, lease id, blocks as JSON).
RAW_PULLER = r"""
import json, socket, struct, sys, time
port, model, dtype, layers, heads, dim, bs, tp, engine, lease, blocks = sys.argv[1:]
layers, heads, dim, bs, tp = map(int, (layers, heads, dim, bs, tp))
blocks = json.loads(blocks)
def text(s): return struct.pack("<I", len(s.encode())) + s.encode()
def frame(k, p): return struct.pack("<IHHI", 0x564B5356, k, 0, len(p)) + p
hello = (text(model) + text(dtype) + struct.pack("<IIII", layers, heads, dim, bs) +
         text("layer,kv,block,slot,head,dim") + struct.pack("<II", tp, 1) +
         struct.pack("<I", 0) + text(engine) + struct.pack("<B", 2))
pull = struct.pack("<Q", 1) + text(lease) + struct.pack("<I", len(blocks)) + struct.pack("<%di" % len(blocks), *blocks)
s = socket.create_connection(("127.0.0.1", int(port)))
s.sendall(frame(1, hello) + frame(3, pull))
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: sys.exit("closed")
        b += c
    return b
for want in (2, 4):  # Welcome, then PullReady: the lease is ours now
    magic, kind, flags, length = struct.unpack("<IHHI", read(12))
    read(length)
    if kind != want: sys.exit("got frame %d" % kind)
print("pulling", flush=True)
time.sleep(600)
"""


def test_pd_a_decode_side_killed_mid_pull_frees_the_prefill_blocks_at_once(trees):
    pd = PD(trees, single=False)
    kv = pd.prefill_params(request("Hello, world! 123"))
    m = re.search(r"\(model (\S+), (\w+), (\d+) layers, (\d+) kv heads of (\d+), blocks of (\d+) "
                  r"tokens, tp (\d+)\)", pd.prefill.stderr())
    assert m, pd.prefill.stderr()
    puller = subprocess.Popen(
        [sys.executable, "-c", RAW_PULLER, str(pd.kv_port), *m.groups(), kv["remote_engine_id"],
         kv["remote_request_id"], json.dumps(kv["remote_block_ids"])],
        stdout=subprocess.PIPE, text=True)
    try:
        assert puller.stdout.readline().strip() == "pulling"
        assert metric(pd.prefill, "vllm:kv_cache_usage_perc") > 0
        killed_at = time.monotonic()
        puller.kill()
    finally:
        puller.kill()
        puller.wait(5)
    wait_for(lambda: metric(pd.prefill, "vllm:kv_cache_usage_perc") == 0.0, 1.0,
             "the dead puller's lease to be released", pd.prefill.stderr)
    assert time.monotonic() - killed_at < 1.0
    # The prefill instance serves on, and the next lease works end to end.
    body = request("another prompt!!")
    assert pd.via_pd(body)["choices"][0]["text"]
    caches_empty(pd.prefill, pd.decode)
    assert trees.stop(pd.prefill) == 0
    assert trees.stop(pd.decode) == 0


def test_pd_decode_sigterm_aborts_a_request_waiting_for_kv_at_the_drain_deadline(trees):
    pd = PD(trees, prefill_args=("--kv-shutdown-timeout", "1"),
            decode_args=("--shutdown-timeout", "1"), single=False)
    body = request("Hello, world! 123")
    kv = pd.prefill_params(body)
    agent = agent_pid(pd.prefill)
    os.kill(agent, signal.SIGSTOP)  # its pull waits
    try:
        answer = in_thread(lambda: post(pd.decode, {**body, "kv_transfer_params": kv}))
        wait_for(lambda: metric(pd.decode, "vllm:num_requests_running") == 1, 5,
                 "the decode request to wait for its KV", pd.decode.stderr)
        t0 = time.monotonic()
        pd.decode.signal(signal.SIGTERM)
        status, doc = answer()
        told = time.monotonic() - t0
        code = pd.decode.wait_exit(15)
        took = time.monotonic() - t0
    finally:
        os.kill(agent, signal.SIGCONT)
    assert status == 200, doc
    assert doc["choices"][0]["finish_reason"] == "abort", doc
    assert 0.9 <= told < 2.0, f"the client was told after {told:.2f}s; the drain deadline was 1s"
    assert code == 0, pd.decode.stderr()
    assert took < 3.0, f"decode stopped {took:.2f}s after SIGTERM"
    trees.wait_nothing_left(pd.decode)
    # The prefill side is healthy once it runs again.
    wait_for(lambda: pd.prefill.health()[0] == 200, 5, "the prefill instance to answer",
             pd.prefill.stderr)
    assert trees.stop(pd.prefill) == 0


def test_pd_a_request_aborted_before_its_pull_gives_its_lease_up(trees):
    # One decode slot (--max-num-seqs 1): the first request takes it and its pull stalls on a
    # stopped prefill agent; the second waits in the queue for the slot, its lease held by
    # another prefill instance. Its client goes away: that lease is given up at once (well, as
    # soon as the decode agent's one transfer thread is free: the stalled pull's timeout).
    pd = PD(trees, decode_args=("--max-num-seqs", "1", "--max-num-batched-tokens", "256",
                                "--kv-transfer-timeout", "1"), single=False)
    other = trees.serve(*COMMON, "--kv-connector", "vsup", "--kv-role", "prefill",
                        "--kv-port", str(free_ports(1)))
    body = request("Hello, world! 123")
    kv_first = pd.prefill_params(body)
    status, doc = post(other, {**body, "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 200, doc
    kv_second = doc["kv_transfer_params"]
    agent = agent_pid(pd.prefill)
    os.kill(agent, signal.SIGSTOP)
    try:
        first = in_thread(lambda: post(pd.decode, {**body, "kv_transfer_params": kv_first}))
        wait_for(lambda: metric(pd.decode, "vllm:num_requests_running") == 1, 5,
                 "the first request to wait for its KV", pd.decode.stderr)
        c = pd.decode.connect()
        c.request("POST", "/v1/completions",
                  body=json.dumps({**body, "kv_transfer_params": kv_second}),
                  headers={"Content-Type": "application/json"})
        wait_for(lambda: metric(pd.decode, "vllm:num_requests_waiting") == 1, 5,
                 "the second request to queue", pd.decode.stderr)
        # The client goes away: a reset, as a killed client's kernel sends.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        wait_for(lambda: metric(other, "vsup_kv_leases_ended_total", 'reason="gave_up"') == 1, 5,
                 "the queued request's lease to be given up", lambda: pd.decode.stderr() + other.stderr())
        caches_empty(other)
        status, doc = first()
        assert status == 500 and "timed out" in doc["error"]["message"], doc
    finally:
        os.kill(agent, signal.SIGCONT)
    caches_empty(pd.decode)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_pulled_blocks_equal_the_prefills_bytes(trees, tmp_path, transport):
    """The test hook VSUP_KV_DIGEST_LOG: each prefill agent logs a digest of the blocks it serves
    (from its own cache, as the pull starts), each decode agent one of the blocks it received
    (from its own cache, once the pull ended). They must be equal, lease by lease and rank by
    rank; and differ between prompts, or the check would prove nothing."""
    log = tmp_path / "digests"
    pd = PD(trees, tp=2, transport=transport, single=False, env={"VSUP_KV_DIGEST_LOG": str(log)})
    leases = []
    for prompt in ("a", "Hello, world! 123", "q" * 100):
        kv = pd.prefill_params(request(prompt))
        status, doc = post(pd.decode, {**request(prompt), "kv_transfer_params": kv})
        assert status == 200, doc
        leases.append(kv["remote_request_id"])
    records = [line.split() for line in log.read_text().splitlines()]
    digests = {}
    for what, lease, rank, digest in records:
        digests.setdefault((lease, rank), {}).setdefault(what, []).append(digest)
    for lease in leases:
        for rank in ("tp0", "tp1"):
            seen = digests.get((lease, rank), {})
            assert len(seen.get("served", [])) == 1, (lease, rank, records)
            assert seen.get("pulled") == seen["served"], (lease, rank, records)
    for rank in ("tp0", "tp1"):
        assert len({digests[(lease, rank)]["served"][0] for lease in leases}) == len(leases)
    caches_empty(pd.prefill, pd.decode)
