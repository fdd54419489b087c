"""`vsup run` serving the sim engine: real processes, real HTTP, real signals.

Each test starts its own serving tree on a free port, talks HTTP to it with the standard
library, and at the end checks that every process of the tree is gone and nothing is left in the
process table. Waits poll for an event with a hard timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import is_running, reap_adopted, wait_for

HTTP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving:
    """One `vsup run` serving tree."""

    def __init__(self, vsup_bin: str, tmp: Path):
        self.vsup_bin = vsup_bin
        self.tmp = tmp
        self.port = free_port()
        self.socket = tmp / "ctl.sock"
        self.stderr_path = tmp / "vsup.stderr"
        self.proc: subprocess.Popen | None = None
        self.pids: set[int] = set()

    def start(self, *args: str, env: dict | None = None) -> None:
        # The sim engine unless a test asks for another: its tokens and step times are exact.
        engine = [] if "--engine" in args else ["--engine", "sim", "--model", "vsup-sim"]
        argv = [self.vsup_bin, "run", "--port", str(self.port), "--control-socket",
                str(self.socket), *engine, *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True,
                                         env={**os.environ, **(env or {})})
        self.pids.add(self.proc.pid)
        wait_for(lambda: self.health()[0] == 200 or self.proc.poll() is not None, 30,
                 "/health to answer 200", self.stderr)
        assert self.proc.poll() is None, f"vsup exited during start-up:\n{self.stderr()}"
        self.remember_pids()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def tree(self) -> dict:
        out = subprocess.run([self.vsup_bin, "tree", "--json", "--socket", str(self.socket)],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def remember_pids(self) -> dict[str, int]:
        by_name = {}

        def walk(node):
            if node["pid"]:
                self.pids.add(node["pid"])
                by_name[node["name"]] = node["pid"]
            for c in node["children"]:
                walk(c)

        walk(self.tree())
        return by_name

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S)

    def health(self) -> tuple[int, str]:
        try:
            c = self.connect()
            c.request("GET", "/health")
            r = c.getresponse()
            body = r.read().decode()
            c.close()
            return r.status, body
        except OSError:
            return 0, ""

    def post(self, path: str, body, conn=None, headers=None):
        c = conn or self.connect()
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        c.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})
        r = c.getresponse()
        return r, r.read()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def leftovers(self) -> list[int]:
        reap_adopted()
        return [p for p in self.pids if is_running(p)]

    def kill_everything(self) -> None:
        for p in self.pids:
            try:
                os.killpg(p, signal.SIGKILL)
            except OSError:
                pass
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def refused(port: int) -> bool:
    """True when a new TCP connect to PORT is refused (the listener is closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # A connect that landed in a listener's accept queue as it closed is reset rather than
        # refused: not served, but not yet the steady state. Ask again.
        return False


def turned_away(port: int, model: str = "vsup-sim") -> bool:
    """True when a new completion request, on a connection of its own, is answered 503 with
    `Connection: close`: the tree is draining (its listener stays open through the drain)."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        c.request("POST", "/v1/completions",
                  body=json.dumps({"model": model, "prompt": "x", "max_tokens": 1}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status == 503 and r.getheader("Connection", "").lower() == "close"
    except OSError:
        return False


@pytest.fixture
def serving(tmp_path, vsup_bin):
    s = Serving(vsup_bin, tmp_path)
    yield s
    try:
        if s.proc is not None and s.proc.poll() is None:
            s.signal(signal.SIGTERM)
            s.wait_exit(30)
        wait_for(lambda: not s.leftovers(), 2.0, "every process of the tree to be gone",
                 lambda: f"left: {s.leftovers()}\n{s.stderr()}")
    finally:
        s.kill_everything()


def sse_events(r):
    """The server-sent events of response R as they arrive: each data payload parsed as JSON,
    or the string "[DONE]". Read errors (a timeout, a reset) and bad JSON propagate."""
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            payload = event.decode()[len("data: "):]
            yield "[DONE]" if payload == "[DONE]" else json.loads(payload)


class StreamClient(threading.Thread):
    """A streaming completion read to the end in a thread; records every SSE event."""

    def __init__(self, serving: Serving, body: dict, path="/v1/completions"):
        super().__init__(daemon=True)
        self.serving, self.body, self.path = serving, {**body, "stream": True}, path
        self.events: list = []
        self.status = None
        self.error = None
        self.first = threading.Event()

    def run(self):
        try:
            c = self.serving.connect()
            c.request("POST", self.path, body=json.dumps(self.body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            self.status = r.status
            for event in sse_events(r):
                self.events.append(event)
                self.first.set()
        except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
            self.error = e
        finally:
            self.first.set()

    def finish_reason(self):
        reasons = [e["choices"][0]["finish_reason"] for e in self.events
                   if isinstance(e, dict) and e.get("choices")]
        return reasons[-1] if reasons else None

    def text(self):
        return "".join(e["choices"][0].get("text", "") for e in self.events
                       if isinstance(e, dict) and e.get("choices"))


class PlainClient(threading.Thread):
    def __init__(self, serving: Serving, body: dict, path="/v1/completions"):
        super().__init__(daemon=True)
        self.serving, self.body, self.path = serving, body, path
        self.status = None
        self.json = None
        self.error = None

    def run(self):
        try:
            r, data = self.serving.post(self.path, self.body)
            self.status, self.json = r.status, json.loads(data)
        except Exception as e:  # noqa: BLE001
            self.error = e


def completion(max_tokens: int, prompt="hello") -> dict:
    return {"model": "vsup-sim", "prompt": prompt, "max_tokens": max_tokens}


# ---------------------------------------------------------------------------------------------


def test_completions_chat_models_and_streaming_have_the_openai_shape(serving):
    serving.start("--sim-token-ms", "1")
    r, data = serving.post("/v1/completions", completion(5))
    assert r.status == 200, data
    doc = json.loads(data)
    assert doc["object"] == "text_completion"
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 5
    assert doc["choices"][0]["text"]
    # Deterministic: the same prompt gives the same text.
    _, again = serving.post("/v1/completions", completion(5))
    assert json.loads(again)["choices"][0]["text"] == doc["choices"][0]["text"]

    r, data = serving.post("/v1/chat/completions",
                           {"model": "vsup-sim", "max_tokens": 3,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200, data
    chat = json.loads(data)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"

    c = serving.connect()
    c.request("GET", "/v1/models")
    models = json.loads(c.getresponse().read())
    assert models["data"][0]["id"] == "vsup-sim"

    s = StreamClient(serving, {**completion(4), "stream_options": {"include_usage": True}})
    s.start()
    s.join(HTTP_TIMEOUT_S)
    assert s.error is None and s.status == 200
    assert s.events[-1] == "[DONE]"
    assert s.events[-2]["usage"]["completion_tokens"] == 4
    assert s.finish_reason() == "length"
    assert s.text() == doc["choices"][0]["text"][: len(s.text())]


def test_long_prompts_tokenized_off_the_loop_and_short_ones_on_it_give_the_same_kind_of_answer(
        serving):
    # engine-core tokenizes a prompt of up to 512 bytes on its loop and a longer one on its
    # tokenizing thread: both paths (and a chat rendered there) must admit the request with its
    # true token count, while requests on the other path come and go.
    serving.start("--sim-token-ms", "1")
    long_prompt = " ".join(f"w{i}" for i in range(3000))  # ~15 KB, 3000 sim tokens
    slow = PlainClient(serving, completion(8, long_prompt))
    slow.start()
    r, data = serving.post("/v1/completions", completion(2, "a short one"))
    assert r.status == 200, data
    assert json.loads(data)["usage"]["prompt_tokens"] == 3
    slow.join(30)
    assert slow.error is None and slow.status == 200, (slow.error, slow.json)
    assert slow.json["usage"] == {"prompt_tokens": 3000, "completion_tokens": 8,
                                  "total_tokens": 3008}, slow.json
    chat_long = {"model": "vsup-sim", "max_tokens": 2,
                 "messages": [{"role": "user", "content": long_prompt}]}
    r, data = serving.post("/v1/chat/completions", chat_long)
    assert r.status == 200, data
    assert json.loads(data)["usage"]["prompt_tokens"] >= 3000


def test_sigterm_drains_every_in_flight_request_answers_new_ones_503_and_exits_0(serving):
    serving.start("--sim-token-ms", "40", "--shutdown-timeout", "30")
    clients = [StreamClient(serving, completion(25)) for _ in range(4)]
    clients += [PlainClient(serving, completion(25)) for _ in range(4)]
    for c in clients:
        c.start()
    for c in clients[:4]:
        assert c.first.wait(10), "a streaming request did not start"
    wait_for(lambda: serving.tree()["children"][-1].get("in_flight", 0) >= 8, 10,
             "8 requests in flight", serving.stderr)
    sent = time.monotonic()
    serving.signal(signal.SIGTERM)

    # The listener stays open through the drain (a connect in its accept queue is never reset):
    # a new inference request is answered at once, 503 with Connection: close and Retry-After,
    # so a load balancer retries it elsewhere; /live stays 200 and /health says draining.
    wait_for(lambda: serving.health()[0] == 503, 2, "/health to turn 503", serving.stderr)
    assert time.monotonic() - sent < 0.5, "intake did not stop at once"
    r, data = serving.post("/v1/completions", completion(5))
    assert r.status == 503, data
    assert r.getheader("Connection", "").lower() == "close"
    assert int(r.getheader("Retry-After")) >= 1
    assert json.loads(data)["error"]["message"], data
    c = serving.connect()
    c.request("GET", "/live")
    assert c.getresponse().status == 200
    c.close()
    for c in clients:
        c.join(HTTP_TIMEOUT_S)
    for c in clients[:4]:
        assert c.error is None, c.error
        assert c.finish_reason() == "length", f"a streaming request was cut: {c.events[-3:]}"
        assert c.events[-1] == "[DONE]"
    for c in clients[4:]:
        assert c.error is None, c.error
        assert c.status == 200
        assert c.json["choices"][0]["finish_reason"] == "length"
    assert serving.wait_exit(30) == 0, serving.stderr()
    assert refused(serving.port), "the port is still served after the tree exited"


def test_at_the_drain_deadline_every_client_is_told_abort_and_the_tree_exits_in_time(serving):
    serving.start("--sim-token-ms", "20", "--shutdown-timeout", "1")
    stream = StreamClient(serving, completion(4000))
    plain = PlainClient(serving, completion(4000))
    stream.start()
    plain.start()
    assert stream.first.wait(10)
    wait_for(lambda: serving.tree()["children"][-1].get("in_flight", 0) >= 2, 10,
             "2 requests in flight", serving.stderr)
    sent = time.monotonic()
    serving.signal(signal.SIGTERM)
    stream.join(HTTP_TIMEOUT_S)
    plain.join(HTTP_TIMEOUT_S)
    assert stream.error is None and stream.finish_reason() == "abort"
    assert stream.events[-1] == "[DONE]"
    assert plain.error is None and plain.status == 200
    assert plain.json["choices"][0]["finish_reason"] == "abort"
    assert plain.json["choices"][0]["text"], "the text so far was not returned"
    code = serving.wait_exit(10)
    assert time.monotonic() - sent < 1 + 2, "the tree took longer than timeout + 2 s"
    assert code == 0, serving.stderr()


def test_shutdown_timeout_0_aborts_at_once_and_tells_the_client(serving):
    serving.start("--sim-token-ms", "20", "--shutdown-timeout", "0")
    stream = StreamClient(serving, completion(4000))
    stream.start()
    assert stream.first.wait(10)
    serving.signal(signal.SIGTERM)
    stream.join(HTTP_TIMEOUT_S)
    assert stream.finish_reason() == "abort"
    assert stream.events[-1] == "[DONE]"
    assert serving.wait_exit(10) == 0, serving.stderr()


def test_while_draining_health_is_503_and_a_busy_connection_closes_after_its_response(serving):
    serving.start("--sim-token-ms", "20", "--shutdown-timeout", "5")
    assert serving.health() == (200, '{"status":"ready"}')
    # One connection: a request in flight, and a second one pipelined behind it. The server reads
    # the second only after answering the first, by which time it is draining.
    sock = socket.create_connection(("127.0.0.1", serving.port), timeout=HTTP_TIMEOUT_S)
    body = json.dumps(completion(40))
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    sock.sendall(request)
    wait_for(lambda: serving.tree()["children"][-1].get("in_flight", 0) >= 1, 10,
             "the first request in flight", serving.stderr)
    serving.signal(signal.SIGTERM)
    wait_for(lambda: serving.health()[0] != 200 or not is_running(serving.proc.pid), 5,
             "/health to leave 200", serving.stderr)
    # While the first request drains, a new connection is still accepted and told why.
    status, text = serving.health()
    assert status == 503 and json.loads(text)["status"] in ("draining", "stopping"), text
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    # The in-flight request completes normally, and its response tells the client that this
    # connection takes no further request; the server then closes it. (A request that was
    # already arriving when draining began gets 503 + close: tests/http_server_test.cpp.)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b'"finish_reason":"length"' in data, "the in-flight request was not completed"
    assert b"connection: close" in data.lower().split(b"\r\n\r\n")[0]
    assert serving.wait_exit(15) == 0


def test_sigint_to_the_whole_process_group_is_handled_once_like_sigterm(serving):
    serving.start("--sim-token-ms", "1")
    os.killpg(serving.proc.pid, signal.SIGINT)
    assert serving.wait_exit(15) == 0, serving.stderr()
    assert serving.stderr().count("SIGINT received") == 1
    assert "second SIGINT" not in serving.stderr()


def test_a_direct_sigterm_to_engine_core_or_a_worker_is_ignored(serving):
    serving.start("--sim-token-ms", "1", "--tensor-parallel-size", "2")
    pids = serving.remember_pids()
    for name in ("engine-core", "worker-tp0", "worker-tp1", "api-server-0"):
        os.kill(pids[name], signal.SIGTERM)
    r, data = serving.post("/v1/completions", completion(3))
    assert r.status == 200, data
    assert all(is_running(pids[n]) for n in ("engine-core", "worker-tp0", "worker-tp1"))
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0


@pytest.mark.parametrize("victim", ["worker-tp1", "engine-core", "api-server-0"])
def test_sigkill_of_a_tree_process_fails_requests_clearly_and_exits_non_zero(serving, victim):
    serving.start("--sim-token-ms", "20", "--tensor-parallel-size", "2")
    pids = serving.remember_pids()
    stream = StreamClient(serving, completion(4000))
    stream.start()
    assert stream.first.wait(10)
    os.kill(pids[victim], signal.SIGKILL)
    stream.join(HTTP_TIMEOUT_S)
    if victim != "api-server-0":
        # The client is told: an error event, then [DONE] (no silently dropped stream).
        assert any(isinstance(e, dict) and "error" in e for e in stream.events), stream.events[-3:]
        assert stream.events[-1] == "[DONE]"
        # After the failure the server never claims to be ready again: 503 ("failed" or
        # "stopping") while it still answers, then nothing.
        status, body = serving.health()
        assert status != 200, body
        if status:
            assert status == 503 and json.loads(body)["status"] in ("failed", "stopping", "draining")
    code = serving.wait_exit(15)
    assert code != 0, serving.stderr()


def test_sigkill_of_the_root_takes_every_descendant_down_within_a_second(serving):
    serving.start("--sim-token-ms", "1", "--tensor-parallel-size", "2", "--api-server-count", "2")
    pids = serving.remember_pids()
    assert len(pids) == 6  # root, engine-core, 2 workers, 2 API servers
    os.kill(serving.proc.pid, signal.SIGKILL)
    serving.proc.wait(5)
    wait_for(lambda: not serving.leftovers(), 1.0, "every descendant to die",
             lambda: f"left: {serving.leftovers()}")


def test_vsup_tree_shows_every_rank_and_api_server_with_in_flight_counts(serving):
    serving.start("--sim-token-ms", "1", "--tensor-parallel-size", "2", "--api-server-count", "2")
    doc = serving.tree()
    names = [c["name"] for c in doc["children"]]
    assert names == ["engine-core", "api-server-0", "api-server-1"]
    core = doc["children"][0]
    assert [w["name"] for w in core["children"]] == ["worker-tp0", "worker-tp1"]
    assert all(w["state"] == "running" for w in core["children"])
    assert "in_flight" in core and "in_flight" in doc["children"][1]


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/completions", "{not json", 400, "invalid JSON"),
    ("/v1/completions", {"model": "vsup-sim", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "vsup-sim", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "other"),
    ("/v1/nothing", {}, 404, "/v1/nothing"),
])
def test_bad_input_gets_an_openai_error_naming_what_was_wrong_and_the_server_keeps_serving(
        serving, path, body, status, needle):
    serving.start("--sim-token-ms", "1")
    r, data = serving.post(path, body)
    assert r.status == status, data
    err = json.loads(data)["error"]
    assert needle in err["message"]
    r, _ = serving.post("/v1/completions", completion(1))
    assert r.status == 200


def test_oversized_bodies_wrong_methods_and_missing_api_keys_are_refused(serving):
    serving.start("--sim-token-ms", "1", "--max-request-bytes", "2048", "--api-key", "sekrit")
    r, data = serving.post("/v1/completions", completion(1))
    assert r.status == 401, data
    auth = {"Authorization": "Bearer sekrit"}
    r, data = serving.post("/v1/completions", completion(1), headers=auth)
    assert r.status == 200, data
    r, data = serving.post("/v1/completions", {**completion(1), "prompt": "x" * 4096}, headers=auth)
    assert r.status == 413, data
    c = serving.connect()
    c.request("GET", "/v1/completions", headers=auth)
    assert c.getresponse().status == 405
    assert serving.health()[0] == 200, "health needs no key"
