#!/usr/bin/env python3
"""Serving benchmarks for `vsup run`, each next to a baseline measured in the same run.

    python3 bench/serving_bench.py --vsup build/tools/vsup \
        --plain build/bench/plain_http_server [--quick] [--json] [--rows abcd]

Prints one markdown table on stdout (progress and the machine on stderr); with --json, one JSON
object instead: every row's ratio under a stable name (req_per_s_vs_plain_c4, cpu_us_per_req_c32,
idle_stop_tp1_vs_floor, startup_tp2_vs_floor, drain_vs_deadline, ...) and the raw numbers. Rows:

  (a) idle shutdown: SIGTERM -> `vsup run` exits, --tensor-parallel-size 1, 2, 4.
      Baseline: SIGTERM -> exit of a tiny sh parent that forwards SIGTERM to as many bare
      `sleep` children as vsup's tree has processes, and waits for them.
  (b) startup: spawn -> first GET /health answered 200 (TP 1, 2, 4).
      Baseline: spawn -> first connect accepted by plain_http_server.
  (c) request overhead: wrk, POST /v1/completions max_tokens 1 with --sim-token-ms 0 (the engine
      is free, so the front end + engine RPC path is what is measured), against vsup and against
      plain_http_server (libuv + llhttp, one loop, the same response bytes), at 4 and at 32
      connections (--connections). Requests/s, mean and p99 latency, the mean latency
      difference, and server CPU time per request (user + sys of every process of the server's
      tree, from /proc). Then one more wrk round per server with `perf stat` counting
      raw_syscalls:sys_enter and context-switches over the server's whole tree (every server
      runs under `perf stat --control`, its counters enabled for that round only, so the timed
      rounds run without the tracepoint's cost): syscalls and context switches per request.
      Without a working `perf` those two rows say "n/a".
  (d) drain precision: --shutdown-timeout 1 with a long streaming request in flight; SIGTERM ->
      the client reads the final `"finish_reason":"abort"` chunk. Baseline: the deadline (1 s).

Python 3 stdlib only, plus the `wrk` binary (Debian package `wrk`) and, for the syscall and
context-switch counts, `perf` (Debian package `linux-perf`). Every process starts in its
own session; every wait is bounded; everything started is killed in a `finally`.
"""

import argparse
import json
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


