"""`vsup run` refuses what it can check before it starts anything, and owns its port.

Every bad value of a `vsup run` flag (negative, nan, inf, empty, huge, malformed), a broken model
directory, and a port another server holds is a usage error: exit status 2, a message on stderr
that names the flag (or the file and field), and nothing started: no child process, no control
socket, no log line of a supervisor. What only a rank can find out (reading the weights
themselves) is a failed start instead (exit 3, naming the node); the tests of that are in
test_cpu_engine.py and test_serving.py.

The port is bound once, by the root, before anything is spawned, and every API server accepts
from that one socket (no SO_REUSEPORT): a second `vsup run` on a served port is refused and the
first keeps all of its traffic; `--port 0` takes a free port.

Each refused run is started in its own session, so that anything it had spawned would be found
(and reported) by session id; waits poll with a deadline, nothing sleeps to synchronise.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import llama_ref as ref
from conftest import listening_inodes, wait_for
from test_cpu_engine import TINY_CFG, left_behind, session_processes, write_hf_model
from test_serving import HTTP_TIMEOUT_S, Serving, free_port

SIM = ("--engine", "sim", "--model", "vsup-sim")
CPU = ("--engine", "cpu", "--model", "vsup-tiny-4m", "--kv-cache-memory", "32MiB")
REFUSE_TIMEOUT_S = 15


def run_refused(vsup_bin: str, tmp: Path, *args: str, engine=SIM, env: dict | None = None,
                port: int | None = None) -> str:
    """`vsup run ENGINE ARGS`, which must be refused: exit 2, quickly, with nothing started.
    Returns its stderr."""
    d = tmp / f"refused-{len(list(tmp.glob('refused-*')))}"
    d.mkdir()
    ctl = d / "ctl.sock"
    argv = [vsup_bin, "run", "--port", str(port if port is not None else free_port()),
            "--control-socket", str(ctl), *engine, *args]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, **(env or {})})
    try:
        out, err = p.communicate(timeout=REFUSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{argv} was not refused: it ran for {REFUSE_TIMEOUT_S}s", pytrace=False)
    took = time.monotonic() - t0
    text = (out + err).decode(errors="replace")
    diag = f"{' '.join(argv)}\n{text}"
    assert p.returncode == 2, f"exit {p.returncode}, not 2 (a usage error): {diag}"
    # Nothing started: no control socket, no supervisor's log line, nothing of its session.
    assert not ctl.exists(), f"a control socket was made: {diag}"
    assert "[supervisor]" not in text and "started" not in text, f"something started: {diag}"
    assert not left_behind({p.pid}, set()), left_behind({p.pid}, set())
    assert not session_processes(p.pid), session_processes(p.pid)
    assert took < 10, f"a usage error took {took:.1f}s: {diag}"
    return text


# ---------------------------------------------------------------------------------------------
# Every flag with a bad value: exit 2, the flag named, nothing started.

BAD_FLAGS = [
    # The address and the port.
    ("--host", "not-an-address"), ("--host", "999.1.1.1"), ("--host", ""),
    ("--host", "example.com"), ("--host", "[::1"),
    ("--port", "-1"), ("--port", "65536"), ("--port", "abc"), ("--port", ""), ("--port", "1.5"),
    # Seconds: nan, inf, negative, empty, huge.
    ("--shutdown-timeout", "nan"), ("--shutdown-timeout", "inf"), ("--shutdown-timeout", "-1"),
    ("--shutdown-timeout", ""), ("--shutdown-timeout", "1e12"), ("--shutdown-timeout", "-nan"),
    ("--kv-shutdown-timeout", "nan"), ("--kv-shutdown-timeout", "-1"),
    ("--kv-shutdown-timeout", "inf"),
    ("--liveness-timeout", "nan"), ("--liveness-timeout", "-1"), ("--liveness-timeout", "0.001"),
    ("--liveness-timeout", "1e9"), ("--liveness-interval", "0"), ("--liveness-interval", "nan"),
    ("--engine-start-timeout", "nan"),
    ("--engine-start-timeout", "-5"), ("--worker-start-timeout", "inf"),
    ("--worker-start-timeout", "0"), ("--api-server-start-timeout", "nan"),
    ("--api-server-start-timeout", ""),
    ("--http-first-byte-timeout", "nan"), ("--http-first-byte-timeout", "-1"),
    ("--http-header-timeout", "inf"), ("--http-body-timeout", "-0.5"),
    ("--http-idle-timeout", "nan"), ("--http-idle-timeout", "1e300"),
    # Counts and sizes.
    ("--max-connections", "0"), ("--max-connections", "-5"), ("--max-connections", "abc"),
    ("--max-connections", "1e100"),
    ("--api-server-count", "0"), ("--api-server-count", "65"), ("--api-server-count", "nan"),
    ("--max-request-bytes", "0"), ("--max-request-bytes", "-1"),
    ("--max-request-bytes", "99999999999999999999"),
    ("--tensor-parallel-size", "0"), ("--tensor-parallel-size", "-1"),
    ("--tensor-parallel-size", "65"), ("--max-num-seqs", "0"), ("--max-num-seqs", "1.5"),
    ("--max-num-batched-tokens", "0"), ("--max-num-batched-tokens", "-1"),
    ("--max-model-len", "-1"), ("--max-model-len", "99999999999"), ("--max-model-len", ""),
    ("--max-model-len", "nan"), ("--block-size", "0"), ("--block-size", "2000"),
    ("--collective-timeout-ms", "5"), ("--collective-timeout-ms", "-1"),
    ("--sim-token-ms", "-1"), ("--sim-token-ms", "1e100"), ("--sim-kv-transfer-ms", "-1"),
    ("--seed", "-1"), ("--seed", "5x"), ("--seed", ""),
    ("--kv-cache-memory", "nan"), ("--kv-cache-memory", "0"), ("--kv-cache-memory", "-1GiB"),
    ("--kv-cache-memory", ""), ("--kv-cache-memory", "5PiB"), ("--kv-cache-memory", "2048TiB"),
    ("--kv-cache-memory", "lots"), ("--kv-cache-memory", "0x100"),
    # Names and choices.
    ("--api-key", ""), ("--api-key", " key"), ("--api-key", "key\t"),
    ("--served-model-name", ""), ("--model", ""), ("--engine", "tpu"), ("--engine", ""),
    ("--load-format", "pickle"), ("--kv-connector", "nixl"), ("--log-level", "loud"),
    ("--log-format", "xml"),
    ("--control-socket", "/nonexistent-dir/ctl.sock"), ("--control-socket", "/tmp"),
    ("--control-socket", "/tmp/" + "s" * 120),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v!r}" for f, v in BAD_FLAGS])
def test_a_bad_value_is_refused_naming_the_flag_with_nothing_started(vsup_bin, tmp_path, flag,
                                                                     value):
    if flag == "--control-socket":
        # The refusal's own --control-socket must not be there twice.
        argv = [vsup_bin, "run", "--port", str(free_port()), *SIM, flag, value]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=REFUSE_TIMEOUT_S,
                           start_new_session=True)
        assert p.returncode == 2, (argv, p.stderr)
        assert flag in p.stderr, p.stderr
        assert "[supervisor]" not in p.stderr, p.stderr
        return
    engine = () if flag in ("--engine", "--model") else SIM
    text = run_refused(vsup_bin, tmp_path, flag, value, engine=engine)
    assert flag in text, text


def test_an_empty_vsup_api_key_is_refused_rather_than_serving_without_one(vsup_bin, tmp_path):
    text = run_refused(vsup_bin, tmp_path, env={"VSUP_API_KEY": ""})
    assert "VSUP_API_KEY is set but empty" in text, text


def test_max_model_len_above_the_models_context_is_refused(vsup_bin, tmp_path):
    # vsup-tiny-4m's context is 2048 tokens.
    text = run_refused(vsup_bin, tmp_path, "--max-model-len", "4096", engine=CPU)
    assert "--max-model-len 4096 is more than the model's context length (2048 tokens" in text, \
        text


def total_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_a_kv_cache_in_tib_beyond_this_machines_memory_is_refused(vsup_bin, tmp_path):
    tib = total_memory() // (1 << 40) + 2
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", "vsup-tiny-4m",
                       "--kv-cache-memory", f"{tib}TiB", engine=())
    assert f"--kv-cache-memory {tib << 40} bytes per rank" in text, text
    assert "more than this machine's memory" in text, text


def test_a_kv_cache_in_tib_is_a_valid_size_for_the_sim_engine(vsup_bin, tmp_path):
    """The sim engine allocates no KV cache: 2TiB parses and serves (its slots are capped)."""
    s = Serving(vsup_bin, tmp_path)
    try:
        s.start("--kv-cache-memory", "2TiB")
        r, body = s.post("/v1/completions", {"model": "vsup-sim", "prompt": "x", "max_tokens": 2})
        assert r.status == 200, body
        s.signal(signal.SIGTERM)
        assert s.wait_exit(15) == 0, s.stderr()
    finally:
        s.kill_everything()


# ---------------------------------------------------------------------------------------------
# Broken model directories: whatever the root can read is checked before spawning (exit 2,
# naming the file and the field or tensor).


def hf_model(tmp_path: Path, name: str = "model", **config_changes) -> Path:
    d = write_hf_model(tmp_path / name)
    if config_changes:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config_changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 10**12), ("hidden_size", 10**9), ("num_hidden_layers", 10**7),
    ("intermediate_size", 2**40), ("num_attention_heads", 10**6),
    ("max_position_embeddings", 10**10), ("head_dim", 10**6), ("vocab_size", 2**70),
    ("vocab_size", -5), ("hidden_size", 0), ("num_hidden_layers", 2.5), ("vocab_size", "big"),
])
def test_an_absurd_size_in_config_json_is_refused_naming_the_field(vsup_bin, tmp_path, field,
                                                                   value):
    d = hf_model(tmp_path, **{field: value})
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", str(d), engine=())
    assert f'{d}/config.json: "{field}"' in text, text
    assert "bad_alloc" not in text, text


def test_sizes_in_bounds_but_beyond_this_machines_memory_are_refused_naming_them(vsup_bin,
                                                                                  tmp_path):
    # 2^24 x 2^16 embedding rows: 4 TiB of fp32 weights for the embedding alone.
    d = hf_model(tmp_path, vocab_size=2**24, hidden_size=2**16, num_attention_heads=1024,
                 num_key_value_heads=1024, intermediate_size=128, max_position_embeddings=256)
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", str(d),
                       "--kv-cache-memory", "256MiB", engine=())
    assert f"{d}/config.json (hidden_size 65536" in text, text
    assert "vocab_size 16777216" in text, text
    assert "more than this machine's memory" in text, text


def test_a_checkpoint_with_a_tensor_of_the_wrong_shape_is_refused_naming_the_tensor(
        vsup_bin, tmp_path):
    d = write_hf_model(tmp_path / "model")
    weights = ref.random_weights(TINY_CFG, 7)
    name = "model.layers.0.self_attn.k_proj.weight"
    rows, cols = weights[name].shape
    weights[name] = weights[name][:-1]  # one row short
    raw, _ = ref.encode_model(weights, "F32")
    ref.write_safetensors(d / "model.safetensors", raw, {"format": "pt"})
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", str(d), engine=())
    assert (f"tensor '{name}' has shape [{rows - 1}, {cols}], expected [{rows}, {cols}]"
            in text), text


def test_a_truncated_safetensors_file_is_refused_naming_the_file(vsup_bin, tmp_path):
    d = write_hf_model(tmp_path / "model")
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", str(d), engine=())
    assert f"{f}: truncated" in text, text


@pytest.mark.parametrize("breakage", ["not json", "no tokenizer", "no safetensors",
                                      "architecture"])
def test_other_broken_model_directories_are_usage_errors(vsup_bin, tmp_path, breakage):
    d = write_hf_model(tmp_path / "model")
    if breakage == "not json":
        (d / "config.json").write_text("{nope")
        expect = f"{d}/config.json: not valid JSON"
    elif breakage == "no tokenizer":
        (d / "tokenizer.json").unlink()
        expect = f"{d}/tokenizer.json: missing"
    elif breakage == "no safetensors":
        (d / "model.safetensors").unlink()
        expect = str(d)
    else:
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["MistralForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
        expect = '"MistralForCausalLM" is not supported'
    text = run_refused(vsup_bin, tmp_path, "--engine", "cpu", "--model", str(d), engine=())
    assert expect in text, text


# ---------------------------------------------------------------------------------------------
# The port: bound once by the root, refused when taken.


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            found.add(m.group(1))
    return found


def complete(s: Serving, model: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=HTTP_TIMEOUT_S)
    try:
        c.request("POST", "/v1/completions",
                  body=json.dumps({"model": model, "prompt": "x", "max_tokens": 2}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_a_second_vsup_run_on_a_served_port_is_refused_and_the_first_keeps_its_traffic(
        vsup_bin, tmp_path):
    first = Serving(vsup_bin, tmp_path / "first")
    (tmp_path / "first").mkdir()
    try:
        first.start("--sim-token-ms", "1", "--api-server-count", "2",
                    "--served-model-name", "first")
        text = run_refused(vsup_bin, tmp_path, "--api-server-count", "2",
                           "--served-model-name", "second", port=first.port)
        assert f"--host/--port 127.0.0.1:{first.port}: address already in use" in text, text
        # Every request is answered by the first tree (a second one would not know the model
        # "first": 404), and its two API servers counted them all.
        def served() -> int:
            return sum(a.get("requests_total", 0) for a in first.tree()["children"]
                       if a["name"].startswith("api-server"))
        before = served()
        n = 40
        statuses = [complete(first, "first") for _ in range(n)]
        assert statuses == [200] * n, statuses
        assert served() - before == n, first.tree()
        assert first.health()[0] == 200
        first.signal(signal.SIGTERM)
        assert first.wait_exit(15) == 0, first.stderr()
        assert not first.leftovers(), first.leftovers()
    finally:
        first.kill_everything()


def test_every_api_server_accepts_from_the_one_socket_the_root_bound_and_closed(vsup_bin,
                                                                               tmp_path):
    s = Serving(vsup_bin, tmp_path)
    try:
        s.start("--api-server-count", "3")
        pids = s.remember_pids()
        inodes = listening_inodes(s.port)
        assert len(inodes) == 1, f"{len(inodes)} listening sockets on the port: {inodes}"
        (inode,) = inodes
        for i in range(3):
            assert inode in socket_inodes(pids[f"api-server-{i}"]), f"api-server-{i}"
        # The root bound it and handed it on: it holds no copy (one would keep connections
        # queued after the last API server exited), nor does engine-core.
        assert inode not in socket_inodes(s.proc.pid)
        assert inode not in socket_inodes(pids["engine-core"])
        assert f"[serve] root: bound 127.0.0.1:{s.port} for 3 API server(s)" in s.stderr()
        s.signal(signal.SIGTERM)
        assert s.wait_exit(15) == 0, s.stderr()
        assert not listening_inodes(s.port)
    finally:
        s.kill_everything()


def test_port_0_serves_on_a_free_port_named_in_the_log(vsup_bin, tmp_path):
    stderr_path = tmp_path / "stderr"
    argv = [vsup_bin, "run", "--port", "0", "--control-socket", str(tmp_path / "ctl.sock"),
            *SIM, "--api-server-count", "2"]
    with open(stderr_path, "wb") as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             start_new_session=True)
    try:
        def bound():
            m = re.search(r"\[serve\] root: bound 127\.0\.0\.1:(\d+) ", stderr_path.read_text())
            return int(m.group(1)) if m else None
        wait_for(lambda: bound() or p.poll() is not None, 10, "the bound port in the log",
                 stderr_path.read_text)
        port = bound()
        assert port and port != 0, stderr_path.read_text()
        s = Serving(vsup_bin, tmp_path)
        s.port = port
        s.proc = p
        wait_for(lambda: s.health()[0] == 200 or p.poll() is not None, 30, "/health 200",
                 stderr_path.read_text)
        assert complete(s, "vsup-sim") == 200
        for i in range(2):
            wait_for(lambda: f"api-server-{i}: listening on 127.0.0.1:{port}"
                     in stderr_path.read_text(), 10, f"api-server-{i} listening on {port}",
                     stderr_path.read_text)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0, stderr_path.read_text()
        wait_for(lambda: not left_behind({p.pid}, set()), 2, "nothing left",
                 lambda: "\n".join(left_behind({p.pid}, set())))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


# ---------------------------------------------------------------------------------------------
# The other half of the rule: what only a rank finds while starting is a failed start (exit 3).


def test_a_rank_that_fails_while_starting_is_exit_3_naming_the_rank(vsup_bin, tmp_path):
    argv = [vsup_bin, "run", "--port", "0", "--control-socket", str(tmp_path / "ctl.sock"),
            *SIM, "--tensor-parallel-size", "2"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "VSUP_TEST_FAIL_WORKER_START": "1"})
    try:
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vsup run: ") and "worker-tp1" in last, err
    wait_for(lambda: not left_behind({p.pid}, set()), 2, "nothing left",
             lambda: "\n".join(left_behind({p.pid}, set())))


def test_the_kv_connector_with_an_engine_whose_cache_cannot_move_is_a_usage_error(vsup_bin,
                                                                                 tmp_path):
    text = run_refused(vsup_bin, tmp_path, "--kv-connector", "vsup")  # the sim engine
    assert ("--kv-connector vsup needs an engine whose KV cache can be transferred "
            "(--engine cpu), not --engine sim") in text, text
