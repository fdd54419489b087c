"""The official OpenAI client (the `openai` npm package) against a `vsup run` serving tree.

tests/integration/openai_client/client.mjs runs a completion, a streamed completion, a chat
completion and a streamed chat completion with usage through the real client library and prints
what came back as one JSON object; this test checks it. The client's node_modules come from
`.ci/install-deps` (`npm ci` in that directory); without them the test fails, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from test_serving import serving  # noqa: F401 - a fixture, found by pytest by name

CLIENT_DIR = Path(__file__).resolve().parent / "openai_client"
NODE_TIMEOUT_S = 30


def test_the_official_openai_client_completes_streams_and_chats_with_usage(serving):
    node = shutil.which("node")
    if node is None or not (CLIENT_DIR / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail(f"the OpenAI client's dependencies are missing ({CLIENT_DIR}/node_modules "
                    f"or node itself): run .ci/install-deps", pytrace=False)
    serving.start("--sim-token-ms", "1", "--api-key", "sekrit")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = "sekrit"
    r = subprocess.run([node, "client.mjs", f"http://127.0.0.1:{serving.port}/v1"],
                       cwd=CLIENT_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=NODE_TIMEOUT_S)
    assert r.returncode == 0, f"client.mjs exited {r.returncode}:\n{r.stderr}\n{serving.stderr()}"
    out = json.loads(r.stdout)

    c = out["completion"]
    assert c["object"] == "text_completion"
    assert c["text"] and c["finish_reason"] == "length"
    assert c["usage"]["completion_tokens"] == 5
    assert c["usage"]["prompt_tokens"] > 0
    assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + 5

    s = out["completion_stream"]
    assert s["text"] and s["finish_reason"] == "length"
    assert s["chunks"] >= 2
    # Deterministic engine: the stream is a prefix of the same prompt's completion.
    assert c["text"].startswith(s["text"])

    ch = out["chat"]
    assert ch["object"] == "chat.completion"
    assert ch["role"] == "assistant"
    assert ch["content"] and ch["finish_reason"] == "length"
    assert ch["usage"]["completion_tokens"] == 3

    cs = out["chat_stream"]
    assert cs["role"] == "assistant"
    assert cs["content"] and cs["finish_reason"] == "length"
    assert cs["usage"] is not None, "stream_options.include_usage gave no usage chunk"
    assert cs["usage"]["completion_tokens"] == 6
    assert cs["usage"]["total_tokens"] == cs["usage"]["prompt_tokens"] + 6

    # Without the key the client gets a 401 and says so (exit 1), and the tree keeps serving.
    env["OPENAI_API_KEY"] = "wrong"
    r = subprocess.run([node, "client.mjs", f"http://127.0.0.1:{serving.port}/v1"],
                       cwd=CLIENT_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=NODE_TIMEOUT_S)
    assert r.returncode == 1 and "401" in r.stderr, r.stderr
    assert serving.health()[0] == 200

    serving.signal(signal.SIGTERM)
    assert serving.wait_exit(15) == 0, serving.stderr()