def session_cpu_seconds(sid, exclude=()):
    """utime + stime of every live process in the session (children's own time, not reaped),
    but those in `exclude` (a `perf stat` watching the tree)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in session_members(sid):
        if pid in exclude:
            continue
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


PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches")


def perf_usable(perf):
    """Whether `perf stat` can count PERF_EVENTS for a child here (a short self-test)."""
    if not perf:
        return False
    try:
        out = subprocess.run([perf, "stat", "-x,", "-e", ",".join(PERF_EVENTS), "--", "/bin/true"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    counts = parse_perf(out.stderr)
    return out.returncode == 0 and all(counts.get(e, 0) > 0 for e in PERF_EVENTS[:1])


def parse_perf(text):
    """{event: count} from `perf stat -x,` output ("<not counted>" is 0)."""
    counts = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[2] in PERF_EVENTS:
            counts[f[2]] = int(f[0]) if f[0].isdigit() else 0
    return counts


class Server:
    """A server (vsup or the plain one) in its own session, under `perf stat` when `perf` is set:
    the counters follow the whole tree (perf's inherited events) but stay disabled except
    inside count(). `sid` is the session (perf's pid, or the server's); cpu_seconds() is the
    tree's CPU without perf's own."""

    def __init__(self, argv, tmp, name, perf=None, logfile=None):
        self.perf_out = None
        if perf:
            d = tempfile.mkdtemp(prefix=name + "-", dir=tmp)
            ctl, ack = os.path.join(d, "ctl"), os.path.join(d, "ack")
            os.mkfifo(ctl)
            os.mkfifo(ack)
            self.perf_out = os.path.join(d, "perf.out")
            argv = [perf, "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-D", "-1",
                    "--control", f"fifo:{ctl},{ack}", "-o", self.perf_out, "--", *argv]
            # O_RDWR: neither end blocks on the other's open (Linux FIFOs allow it).
            self.ctl = os.open(ctl, os.O_RDWR)
            self.ack = os.open(ack, os.O_RDWR | os.O_NONBLOCK)
        self.proc = Proc(argv, logfile)
        self.sid = self.proc.pid

    def cpu_seconds(self):
        return session_cpu_seconds(self.sid, exclude={self.sid} if self.perf_out else ())

    def _control(self, command):
        os.write(self.ctl, command.encode() + b"\n")
        r, _, _ = select.select([self.ack], [], [], 10)
        if not r:
            raise RuntimeError(f"perf stat did not acknowledge {command!r}")
        os.read(self.ack, 64)

    def count(self, fn):
        """fn() with the counters enabled."""
        self._control("enable")
        try:
            return fn()
        finally:
            self._control("disable")

    def stop(self):
        """SIGTERM the server and wait for it (and perf) to exit; the counts, or {} without perf."""
        if self.perf_out is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait_exit(30)
            return {}
        with open(f"/proc/{self.sid}/task/{self.sid}/children") as f:
            children = [int(x) for x in f.read().split()]
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        if self.proc.wait_exit(30) is None:
            raise RuntimeError("the server (under perf stat) did not exit within 30 s of SIGTERM")
        with open(self.perf_out) as f:
            return parse_perf(f.read())

    def close(self):
        self.proc.close()
        if self.perf_out:
            os.close(self.ctl)
            os.close(self.ack)


def run_wrk(args, lua, port, seconds, server, connections):
    cpu0 = server.cpu_seconds()
    argv = [args.wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", lua,
            f"http://127.0.0.1:{port}/v1/completions"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         start_new_session=True)
    cpu1 = server.cpu_seconds()
    m = re.search(r"BENCH requests=(\d+) duration_us=(\d+) mean_us=([\d.]+) p99_us=([\d.]+) "
                  r"errors=(\d+) status_errors=(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    reqs, dur = int(m.group(1)), int(m.group(2))
    if int(m.group(5)) or int(m.group(6)):
        raise RuntimeError(f"wrk saw errors: {out.stdout}")
    return {"requests": reqs, "rps": reqs / (dur / 1e6), "mean_us": float(m.group(3)),
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


def request_overhead(args, conns, tmp, logf, perf, seconds, rounds, body):
    """Row (c) at `conns` connections: (vsup medians, plain medians, vsup counts, plain counts,
    the response body). `body` is the response to serve from the plain server (None: take it
    from vsup's first answer)."""
    port = free_port()
    vsup = Server(vsup_argv(args, port, 1, ["--sim-token-ms", "0"]), tmp, "vsup", perf, logf)
    plain = None
    try:
        wait_until(lambda: http_get_status(port, "/health") == 200, 30, vsup.proc)
        status, head, vbody = http_post(port, "/v1/completions", REQUEST_BODY)
        if status != 200 or b'"finish_reason"' not in vbody:
            raise RuntimeError(f"unexpected vsup answer: {status} {head} {vbody!r}")
        if body is None:
            body = vbody
        body_file = os.path.join(tmp, "body.json")
        with open(body_file, "wb") as f:
            f.write(body)
        lua = os.path.join(tmp, "post.lua")
        with open(lua, "w") as f:
            f.write(WRK_LUA % REQUEST_BODY)
        pport = free_port()
        plain = Server([args.plain, "--port", str(pport), "--body-file", body_file], tmp, "plain",
                       perf)
        wait_until(lambda: connect_ok(pport), 10, plain.proc)
        pstatus, _, pbody = http_post(pport, "/v1/completions", REQUEST_BODY)
        if pstatus != 200 or pbody != body:
            raise RuntimeError("plain server answered differently")
        warm = min(1, seconds)
        run_wrk(args, lua, port, warm, vsup, conns)
        run_wrk(args, lua, pport, warm, plain, conns)
        vs, ps = [], []
        for r in range(rounds):  # alternate, so drift hits both alike
            ps.append(run_wrk(args, lua, pport, seconds, plain, conns))
            vs.append(run_wrk(args, lua, port, seconds, vsup, conns))
            log(f"  {conns} conns, round {r + 1}: vsup {vs[-1]['rps']:.0f} req/s "
                f"{vs[-1]['cpu_us_per_req']:.1f} µs CPU/req, plain {ps[-1]['rps']:.0f} req/s "
                f"{ps[-1]['cpu_us_per_req']:.1f} µs CPU/req")
        vcount = pcount = None
        if perf:  # one more round each, counted (the tracepoint slows every syscall a little)
            pc = plain.count(lambda: run_wrk(args, lua, pport, seconds, plain, conns))
            vc = vsup.count(lambda: run_wrk(args, lua, port, seconds, vsup, conns))
            pcount, vcount = plain.stop(), vsup.stop()
            pcount = {e: n / pc["requests"] for e, n in pcount.items()}
            vcount = {e: n / vc["requests"] for e, n in vcount.items()}
        v = {k: med([x[k] for x in vs]) for k in vs[0]}
        p = {k: med([x[k] for x in ps]) for k in ps[0]}
        return v, p, vcount, pcount, body
    finally:
        if plain is not None:
            plain.close()
        vsup.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vsup", required=True)
    ap.add_argument("--plain", required=True, help="build/bench/plain_http_server")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    ap.add_argument("--perf", default=shutil.which("perf"),
                    help="perf, for syscalls and context switches per request (default: on PATH)")
    ap.add_argument("--quick", action="store_true", help="fewer runs, shorter wrk")
    ap.add_argument("--runs", type=int, help="runs per median (default 9, --quick 3)")
    ap.add_argument("--seconds", type=float, help="wrk duration per round (default 5, quick 1)")
    ap.add_argument("--rounds", type=int, help="wrk rounds per server (default 3, quick 1)")
    ap.add_argument("--connections", default="4,32",
                    help="wrk connection counts for row (c), comma-separated (default 4,32)")
    ap.add_argument("--rows", default="abcd", help="which rows to measure (default abcd)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (ratios and raw numbers) instead of the table")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 9)
    seconds = args.seconds or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    try:
        connections = [int(c) for c in args.connections.split(",")]
        if not connections or min(connections) < 1:
            raise ValueError
    except ValueError:
        sys.exit(f"serving_bench: --connections {args.connections!r}: expected positive integers "
                 "separated by commas, e.g. 4,32")
    if not args.rows or set(args.rows) - set("abcd"):
        sys.exit(f"serving_bench: --rows {args.rows!r}: expected letters of abcd, e.g. c or ab")
    for exe in (args.vsup, args.plain):
        if not os.access(exe, os.X_OK):
            sys.exit(f"serving_bench: not executable: {exe}")
    if not shutil.which(args.wrk):
        sys.exit("serving_bench: wrk not found (apt-get install wrk)")
    perf = args.perf if perf_usable(args.perf) else None

    log(f"machine: {machine()}")
    log(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews timings)")
    log(f"runs per median: {runs}; wrk: {rounds} x {seconds:g} s, 1 thread, "
        f"{args.connections} connections")
    if perf is None:
        log("perf stat cannot count syscalls here: syscalls and context switches are n/a")
    rows = []
    result = {"machine": machine()}
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
        body = None
        if "c" in args.rows or "b" in args.rows:
            for conns in connections if "c" in args.rows else []:
                log(f"(c) request overhead, {conns} connections")
                v, p, vc, pc, body = request_overhead(args, conns, tmp, logf, perf, seconds,
                                                      rounds, body)
                c = f"c{conns}"
                what = (f"wrk {conns} conns, POST /v1/completions max_tokens 1, sim-token-ms 0; "
                        f"vs libuv+llhttp fixed reply ({len(body)} B body)")
                rows.append((f"(c) requests/s, {conns} conns", f"{v['rps']:.0f}", f"{p['rps']:.0f}",
                             f"{v['rps'] / p['rps']:.2f}", what))
                rows.append((f"(c) mean latency, {conns} conns", f"{v['mean_us']:.0f} µs",
                             f"{p['mean_us']:.0f} µs", f"{v['mean_us'] / p['mean_us']:.1f}",
                             "same runs"))
                rows.append((f"(c) p99 latency, {conns} conns", f"{v['p99_us']:.0f} µs",
                             f"{p['p99_us']:.0f} µs", f"{v['p99_us'] / p['p99_us']:.1f}",
                             "same runs"))
                rows.append((f"(c) overhead per request, {conns} conns",
                             f"+{v['mean_us'] - p['mean_us']:.0f} µs", "0 µs", "",
                             "vsup mean latency − baseline mean latency"))
                rows.append((f"(c) server CPU per request, {conns} conns",
                             f"{v['cpu_us_per_req']:.1f} µs", f"{p['cpu_us_per_req']:.1f} µs",
                             f"{v['cpu_us_per_req'] / p['cpu_us_per_req']:.1f}",
                             "user+sys of every server process / requests"))
                result.update({
                    f"req_per_s_vs_plain_{c}": v["rps"] / p["rps"],
                    f"mean_latency_vs_plain_{c}": v["mean_us"] / p["mean_us"],
                    f"p99_latency_vs_plain_{c}": v["p99_us"] / p["p99_us"],
                    f"cpu_per_req_vs_plain_{c}": v["cpu_us_per_req"] / p["cpu_us_per_req"],
                    f"cpu_us_per_req_{c}": v["cpu_us_per_req"],
                    f"plain_cpu_us_per_req_{c}": p["cpu_us_per_req"],
                    f"req_per_s_{c}": v["rps"], f"plain_req_per_s_{c}": p["rps"],
                    f"mean_latency_us_{c}": v["mean_us"], f"plain_mean_latency_us_{c}": p["mean_us"],
                    f"p99_latency_us_{c}": v["p99_us"], f"plain_p99_latency_us_{c}": p["p99_us"],
                })
                for event, key, label in (("raw_syscalls:sys_enter", "syscalls", "syscalls"),
                                          ("context-switches", "ctx_switches",
                                           "context switches")):
                    if vc is None:
                        rows.append((f"(c) {label} per request, {conns} conns", "n/a", "n/a", "",
                                     "perf stat cannot count here"))
                        continue
                    vn, pn = vc.get(event, 0.0), pc.get(event, 0.0)
                    rows.append((f"(c) {label} per request, {conns} conns", f"{vn:.1f}",
                                 f"{pn:.1f}", f"{vn / pn:.1f}" if pn else "",
                                 f"perf stat -e {event}, every process of the tree, one extra "
                                 f"{seconds:g} s round"))
                    result[f"{key}_per_req_{c}"] = vn
                    result[f"plain_{key}_per_req_{c}"] = pn
            if body is None:  # (b)'s baseline serves some body; its bytes do not matter there
                body = b"{}"
            body_file = os.path.join(tmp, "body.json")
            with open(body_file, "wb") as f:
                f.write(body)

        # (b) + (a): interleave vsup runs with baseline runs.
        for tp in (1, 2, 4) if ("a" in args.rows or "b" in args.rows) else ():
            log(f"(a)(b) startup/shutdown, TP {tp}")
            vstart, vstop, bstart, bstop, nprocs = [], [], [], [], 0
            for _ in range(runs):
                st, sd, nprocs = vsup_start_stop(args, tp, logf)
                vstart.append(st)
                vstop.append(sd)
                if "b" in args.rows:
                    bstart.append(plain_start(args, body_file))
                if "a" in args.rows:
                    bstop.append(bare_stop(nprocs))
            if "a" in args.rows:
                rows.append((f"(a) idle shutdown, TP {tp}", f"{med(vstop) * 1e3:.2f} ms",
                             f"{med(bstop) * 1e3:.2f} ms", f"{med(vstop) / med(bstop):.1f}",
                             f"SIGTERM → exit; baseline: sh parent + {nprocs - 1} sleep children "
                             f"(vsup tree: {nprocs} processes)"))
                result.update({f"idle_stop_tp{tp}_vs_floor": med(vstop) / med(bstop),
                               f"idle_stop_tp{tp}_ms": med(vstop) * 1e3,
                               f"idle_stop_tp{tp}_floor_ms": med(bstop) * 1e3})
            if "b" in args.rows:
                rows.append((f"(b) startup, TP {tp}", f"{med(vstart) * 1e3:.1f} ms",
                             f"{med(bstart) * 1e3:.1f} ms", f"{med(vstart) / med(bstart):.1f}",
                             "spawn → first /health 200; baseline: spawn → plain server accepts"))
                result.update({f"startup_tp{tp}_vs_floor": med(vstart) / med(bstart),
                               f"startup_tp{tp}_ms": med(vstart) * 1e3,
                               f"startup_tp{tp}_floor_ms": med(bstart) * 1e3})
        # Put (a) before (b) before (c) in the table.
        rows.sort(key=lambda r: r[0][:3])

        if "d" in args.rows:
            log("(d) drain precision")
            lates = [drain_run(args, logf) for _ in range(runs)]
            d = med(lates)
            rows.append(("(d) drain: SIGTERM → final abort chunk", f"{d * 1e3:.1f} ms",
                         "1000.0 ms", f"{d:.3f}",
                         f"--shutdown-timeout 1, long stream in flight: {(d - 1) * 1e3:+.1f} ms "
                         f"after the deadline (worst {max(lates) * 1e3 - 1000:+.1f} ms)"))
            result.update({"drain_vs_deadline": d, "drain_ms": d * 1e3,
                           "drain_worst_ms": max(lates) * 1e3})
    finally:
        logf.close()
        for sid in _sessions:
            kill_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)

    log(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return
    print(f"| measurement (median of {runs}; wrk: median of {rounds} × {seconds:g} s) "
          "| vsup | baseline, same run | ratio | what |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
