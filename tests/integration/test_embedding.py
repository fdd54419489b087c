"""The embedding library from a real host program (tests/embedding/host_program.cpp): a host
that returns from main without shutting down, and a host that catches SIGTERM itself and shuts
its vsup::Supervisor down. Each test checks that the host exits 0, says nothing alarming, and
leaves no process behind (this pytest process is a subreaper: orphans come to us and are seen)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import describe, is_running, reap_adopted, wait_for

ALARMING = re.compile(r"error|died|unexpected", re.IGNORECASE)


def host_program() -> str:
    path = os.environ.get("VSUP_HOST_PROGRAM")
    if not path:
        pytest.fail("VSUP_HOST_PROGRAM is not set: run through meson test "
                    "(or point it at build/tests/embedding/vsup-host-program)", pytrace=False)
    return os.path.realpath(path)


def host_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    assert env.get("VSUP_EXE"), "VSUP_EXE is not set: run through meson test"
    env.pop("NOTIFY_SOCKET", None)
    env["XDG_RUNTIME_DIR"] = str(tmp)
    return env


def alarming_lines(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if ALARMING.search(line)]


def assert_all_gone(pids: list[int], what: str, timeout: float = 3.0) -> None:
    """Every pid is dead (orphans we adopted reaped), within TIMEOUT after the host exited."""
    def gone():
        reap_adopted()
        return not any(is_running(p) for p in pids)
    wait_for(gone, timeout, f"{what} to be gone",
             lambda: "\n".join(describe(p) for p in pids if is_running(p)))
    reap_adopted()
    children = [describe(int(e)) for e in os.listdir("/proc") if e.isdigit()
                and _ppid(int(e)) == os.getpid() and is_running(int(e))]
    assert not children, f"left running as children of the test runner: {children}"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2:].split()[1])


@pytest.mark.parametrize("tp", [1, 2])
def test_a_host_that_returns_from_main_without_shutdown_exits_0_quietly_and_leaves_nothing(
        tmp_path, tp):
    r = subprocess.run([host_program(), "generate", "--tp", str(tp)], stdin=subprocess.DEVNULL,
                       capture_output=True, env=host_env(tmp_path), cwd=tmp_path, timeout=60,
                       start_new_session=True)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"the host exited {r.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    text = re.search(r"^text: (.*)$", out, re.MULTILINE)
    assert text and text.group(1).strip(), f"no generated text printed:\n{out}"
    assert re.search(r"^finish: length$", out, re.MULTILINE), out
    bad = alarming_lines(out, err)
    assert not bad, f"the host's output has alarming lines: {bad}"
    m = re.search(r"^descendants:(.*)$", out, re.MULTILINE)
    assert m, out
    pids = [int(p) for p in m.group(1).split()]
    # engine-core, tp ranks, and the orphan guards: at least the engine and its ranks.
    assert len(pids) >= 1 + tp, f"expected engine-core and {tp} rank(s), saw {pids}"
    assert_all_gone(pids, "the LLM's processes")
    assert not list(tmp_path.iterdir()), f"left in $XDG_RUNTIME_DIR: {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("how", ["kill", "killpg"])
def test_a_host_that_catches_sigterm_itself_shuts_its_supervisor_down_and_exits_0(tmp_path, how):
    stdout_path = tmp_path / "host.stdout"
    stderr_path = tmp_path / "host.stderr"
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen([host_program(), "supervise"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=host_env(runtime), cwd=tmp_path,
                                start_new_session=True)
    pids: list[int] = []
    try:
        def diag() -> str:
            return (f"host returncode {proc.poll()}\nstdout:\n{stdout_path.read_text()}\n"
                    f"stderr:\n{stderr_path.read_text()}")

        def ready():
            if proc.poll() is not None:
                pytest.fail(f"the host exited before it was ready\n{diag()}", pytrace=False)
            return re.search(r"^ready((?: \d+)+)\n", stdout_path.read_text(), re.MULTILINE)

        m = wait_for(ready, 20.0, "the host's 'ready' line", diag)
        pids = [int(p) for p in m.group(1).split()]
        assert len(pids) == 4, f"expected web, cache, batch and job: {pids}"
        assert all(is_running(p) for p in pids), [describe(p) for p in pids]

        if how == "kill":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            # A terminal or a process manager signalling the host's group: vsup's children are
            # in their own process groups, so only the host hears it and it does the stopping.
            os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the host did not exit within 10 s of SIGTERM\n{diag()}", pytrace=False)
        took = time.monotonic() - t0
        out = stdout_path.read_text()
        err = stderr_path.read_text()
        assert rc == 0, f"the host exited {rc}\n{diag()}"
        assert "stopping\nclean\n" in out, diag()
        assert took < 5.0, f"shutting down took {took:.2f}s"
        bad = alarming_lines(out, err)
        assert not bad, f"the host's output has alarming lines: {bad}"
        assert_all_gone(pids, "the supervised processes")
        assert not list(runtime.iterdir()), f"left in $XDG_RUNTIME_DIR: {list(runtime.iterdir())}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for p in pids:
            if is_running(p):
                try:
                    os.killpg(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        reap_adopted()


def run_host(tmp: Path, *args: str, timeout: float = 60) -> tuple[str, str]:
    r = subprocess.run([host_program(), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       env=host_env(tmp), cwd=tmp, timeout=timeout, start_new_session=True)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"the host exited {r.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def test_a_host_that_drains_gets_its_finished_request_its_aborted_text_and_a_quiet_stop(tmp_path):
    t0 = time.monotonic()
    out, err = run_host(tmp_path, "drain")
    took = time.monotonic() - t0
    assert re.search(r"^report: completed=1 aborted=1 failed=0 kv=0$", out, re.MULTILINE), out
    # The short one finished normally inside the drain; the endless one was cut at the
    # deadline, returned (not thrown) with "abort", and its text is what it had streamed.
    assert re.search(r"^stream short: length 40 yes$", out, re.MULTILINE), out
    m = re.search(r"^stream endless: abort (\d+) yes$", out, re.MULTILINE)
    assert m and int(m.group(1)) > 40, out
    assert re.search(r"^after: ShutDownError: .*shut down", out, re.MULTILINE), out
    # A drain the host asked for is not a failure: nothing alarming on any channel (but the
    # line that names the ShutDownError the test asked for).
    bad = alarming_lines("\n".join(l for l in out.splitlines() if not l.startswith("after: ")),
                         err)
    assert not bad, f"the host's output has alarming lines: {bad}"
    assert "remote exception" not in out + err
    assert took < 30, f"the host took {took:.1f}s"
    m = re.search(r"^descendants:(.*)$", out, re.MULTILINE)
    assert m, out
    pids = [int(p) for p in m.group(1).split()]
    assert len(pids) >= 3, f"expected engine-core and 2 ranks, saw {pids}"
    assert_all_gone(pids, "the LLM's processes")
    assert not list(tmp_path.iterdir()), f"left in $XDG_RUNTIME_DIR: {list(tmp_path.iterdir())}"


# The same out-of-range values, as the library takes them (host_program.cpp's table) and as
# the HTTP API does: the messages must be the same.
SAMPLING_CASES = {
    "max_tokens_0": {"max_tokens": 0},
    "max_tokens_4097": {"max_tokens": 4097},
    "temperature_2.01": {"temperature": 2.01},
    "temperature_-0.1": {"temperature": -0.1},
    "top_p_0": {"top_p": 0},
    "top_p_1.5": {"top_p": 1.5},
    "top_k_-2": {"top_k": -2},
    "stop_5": {"stop": ["a", "b", "c", "d", "e"]},
    "stop_empty": {"stop": ["x", ""]},
}


def test_generate_refuses_bad_sampling_with_the_same_message_as_the_http_api(tmp_path, vsup_bin):
    from test_serving import Serving  # the serving tree helper of the HTTP tests

    out, _ = run_host(tmp_path, "sampling")
    library = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    assert set(library) == set(SAMPLING_CASES), out
    serving = Serving(vsup_bin, tmp_path / "serving")
    (tmp_path / "serving").mkdir()
    try:
        serving.start("--sim-token-ms", "1")
        for case, fields in SAMPLING_CASES.items():
            r, data = serving.post("/v1/completions",
                                   {"model": "vsup-sim", "prompt": "hello", **fields})
            assert r.status == 400, (case, data)
            http_message = json.loads(data)["error"]["message"]
            assert library[case] == "vsup::LLM: " + http_message, (
                f"{case}: the library says {library[case]!r}, the HTTP API {http_message!r}")
        serving.signal(signal.SIGTERM)
        assert serving.wait_exit(30) == 0, serving.stderr()
        wait_for(lambda: not serving.leftovers(), 2.0, "every process of the tree to be gone",
                 lambda: f"left: {serving.leftovers()}")
    finally:
        serving.kill_everything()
