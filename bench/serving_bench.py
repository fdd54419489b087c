#!/usr/bin/env python3
"""Serving benchmarks for `vsup run`, each next to a baseline measured in the same run.

    python3 bench/serving_bench.py --vsup build/tools/vsup \
        --plain build/bench/plain_http_server [--quick]

Prints one markdown table on stdout (progress and the machine on stderr). Rows:

  (a) idle shutdown: SIGTERM -> `vsup run` exits, --tensor-parallel-size 1, 2, 4.
      Baseline: SIGTERM -> exit of a tiny sh parent that forwards SIGTERM to as many bare
      `sleep` children as vsup's tree has processes, and waits for them.
  (b) startup: spawn -> first GET /health answered 200 (TP 1, 2, 4).
      Baseline: spawn -> first connect accepted by plain_http_server.
  (c) request overhead: wrk, POST /v1/completions max_tokens 1 with --sim-token-ms 0 (the engine
      is free, so the front end + engine RPC path is what is measured), against vsup and against
      plain_http_server (libuv + llhttp, one loop, the same response bytes). Requests/s, mean and
      p99 latency, the mean latency difference, and server CPU time per request.
  (d) drain precision: --shutdown-timeout 1 with a long streaming request in flight; SIGTERM ->
      the client reads the final `"finish_reason":"abort"` chunk. Baseline: the deadline (1 s).

Python 3 stdlib only, plus the `wrk` binary (Debian package `wrk`). Every process starts in its
own session; every wait is bounded; everything started is killed in a `finally`.
"""

import argparse
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REQUEST_BODY = '{"model":"vsup-sim","prompt":"hello","max_tokens":1}'
STREAM_BODY = '{"model":"vsup-sim","prompt":"hello","max_tokens":4096,"stream":true}'  # 41 s at 10 ms

