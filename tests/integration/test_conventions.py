"""`vsup run` follows `vllm serve`'s command-line conventions, so routers, orchestrators and
scripts written for vLLM work unchanged: the model as a positional argument, --served-model-name
aliases, --enable-log-requests; and --log-format json makes every line the tree writes one JSON
object. Each serving test starts its own tree (the `serving` fixture of test_serving.py, which
checks at the end that every process is gone); waits poll with a hard timeout.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from conftest import wait_for
from test_serving import (  # noqa: F401 - `serving` is a fixture, found by pytest by name
    HTTP_TIMEOUT_S,
    Serving,
    free_port,
    serving,
)

JSON_KEYS = {"time", "level", "process", "pid", "message"}


def models(serving: Serving) -> list[dict]:
    c = serving.connect()
    c.request("GET", "/v1/models")
    r = c.getresponse()
    body = r.read()
    c.close()
    assert r.status == 200, body
    return json.loads(body)["data"]


def complete(serving: Serving, model: str, headers=None, prompt="hello"):
    conn = serving.connect()
    try:
        r, data = serving.post("/v1/completions",
                               {"model": model, "prompt": prompt, "max_tokens": 2},
                               conn=conn, headers=headers)
        return r.status, json.loads(data)
    finally:
        conn.close()


def run_usage_error(vsup_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([vsup_bin, "run", "--port", str(free_port()), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)


def test_the_model_may_be_given_as_the_positional_argument(serving):
    # Both forms at once are fine when they agree.
    serving.start("--engine", "sim", "my-model", "--model", "my-model", "--sim-token-ms", "1")
    listed = models(serving)
    assert listed[0]["id"] == "my-model", listed
    status, doc = complete(serving, "my-model")
    assert status == 200, doc
    assert doc["model"] == "my-model"
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()


def test_a_positional_model_and_a_different_model_flag_are_a_usage_error(vsup_bin):
    r = run_usage_error(vsup_bin, "--engine", "sim", "one-model", "--model", "another-model")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "MODEL 'one-model'" in r.stderr and "--model 'another-model'" in r.stderr, r.stderr
    # In the json log format the usage errors are JSON lines too, CLI11's own included.
    r = run_usage_error(vsup_bin, "--log-format", "json", "--engine", "sim", "one-model",
                        "--model", "another-model")
    assert r.returncode == 2, (r.returncode, r.stderr)
    (doc,) = json_lines(r.stderr, "stderr")
    assert doc["level"] == "error" and "--model 'another-model'" in doc["message"], doc
    r = run_usage_error(vsup_bin, "--log-format", "json", "--engine", "no-such-engine")
    assert r.returncode == 2, (r.returncode, r.stderr)
    (doc,) = json_lines(r.stderr, "stderr")
    assert "--engine" in doc["message"], doc


def test_served_model_names_are_the_names_requests_use(serving):
    serving.start("--sim-token-ms", "1", "--served-model-name", "alias-a", "alias-b")
    listed = models(serving)
    assert listed[0]["id"] == "alias-a", listed
    assert all(m["root"] == "vsup-sim" for m in listed), listed  # the model as given
    for name in ("alias-a", "alias-b"):
        status, doc = complete(serving, name)
        assert status == 200, (name, doc)
    # The model's own name is not one of the served names now.
    status, doc = complete(serving, "vsup-sim")
    assert status == 404 and doc["error"]["code"] == "model_not_found", doc
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()


@pytest.mark.parametrize("names, says", [
    ([""], "--served-model-name: an empty value"),
    (["a", "b", "a"], "--served-model-name: 'a' twice"),
])
def test_bad_served_model_names_are_a_usage_error(vsup_bin, names, says):
    r = run_usage_error(vsup_bin, "--engine", "sim", "--served-model-name", *names)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert says in r.stderr, r.stderr


def json_lines(text: str, where: str) -> list[dict]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"{where} line {n} is not JSON: {line!r}", pytrace=False)
        assert isinstance(doc, dict) and JSON_KEYS <= doc.keys(), f"{where} line {n}: {line}"
        assert isinstance(doc["pid"], int) and doc["pid"] > 0, line
        docs.append(doc)
    return docs


def test_log_format_json_makes_every_line_of_vsup_run_a_json_object(serving, tmp_path):
    # stdout and stderr apart, to check both.
    out_path, err_path = tmp_path / "run.stdout", tmp_path / "run.stderr"
    argv = [serving.vsup_bin, "run", "--log-format", "json", "--port", str(serving.port),
            "--control-socket", str(serving.socket), "--engine", "sim", "--model", "vsup-sim",
            "--tensor-parallel-size", "2", "--sim-token-ms", "1"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        serving.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
    serving.pids.add(serving.proc.pid)
    serving.stderr_path = err_path  # for the fixture's diagnostics
    wait_for(lambda: serving.health()[0] == 200 or serving.proc.poll() is not None, 30,
             "/health to answer 200", serving.stderr)
    serving.remember_pids()
    status, doc = complete(serving, "vsup-sim")
    assert status == 200, doc
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()

    logged = json_lines(err_path.read_text(errors="replace"), "stderr")
    json_lines(out_path.read_text(errors="replace"), "stdout")
    processes = {d["process"] for d in logged}
    assert {"root", "engine-core", "api-server-0", "worker-tp0", "worker-tp1"} <= processes, processes
    levels = {d["level"] for d in logged}
    assert levels <= {"trace", "debug", "info", "warn", "error", "critical"}, levels
    assert any("SIGTERM received" in d["message"] and d["process"] == "root" for d in logged)
    assert all(d["time"].endswith("Z") and "T" in d["time"] for d in logged)


def test_log_format_json_wraps_what_generic_children_print(tree):
    # A plain program's output (not JSON) is wrapped by the supervisor that collects it, one
    # level down as well; the root passes the already-JSON lines of the nested one unchanged.
    tree.start({"children": [
        {"name": "plain", "command": ["/bin/sh", "-c",
                                      "echo plain-out; echo plain-err >&2; exec sleep 30"]},
        {"name": "sub", "type": "supervisor", "children": [
            {"name": "inner", "command": ["/bin/sh", "-c", "echo inner-out; exec sleep 30"]},
        ]},
    ]}, extra_args=["--log-format", "json"])
    wait_for(lambda: tree.stdout_path.exists() and "inner-out" in tree.stdout_path.read_text()
             and "plain-out" in tree.stdout_path.read_text()
             and "plain-err" in tree.stderr(), 10, "the children's lines", tree.diagnostics)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0, tree.diagnostics()

    out = json_lines(tree.stdout_path.read_text(), "stdout")
    err = json_lines(tree.stderr(), "stderr")
    by_message = {d["message"]: d for d in out + err}
    assert by_message["plain-out"]["process"] == "plain"
    assert by_message["plain-out"]["stream"] == "stdout"
    assert by_message["plain-err"]["stream"] == "stderr"
    assert by_message["inner-out"]["process"] == "inner"
    assert any(d["process"] == "sub" for d in err), "the sub-supervisor's own log lines"


def test_enable_log_requests_logs_each_request_id_and_never_the_prompt(serving):
    serving.start("--sim-token-ms", "1", "--enable-log-requests")
    secret = "a-secret-prompt-8d1f"
    status, doc = complete(serving, "vsup-sim", headers={"X-Request-Id": "req-conventions-42"},
                           prompt=secret)
    assert status == 200, doc
    wait_for(lambda: "req-conventions-42" in serving.stderr(), 10,
             "a log line with the request id", serving.stderr)
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
    assert secret not in serving.stderr()


def test_requests_are_not_logged_without_the_flag(serving):
    serving.start("--sim-token-ms", "1")
    status, doc = complete(serving, "vsup-sim", headers={"X-Request-Id": "req-conventions-43"})
    assert status == 200, doc
    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
    assert "req-conventions-43" not in serving.stderr()
