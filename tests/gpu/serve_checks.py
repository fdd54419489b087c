#!/usr/bin/env python3
"""The GPU checks that need whole process trees (tests/gpu/run.sh runs them on a machine with a GPU).

1. Three `vsup run --engine cuda` serve -> SIGTERM cycles: each answers a completion, exits 0,
   and leaves no process of its session and no compute process on the GPU (nvidia-smi).
2. A SIGKILLed rank mid-decode: the streaming request ends with an error, the tree exits
   non-zero within the collective timeout (plus its bounded stop), and the GPU is left empty.

Prints one line per check, "name | PASS/FAIL | detail"; exit 0 only when all pass. Standard
library only, no pytest: the GPU machine may have nothing but the build's dependencies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.add(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return {int(x) for x in out.stdout.split() if x.strip().isdigit()}


def wait_for(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


class Tree:
    def __init__(self, vsup: str, extra: list[str]):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="vsup-gpu-")
        argv = [vsup, "run", "--engine", "cuda", "--port", str(self.port), "--control-socket",
                os.path.join(self.dir, "ctl.sock"), *extra]
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.err, start_new_session=True)
        self.seen: set[int] = set()

    def stderr(self) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()[-2000:]

    def health(self) -> int:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            c.request("GET", "/health")
            return c.getresponse().status
        except OSError:
            return 0

    def ready(self, timeout: float = 180) -> bool:
        ok = wait_for(lambda: self.health() == 200 or self.proc.poll() is not None, timeout)
        self.seen |= session_pids(self.proc.pid)
        return ok and self.proc.poll() is None

    def post(self, body: dict, timeout: float = 120) -> tuple[int, str]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")

    def left(self) -> list[str]:
        alive = session_pids(self.proc.pid)
        on_gpu = gpu_pids() & (self.seen | alive)
        return [f"running: {p} {cmdline(p)}" for p in sorted(alive)] + \
               [f"on the GPU: {p}" for p in sorted(on_gpu)]

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def serve_cycles(vsup: str) -> tuple[bool, str]:
    times = []
    for i in range(3):
        t = Tree(vsup, [])
        try:
            if not t.ready():
                return False, f"cycle {i}: not ready: {t.stderr()}"
            status, body = t.post({"model": "vsup-tiny-25m", "prompt": "Hello", "max_tokens": 16,
                                   "temperature": 0})
            if status != 200:
                return False, f"cycle {i}: completion {status}: {body}"
            t.seen |= session_pids(t.proc.pid)
            start = time.monotonic()
            t.proc.send_signal(signal.SIGTERM)
            code = t.proc.wait(60)
            times.append(time.monotonic() - start)
            if code != 0:
                return False, f"cycle {i}: exit {code}: {t.stderr()}"
            if not wait_for(lambda: not t.left(), 5):
                return False, f"cycle {i}: left behind: {t.left()}"
        finally:
            t.kill()
    return True, "3 cycles exit 0, nothing left; SIGTERM to exit " + \
        ", ".join(f"{x:.2f} s" for x in times)


def killed_rank(vsup: str) -> tuple[bool, str]:
    timeout_ms = 5000
    t = Tree(vsup, ["--collective-timeout-ms", str(timeout_ms)])
    try:
        if not t.ready():
            return False, f"not ready: {t.stderr()}"
        result: dict = {"status": 0, "body": ""}
        decoding = threading.Event()

        def stream():
            try:
                c = http.client.HTTPConnection("127.0.0.1", t.port, timeout=120)
                body = {"model": "vsup-tiny-25m", "prompt": "Once upon a time", "max_tokens": 1500,
                        "temperature": 0, "stream": True}
                c.request("POST", "/v1/completions", json.dumps(body),
                          {"Content-Type": "application/json"})
                r = c.getresponse()
                result["status"] = r.status
                while True:
                    line = r.readline()
                    if not line:
                        break
                    result["body"] += line.decode(errors="replace")
                    if line.startswith(b"data: {"):
                        decoding.set()  # a token has come: the kill lands mid-decode
            except Exception as e:  # a reset connection is an answer too
                result["body"] += f"connection error: {e}"
            decoding.set()

        th = threading.Thread(target=stream)
        th.start()
        workers = [p for p in session_pids(t.proc.pid) if "__worker" in cmdline(p)]
        if not workers:
            return False, "no rank process found"
        if not decoding.wait(60):
            return False, "no token streamed within 60 s"
        killed_at = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)
        code = t.proc.wait(timeout_ms / 1000 + 30)
        exit_s = time.monotonic() - killed_at
        th.join(30)
        body = result.get("body", "")
        told = "error" in body.lower()  # an error event ended the stream (it had begun: 200)
        if code == 0:
            return False, "the tree exited 0 after a rank was killed"
        if not told:
            return False, f"the client was not told: {result.get('status')} {body[-300:]}"
        if not wait_for(lambda: not t.left(), 5):
            return False, f"left behind: {t.left()}"
        return True, f"exit {code} {exit_s:.2f} s after the kill, client told, GPU empty"
    finally:
        t.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vsup", required=True)
    args = ap.parse_args()
    ok = True
    for name, check in (("serve -> SIGTERM x3", serve_cycles), ("SIGKILL a rank mid-decode", killed_rank)):
        try:
            passed, detail = check(args.vsup)
        except Exception as e:
            passed, detail = False, f"{type(e).__name__}: {e}"
        print(f"{name:<34} | {'PASS' if passed else 'FAIL'} | {detail}")
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
