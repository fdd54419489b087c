"""`vsup proxy`, the two-leg front end of a disaggregated deployment, and the shipped one-host
topology (examples/topologies/pd.toml).

Output equality runs on real prefill and decode instances of the CPU engine. The shutdown
contract is checked against upstreams written here (a prefill that answers kv_transfer_params at
once and a decode whose stream the test drives event by event), so that "mid-stream" is a fact of
the test, not a race with a fast model. Every tree is stopped and nothing of it may be left (the
`trees` fixture); waits poll with hard timeouts.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import wait_for
from test_cpu_engine import Trees, trees  # noqa: F401  (the fixture)
from test_pd import PD, PROMPTS, free_ports, post, request, caches_empty
from test_serving import Serving, free_port

ROOT = Path(__file__).resolve().parents[2]


class ProxyServing(Serving):
    """One `vsup proxy` tree."""

    def start(self, *args: str, env: dict | None = None) -> None:
        argv = [self.vsup_bin, "proxy", "--port", str(self.port), "--control-socket",
                str(self.socket), *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)
        self.pids.add(self.proc.pid)
        wait_for(lambda: self.health()[0] == 200 or self.proc.poll() is not None, 30,
                 "the proxy's /health to answer 200", self.stderr)
        assert self.proc.poll() is None, f"vsup proxy exited during start-up:\n{self.stderr()}"
        self.remember_pids()


def start_proxy(trees: Trees, *args: str) -> ProxyServing:
    d = trees.tmp / f"proxy-{len(trees.servings)}"
    d.mkdir()
    s = ProxyServing(trees.vsup_bin, d)
    trees.servings.append(s)
    try:
        s.start(*args)
    finally:
        if s.proc is not None:
            trees.sids.add(s.proc.pid)
    return s


def url(s) -> str:
    return f"http://127.0.0.1:{s.port}"


def sse_events(resp) -> list[str]:
    """The data: payloads of a streamed response, read to its end."""
    out = []
    for line in resp.read().decode().split("\n"):
        if line.startswith("data: "):
            out.append(line[6:])
    return out


# ---------------------------------------------------------------------------------------------
# Output through the proxy equals a single instance's.

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_output_through_the_proxy_equals_a_single_instance(trees, tp, transport):
    pd = PD(trees, tp=tp, transport=transport)
    proxy = start_proxy(trees, "--prefill", url(pd.prefill), "--decode", url(pd.decode))
    for prompt in PROMPTS:
        max_tokens = 8 if len(prompt) < 200 else 256 - len(prompt)
        for extra in ({"temperature": 0}, {"temperature": 0.8, "seed": 7, "top_p": 0.9}):
            body = request(prompt, max_tokens, **extra)
            single = post(pd.single, body)
            got = post(proxy, body)
            assert got[0] == 200 and single[0] == 200, (got, single)
            assert got[1]["choices"][0]["text"] == single[1]["choices"][0]["text"], (prompt, extra)
            assert got[1]["usage"] == single[1]["usage"]
    # Streamed, the same tokens in the same order, then [DONE].
    body = request("Hello, world! 123", 12, stream=True)
    c = proxy.connect()
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e).get("choices"))
    single = post(pd.single, {**body, "stream": False})
    assert text == single[1]["choices"][0]["text"]
    caches_empty(pd.prefill, pd.decode)
    c = proxy.connect()
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    assert re.search(r'^vsup_proxy_requests_total\{outcome="ok"\} 11$', text, re.M), text
    for code in (trees.stop(proxy), trees.stop(pd.decode), trees.stop(pd.prefill)):
        assert code == 0


# ---------------------------------------------------------------------------------------------
# Upstreams written here, for the shutdown contract.

class Upstreams:
    """A prefill that answers at once and a decode whose stream the test writes, event by event.
    `reset` is set when the decode leg's connection was cut by the proxy."""

    def __init__(self):
        self.events: list[bytes] = []
        self.cond = threading.Condition()
        self.reset = threading.Event()
        self.decode_started = threading.Event()
        outer = self

        class Prefill(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["kv_transfer_params"] == {"do_remote_decode": True}
                assert body["stream"] is False and body["max_tokens"] == 1
                doc = json.dumps({"id": "cmpl-p", "object": "text_completion", "choices": [],
                                  "kv_transfer_params": {"do_remote_prefill": True,
                                                         "remote_engine_id": "e"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(doc)))
                self.end_headers()
                self.wfile.write(doc)

        class Decode(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["kv_transfer_params"]["remote_engine_id"] == "e"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                outer.decode_started.set()
                sent = 0
                try:
                    while True:
                        with outer.cond:
                            outer.cond.wait_for(lambda: len(outer.events) > sent, timeout=0.05)
                            batch = outer.events[sent:]
                        for e in batch:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(e), e))
                            self.wfile.flush()
                            sent += 1
                            if e == b"data: [DONE]\n\n":
                                self.wfile.write(b"0\r\n\r\n")
                                return
                        # A reset connection shows as readable with nothing to read.
                        self.connection.setblocking(False)
                        try:
                            if self.connection.recv(1) == b"":
                                raise ConnectionResetError
                        except BlockingIOError:
                            pass
                        finally:
                            self.connection.setblocking(True)
                except (ConnectionResetError, BrokenPipeError):
                    outer.reset.set()

        self.prefill = ThreadingHTTPServer(("127.0.0.1", 0), Prefill)
        self.decode = ThreadingHTTPServer(("127.0.0.1", 0), Decode)
        for s in (self.prefill, self.decode):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def send(self, text: str) -> None:
        with self.cond:
            self.events.append(f"data: {text}\n\n".encode())
            self.cond.notify_all()

    def chunk(self, i: int, finish=None) -> str:
        return json.dumps({"id": "cmpl-d", "object": "text_completion", "created": 1,
                           "model": "m", "choices": [{"index": 0, "text": f"t{i}",
                                                      "logprobs": None,
                                                      "finish_reason": finish}]})

    def urls(self) -> tuple[str, str]:
        return (f"http://127.0.0.1:{self.prefill.server_address[1]}",
                f"http://127.0.0.1:{self.decode.server_address[1]}")

    def close(self):
        for s in (self.prefill, self.decode):
            s.shutdown()
            s.server_close()


@pytest.fixture
def upstreams():
    u = Upstreams()
    yield u
    u.close()


def open_stream(proxy: ProxyServing):
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    c.request("POST", "/v1/completions",
              body=json.dumps({"model": "m", "prompt": "p", "max_tokens": 50, "stream": True}),
              headers={"Content-Type": "application/json"})
    return c, c.getresponse()


def read_event(resp) -> str:
    """One SSE data payload (the proxy relays whole events)."""
    line = resp.readline().decode()
    while not line.startswith("data: "):
        assert line != "", "the stream ended"
        line = resp.readline().decode()
    resp.readline()  # the blank line
    return line[6:].rstrip("\n")


def test_proxy_sigterm_mid_stream_drains_then_cuts_with_the_client_told(trees, upstreams):
    p, d = upstreams.urls()
    proxy = start_proxy(trees, "--prefill", p, "--decode", d, "--shutdown-timeout", "2")
    c, r = open_stream(proxy)
    upstreams.send(upstreams.chunk(0))
    assert json.loads(read_event(r))["choices"][0]["text"] == "t0"
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    # Draining: a new completion is refused at once (503, Retry-After, the connection closed)...
    # Polled on /health, not with completions: one sent before the signal is handled would be
    # served, and the test's upstream would hold it open until the deadline.
    wait_for(lambda: proxy.health()[0] == 503, 5, "/health to say draining", proxy.stderr)
    assert post(proxy, {"model": "m", "prompt": "x"})[0] == 503
    # ... while the one in flight goes on.
    upstreams.send(upstreams.chunk(1))
    assert json.loads(read_event(r))["choices"][0]["text"] == "t1"
    # At the drain deadline (2 s) it is cut: its choice ends with "abort", then [DONE]; the
    # decode leg's connection is reset, so the instance can abort its request.
    last = read_event(r)
    cut = time.monotonic() - t0
    assert json.loads(last)["choices"][0]["finish_reason"] == "abort"
    assert json.loads(last)["id"] == "cmpl-d"
    assert read_event(r) == "[DONE]"
    assert 1.9 <= cut < 4.0, cut
    assert upstreams.reset.wait(5)
    c.close()
    assert trees.stop(proxy) == 0


def test_proxy_sigterm_lets_a_stream_finish_within_the_drain(trees, upstreams):
    p, d = upstreams.urls()
    proxy = start_proxy(trees, "--prefill", p, "--decode", d, "--shutdown-timeout", "20")
    c, r = open_stream(proxy)
    upstreams.send(upstreams.chunk(0))
    read_event(r)
    proxy.signal(signal.SIGTERM)
    # Polled on /health, not with completions: one sent before the signal is handled would be
    # served, and the test's upstream would hold it open until the deadline.
    wait_for(lambda: proxy.health()[0] == 503, 5, "/health to say draining", proxy.stderr)
    assert post(proxy, {"model": "m", "prompt": "x"})[0] == 503
    upstreams.send(upstreams.chunk(1, finish="length"))
    upstreams.send("[DONE]")
    assert json.loads(read_event(r))["choices"][0]["finish_reason"] == "length"
    assert read_event(r) == "[DONE]"
    # Nothing left in flight: the tree exits at once, not at the deadline.
    t0 = time.monotonic()
    assert proxy.wait_exit(10) == 0
    assert time.monotonic() - t0 < 5
    trees.wait_nothing_left(proxy)


def test_proxy_errors_name_the_instance_and_a_dead_one_is_skipped(trees, upstreams):
    p, d = upstreams.urls()
    dead, dead_decode = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    # The dead prefill is first in the list: its connect is refused, the leg goes to the next.
    proxy = start_proxy(trees, "--prefill", f"{dead},{p}", "--decode", dead_decode)
    status, doc = post(proxy, {"model": "m", "prompt": "p", "max_tokens": 2})
    assert status == 502
    assert doc["error"]["message"].startswith(
        f"decode {dead_decode}: connect: Connection refused"), doc
    status, doc = post(proxy, {"model": "m", "prompt": "p", "kv_transfer_params": {}})
    assert status == 400 and doc["error"]["param"] == "kv_transfer_params"
    assert trees.stop(proxy) == 0


def test_proxy_refuses_bad_urls_naming_the_flag(trees, vsup_bin):
    for args, want in [(("--prefill", "127.0.0.1:1", "--decode", "http://127.0.0.1:2"),
                        "--prefill '127.0.0.1:1': not an http:// URL"),
                       (("--prefill", "http://127.0.0.1:1", "--decode", "http://h:2"),
                        "not an IP address"),
                       (("--prefill", "http://127.0.0.1:1,", "--decode", "http://127.0.0.1:2"),
                        "an empty URL"),
                       (("--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:1"),
                        "both name http://127.0.0.1:1")]:
        out = subprocess.run([vsup_bin, "proxy", "--port", "0", *args], capture_output=True,
                             text=True, timeout=10)
        assert out.returncode == 2, out
        assert want in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# The shipped topology: prefill, decode and proxy as one tree, stopped proxy -> decode -> prefill.

def test_pd_topology_serves_and_stops_in_order(trees, tmp_path):
    text = (ROOT / "examples/topologies/pd.toml").read_text()
    ports = {"8000": free_port(), "8100": free_port(), "8200": free_port()}
    kv = {"14579": free_ports(1), "14589": free_ports(1)}
    for old, new in {**ports, **kv}.items():
        text = re.sub(rf"\b{old}\b", str(new), text)
    text = text.replace('"256MiB"', '"64MiB"')
    (tmp_path / "pd.toml").write_text(text)
    d = tmp_path / "tree"
    d.mkdir()
    root = Serving(trees.vsup_bin, d)
    root.port = ports["8000"]
    argv = [trees.vsup_bin, "run", "--topology", str(tmp_path / "pd.toml"), "--control-socket",
            str(root.socket)]
    with open(root.stderr_path, "wb") as err:
        root.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
    trees.servings.append(root)
    trees.sids.add(root.proc.pid)
    root.pids.add(root.proc.pid)
    wait_for(lambda: root.health()[0] == 200 or root.proc.poll() is not None, 60,
             "the proxy of the topology to answer /health 200", root.stderr)
    assert root.proc.poll() is None, root.stderr()
    root.remember_pids()
    status, doc = post(root, {"model": "vsup-tiny-25m", "prompt": "Hello", "max_tokens": 4,
                              "temperature": 0})
    assert status == 200 and doc["usage"]["completion_tokens"] == 4, doc
    assert trees.stop(root, timeout=60) == 0
    log = root.stderr()
    order = [m.group(1) for m in re.finditer(r"\[shutdown\] pd: (\w+) stopped in", log)]
    assert order == ["proxy", "decode", "prefill"], log
