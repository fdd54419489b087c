"""A small closed-loop HTTP load client that records and checks every response.

Each client thread sends completions back to back (no think time) to one host:port until told to
stop, alternating a non-streaming completion and a streaming one, and keeps one `Record` per
request: when it started and ended, what came back, which server answered (the proxy's
`X-Served-By` header), and, when it was not a complete success, why. A response counts as a
success only when it was read to the end and is whole: status 200, a Content-Length or chunked
body that arrived in full, valid JSON with a finish_reason and no error object, or, for a stream,
SSE events each of which is valid JSON with no error object, one with a finish_reason, and
`[DONE]` last. Anything else is a failure, of one of three kinds: a connection error (refused,
reset, closed before a status line, timed out: what a client sees when a server drops a
connection rather than answering), an incomplete response (the body cut short), or an invalid
one (whole, but not a successful completion).

Clients are either keep-alive (one connection reused for every request, re-opened only after the
server closes it cleanly with `Connection: close`) or connection-per-request. A keep-alive client
never retries: a request that fails on a reused connection is reported, not hidden.

Standard library only; every socket operation has a timeout, so a stuck server fails a request
within `timeout_s` instead of hanging the test.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

SERVED_BY = "X-Served-By"


@dataclass
class Record:
    client: int
    kind: str  # "plain" or "stream"
    keep_alive: bool
    reused: bool  # sent on a connection that had already carried a request
    t0: float  # time.monotonic() when the request was sent
    t1: float  # when the response was read to its end, or the request failed
    status: int | None = None
    port: int | None = None  # the client's local port: finds the request in a proxy's log
    server: str | None = None
    error: str | None = None  # None: a complete, valid response
    # What went wrong, when something did: "connection" (no response: refused, reset, closed
    # before the status line, timed out), "incomplete" (the body was cut short) or "invalid"
    # (a whole response, but not a successful completion).
    category: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_ms(self) -> float:
        return (self.t1 - self.t0) * 1000.0


class _Invalid(Exception):
    """A response that arrived but is not a complete, valid completion."""


def _check_completion(doc: dict) -> None:
    if "error" in doc:
        raise _Invalid(f"error object: {doc['error']}")
    choices = doc.get("choices") or []
    if not choices or not choices[0].get("finish_reason"):
        raise _Invalid(f"no finish_reason: {doc}")


def _check_stream(body: bytes) -> None:
    if not body.endswith(b"\n\n"):
        raise _Invalid(f"the stream does not end with a complete event: {body[-80:]!r}")
    events = body[:-2].split(b"\n\n")
    if events[-1] != b"data: [DONE]":
        raise _Invalid(f"the last event is not [DONE]: {events[-1][:80]!r}")
    reasons = []
    for event in events[:-1]:
        if not event.startswith(b"data: "):
            raise _Invalid(f"not an SSE data event: {event[:80]!r}")
        doc = json.loads(event[len(b"data: "):])
        if "error" in doc:
            raise _Invalid(f"error event: {doc['error']}")
        reasons += [c.get("finish_reason") for c in doc.get("choices", [])]
    if not any(reasons):
        raise _Invalid(f"no event carries a finish_reason ({len(events)} events)")


class LoadGen:
    """CLIENTS threads of closed-loop load on HOST:PORT; start() then stop() (which joins)."""

    def __init__(self, host: str, port: int, *, keep_alive_clients: int, per_request_clients: int,
                 model: str, plain_max_tokens: int = 4, stream_max_tokens: int = 8,
                 timeout_s: float = 15.0):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.plain_body = json.dumps({"model": model, "prompt": "hello",
                                      "max_tokens": plain_max_tokens})
        self.stream_body = json.dumps({"model": model, "prompt": "hello", "stream": True,
                                       "max_tokens": stream_max_tokens})
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        modes = [True] * keep_alive_clients + [False] * per_request_clients
        self._threads = [threading.Thread(target=self._run, args=(i, ka), daemon=True,
                                          name=f"loadgen-{i}") for i, ka in enumerate(modes)]

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> None:
        """Asks every client to stop after its current request; waits at most TIMEOUT_S in all."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise AssertionError(f"load clients still running {timeout_s:.0f}s after stop: {stuck}")

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def count(self, predicate) -> int:
        with self._lock:
            return sum(1 for r in self.records if predicate(r))

    # -- one client ------------------------------------------------------------------------------

    def _run(self, client: int, keep_alive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        used = False
        n = 0
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                used = False
            kind = "stream" if (n + client) % 2 else "plain"
            n += 1
            rec = Record(client, kind, keep_alive, used, time.monotonic(), 0.0)
            closed = True
            try:
                closed = self._request(conn, kind, keep_alive, rec)
            except (_Invalid, ValueError) as e:  # ValueError: JSON that does not parse
                rec.error, rec.category = f"{type(e).__name__}: {e}", "invalid"
            except http.client.IncompleteRead as e:
                rec.error, rec.category = f"IncompleteRead: {e!r}", "incomplete"
            except (OSError, http.client.HTTPException) as e:
                if rec.status is None:
                    rec.category = "connection"
                else:  # the status line came, then the connection failed during the body
                    rec.category = "incomplete"
                rec.error = f"{type(e).__name__}: {e}"
            rec.t1 = time.monotonic()
            with self._lock:
                self.records.append(rec)
            used = True
            if closed or not keep_alive or rec.error is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _request(self, conn: http.client.HTTPConnection, kind: str, keep_alive: bool,
                 rec: Record) -> bool:
        """Sends one request on CONN and checks the response; True if the server closed CONN."""
        body = self.stream_body if kind == "stream" else self.plain_body
        headers = {"Content-Type": "application/json"}
        if not keep_alive:
            headers["Connection"] = "close"
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        rec.port = conn.sock.getsockname()[1] if conn.sock is not None else None
        r = conn.getresponse()
        rec.status = r.status
        rec.server = r.getheader(SERVED_BY)
        data = r.read()  # raises IncompleteRead on a short Content-Length or chunked body
        if r.status != 200:
            raise _Invalid(f"status {r.status}: {data[:200]!r}")
        if kind == "stream":
            if not r.getheader("Content-Type", "").startswith("text/event-stream"):
                raise _Invalid(f"not an event stream: {r.getheader('Content-Type')}")
            _check_stream(data)
        else:
            _check_completion(json.loads(data))
        return r.will_close


# -- the report ----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank P-th percentile of a sorted, non-empty list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


@dataclass
class Summary:
    requests: int
    ok: int
    failures: int
    connection_errors: int
    incomplete: int
    invalid: int
    by_kind: dict = field(default_factory=dict)
    by_server: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    first_failures: list = field(default_factory=list)
    slowest: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(records: list[Record]) -> Summary:
    lat = sorted(r.latency_ms for r in records)
    by_kind: dict = {}
    by_server: dict = {}
    for r in records:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        if r.server:
            by_server[r.server] = by_server.get(r.server, 0) + 1
    failed = [r for r in records if not r.ok]
    start = min((r.t0 for r in records), default=0.0)
    span = (max(r.t1 for r in records) - start) if records else 0.0
    s = Summary(
        requests=len(records),
        ok=len(records) - len(failed),
        failures=len(failed),
        connection_errors=sum(1 for r in failed if r.category == "connection"),
        incomplete=sum(1 for r in failed if r.category == "incomplete"),
        invalid=sum(1 for r in failed if r.category == "invalid"),
        by_kind=by_kind,
        by_server=by_server,
        duration_s=round(span, 3),
        requests_per_s=round(len(records) / span, 1) if span else 0.0,
        first_failures=[f"client {r.client} {r.kind} keep_alive={r.keep_alive} reused={r.reused} "
                        f"at +{r.t0 - start:.3f}s port {r.port} status={r.status} "
                        f"server={r.server}: {r.error}" for r in failed[:20]],
        slowest=[f"{r.latency_ms:.0f} ms: client {r.client} {r.kind} keep_alive={r.keep_alive} "
                 f"at +{r.t0 - start:.3f}s port {r.port} server={r.server}"
                 for r in sorted(records, key=lambda r: r.t0 - r.t1)[:3]],
    )
    if lat:
        s.latency_ms = {name: round(percentile(lat, p), 1)
                        for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    return s