_sessions = []  # session ids (= leader pids) of everything we started


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def now():
    return time.monotonic()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid):
    """Pids of every live process whose session id is `sid` (zombies excluded)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # after "pid (comm) ": state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(name))
    return out


def session_cpu_seconds(sid):
    """utime + stime of every live process in the session (children's own time, not reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in session_members(sid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def kill_session(sid):
    """SIGKILL every process of the session; children of vsup each have their own group."""
    for _ in range(50):
        pids = session_members(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


class Proc:
    """A child in its own session, watched through a pidfd (no polling for its exit)."""

    def __init__(self, argv, logfile=None):
        self.p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                                  stdout=logfile or subprocess.DEVNULL,
                                  stderr=logfile or subprocess.DEVNULL)
        self.pid = self.p.pid
        _sessions.append(self.pid)
        self.pidfd = os.pidfd_open(self.pid)

    def wait_exit(self, timeout):
        """Block until the process exits; returns the time it was seen to exit, or None."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return None
        t = now()
        self.p.wait(timeout=1)
        return t

    def close(self):
        if self.p.poll() is None:
            kill_session(self.pid)
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        else:
            kill_session(self.pid)  # stragglers of an exited leader
        os.close(self.pidfd)


def http_get_status(port, path, timeout=1.0):
    """One GET on a fresh connection; the status code, or None if nothing answered."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
            return int(m.group(1)) if m else None
    except OSError:
        return None


def http_post(port, path, body, timeout=5.0):
    """POST with Connection: close; returns (status, headers text, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(re.match(rb"HTTP/1\.[01] (\d{3})", head).group(1))
    return status, head.decode(errors="replace"), rest


def connect_ok(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(pred, timeout, proc=None, step=0.0005):
    """Poll pred() every `step` s; the time it first held, or raise after `timeout` s."""
    deadline = now() + timeout
    while now() < deadline:
        if pred():
            return now()
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.p.returncode}")
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout} s")


def vsup_argv(args, port, tp, extra=()):
    return [args.vsup, "run", "--port", str(port), "--tensor-parallel-size", str(tp),
            "--engine", "sim", "--model", "vsup-sim", "--log-level", "warn", *extra]


# --- (a) + (b): startup and idle shutdown ------------------------------------------------------

def vsup_start_stop(args, tp, logf):
    """One run: spawn -> /health 200, then SIGTERM -> exit. (startup s, shutdown s, nprocs)."""
    port = free_port()
    t0 = now()
    proc = Proc(vsup_argv(args, port, tp, ["--sim-token-ms", "0"]), logf)
    try:
        t1 = wait_until(lambda: http_get_status(port, "/health") == 200, 30, proc)
        nprocs = len(session_members(proc.pid))
        time.sleep(0.05)  # idle
        t2 = now()
        os.kill(proc.pid, signal.SIGTERM)
        t3 = proc.wait_exit(30)
        if t3 is None:
            raise RuntimeError("vsup did not exit within 30 s of SIGTERM")
        left = session_members(proc.pid)
        if left:
            log(f"  warning: {len(left)} process(es) of the tree outlived vsup: {left}")
        return t1 - t0, t3 - t2, nprocs
    finally:
        proc.close()


FORWARDER = r'''
n=$1; pids=""
i=0; while [ $i -lt $n ]; do sleep 1000 & pids="$pids $!"; i=$((i+1)); done
trap 'kill -TERM $pids; wait; exit 0' TERM
wait
'''


def bare_stop(nprocs):
    """SIGTERM -> exit of a sh parent + (nprocs - 1) sleep children it forwards SIGTERM to."""
    proc = Proc(["/bin/sh", "-c", FORWARDER, "sh", str(nprocs - 1)])
    try:
        wait_until(lambda: len(session_members(proc.pid)) >= nprocs, 10, proc)
        time.sleep(0.05)
        t0 = now()
        os.kill(proc.pid, signal.SIGTERM)
        t1 = proc.wait_exit(10)
        if t1 is None:
            raise RuntimeError("baseline parent did not exit")
        return t1 - t0
    finally:
        proc.close()


def plain_start(args, body_file):
    """Spawn -> first connect accepted by plain_http_server."""
    port = free_port()
    t0 = now()
    proc = Proc([args.plain, "--port", str(port), "--body-file", body_file])
    try:
        t1 = wait_until(lambda: connect_ok(port), 10, proc)
        return t1 - t0
    finally:
        proc.close()


# --- (c): request overhead with wrk --------------------------------------------------------------

WRK_LUA = r'''
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%%d duration_us=%%d mean_us=%%f p99_us=%%f "
    .. "errors=%%d status_errors=%%d\n",
    summary.requests, summary.duration, latency.mean, latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
'''


def run_wrk(args, lua, port, seconds, sid):
    cpu0 = session_cpu_seconds(sid)
    argv = [args.wrk, "-t1", f"-c{args.connections}", f"-d{seconds}s", "-s", lua,
            f"http://127.0.0.1:{port}/v1/completions"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         start_new_session=True)
    cpu1 = session_cpu_seconds(sid)
    m = re.search(r"BENCH requests=(\d+) duration_us=(\d+) mean_us=([\d.]+) p99_us=([\d.]+) "
                  r"errors=(\d+) status_errors=(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    reqs, dur = int(m.group(1)), int(m.group(2))
    if int(m.group(5)) or int(m.group(6)):
        raise RuntimeError(f"wrk saw errors: {out.stdout}")
    return {"rps": reqs / (dur / 1e6), "mean_us": float(m.group(3)),
            "p99_us": float(m.group(4)), "cpu_us_per_req": (cpu1 - cpu0) / reqs * 1e6}


# --- (d): drain precision ----------------------------------------------------------------------

def drain_run(args, logf):
    """Signal -> final abort chunk of a long stream, with --shutdown-timeout 1. Seconds."""
    port = free_port()
    proc = Proc(vsup_argv(args, port, 1, ["--sim-token-ms", "10", "--shutdown-timeout", "1"]),
                logf)
    try:
        wait_until(lambda: http_get_status(port, "/health") == 200, 30, proc)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n"
                       f"\r\n{STREAM_BODY}").encode())
            buf = b""
            while buf.count(b"data: ") < 3:  # streaming for sure
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("stream ended before the signal")
                buf += chunk
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"stream request refused: {buf[:300]!r}")
            time.sleep(0.05)
            t_sig = now()
            os.kill(proc.pid, signal.SIGTERM)
            s.setblocking(False)
            tail = b""
            deadline = t_sig + 10
            while True:
                left = deadline - now()
                if left <= 0:
                    raise RuntimeError("no abort chunk within 10 s of SIGTERM")
                r, _, _ = select.select([s], [], [], left)
                if not r:
                    continue
                chunk = s.recv(65536)
                t = now()
                if not chunk:
                    raise RuntimeError("stream closed without an abort chunk")
                tail = (tail + chunk)[-4096:]
                if b'"finish_reason":"abort"' in tail:
                    t_abort = t
                    break
        finally:
            s.close()
        if proc.wait_exit(10) is None:
            log("  warning: vsup did not exit within 10 s after the drain")
        return t_abort - t_sig
    finally:
        proc.close()


# --- main --------------------------------------------------------------------------------------

def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vsup", required=True)
    ap.add_argument("--plain", required=True, help="build/bench/plain_http_server")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    ap.add_argument("--quick", action="store_true", help="fewer runs, shorter wrk")
    ap.add_argument("--runs", type=int, help="runs per median (default 9, --quick 3)")
    ap.add_argument("--seconds", type=float, help="wrk duration per round (default 5, quick 1)")
    ap.add_argument("--rounds", type=int, help="wrk rounds per server (default 3, quick 1)")
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 9)
    seconds = args.seconds or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    for exe in (args.vsup, args.plain):
        if not os.access(exe, os.X_OK):
            sys.exit(f"serving_bench: not executable: {exe}")
    if not shutil.which(args.wrk):
        sys.exit("serving_bench: wrk not found (apt-get install wrk)")

    log(f"machine: {machine()}")
    log(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews timings)")
    log(f"runs per median: {runs}; wrk: {rounds} x {seconds:g} s, 1 thread, "
        f"{args.connections} connections")
    rows = []
    tmp = tempfile.mkdtemp(prefix="vsup-serving-bench-")
    # Run private copies, so a rebuild of the build dir during the run cannot change or
    # remove the binaries under test.
    for name in ("vsup", "plain"):
        copy = os.path.join(tmp, os.path.basename(getattr(args, name)))
        shutil.copy2(getattr(args, name), copy)
        setattr(args, name, copy)
    logf = open(os.path.join(tmp, "vsup.log"), "wb")
    try:
        # (c) first: it also yields the response body the baseline serves.
        log("(c) request overhead")
        port = free_port()
        vsup = Proc(vsup_argv(args, port, 1, ["--sim-token-ms", "0"]), logf)
        try:
            wait_until(lambda: http_get_status(port, "/health") == 200, 30, vsup)
            status, head, body = http_post(port, "/v1/completions", REQUEST_BODY)
            if status != 200 or b'"finish_reason"' not in body:
                raise RuntimeError(f"unexpected vsup answer: {status} {head} {body!r}")
            body_file = os.path.join(tmp, "body.json")
            with open(body_file, "wb") as f:
                f.write(body)
            lua = os.path.join(tmp, "post.lua")
            with open(lua, "w") as f:
                f.write(WRK_LUA % REQUEST_BODY)
            pport = free_port()
            plain = Proc([args.plain, "--port", str(pport), "--body-file", body_file])
            try:
                wait_until(lambda: connect_ok(pport), 10, plain)
                pstatus, _, pbody = http_post(pport, "/v1/completions", REQUEST_BODY)
                if pstatus != 200 or pbody != body:
                    raise RuntimeError("plain server answered differently")
                warm = min(1, seconds)
                run_wrk(args, lua, port, warm, vsup.pid)
                run_wrk(args, lua, pport, warm, plain.pid)
                vs, ps = [], []
                for r in range(rounds):  # alternate, so drift hits both alike
                    ps.append(run_wrk(args, lua, pport, seconds, plain.pid))
                    vs.append(run_wrk(args, lua, port, seconds, vsup.pid))
                    log(f"  round {r + 1}: vsup {vs[-1]['rps']:.0f} req/s, "
                        f"plain {ps[-1]['rps']:.0f} req/s")
            finally:
                plain.close()
        finally:
            vsup.close()
        v = {k: med([x[k] for x in vs]) for k in vs[0]}
        p = {k: med([x[k] for x in ps]) for k in ps[0]}
        what = (f"wrk {args.connections} conns, POST /v1/completions max_tokens 1, "
                f"sim-token-ms 0; vs libuv+llhttp fixed reply ({len(body)} B body)")
        rows.append(("(c) requests/s", f"{v['rps']:.0f}", f"{p['rps']:.0f}",
                     f"{v['rps'] / p['rps']:.2f}", what))
        rows.append(("(c) mean latency", f"{v['mean_us']:.0f} µs", f"{p['mean_us']:.0f} µs",
                     f"{v['mean_us'] / p['mean_us']:.1f}", "same runs"))
        rows.append(("(c) p99 latency", f"{v['p99_us']:.0f} µs", f"{p['p99_us']:.0f} µs",
                     f"{v['p99_us'] / p['p99_us']:.1f}", "same runs"))
        rows.append(("(c) overhead per request", f"+{v['mean_us'] - p['mean_us']:.0f} µs",
                     "0 µs", "", "vsup mean latency − baseline mean latency"))
        rows.append(("(c) server CPU per request", f"{v['cpu_us_per_req']:.1f} µs",
                     f"{p['cpu_us_per_req']:.1f} µs",
                     f"{v['cpu_us_per_req'] / p['cpu_us_per_req']:.1f}",
                     "user+sys of every server process / requests"))

        # (b) + (a): interleave vsup runs with baseline runs.
        for tp in (1, 2, 4):
            log(f"(a)(b) startup/shutdown, TP {tp}")
            vstart, vstop, bstart, bstop, nprocs = [], [], [], [], 0
            for _ in range(runs):
                st, sd, nprocs = vsup_start_stop(args, tp, logf)
                vstart.append(st)
                vstop.append(sd)
                bstart.append(plain_start(args, body_file))
                bstop.append(bare_stop(nprocs))
            rows.append((f"(a) idle shutdown, TP {tp}", f"{med(vstop) * 1e3:.2f} ms",
                         f"{med(bstop) * 1e3:.2f} ms", f"{med(vstop) / med(bstop):.1f}",
                         f"SIGTERM → exit; baseline: sh parent + {nprocs - 1} sleep children "
                         f"(vsup tree: {nprocs} processes)"))
            rows.append((f"(b) startup, TP {tp}", f"{med(vstart) * 1e3:.1f} ms",
                         f"{med(bstart) * 1e3:.1f} ms", f"{med(vstart) / med(bstart):.1f}",
                         "spawn → first /health 200; baseline: spawn → plain server accepts"))
        # Put (a) before (b) in the table.
        rows.sort(key=lambda r: r[0][:3])

        log("(d) drain precision")
        lates = [drain_run(args, logf) for _ in range(runs)]
        d = med(lates)
        rows.append(("(d) drain: SIGTERM → final abort chunk", f"{d * 1e3:.1f} ms",
                     "1000.0 ms", f"{d:.3f}",
                     f"--shutdown-timeout 1, long stream in flight: {(d - 1) * 1e3:+.1f} ms "
                     f"after the deadline (worst {max(lates) * 1e3 - 1000:+.1f} ms)"))
    finally:
        logf.close()
        for sid in _sessions:
            kill_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)

    log(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"| measurement (median of {runs}; wrk: median of {rounds} × {seconds:g} s) "
          "| vsup | baseline, same run | ratio | what |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
