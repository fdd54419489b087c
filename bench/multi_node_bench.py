#!/usr/bin/env python3
"""Tensor parallelism across nodes against the same TP on one node, measured in the same run
between two network namespaces of this machine joined by a veth pair (root).

    python3 bench/multi_node_bench.py --vsup build/tools/vsup \\
        --cross-node-bench build/bench/cross_node_bench [--tokens N] [--runs N] [--json]

Two parts:

  all-reduce  build/bench/cross_node_bench between the two namespaces (--netns): the cross-node
              all-reduce at TP 2 against a raw TCP exchange of the same bytes over the same veth,
              for the decode (one and 32 tokens of a 4096-wide model) and prefill (512 tokens)
              messages, and two ranks' shared memory on one machine;
  decode      one greedy completion of --tokens tokens, streamed, on vsup-tiny-25m: its decode
              rate (tokens after the first / the time from the first to the last) at TP 1 and
              TP 2 on one node, and TP 2 as two nodes of one rank (the leader in one namespace, a
              `vsup run --headless` worker in the other). Median of --runs.

--json: one JSON object on stdout (the tables go to stderr).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time

NET = "10.232.{}.{}"
PORT = 8000
MASTER_PORT = 29500


def sh(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, input=input, text=True, check=True, capture_output=True, timeout=20)


class Namespaces:
    """Two network namespaces joined by one veth pair, 10.232.S.1 and 10.232.S.2."""

    def __init__(self):
        tag = "mb" + secrets.token_hex(2)
        self.names = [f"{tag}a", f"{tag}b"]
        subnet = 200 + secrets.randbelow(50)
        self.ips = [NET.format(subnet, 1), NET.format(subnet, 2)]
        for n in self.names:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", f"{tag}x", "netns", self.names[0], "type", "veth", "peer",
           "name", f"{tag}y", "netns", self.names[1])
        for n, dev, ip in zip(self.names, (f"{tag}x", f"{tag}y"), self.ips):
            sh("ip", "-n", n, "-batch", "-", input=(
                f"addr add {ip}/24 dev {dev}\nlink set {dev} up\nlink set lo up\n"))

    def close(self):
        for n in self.names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)


def start(vsup: str, tmp: str, netns: str, name: str, args: list[str]) -> subprocess.Popen:
    log = open(os.path.join(tmp, name + ".log"), "wb")
    return subprocess.Popen(["ip", "netns", "exec", netns, vsup, "run", "--control-socket",
                             os.path.join(tmp, name + ".sock"), *args],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)


def wait_ready(netns: str, ip: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vsup exited ({proc.returncode}) before it was ready")
        r = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c",
                            f"import http.client as h; c=h.HTTPConnection('{ip}',{PORT},timeout=2);"
                            f"c.request('GET','/health'); print(c.getresponse().status)"],
                           capture_output=True, text=True, timeout=10)
        if r.stdout.strip() == "200":
            return
        time.sleep(0.2)
    raise SystemExit("not ready in time")


def decode_rate(ip: str, tokens: int) -> float:
    """Tokens per second of one streamed greedy completion, after its first token."""
    c = http.client.HTTPConnection(ip, PORT, timeout=300)
    body = {"model": "vsup-tiny-25m", "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0, "stream": True}
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    stamps = []
    for line in r:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            stamps.append(time.perf_counter())
    c.close()
    if len(stamps) < 2:
        raise SystemExit("the stream carried fewer than two chunks")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vsup", required=True)
    ap.add_argument("--cross-node-bench", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("multi_node_bench: needs root (network namespaces)")
    out = sys.stderr if a.json else sys.stdout
    ns = Namespaces()
    result: dict = {"addresses": ns.ips}
    try:
        r = subprocess.run([a.cross_node_bench, "--json", "--netns", ",".join(ns.names),
                            "--addresses", ",".join(ns.ips)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"cross_node_bench failed:\n{r.stderr}")
        result["all_reduce"] = json.loads(r.stdout)["rows"]
        print(r.stderr, file=out)

        model = ["--engine", "cpu", "--model", "vsup-tiny-25m", "--port", str(PORT)]
        configs = {}
        with tempfile.TemporaryDirectory(prefix="vsup-multi-node-bench-") as tmp:
            for label, tp in (("TP 1, one node", 1), ("TP 2, one node", 2)):
                p = start(a.vsup, tmp, ns.names[0], label.replace(" ", "").replace(",", "-"),
                          [*model, "--host", ns.ips[0], "--tensor-parallel-size", str(tp)])
                try:
                    wait_ready(ns.names[0], ns.ips[0], p)
                    configs[label] = [decode_rate_in(ns, 0, a.tokens) for _ in range(a.runs)]
                finally:
                    stop(p)
            group = [*model, "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr",
                     ns.ips[0], "--master-port", str(MASTER_PORT)]
            w = start(a.vsup, tmp, ns.names[1], "worker", ["--headless", "--node-rank", "1",
                                                           *group])
            l = start(a.vsup, tmp, ns.names[0], "leader", [*group, "--host", ns.ips[0]])
            try:
                wait_ready(ns.names[0], ns.ips[0], l)
                configs["TP 2, two nodes"] = [decode_rate_in(ns, 0, a.tokens)
                                              for _ in range(a.runs)]
            finally:
                stop(l, w)
        result["decode_tokens_per_s"] = {k: statistics.median(v) for k, v in configs.items()}
        base = result["decode_tokens_per_s"]["TP 2, one node"]
        print(f"decode, vsup-tiny-25m, {a.tokens} tokens, batch 1 (median of {a.runs})", file=out)
        print(f"{'engine':<18} {'tokens/s':>10} {'x TP 2 one node':>16}", file=out)
        for k, v in result["decode_tokens_per_s"].items():
            print(f"{k:<18} {v:>10.1f} {v / base:>16.2f}", file=out)
    finally:
        ns.close()
    if a.json:
        print(json.dumps(result))


def decode_rate_in(ns: Namespaces, node: int, tokens: int) -> float:
    """decode_rate() run inside node's namespace (the leader's address is only reachable there)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import multi_node_bench as b; print(b.decode_rate({ns.ips[node]!r}, {tokens}))")
    r = subprocess.run(["ip", "netns", "exec", ns.names[node], sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"decode run failed: {r.stderr}")
    return float(r.stdout.strip())


if __name__ == "__main__":
    main()
