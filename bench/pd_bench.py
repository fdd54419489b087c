#!/usr/bin/env python3
"""Time to first token through disaggregated prefill/decode, against the same request on a
single instance, measured in the same run on the same machine.

    python3 bench/pd_bench.py --vsup build/tools/vsup [--runs N] [--json]

Starts three `vsup run` trees of the CPU engine (vsup-tiny-25m by default): a prefill instance
and a decode instance (--kv-connector vsup, --kv-transport auto: shared memory on this host, or
--transport tcp) and a plain single instance. For each prompt length, with max_tokens 1 and a
fresh prompt every run (median of --runs):

  single     the request on the single instance: its time to first token;
  P/D        the prefill leg (do_remote_decode) then the decode leg (the pull of every rank's
             blocks, then the last prompt token computed again), one after the other, as a
             router sends them: the time to first token a client of P/D sees;
  decode leg the second leg alone (what P/D adds on top of a prefill);
  recompute  the same request on the decode instance without kv_transfer_params (decode
             computing the prompt itself).

--json: one JSON object on stdout (the table goes to stderr), per prompt length the four
medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        doc = json.load(r)
    return time.perf_counter() - t0, doc


def start(vsup: str, tmp: str, name: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    err = open(os.path.join(tmp, name + ".log"), "wb")
    p = subprocess.Popen([vsup, "run", "--port", str(port), "--control-socket",
                          os.path.join(tmp, name + ".sock"), *args],
                         stdout=err, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return p, port
        except OSError:
            pass
        if p.poll() is not None:
            sys.exit(f"{name} exited during start-up; see {err.name}")
        time.sleep(0.05)
    sys.exit(f"{name} did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vsup", required=True)
    ap.add_argument("--model", default="vsup-tiny-25m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lengths", default="128,512,1024,2000")
    ap.add_argument("--transport", default="auto", choices=["auto", "shm", "tcp"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    table = sys.stderr if a.json else sys.stdout
    common = ["--engine", "cpu", "--model", a.model]
    with tempfile.TemporaryDirectory() as tmp:
        kv_prefill, kv_decode = free_port(), free_port()
        procs = []
        try:
            prefill, pp = start(a.vsup, tmp, "prefill", [*common, "--kv-connector", "vsup",
                                                          "--kv-role", "prefill",
                                                          "--kv-port", str(kv_prefill)])
            procs.append(prefill)
            decode, dp = start(a.vsup, tmp, "decode", [*common, "--kv-connector", "vsup",
                                                        "--kv-role", "decode", "--kv-port",
                                                        str(kv_decode), "--kv-transport",
                                                        a.transport])
            procs.append(decode)
            single, sp = start(a.vsup, tmp, "single", common)
            procs.append(single)
            rng = random.Random(1)
            out = {}
            print(f"{'prompt tokens':>14} {'single ms':>10} {'P/D ms':>9} {'decode leg':>11} "
                  f"{'recompute':>10}", file=table)
            for n in (int(x) for x in a.lengths.split(",")):
                times = {"single": [], "pd": [], "decode_leg": [], "recompute": []}
                for _ in range(a.runs + 1):  # the first run of each length warms up
                    prompt = "".join(rng.choice(string.ascii_letters) for _ in range(n))
                    body = {"model": a.model, "prompt": prompt, "max_tokens": 1,
                            "temperature": 0}
                    t_single, _ = post(sp, body)
                    t_pre, doc = post(pp, {**body, "kv_transfer_params": {"do_remote_decode": True}})
                    t_dec, _ = post(dp, {**body, "kv_transfer_params": doc["kv_transfer_params"]})
                    t_rec, _ = post(dp, body)
                    for k, v in (("single", t_single), ("pd", t_pre + t_dec),
                                 ("decode_leg", t_dec), ("recompute", t_rec)):
                        times[k].append(v)
                med = {k: statistics.median(v[1:]) * 1000 for k, v in times.items()}
                out[str(n)] = {f"{k}_ms": round(v, 2) for k, v in med.items()}
                print(f"{n:>14} {med['single']:>10.1f} {med['pd']:>9.1f} {med['decode_leg']:>11.1f} "
                      f"{med['recompute']:>10.1f}", file=table)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(60)
    if a.json:
        print(json.dumps({"pd_ttft": out, "transport": a.transport, "model": a.model}, indent=2))


if __name__ == "__main__":
    main()
