"""All ranks defer for their pending KV transfers at the same time, under one deadline: the
shutdown of a TP 2 engine with transfers pending on both ranks takes one --kv-shutdown-timeout,
not one per rank, and both ranks are seen deferring at once (engine-core stops its ranks
together, at the step boundary, after announcing the one deadline)."""

import re
import signal

from test_serving import completion, serving  # noqa: F401  (the fixture)


def stamp(line: str) -> float:
    """Seconds of the day of a log line's HH:MM:SS.mmm prefix."""
    h, m, s = line.split(" ", 1)[0].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_two_ranks_with_pending_kv_transfers_wait_one_kv_bound_not_two(serving):
    kv_bound = 1.5
    serving.start("--sim-token-ms", "5", "--tensor-parallel-size", "2", "--api-server-count", "1",
                  "--kv-connector", "sim", "--sim-kv-transfer-ms", "20000",
                  "--kv-shutdown-timeout", str(kv_bound), "--shutdown-timeout", "1")
    # A finished request leaves a 20 s transfer on every rank.
    r, data = serving.post("/v1/completions", completion(3))
    assert r.status == 200, data
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(30) == 0
    log = serving.stderr()
    lines = log.splitlines()

    def first(pattern: str) -> str:
        for line in lines:
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line /{pattern}/ in\n{log}")

    # Both ranks deferred for their transfers at the same time, and both gave up (20 s > the
    # bound).
    deferring = [stamp(first(rf"\[shutdown\] {rank}: deferring: kv: 1 transfer\(s\) pending"))
                 for rank in ("worker-tp0", "worker-tp1")]
    assert abs(deferring[0] - deferring[1]) <= 0.3, f"the ranks deferred {deferring}\n{log}"
    for rank in ("worker-tp0", "worker-tp1"):
        first(rf"\[shutdown\] {rank}: kv: giving up: 1 transfer\(s\) abandoned")
    began = stamp(first(r"\[shutdown\] engine-core: shutdown requested"))
    stopped = stamp(first(r"\[shutdown\] engine-core: stopped in"))
    took = stopped - began
    print(f"engine-core's shutdown with KV transfers pending on 2 ranks: {took:.2f}s "
          f"(--kv-shutdown-timeout {kv_bound})")
    # One bound (plus the steps and stops around it), not two.
    assert kv_bound - 0.1 <= took <= kv_bound + 0.9, log
    gave_up = [stamp(first(rf"\[shutdown\] {r}: kv: giving up")) for r in ("worker-tp1", "worker-tp0")]
    assert abs(gave_up[0] - gave_up[1]) <= 0.3, f"the ranks gave up {gave_up} apart\n{log}"
