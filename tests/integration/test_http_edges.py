"""HTTP at the edges of a serving tree (`vsup run --engine sim`): peers that misbehave.

A client that half-closes after its request (`shutdown(SHUT_WR)`, as `nc -N` and some proxies
do) gets its answer; silent connections hold the connection limit only until the first-byte
timeout, and reaching the limit is logged once per burst; an HTTP/1.1 request without Host is a
400; the parser's own errors have the OpenAI error shape of every other error; the Bearer scheme
is case-insensitive; a chat without max_tokens may use the rest of the context while a
completion keeps vLLM's default of 16; response_format is refused like tools. And every other
way a peer can misbehave over HTTP (garbage pipelined after a valid request, a body shorter than
its Content-Length then FIN, Transfer-Encoding with Content-Length, a huge chunk size, a reset in
the middle of a request, a client that stops reading its stream) gets a clear error or a clean
close, never a crash, a hang, or a reset of someone else's request.

Every test starts its own tree (test_serving.py's `Serving`) and, through the `serving`
fixture, ends with it stopped by SIGTERM and no process of it left. Every socket has a timeout;
waits poll for an event with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import time

from conftest import wait_for
from test_serving import PlainClient, StreamClient, serving  # noqa: F401 - the fixture

SOCKET_TIMEOUT_S = 10.0


def connect(s, timeout: float = SOCKET_TIMEOUT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.port), timeout=timeout)


def read_until_eof(sock: socket.socket, timeout: float = SOCKET_TIMEOUT_S) -> bytes:
    """Everything the server sends until it closes (EOF); fails on a timeout or a reset."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def ends_cleanly(sock: socket.socket, timeout: float) -> bool:
    """True if the server ends the connection with FIN (EOF) within TIMEOUT, data skipped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return False


def parse_responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """The HTTP/1.1 responses in RAW: (status, lower-cased headers, de-chunked body) each."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {raw[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.1 (\d{3}) ", lines[0])
        assert m, f"not an HTTP/1.1 status line: {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
            assert len(body) == n, f"a body cut short: {rest[:300]!r}"
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append((int(m.group(1)), headers, body))
    return out


def request(method: str, path: str, body: bytes = b"", version: str = "HTTP/1.1",
            host: bool = True, extra: str = "") -> bytes:
    head = f"{method} {path} {version}\r\n"
    if host:
        head += "Host: x\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def completion_body(max_tokens: int | None = 5, stream: bool = False, **extra) -> bytes:
    doc = {"model": "vsup-sim", "prompt": "hello", "stream": stream, **extra}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return json.dumps(doc).encode()


def chat_body(**extra) -> dict:
    return {"model": "vsup-sim", "messages": [{"role": "user", "content": "hello there"}], **extra}


def error_of(body: bytes) -> dict:
    """The OpenAI error object; its keys must be exactly message, type, param, code, in order."""
    doc = json.loads(body)
    assert list(doc) == ["error"], body
    assert list(doc["error"]) == ["message", "type", "param", "code"], body
    return doc["error"]


def sse_events(body: bytes) -> list:
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------------------------------------
# A half-closed client gets its answer


def test_a_client_that_half_closes_after_its_request_gets_its_answer(serving):
    serving.start("--sim-token-ms", "2")
    # Plain: the whole completion, then the server's FIN.
    c = connect(serving)
    c.sendall(request("POST", "/v1/completions", completion_body(8)))
    c.shutdown(socket.SHUT_WR)  # what `nc -N` does after its input
    [(status, _, body)] = parse_responses(read_until_eof(c))
    c.close()
    assert status == 200, body
    doc = json.loads(body)
    assert doc["usage"]["completion_tokens"] == 8, doc
    assert doc["choices"][0]["finish_reason"] == "length", doc

    # Streaming: every event to [DONE] arrives after the client's FIN.
    c = connect(serving)
    c.sendall(request("POST", "/v1/completions", completion_body(20, stream=True)))
    c.shutdown(socket.SHUT_WR)
    [(status, headers, body)] = parse_responses(read_until_eof(c))
    c.close()
    assert status == 200, body
    assert headers["content-type"] == "text/event-stream"
    events = sse_events(body)
    assert events[-1] == "[DONE]", events
    assert events[-2]["choices"][0]["finish_reason"] == "length", events
    assert sum(1 for e in events[:-1] if e["choices"][0]["text"]) == 20, events

    # Pipelined, then half-closed: each answered in order.
    c = connect(serving)
    c.sendall(request("GET", "/health") + request("POST", "/v1/completions", completion_body(2))
              + request("GET", "/version"))
    c.shutdown(socket.SHUT_WR)
    responses = parse_responses(read_until_eof(c))
    c.close()
    assert [r[0] for r in responses] == [200, 200, 200], responses
    assert json.loads(responses[1][2])["usage"]["completion_tokens"] == 2
    assert "version" in json.loads(responses[2][2])


