"""Security of the local surfaces of a serving tree (`vsup run --engine sim`).

The control socket refuses other users (a private 0700 directory, a 0600 socket, and SO_PEERCRED
behind both) and survives garbage; the HTTP server cuts slowloris connections and refuses
oversized input without reading it; --api-key never shows in a command line, a log or the tree,
and is compared in constant time; prompts and completions are not logged.

Every test starts its own tree (tests/integration/test_serving.py's `Serving`) and, through the
`serving` fixture, ends with it stopped by SIGTERM and no process of it left. Waits poll for an
event with a hard timeout; nothing sleeps to synchronise. The one slow test is the slowloris
one: it must outlast the server's 10 s header timeout (workers/http/http_server.h).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import is_running, wait_for
from test_serving import Serving, completion

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
# workers/http/http_server.h, ServerOptions: the defaults `vsup run` serves with.
HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 * 1024


class DefaultSocketServing(Serving):
    """A serving tree started WITHOUT --control-socket: its socket is in the default directory.

    XDG_RUNTIME_DIR points at the test's temp dir, so that default is <tmp>/vsup (hermetic); the
    path itself is read from the root's log line "control socket PATH".
    """

    def start(self, *args: str, env: dict | None = None) -> None:
        engine = [] if "--engine" in args else ["--engine", "sim", "--model", "vsup-sim"]
        argv = [self.vsup_bin, "run", "--port", str(self.port), *engine, *args]
        full_env = {**os.environ, "XDG_RUNTIME_DIR": str(self.tmp), **(env or {})}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, env=full_env)
        self.pids.add(self.proc.pid)
        m = wait_for(lambda: re.search(r"control socket (\S+)", self.stderr())
                     or self.proc.poll() is not None, 30, "the log line 'control socket PATH'",
                     self.stderr)
        assert self.proc.poll() is None, f"vsup exited during start-up:\n{self.stderr()}"
        self.socket = Path(m.group(1))
        wait_for(lambda: self.health()[0] == 200 or self.proc.poll() is not None, 30,
                 "/health to answer 200", self.stderr)
        assert self.proc.poll() is None, f"vsup exited during start-up:\n{self.stderr()}"
        self.remember_pids()


@pytest.fixture
def default_serving(tmp_path, vsup_bin):
    s = DefaultSocketServing(vsup_bin, tmp_path)
    yield s
    try:
        if s.proc is not None and s.proc.poll() is None:
            s.signal(15)
            assert s.wait_exit(30) == 0, s.stderr()
        wait_for(lambda: not s.leftovers(), 2.0, "every process of the tree to be gone",
                 lambda: f"left: {s.leftovers()}\n{s.stderr()}")
        if s.proc is not None:
            assert not s.socket.exists(), f"control socket {s.socket} was left behind"
            assert not (tmp_path / "vsup").exists(), "the default socket directory was left behind"
    finally:
        s.kill_everything()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def as_nobody(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Runs ARGV as uid/gid 65534 with no supplementary groups (util-linux setpriv)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=10, **kw)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Reads and discards until the peer closes (EOF or reset); False if still open at TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def http_status(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    assert m, f"not an HTTP response: {raw[:200]!r}"
    return int(m.group(1))


def read_response_head(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


# ---------------------------------------------------------------------------------------------
# The control socket


def test_the_default_control_socket_is_0600_in_a_0700_directory_of_ours(default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1")
    d = s.socket.parent
    assert d == s.tmp / "vsup", f"the default socket is not in $XDG_RUNTIME_DIR/vsup: {s.socket}"
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    assert st.st_uid == os.geteuid()
    st = os.lstat(s.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()


def test_another_user_is_refused_by_the_directory_and_by_peer_credentials(default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1")
    # Let nobody traverse down to the socket's directory, as a shared /tmp would (pytest's
    # temp dirs are 0700): the 0700 socket directory alone must then keep them out.
    opened = {}
    for d in [s.tmp, *s.tmp.parents]:
        st = os.stat(d)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o001 and d != Path("/"):
            opened[d] = stat.S_IMODE(st.st_mode)
            os.chmod(d, opened[d] | 0o005)
    try:
        assert as_nobody(["test", "-x", str(s.tmp)]).returncode == 0, "nobody cannot reach tmp"
        assert as_nobody(["test", "-x", str(s.socket.parent)]).returncode != 0
        r = as_nobody([s.vsup_bin, "tree", "--socket", str(s.socket), "--json"])
    finally:
        for d, mode in opened.items():
            os.chmod(d, mode)
    assert r.returncode != 0, f"uid {NOBODY} read the tree: {r.stdout}"
    assert r.stderr.strip() and "Permission denied" in r.stderr, r.stderr

    # Open the socket file itself to everyone (a misconfiguration): SO_PEERCRED must still
    # refuse. Nobody reaches it through an O_PATH fd we pass it, past the 0700 directory.
    baseline_fds = fd_count(s.proc.pid)
    os.chmod(s.socket, 0o666)
    fd = os.open(s.socket, os.O_PATH)
    try:
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            s.vsup_bin, "tree", "--socket", f"/proc/self/fd/{fd}", "--json"],
                           capture_output=True, text=True, timeout=10, pass_fds=(fd,))
    finally:
        os.close(fd)
        os.chmod(s.socket, 0o600)
    assert r.returncode != 0, f"uid {NOBODY} read the tree past SO_PEERCRED: {r.stdout}"
    assert r.stderr.strip(), "refused without a message"
    assert not r.stdout.strip(), f"a refused peer got output: {r.stdout}"
    wait_for(lambda: re.search(rf"refused a connection from uid {NOBODY}\b", s.stderr()), 5,
             "the root to log the refused uid", s.stderr)
    # The tree keeps serving, and the refused connection holds no fd in the root.
    assert s.health()[0] == 200
    assert s.tree()["name"]
    wait_for(lambda: fd_count(s.proc.pid) <= baseline_fds, 5, "the root's fds back to baseline",
             lambda: f"{fd_count(s.proc.pid)} > {baseline_fds}")


GARBAGE = {
    "random bytes": os.urandom(4096),
    # Cap'n Proto stream framing: u32 (segment count - 1), then u32 sizes in words.
    "a huge segment count": (0xFFFFFFFF).to_bytes(4, "little") + b"\0" * 60,
    "a huge segment length": (0).to_bytes(4, "little") + (0xFFFFFFF0).to_bytes(4, "little"),
    "a truncated frame": (0).to_bytes(4, "little") + (10).to_bytes(4, "little") + b"\x01" * 16,
    "1 MB of zeros": b"\0" * (1 << 20),
}


def test_garbage_on_the_control_socket_leaves_the_root_serving_and_holding_no_connection(
        default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1")
    baseline_fds = fd_count(s.proc.pid)
    for what, payload in GARBAGE.items():
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(str(s.socket))
        try:
            c.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the root may hang up mid-payload: that is a refusal too
        # A truncated frame is a peer that stops talking: we hang up. Everything else the root
        # must reject by itself, by closing.
        if what != "a truncated frame":
            assert closed_by_peer(c, 5), f"the root kept a connection open after {what}"
        c.close()
        assert s.proc.poll() is None, f"the root died on {what}:\n{s.stderr()}"
        assert s.health()[0] == 200, f"/health failed after {what}"
        assert s.tree()["children"], f"vsup tree failed after {what}"
        wait_for(lambda: fd_count(s.proc.pid) <= baseline_fds, 5,
                 f"the root's fds back to baseline after {what}",
                 lambda: f"{fd_count(s.proc.pid)} > {baseline_fds}\n{s.stderr()}")


# ---------------------------------------------------------------------------------------------
# HTTP


def test_slowloris_connections_are_cut_at_the_header_timeout_while_a_normal_request_is_served(
        default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1")
    n = 20
    conns = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.setblocking(False)
        conns.append(c)
    t0 = time.monotonic()
    header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    closed_at: dict[int, float] = {}
    sent = 0
    served_during_attack = []
    # One byte per connection per second, for longer than the header timeout allows. A
    # connection counts as cut when it turns readable (a 408, EOF) or resets.
    next_tick = t0
    while len(closed_at) < n and time.monotonic() - t0 < HEADER_TIMEOUT_S + 4:
        open_ = [c for i, c in enumerate(conns) if i not in closed_at]
        readable, _, _ = select.select(open_, [], [], max(0.0, next_tick - time.monotonic()))
        for c in readable:
            closed_at[conns.index(c)] = time.monotonic() - t0
        if time.monotonic() < next_tick:
            continue
        next_tick += 1.0
        for i, c in enumerate(conns):
            if i in closed_at:
                continue
            try:
                c.send(header[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_at[i] = time.monotonic() - t0
        sent += 1
        if sent % 3 == 0:
            served_during_attack.append(s.health()[0])
    for c in conns:
        c.close()
    assert len(closed_at) == n, f"{n - len(closed_at)} slowloris connections were never cut"
    latest = max(closed_at.values())
    earliest = min(closed_at.values())
    assert earliest >= HEADER_TIMEOUT_S - 1.5, f"cut too early ({earliest:.1f}s): not the timeout"
    assert latest <= HEADER_TIMEOUT_S + 2.5, f"cut only after {latest:.1f}s"
    assert served_during_attack and all(x == 200 for x in served_during_attack), \
        f"/health during the attack: {served_during_attack}"
    r, data = s.post("/v1/completions", completion(2))
    assert r.status == 200, data


def test_oversized_headers_bodies_and_content_lengths_are_refused_and_the_server_stays_healthy(
        default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1", "--max-request-bytes", "4096")

    # A header block over 64 KiB → 431.
    c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    head = (b"GET /health HTTP/1.1\r\nHost: x\r\n" +
            b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(70)))
    assert len(head) > MAX_HEADER_BYTES
    try:
        c.sendall(head + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw = read_response_head(c, 5)
    c.close()
    assert http_status(raw) == 431, raw[:200]
    assert s.health()[0] == 200

    # A body over --max-request-bytes → 413.
    r, data = s.post("/v1/completions", {**completion(1), "prompt": "x" * 8192})
    assert r.status == 413, data
    assert s.health()[0] == 200

    # A Content-Length of 10^15 → 413 at once, without the server waiting for (reading) a body.
    c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000000000\r\n\r\n{")
    t = time.monotonic()
    raw = read_response_head(c, 5)
    c.close()
    assert http_status(raw) == 413, raw[:200]
    assert time.monotonic() - t < 2, "the 413 waited for a body"
    assert s.health()[0] == 200
    r, data = s.post("/v1/completions", completion(2))
    assert r.status == 200, data


# ---------------------------------------------------------------------------------------------
# --api-key and logs


def tree_pids(node) -> list[int]:
    out = [node["pid"]] if node.get("pid") else []
    for c in node["children"]:
        out += tree_pids(c)
    return out


@pytest.mark.parametrize("how", ["env", "flag"])
def test_the_api_key_is_in_no_command_line_log_or_tree_and_gates_v1(default_serving, how):
    s = default_serving
    key = "k3y-" + uuid.uuid4().hex
    if how == "env":
        s.start("--sim-token-ms", "1", env={"VSUP_API_KEY": key})
    else:
        s.start("--sim-token-ms", "1", "--api-key", key)
    tree = s.tree()
    pids = tree_pids(tree)
    assert len(pids) >= 3, f"the tree shows too few processes: {pids}"
    for pid in pids:
        if how == "flag" and pid == s.proc.pid:
            continue  # the root's own argv holds what the user typed; vsup does not rewrite it
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert key.encode() not in f.read(), f"the key is in pid {pid}'s command line"
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=10)
    leaking = [line for line in ps.stdout.splitlines() if key in line]
    if how == "flag":
        leaking = [line for line in leaking if int(line.split()[0]) != s.proc.pid]
    assert not leaking, f"the key shows in ps: {leaking}"
    assert key not in json.dumps(tree), "the key is in `vsup tree --json`"

    r, data = s.post("/v1/completions", completion(1))
    assert r.status == 401, data
    r, data = s.post("/v1/completions", completion(1), headers={"Authorization": "Bearer wrong"})
    assert r.status == 401, data
    r, data = s.post("/v1/completions", completion(1),
                     headers={"Authorization": "Bearer " + key[:-1]})
    assert r.status == 401, data
    r, data = s.post("/v1/completions", completion(1), headers={"Authorization": "Bearer " + key})
    assert r.status == 200, data
    assert key not in s.stderr(), "the key is in vsup's log"


def test_the_api_key_is_compared_by_a_constant_time_function():
    # A code check, not a timing measurement: the comparison must go through constantTimeEquals,
    # whose loop runs over every byte and folds differences with OR, never returning early.
    src = (REPO / "workers" / "api_server" / "api_server.cpp").read_text()
    m = re.search(r"bool constantTimeEquals\(std::string_view a, std::string_view b\) \{(.*?)\n\}",
                  src, re.S)
    assert m, "constantTimeEquals is gone from workers/api_server/api_server.cpp"
    body = m.group(1)
    assert "|=" in body and "return diff == 0;" in body, body
    assert "return" not in body.replace("return diff == 0;", ""), "it returns early"
    assert "==" not in body.replace("return diff == 0;", "").replace("a.size() == b.size()", ""), \
        "it compares bytes with =="
    # Used for the key, and the key compared nowhere else.
    assert re.search(r"constantTimeEquals\(auth, expected\)", src), "the key check bypasses it"
    assert not re.search(r"(auth|expected|apiKey)\s*[!=]=\s*(auth|expected|options_\.apiKey)",
                         src), "the key is also compared with ==/!="


def test_prompts_and_completions_are_not_logged_at_the_default_level(default_serving):
    s = default_serving
    s.start("--sim-token-ms", "1")
    marker = "MARKER" + uuid.uuid4().hex
    r, data = s.post("/v1/completions", completion(4, prompt=f"tell me about {marker}"))
    assert r.status == 200, data
    text = json.loads(data)["choices"][0]["text"]
    r, data = s.post("/v1/chat/completions", {"model": "vsup-sim", "max_tokens": 4,
                                              "messages": [{"role": "user", "content": marker}]})
    assert r.status == 200, data
    s.signal(15)
    assert s.wait_exit(30) == 0, s.stderr()
    log = s.stderr()
    assert marker not in log, "a prompt was logged"
    if len(text.strip()) >= 8:
        assert text not in log, "a completion was logged"
