#!/usr/bin/env python3
"""Soak: many library create/destroy cycles and many serve-SIGTERM-restart cycles under load.

Out of the default suite; run it by hand or from CI (see README.md):

    python3 tests/soak/soak.py --vsup build/tools/vsup \\
        --embedding-test build/tests/embedding/embedding_test [--serve-cycles 100] \\
        [--library-cycles 1000] [--quick]

Library part: runs the embedding test case "two hundred LLMs created and destroyed, some
mid-stream, leave the host as it was" once, in one process, with VSUP_SOAK_CYCLES=N: that test
case loops N times and itself asserts that the host is as it was (fds, threads, children, files).

Serve part: each cycle starts `vsup run --engine sim` on the same port, drives load (plain and
streaming completions on fresh connections) until enough requests succeeded, sends SIGTERM while
requests are in flight, and asserts: exit 0; every request either completed (200, a final
finish_reason) or was told "abort"; connects refused only after SIGTERM (counted apart); no
process of the tree left; nothing left in the control-socket directory. At checkpoints it records
this harness's fds, threads and RSS and the number of live vsup processes system-wide, and at the
end asserts they did not grow.

Exit status: 0 when every check passed, 1 otherwise (the summary says which).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 20  # --shutdown-timeout 5 plus slack
RSS_SLACK_KB = 4096  # Python's allocator settles over the first cycles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SoakFailure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class SoakFailure(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Measurements


def self_usage() -> dict:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threads, "rss_kb": rss}


def live_processes_of(exe: str, xdg: Path) -> list[int]:
    """Live processes running EXE with our XDG_RUNTIME_DIR (other vsup users are not ours)."""
    mark = f"XDG_RUNTIME_DIR={xdg}".encode()
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{e}/exe") == exe and \
                    mark in open(f"/proc/{e}/environ", "rb").read().split(b"\0"):
                with open(f"/proc/{e}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        out.append(int(e))
        except OSError:
            pass
    return out


def reap_adopted() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Tally:
    ok: int = 0                 # 200 with a final finish_reason other than abort
    aborted: int = 0            # told finish_reason "abort" (the documented shutdown outcome)
    refused_after_term: int = 0  # connect refused once the listener closed
    reset_after_term: int = 0   # a connect reset as the listener closed (never served)
    turned_away: int = 0        # 503 while draining
    in_flight: int = 0          # requests sent and not yet answered, now
    in_flight_at_term: int = 0  # ... when SIGTERM was sent
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, detail: str = "") -> None:
        with self.lock:
            if kind == "fail":
                self.failures.append(detail)
            else:
                setattr(self, kind, getattr(self, kind) + 1)


def one_request(port: int, stream: bool, terminated: threading.Event, tally: Tally) -> bool:
    """Sends one completion on a fresh connection; returns False when the client should stop."""
    body = {"model": "vsup-sim", "prompt": "soak", "max_tokens": 16, "stream": stream}
    after_term = terminated.is_set()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.connect()
    except ConnectionRefusedError:
        if after_term or terminated.is_set():
            tally.add("refused_after_term")
            return False
        tally.add("fail", "connect refused before SIGTERM")
        return False
    except ConnectionResetError:
        if terminated.is_set():
            tally.add("reset_after_term")
            return False
        tally.add("fail", "connect reset before SIGTERM")
        return False
    with tally.lock:
        tally.in_flight += 1
    try:
        c.request("POST", "/v1/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 503 and terminated.is_set():
            r.read()
            tally.add("turned_away")
            return False
        if r.status != 200:
            tally.add("fail", f"status {r.status}: {r.read()[:200]!r}")
            return True
        if stream:
            raw = r.read().decode()
            events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                tally.add("fail", f"stream did not end with [DONE]: {raw[-200:]!r}")
                return True
            reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]
                       if json.loads(e).get("choices")]
            reason = [x for x in reasons if x][-1:] or [None]
            reason = reason[0]
        else:
            reason = json.loads(r.read())["choices"][0]["finish_reason"]
        if reason == "abort":
            tally.add("aborted")
        elif reason in ("length", "stop"):
            tally.add("ok")
        else:
            tally.add("fail", f"finish_reason {reason!r}")
        return True
    except (BrokenPipeError, ConnectionResetError) as e:
        # After SIGTERM, a connect that sat in the accept queue as the listener closed is reset
        # with no response byte (http.client's RemoteDisconnected is a ConnectionResetError):
        # never served. Counted apart, not a failure; before SIGTERM it is one.
        if terminated.is_set():
            tally.add("reset_after_term")
            return False
        tally.add("fail", f"before SIGTERM: {e!r}")
        return True
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        # A request accepted by the server must end in a response, even at shutdown.
        tally.add("fail", f"{'after' if terminated.is_set() else 'before'} SIGTERM: {e!r}")
        return not terminated.is_set()
    finally:
        with tally.lock:
            tally.in_flight -= 1
        c.close()


def client_loop(port: int, stream: bool, terminated: threading.Event, stop: threading.Event,
                tally: Tally) -> None:
    while not stop.is_set():
        if not one_request(port, stream, terminated, tally):
            return


# ---------------------------------------------------------------------------------------------
# Serve cycles


def serve_cycle(vsup: str, port: int, xdg: Path, want_ok: int, clients: int) -> Tally:
    log = xdg / "vsup.stderr"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    env.pop("NOTIFY_SOCKET", None)
    argv = [vsup, "run", "--engine", "sim", "--model", "vsup-sim", "--sim-token-ms", "2",
            "--shutdown-timeout", "5", "--port", str(port)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env, start_new_session=True)
    tally = Tally()
    stop, terminated = threading.Event(), threading.Event()
    threads = []
    try:
        m = wait_for(lambda: re.search(r"control socket (\S+)", log.read_text(errors="replace"))
                     or proc.poll() is not None, START_TIMEOUT_S, "the control socket line")
        if proc.poll() is not None:
            raise SoakFailure(f"vsup exited at start-up ({proc.returncode}):\n{log.read_text()}")
        sock = m.group(1)

        def healthy():
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                ok = c.getresponse().status == 200
                c.close()
                return ok
            except OSError:
                return proc.poll() is not None

        wait_for(healthy, START_TIMEOUT_S, "/health 200")
        tree = json.loads(subprocess.run([vsup, "tree", "--json", "--socket", sock],
                                         capture_output=True, text=True, timeout=10,
                                         check=True).stdout)
        pids = []

        def walk(n):
            if n.get("pid"):
                pids.append(n["pid"])
            for c in n["children"]:
                walk(c)

        walk(tree)
        for i in range(clients):
            t = threading.Thread(target=client_loop, daemon=True,
                                 args=(port, i % 2 == 1, terminated, stop, tally))
            t.start()
            threads.append(t)
        wait_for(lambda: tally.ok >= want_ok or tally.failures, 60, f"{want_ok} requests served")
        # SIGTERM while requests are in flight: the clients never pause between requests.
        with tally.lock:
            terminated.set()
            proc.send_signal(signal.SIGTERM)
            tally.in_flight_at_term = tally.in_flight
        try:
            rc = proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SoakFailure(f"vsup did not exit {EXIT_TIMEOUT_S}s after SIGTERM")
        if rc != 0:
            tally.add("fail", f"vsup exited {rc}:\n" + "\n".join(log.read_text().splitlines()[-20:]))
        for t in threads:
            t.join(35)
            if t.is_alive():
                tally.add("fail", "a client thread hung after the tree exited")
        reap_adopted()
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                 open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                 for p in pids) or reap_adopted(),
                 3, f"every process of the tree {pids} to be gone")
        left = sorted(p.name for p in xdg.glob("vsup/*"))
        if left:
            tally.add("fail", f"left in the control-socket directory: {left}")
        if (xdg / "vsup").exists():
            tally.add("fail", "the control-socket directory was not removed")
        return tally
    finally:
        stop.set()
        terminated.set()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(10)
        log.unlink(missing_ok=True)


def run_serve(args, results: dict) -> bool:
    xdg = Path(tempfile.mkdtemp(prefix="vsup-soak-"))
    port = free_port()
    vsup = os.path.realpath(args.vsup)
    n = args.serve_cycles
    checkpoints = sorted({1, max(1, n // 10), n})
    usage = {}
    totals = Tally()
    ok = True
    t0 = time.monotonic()
    try:
        for i in range(1, n + 1):
            try:
                t = serve_cycle(vsup, port, xdg, args.requests_per_cycle, args.clients)
            except SoakFailure as e:
                t = Tally()
                t.failures.append(str(e))
            if t.in_flight_at_term == 0 and not t.failures:
                t.failures.append("no request was in flight at SIGTERM")
            for k in ("in_flight_at_term", "ok", "aborted", "refused_after_term", "reset_after_term", "turned_away"):
                setattr(totals, k, getattr(totals, k) + getattr(t, k))
            if t.failures:
                ok = False
                totals.failures += [f"cycle {i}: {f}" for f in t.failures]
                print(f"serve cycle {i}: FAILED: {t.failures[:3]}", flush=True)
            if i in checkpoints:
                u = self_usage()
                u["vsup_processes"] = len(live_processes_of(vsup, xdg))
                usage[i] = u
                print(f"serve cycle {i}/{n}: {u}", flush=True)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)
    first, last = usage[checkpoints[0]], usage[checkpoints[-1]]
    growth = []
    for k in ("fds", "threads", "vsup_processes"):
        if last[k] != first[k]:
            growth.append(f"{k} {first[k]} -> {last[k]}")
    if last["rss_kb"] - first["rss_kb"] > RSS_SLACK_KB:
        growth.append(f"rss {first['rss_kb']} kB -> {last['rss_kb']} kB")
    if last["vsup_processes"] != 0:
        growth.append(f"{last['vsup_processes']} vsup processes alive after a cycle")
    if growth:
        ok = False
        totals.failures.append("growth: " + "; ".join(growth))
    results["serve"] = {"cycles": n, "seconds": round(time.monotonic() - t0, 1),
                        "in_flight_at_term": totals.in_flight_at_term,
                        "ok": totals.ok, "aborted": totals.aborted,
                        "refused_after_term": totals.refused_after_term,
                        "reset_after_term": totals.reset_after_term,
                        "turned_away_503": totals.turned_away,
                        "failures": totals.failures, "usage": usage}
    return ok


# ---------------------------------------------------------------------------------------------
# Library cycles


# doctest splits --test-case filters at commas, and the full name has two: match its head.
LIBRARY_CASE = "two hundred LLMs created and destroyed*"


def run_library(args, results: dict) -> bool:
    t0 = time.monotonic()
    env = {**os.environ, "VSUP_SOAK_CYCLES": str(args.library_cycles),
           "VSUP_EXE": os.path.realpath(args.vsup)}
    # The test case's own hang guard scales with the cycle count (300 s per 200).
    timeout = 60 + 2 * 300 * args.library_cycles / 200
    try:
        r = subprocess.run([args.embedding_test, f"--test-case={LIBRARY_CASE}"], env=env,
                           capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        rc = r.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"timed out after {timeout:.0f}s: {e}", None
    passed = rc == 0 and re.search(r"test cases:\s+1\s+\|\s+1 passed", out) is not None
    results["library"] = {"cycles": args.library_cycles, "seconds": round(time.monotonic() - t0, 1),
                          "rc": rc, "passed": passed,
                          "doctest": "\n".join(l for l in out.splitlines()
                                               if "test cases" in l or "assertions" in l
                                               or "cycles" in l.lower())}
    if not passed:
        results["library"]["output_tail"] = "\n".join(out.splitlines()[-40:])
    return passed


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vsup", required=True)
    ap.add_argument("--embedding-test", required=True)
    ap.add_argument("--serve-cycles", type=int, default=100)
    ap.add_argument("--library-cycles", type=int, default=1000)
    ap.add_argument("--requests-per-cycle", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--quick", action="store_true",
                    help="a 1-2 minute version: 20 serve cycles, 40 library cycles")
    ap.add_argument("--skip-library", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.serve_cycles, args.library_cycles = 20, 40
    # Adopt orphans so that a process of the tree whose parent died is ours to see and reap.
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    results: dict = {}
    ok = True
    if not args.skip_serve:
        ok &= run_serve(args, results)
    if not args.skip_library:
        ok &= run_library(args, results)

    print("\n=== soak summary ===")
    if "serve" in results:
        s = results["serve"]
        print(f"serve:   {s['cycles']} cycles in {s['seconds']}s; in flight at SIGTERM (sum) "
              f"{s['in_flight_at_term']}; requests ok {s['ok']}, "
              f"aborted {s['aborted']}, refused after SIGTERM {s['refused_after_term']}, "
              f"reset after SIGTERM {s['reset_after_term']}, 503 while draining "
              f"{s['turned_away_503']}, failures {len(s['failures'])}")
        print(f"         {'cycle':>6} {'fds':>5} {'threads':>8} {'rss_kB':>8} {'vsup procs':>10}")
        for c, u in s["usage"].items():
            print(f"         {c:>6} {u['fds']:>5} {u['threads']:>8} {u['rss_kb']:>8} "
                  f"{u['vsup_processes']:>10}")
        for f in s["failures"][:20]:
            print(f"   FAIL: {f}")
    if "library" in results:
        lib = results["library"]
        print(f"library: {lib['cycles']} cycles in one process in {lib['seconds']}s: "
              f"{'passed' if lib['passed'] else 'FAILED'} (rc {lib['rc']})")
        for line in lib["doctest"].splitlines():
            print(f"         {line.strip()}")
        if not lib["passed"]:
            print(lib.get("output_tail", ""))
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