def test_a_client_that_closes_mid_stream_has_its_request_aborted(serving):
    # Its FIN alone is not enough (it may be a half-close): the first write that fails is.
    serving.start("--sim-token-ms", "5", "--enable-log-requests")
    c = connect(serving)
    c.sendall(request("POST", "/v1/completions", completion_body(2000, stream=True)))
    c.settimeout(SOCKET_TIMEOUT_S)
    assert c.recv(65536).startswith(b"HTTP/1.1 200"), "no stream began"
    c.close()
    wait_for(lambda: "client gone (aborted)" in serving.stderr(), 10,
             "the API server to abort the request of the client that left", serving.stderr)
    status, body = serving.health()
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# The connection limit and the first-byte timeout


def test_silent_connections_lock_out_a_probe_only_until_the_first_byte_timeout(serving):
    cap = 4
    serving.start("--sim-token-ms", "1", "--api-server-count", "1", "--max-connections",
                  str(cap), "--http-first-byte-timeout", "1.5")
    opened = time.monotonic()
    silent = [connect(serving) for _ in range(cap)]

    def probe() -> tuple[int, bytes]:
        [(status, _, body)] = exchange(serving, request("GET", "/health"))
        return status, body

    # At the cap: a probe is refused with 503 in the OpenAI shape (several times: one burst).
    refused = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and refused < 5:
        status, body = probe()
        if status == 503:
            e = error_of(body)
            assert e["type"] == "unavailable" and e["code"] == "too_many_connections", e
            refused += 1
    assert refused == 5, "a probe got through while silent connections held the limit"
    assert time.monotonic() - opened < 1.5, "the probes took longer than the first-byte timeout"
    # The silent ones are closed (FIN, no answer: they asked nothing) once it passes.
    for c in silent:
        assert ends_cleanly(c, 5.0), "a silent connection was not closed"
        c.close()
    assert time.monotonic() - opened >= 1.4, "closed before the first-byte timeout"
    # And the probe is served.
    wait_for(lambda: probe()[0] == 200, 5, "/health to answer 200 once the slots are free",
             serving.stderr)
    log = serving.stderr()
    assert log.count(f"the connection limit of {cap} (--max-connections) is reached") == 1, log


# ---------------------------------------------------------------------------------------------
# Protocol rules and the shape of the parser's errors


def exchange(s, raw: bytes, half_close: bool = True) -> list[tuple[int, dict, bytes]]:
    c = connect(s)
    try:
        c.sendall(raw)
        if half_close:
            c.shutdown(socket.SHUT_WR)
        return parse_responses(read_until_eof(c))
    finally:
        c.close()


def test_http11_without_host_is_400_and_http10_may_omit_it(serving):
    serving.start("--sim-token-ms", "1")
    [(status, headers, body)] = exchange(serving, request("GET", "/health", host=False))
    assert status == 400 and headers["connection"] == "close", body
    e = error_of(body)
    assert e["code"] == "malformed_request" and "Host" in e["message"], e
    [(status, _, body)] = exchange(serving, request("GET", "/health", version="HTTP/1.0",
                                                    host=False))
    assert status == 200, body


def test_the_parsers_own_errors_have_the_openai_error_shape(serving):
    serving.start("--sim-token-ms", "1")
    cases = [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "malformed_request"),
        (request("GET", "/health", version="HTTP/2.0"), 505, "http_version_not_supported"),
        (request("GET", "/health", extra="X-Big: " + "a" * 70000 + "\r\n"), 431,
         "request_header_fields_too_large"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413,
         "payload_too_large"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         "not_implemented"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"model\"",
         400, "incomplete_request"),  # with the half-close below
    ]
    for raw, want, code in cases:
        responses = exchange(serving, raw, half_close=True)
        assert [r[0] for r in responses] == [want], (raw[:60], responses)
        status, headers, body = responses[0]
        assert headers["connection"] == "close"
        e = error_of(body)
        assert e["type"] == "invalid_request_error" and e["code"] == code, (raw[:60], e)
        assert e["param"] is None and e["message"], e
    # The same shape as the API's own errors (a 404 here).
    [(status, _, body)] = exchange(serving, request("GET", "/nowhere"))
    assert status == 404 and error_of(body)["type"] == "not_found_error", body
    assert serving.health()[0] == 200


def test_the_bearer_scheme_is_case_insensitive(serving):
    key = "sk-edge-test-4242"
    serving.start("--sim-token-ms", "1", env={"VSUP_API_KEY": key})
    for auth, want in [(f"Bearer {key}", 200), (f"bearer {key}", 200), (f"BEARER {key}", 200),
                       (f"bEaReR  {key}", 200), (f"Basic {key}", 401), (key, 401),
                       (f"Bearer {key}x", 401), ("bearer", 401)]:
        [(status, _, body)] = exchange(
            serving, request("GET", "/v1/models", extra=f"Authorization: {auth}\r\n"))
        assert status == want, (auth, status, body)
        if want == 401:
            assert error_of(body)["code"] == "invalid_api_key", body


# ---------------------------------------------------------------------------------------------
# The OpenAI surface: max_tokens defaults, response_format


def test_a_chat_without_max_tokens_may_use_the_rest_of_the_context(serving):
    serving.start("--sim-token-ms", "0")
    r, data = serving.post("/v1/chat/completions", chat_body())
    assert r.status == 200, data
    doc = json.loads(data)
    assert doc["usage"]["completion_tokens"] > 16, doc  # not the completions default
    # A completion without max_tokens keeps vLLM's legacy default.
    r, data = serving.post("/v1/completions", {"model": "vsup-sim", "prompt": "hello"})
    assert r.status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] == 16


def test_a_chat_without_max_tokens_ends_at_the_end_of_a_bounded_context(serving):
    serving.start("--sim-token-ms", "0", "--max-model-len", "64")
    r, data = serving.post("/v1/chat/completions", chat_body())
    assert r.status == 200, data
    doc = json.loads(data)
    usage = doc["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64, doc
    assert doc["choices"][0]["finish_reason"] == "length", doc
    # An explicit max_tokens past the context is still the client's error.
    r, data = serving.post("/v1/chat/completions", chat_body(max_tokens=64))
    assert r.status == 400, data
    assert error_of(data)["code"] == "context_length_exceeded"


def test_response_format_is_refused_like_tools_except_text(serving):
    serving.start("--sim-token-ms", "1")
    r, tools = serving.post("/v1/chat/completions",
                            chat_body(tools=[{"type": "function", "function": {"name": "f"}}]))
    assert r.status == 400, tools
    for fmt in [{"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}]:
        r, data = serving.post("/v1/chat/completions", chat_body(response_format=fmt))
        assert r.status == 400, data
        e, t = error_of(data), error_of(tools)
        assert (e["type"], e["code"]) == (t["type"], t["code"]) == (
            "invalid_request_error", "unsupported_parameter"), (e, t)
        assert e["param"] == "response_format", e
    r, data = serving.post("/v1/chat/completions",
                           chat_body(response_format={"type": "text"}, max_tokens=3))
    assert r.status == 200, data


# ---------------------------------------------------------------------------------------------
# Misbehaving peers never disturb anyone else


def test_misbehaving_peers_get_an_error_or_a_clean_close_and_never_disturb_a_request(serving):
    serving.start("--sim-token-ms", "5", "--api-server-count", "1")
    bystander = StreamClient(serving, {"model": "vsup-sim", "prompt": "hello", "max_tokens": 200})
    plain = PlainClient(serving, {"model": "vsup-sim", "prompt": "hello", "max_tokens": 100})
    bystander.start()
    plain.start()
    assert bystander.first.wait(10), "the bystander's stream did not begin"

    hostile = [
        # (what, bytes, half-close after, the statuses it must get)
        ("garbage pipelined after a valid request",
         request("GET", "/health") + b"\x00\x01\x02 NOT HTTP\r\n\r\n", False, [200, 400]),
        ("a body shorter than its Content-Length, then FIN",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":", True,
         [400]),
        ("Transfer-Encoding and Content-Length",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False, [400]),
        ("a chunk size past 64 bits",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"fffffffffffffffffffffff\r\n", False, [400]),
        ("a chunk size of 16 TiB",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"100000000000\r\n{", False, [413]),
        ("a request smuggled in a header name",
         b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n", False, [400]),
    ]
    for what, raw, half, want in hostile:
        responses = exchange(serving, raw, half_close=half)
        assert [r[0] for r in responses] == want, (what, responses)
        for status, headers, body in responses:
            if status >= 400:
                assert headers["connection"] == "close", what
                error_of(body)

    # A client that resets in the middle of a request, and one that never reads its stream.
    c = connect(serving)
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    stalled = connect(serving)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(request("POST", "/v1/completions", completion_body(500, stream=True)))

    bystander.join(30)
    plain.join(30)
    assert not bystander.is_alive() and not plain.is_alive(), "a bystander hung"
    assert bystander.error is None and plain.error is None, (bystander.error, plain.error)
    assert bystander.events[-1] == "[DONE]" and bystander.finish_reason() == "length"
    assert plain.status == 200 and plain.json["usage"]["completion_tokens"] == 100, plain.json
    assert serving.health()[0] == 200
    stalled.close()
    # The tree stops cleanly with all that behind it (the fixture checks for leftovers).
    serving.signal(15)
    assert serving.wait_exit(30) == 0, serving.stderr()
