"""`vsup run --engine cpu`: a real Llama-architecture model served over HTTP, end to end.

The built-in presets (vsup-tiny-25m, the default; vsup-tiny-4m, a cheaper one for tests) have a
byte tokenizer (one token per byte, special tokens one id each), seeded dummy weights, ChatML and
a 2048-token context. A Hugging Face model directory is written here: config.json and F32
safetensors by llama_ref.py's writers, and a byte-level BPE tokenizer.json (TINY_VOCAB) with a
ChatML tokenizer_config.json.

Each test starts its own trees on free ports and, at the end, checks that every process of each
tree's session (the root started its own session: ranks, API servers, guards) is gone and none is
left a zombie. Greedy requests (temperature 0) make outputs exact; the dummy weights are fixed by
--seed (default 0), so a prompt's greedy continuation is the same on every run. Waits poll for an
event with a hard timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import llama_ref as ref
from conftest import describe, is_running, proc_stat, reap_adopted, wait_for
from llama_ref import LlamaConfig
from test_serving import HTTP_TIMEOUT_S, Serving, StreamClient, free_port
from test_serving_shutdown import in_flight

TINY = ("--engine", "cpu", "--model", "vsup-tiny-4m", "--kv-cache-memory", "32MiB")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Greedy continuations of these prompts run to 1500+ tokens without an end-of-text token
# (checked where it matters: the tests below fail saying so if one ever ends early).
LONG_PROMPTS_25M = ("abc", "Once upon a time", "1 2 3")
START_FAIL_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------
# Trees and what they leave behind


def session_processes(sid: int) -> dict[int, str]:
    """Every process of session SID (a tree started with start_new_session): pid -> state."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            out[int(entry)] = fields[0]
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return ""
    return data[data.index("(") + 1:data.rindex(")")]


def left_behind(sids: set[int], pids: set[int]) -> list[str]:
    """Processes of these sessions, or vsup processes with these pids (one that left the session),
    still running or left as zombies."""
    reap_adopted()  # an orphan of the tree is ours to reap (the test runner is a subreaper)
    found = {p for p in pids if comm(p) == "vsup"}
    for sid in sids:
        found |= set(session_processes(sid))
    problems = []
    for p in sorted(found):
        st = proc_stat(p)
        if st is None:
            continue
        if st[0] == "Z":
            problems.append(f"unreaped zombie: {describe(p)}")
        elif st[0] not in ("X", "x"):
            problems.append(f"left running: {describe(p)}")
    return problems


def kill_sessions(sids: set[int], pids: set[int], exe: str) -> None:
    """After a failure: SIGKILL (and SIGCONT, for a stopped one) every process of these sessions
    and every one of these pids that still runs EXE (a pid may have been reused by now)."""
    def runs_exe(p: int) -> bool:
        try:
            return os.readlink(f"/proc/{p}/exe") == exe
        except OSError:
            return False

    targets = {p for p in pids if runs_exe(p)}
    for sid in sids:
        targets |= set(session_processes(sid))
    for p in targets:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(p, sig)
            except OSError:
                pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(is_running(p) for p in targets):
        time.sleep(0.01)
    reap_adopted()


class Trees:
    """Starts `vsup run` trees, each in its own directory and session, and stops them all."""

    def __init__(self, vsup_bin: str, tmp: Path):
        self.vsup_bin = vsup_bin
        self.tmp = tmp
        self.servings: list[Serving] = []
        self.sids: set[int] = set()

    def serve(self, *args: str, env: dict | None = None) -> Serving:
        """A tree that is ready (/health 200), with the pids of its session remembered."""
        d = self.tmp / f"tree-{len(self.servings)}"
        d.mkdir()
        s = Serving(self.vsup_bin, d)
        self.servings.append(s)
        try:
            s.start(*args, env=env)
        finally:
            if s.proc is not None:
                self.sids.add(s.proc.pid)  # start_new_session: the root's pid is the session id
        s.pids |= set(session_processes(s.proc.pid))
        return s

    def stop(self, s: Serving, timeout: float = 15) -> int:
        """SIGTERM, then the exit status; every process of the tree must be gone."""
        s.signal(signal.SIGTERM)
        code = s.wait_exit(timeout)
        self.wait_nothing_left(s)
        return code

    def wait_nothing_left(self, s: Serving, timeout: float = 2.0) -> None:
        sid = s.proc.pid
        wait_for(lambda: not left_behind({sid}, s.pids), timeout,
                 "every process of the tree to be gone",
                 lambda: "\n".join(left_behind({sid}, s.pids)) + "\n" + s.stderr())

    def run_to_exit(self, *args: str, timeout: float = START_FAIL_TIMEOUT_S
                    ) -> tuple[int, str, float]:
        """`vsup run ARGS` expected to exit by itself: (status, stderr, seconds it took)."""
        d = self.tmp / f"run-{len(self.sids)}"
        d.mkdir()
        argv = [self.vsup_bin, "run", "--port", str(free_port()), "--control-socket",
                str(d / "ctl.sock"), *args]
        t0 = time.monotonic()
        with open(d / "stderr", "wb") as err:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 start_new_session=True)
        self.sids.add(p.pid)
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(argv)} did not exit within {timeout}s:\n"
                        f"{(d / 'stderr').read_text(errors='replace')}", pytrace=False)
        took = time.monotonic() - t0
        wait_for(lambda: not left_behind({p.pid}, set()), 2.0,
                 "every process of the failed start to be gone",
                 lambda: "\n".join(left_behind({p.pid}, set())))
        return code, (d / "stderr").read_text(errors="replace"), took


@pytest.fixture
def trees(tmp_path, vsup_bin):
    t = Trees(vsup_bin, tmp_path)
    yield t
    pids = set().union(*(s.pids for s in t.servings)) if t.servings else set()
    clean = False
    try:
        for s in t.servings:
            if s.proc is not None and s.proc.poll() is None:
                s.signal(signal.SIGTERM)
                s.wait_exit(30)
        wait_for(lambda: not left_behind(t.sids, pids), 2.0,
                 "every process of every tree to be gone",
                 lambda: "\n".join(left_behind(t.sids, pids)))
        clean = True
    finally:
        if not clean:
            kill_sessions(t.sids, pids, vsup_bin)


# ---------------------------------------------------------------------------------------------
# Requests


def completion(model: str, prompt: str, max_tokens: int, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def chat(model: str, content: str, max_tokens: int, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **kw}


def post_ok(s: Serving, path: str, body: dict) -> dict:
    r, data = s.post(path, body)
    assert r.status == 200, data
    # The body is UTF-8 as sent (a decode error here is invalid UTF-8 on the wire), and the
    # JSON string escapes decode to whole characters (a lone surrogate fails to encode).
    doc = json.loads(data.decode("utf-8", errors="strict"))
    for choice in doc["choices"]:
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        text.encode("utf-8", errors="strict")
    return doc


def text_of(doc: dict) -> str:
    return doc["choices"][0]["text"]


def get_json(s: Serving, path: str) -> dict:
    c = s.connect()
    c.request("GET", path)
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.status == 200, data
    return json.loads(data)


def raw_stream(s: Serving, body: dict) -> tuple[int, str, list[bytes]]:
    """A streaming request read to the end: (status, content type, each SSE event's raw bytes)."""
    c = s.connect()
    c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    buf = r.read()
    c.close()
    if r.status != 200:
        return r.status, r.getheader("Content-Type", ""), [buf]
    events = buf.split(b"\n\n")
    assert events[-1] == b"", f"the stream did not end with a whole event: {events[-1]!r}"
    return r.status, r.getheader("Content-Type", ""), events[:-1]


def chatml_prompt_tokens(messages: list[tuple[str, str]]) -> int:
    """Prompt tokens of a chat under ChatML with a tokenizer that has one token per byte of
    ordinary text and one id per special token (the presets' byte tokenizer)."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    text += "<|im_start|>assistant\n"
    specials = sum(text.count(sp) for sp in SPECIALS)
    return len(text.encode()) - sum(len(sp) * text.count(sp) for sp in SPECIALS) + specials


def error_events(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and "error" in e]


def wait_stream_started(stream: StreamClient) -> None:
    assert stream.first.wait(HTTP_TIMEOUT_S), "the streaming request did not start"
    assert stream.error is None and stream.status == 200, (stream.status, stream.error)
    assert stream.events and stream.events[-1] != "[DONE]", \
        f"the request ended before the test could act on it: {stream.events[-3:]}"


# ---------------------------------------------------------------------------------------------
# A Hugging Face model directory


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# Ids 0..255: the bytes; then three merges' results; then the special tokens.
MERGES = ["Ġ t", "h e", "Ġt he"]
TINY_VOCAB = {**{ch: b for b, ch in bytes_to_unicode().items()}, "Ġt": 256, "he": 257, "Ġthe": 258}
TINY_SPECIALS = {"<|endoftext|>": 259, "<|im_start|>": 260, "<|im_end|>": 261}
TINY_EOS = TINY_SPECIALS["<|endoftext|>"]
# 262 ids, padded to a multiple of 4 (as real checkpoints pad theirs).
TINY_CFG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=264,
                       max_position_embeddings=256)
# "hello the theme" under TINY_VOCAB: the pre-tokenizer splits "hello" | " the" | " theme";
# "hello" -> he l l o (4), " the" -> Ġthe (1), " theme" -> Ġthe m e (3).
MERGED_PROMPT, MERGED_PROMPT_TOKENS = "hello the theme", 8


def tokenizer_json() -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for c, i in TINY_SPECIALS.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": TINY_VOCAB,
                  "merges": MERGES},
    }


CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                   "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_hf_model(directory: Path, *, drop: str | None = None, seed: int = 7) -> Path:
    """A tiny Llama checkpoint with TINY_VOCAB's tokenizer; DROP: a tensor left out."""
    weights = ref.random_weights(TINY_CFG, seed)
    ref.write_model(directory, TINY_CFG, weights, "F32")
    if drop is not None:
        raw, _ = ref.encode_model({n: w for n, w in weights.items() if n != drop}, "F32")
        ref.write_safetensors(directory / "model.safetensors", raw, {"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=TINY_EOS)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML_TEMPLATE, "eos_token": "<|endoftext|>",
         "bos_token": None, "model_max_length": 256}))
    return directory


# ---------------------------------------------------------------------------------------------
# Serving the default preset


def test_vsup_run_with_engine_cpu_serves_the_default_25m_preset_with_whole_utf8_text(trees):
    s = trees.serve("--engine", "cpu", "--kv-cache-memory", "64MiB")
    assert [m["id"] for m in get_json(s, "/v1/models")["data"]] == ["vsup-tiny-25m"]
    m = re.search(r"\[engine\] engine-core: model vsup-tiny-25m \((\d+) parameters, weights dummy\)"
                  r", context 2048 tokens", s.stderr())
    assert m, s.stderr()
    assert 20e6 < int(m.group(1)) < 30e6, m.group(0)
    doc = post_ok(s, "/v1/completions", completion("vsup-tiny-25m", "abc", 16))
    assert doc["model"] == "vsup-tiny-25m"
    assert doc["choices"][0]["finish_reason"] == "length", doc
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    assert text_of(doc), "16 generated tokens decoded to no text"
    assert trees.stop(s) == 0, s.stderr()


def test_greedy_and_seeded_sampled_text_is_the_same_at_tp_1_2_and_4(trees):
    prompts = ("hello", "The quick brown fox", "abc")
    outputs = {}
    for tp in (1, 2, 4):
        s = trees.serve(*TINY, "--tensor-parallel-size", str(tp))
        workers = [n for n in s.remember_pids() if n.startswith("worker-tp")]
        assert len(workers) == tp, workers
        got = []
        for p in prompts:
            got.append(text_of(post_ok(s, "/v1/completions", completion("vsup-tiny-4m", p, 24))))
            got.append(text_of(post_ok(s, "/v1/completions", completion(
                "vsup-tiny-4m", p, 24, temperature=0.8, seed=5))))
        if tp == 1:
            # The seed matters (so equal sampled texts below are not equal by accident).
            other = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", prompts[0], 24,
                                                             temperature=0.8, seed=6))
            assert text_of(other) != got[1]
        outputs[tp] = got
        assert trees.stop(s) == 0, s.stderr()
    assert all(outputs[1]), outputs[1]
    assert outputs[2] == outputs[1]
    assert outputs[4] == outputs[1]


def test_a_stream_sends_whole_utf8_characters_per_chunk_and_adds_up_to_the_plain_text(trees):
    s = trees.serve(*TINY)
    body = completion("vsup-tiny-4m", "hello", 64)
    plain = text_of(post_ok(s, "/v1/completions", body))
    # Byte tokens of random weights: the text has multi-byte characters (real ones and U+FFFD
    # for invalid bytes), so a chunk boundary inside one would show.
    assert any(ord(ch) > 0x7F for ch in plain), repr(plain)
    status, ctype, events = raw_stream(s, body)
    assert status == 200 and ctype.startswith("text/event-stream"), (status, ctype, events)
    assert events[-1] == b"data: [DONE]", events[-3:]
    chunks = []
    for raw in events[:-1]:
        assert raw.startswith(b"data: "), raw
        text = raw[len(b"data: "):].decode("utf-8", errors="strict")  # each event on its own
        chunk = json.loads(text)
        delta = chunk["choices"][0]["text"]
        delta.encode("utf-8", errors="strict")  # no half character escaped as a lone surrogate
        chunks.append(chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1]), reasons
    assert trees.stop(s) == 0, s.stderr()


def test_a_chat_with_a_preset_is_rendered_as_chatml_with_one_token_per_special(trees):
    s = trees.serve(*TINY)
    doc = post_ok(s, "/v1/chat/completions", chat("vsup-tiny-4m", "hi", 8))
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    expected = chatml_prompt_tokens([("user", "hi")])
    assert expected == 21  # 18 bytes of text + <|im_start|> <|im_end|> <|im_start|>
    assert doc["usage"]["prompt_tokens"] == expected, doc["usage"]
    assert 1 <= doc["usage"]["completion_tokens"] <= 8, doc["usage"]
    assert trees.stop(s) == 0, s.stderr()


def test_prompt_plus_max_tokens_over_the_context_is_a_400_context_length_exceeded(trees):
    s = trees.serve(*TINY, "--max-model-len", "64")
    too_long = completion("vsup-tiny-4m", "x" * 50, 20)  # 50 + 20 = 70 > 64
    r, data = s.post("/v1/completions", too_long)
    assert r.status == 400, data
    assert r.getheader("Content-Type", "").startswith("application/json")
    err = json.loads(data)["error"]
    assert err["code"] == "context_length_exceeded", err
    for number in ("64", "70", "50", "20"):
        assert re.search(rf"\b{number}\b", err["message"]), err["message"]
    # Streaming: refused before any event, as the same plain 400 (not an SSE 200).
    status, ctype, body = raw_stream(s, too_long)
    assert status == 400 and ctype.startswith("application/json"), (status, ctype, body)
    assert json.loads(body[0])["error"]["code"] == "context_length_exceeded"
    # The server keeps serving, up to the limit exactly.
    assert s.health()[0] == 200
    doc = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", "x" * 50, 14))
    assert doc["usage"]["total_tokens"] <= 64
    assert trees.stop(s) == 0, s.stderr()


def test_a_stop_string_ends_the_text_right_before_it_and_max_tokens_caps_the_tokens(trees):
    s = trees.serve(*TINY)
    full_doc = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", "hello", 40))
    full = text_of(full_doc)
    assert full_doc["choices"][0]["finish_reason"] == "length", full_doc
    # A 3-character ASCII piece from the middle (ASCII: one byte, one token, one character).
    start = next(i for i in range(len(full) // 3, len(full) - 3)
                 if all(0x20 <= ord(ch) < 0x7F for ch in full[i:i + 3]))
    stop = full[start:start + 3]
    cut = full.index(stop)
    doc = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", "hello", 40, stop=[stop]))
    assert doc["choices"][0]["finish_reason"] == "stop", (stop, doc)
    assert text_of(doc) == full[:cut], (stop, full)
    assert doc["usage"]["completion_tokens"] < 40
    # Streamed, the text held back while it might be the start of the stop string never leaks.
    status, _, events = raw_stream(s, completion("vsup-tiny-4m", "hello", 40, stop=[stop]))
    assert status == 200
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # max_tokens: exactly that many tokens, finish "length", the start of the same text.
    for n in (1, 7):
        doc = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", "hello", n))
        assert doc["choices"][0]["finish_reason"] == "length"
        assert doc["usage"]["completion_tokens"] == n
        # The last token may end inside a character, flushed as U+FFFD.
        assert full.startswith(text_of(doc).rstrip("\ufffd")), (n, text_of(doc), full)
    assert trees.stop(s) == 0, s.stderr()


# ---------------------------------------------------------------------------------------------
# A Hugging Face model directory


def test_a_hugging_face_model_directory_is_served_with_its_tokenizer_and_chat_template(
        trees, tmp_path):
    model = str(write_hf_model(tmp_path / "tiny-llama"))
    s2 = trees.serve("--engine", "cpu", "--model", model, "--kv-cache-memory", "8MiB",
                     "--tensor-parallel-size", "2")
    assert [m["id"] for m in get_json(s2, "/v1/models")["data"]] == [model]
    params = sum(math.prod(shape) for shape in ref.tensor_shapes(TINY_CFG).values())
    assert f"model {model} ({params} parameters, weights safetensors)" in s2.stderr()
    doc = post_ok(s2, "/v1/completions", completion(model, MERGED_PROMPT, 24))
    assert doc["usage"]["prompt_tokens"] == MERGED_PROMPT_TOKENS, doc["usage"]  # merges applied
    tp2 = text_of(doc)
    assert tp2, doc
    reply = post_ok(s2, "/v1/chat/completions", chat(model, "hi", 8))
    # ChatML with one id per special token, and no merge applies to "user\nhi", "assistant\n".
    assert reply["usage"]["prompt_tokens"] == chatml_prompt_tokens([("user", "hi")]), reply
    assert trees.stop(s2) == 0, s2.stderr()

    s1 = trees.serve("--engine", "cpu", "--model", model, "--kv-cache-memory", "8MiB")
    assert text_of(post_ok(s1, "/v1/completions", completion(model, MERGED_PROMPT, 24))) == tp2
    assert trees.stop(s1) == 0, s1.stderr()

    sd = trees.serve("--engine", "cpu", "--model", model, "--kv-cache-memory", "8MiB",
                     "--load-format", "dummy")
    assert f"model {model} ({params} parameters, weights dummy)" in sd.stderr()
    doc = post_ok(sd, "/v1/completions", completion(model, MERGED_PROMPT, 4))
    assert doc["usage"]["prompt_tokens"] == MERGED_PROMPT_TOKENS
    assert trees.stop(sd) == 0, sd.stderr()


def test_a_missing_model_is_a_usage_error_naming_the_path_and_listing_the_presets(trees):
    code, err, took = trees.run_to_exit("--engine", "cpu", "--model", "/nonexistent")
    assert code == 2, err
    assert "/nonexistent" in err and "vsup-tiny-25m" in err and "vsup-tiny-4m" in err, err
    assert took < 5, f"a usage error took {took:.1f}s"


def test_an_engine_this_build_lacks_is_a_usage_error_saying_how_to_get_it(trees):
    # The engine is checked before the size: only a build without cuda names the engine here.
    _, probe, _ = trees.run_to_exit("--engine", "cuda", "--kv-cache-memory", "lots")
    if "built without it" not in probe:
        pytest.skip("this build has the cuda engine (nvcc was found): test_cuda_engine.py "
                    "covers --engine cuda; the sanitizer builds (-Dcuda=disabled) run this case")
    code, err, took = trees.run_to_exit("--engine", "cuda")
    assert code == 2, err
    assert "--engine 'cuda'" in err and "nvcc" in err and "meson setup" in err, err
    assert "accepted" in err and "cpu" in err and "sim" in err, err
    assert took < 5, f"a usage error took {took:.1f}s"


def test_an_unknown_engine_is_a_usage_error_listing_the_engines(trees):
    code, err, _ = trees.run_to_exit("--engine", "tpu")
    assert code == 2, err
    assert "tpu" in err and "cpu" in err and "sim" in err, err


def test_a_rank_gets_its_engine_configuration_over_the_control_channel_not_argv(trees):
    s = trees.serve(*TINY, "--tensor-parallel-size", "2", "--max-num-batched-tokens", "512")
    ranks = [pid for pid in s.pids if "__worker" in cmdline(pid)]
    cores = [pid for pid in s.pids if "__engine-core" in cmdline(pid)]
    assert len(ranks) == 2 and len(cores) == 1, [cmdline(p) for p in s.pids]
    for pid in ranks + cores:
        argv = cmdline(pid)
        for setting in ("--model", "--sim-token-ms", "--sim-kv-transfer-ms", "--kv-cache-memory",
                        "--max-num-batched-tokens", "--engine", "--tp"):
            assert setting not in argv, f"pid {pid}: {argv}"
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in env if e.startswith(b"VSUP_SIM")], env
    # The configuration did arrive: engine-core planned the model it names, and it serves.
    doc = post_ok(s, "/v1/completions", completion("vsup-tiny-4m", "hi", 4))
    assert doc["usage"]["completion_tokens"] >= 1
    assert "model vsup-tiny-4m" in s.stderr(), s.stderr()
    assert trees.stop(s) == 0, s.stderr()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_tensor_parallel_size_that_does_not_divide_the_heads_is_a_usage_error(trees):
    code, err, took = trees.run_to_exit(*TINY, "--tensor-parallel-size", "3")
    assert code == 2, err
    assert "--tensor-parallel-size 3" in err and "heads" in err, err
    assert took < 5, f"a usage error took {took:.1f}s"


def test_a_checkpoint_missing_a_tensor_is_a_usage_error_naming_the_tensor(trees, tmp_path):
    # The root checks the checkpoint's headers against config.json before any rank starts.
    missing = "model.layers.1.mlp.up_proj.weight"
    model = str(write_hf_model(tmp_path / "broken", drop=missing))
    code, err, took = trees.run_to_exit("--engine", "cpu", "--model", model,
                                        "--kv-cache-memory", "8MiB", "--tensor-parallel-size", "2")
    assert code == 2, err  # a usage error, found before anything started
    assert f"tensor '{missing}' not found" in err, err
    assert "started" not in err, err
    assert took < 5, f"a usage error took {took:.1f}s"


# ---------------------------------------------------------------------------------------------
# Shutdown and failures with the real engine


def test_sigterm_past_the_drain_deadline_aborts_long_streams_and_the_tree_exits_0(trees):
    s = trees.serve("--engine", "cpu", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "1")
    clients = [StreamClient(s, completion("vsup-tiny-25m", p, 1500)) for p in LONG_PROMPTS_25M]
    for c in clients:
        c.start()
    for c in clients:
        wait_stream_started(c)
    wait_for(lambda: in_flight(s) >= len(clients), 10, "every request in flight", s.stderr)
    sent = time.monotonic()
    s.signal(signal.SIGTERM)
    for c in clients:
        c.join(max(0.0, sent + 5 - time.monotonic()))
    assert not any(c.is_alive() for c in clients), "a client was not answered within 5 s"
    for c in clients:
        assert c.error is None, c.error
        assert c.events[-1] == "[DONE]", c.events[-3:]
        assert not error_events(c.events), c.events[-3:]
    reasons = [c.finish_reason() for c in clients]
    assert set(reasons) <= {"abort", "length", "stop"}, reasons
    assert "abort" in reasons, f"no request was still running at the deadline: {reasons}"
    assert all(c.text() for c in clients), "a stream carried no text"
    code = s.wait_exit(10)
    assert time.monotonic() - sent < 1 + 3, "the tree took longer than the timeout + 3 s"
    assert code == 0, s.stderr()
    trees.wait_nothing_left(s)


def test_a_rank_killed_mid_generation_fails_the_stream_with_an_error_and_the_tree_exits_5(trees):
    s = trees.serve("--engine", "cpu", "--kv-cache-memory", "64MiB", "--tensor-parallel-size", "2")
    pids = s.remember_pids()
    stream = StreamClient(s, completion("vsup-tiny-25m", LONG_PROMPTS_25M[1], 2000))
    stream.start()
    wait_stream_started(stream)
    killed = time.monotonic()
    os.kill(pids["worker-tp1"], signal.SIGKILL)
    stream.join(HTTP_TIMEOUT_S)
    told = time.monotonic() - killed
    assert stream.error is None, stream.error
    assert error_events(stream.events), f"no error event: {stream.events[-3:]}"
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    assert told < 3, f"the client was told {told:.1f}s after the rank died\n{s.stderr()}"
    status, body = s.health()
    assert status in (0, 503), (status, body)  # failed/stopping, or already gone
    code = s.wait_exit(15)
    assert code == 5, s.stderr()
    assert all(e["error"]["message"] for e in error_events(stream.events)), stream.events[-3:]
    victim = pids["worker-tp1"]
    # The rank is named: by the step's failure and by its stop (already dead: signal 9).
    assert "worker-tp1 disconnected" in s.stderr() or str(victim) in s.stderr(), s.stderr()
    assert re.search(r"worker-tp1 .*signal 9", s.stderr()), s.stderr()
    trees.wait_nothing_left(s)


def test_a_stopped_rank_times_out_the_collective_fails_the_stream_and_is_killed(trees):
    s = trees.serve("--engine", "cpu", "--kv-cache-memory", "64MiB", "--tensor-parallel-size", "2",
                    "--collective-timeout-ms", "1000")
    pids = s.remember_pids()
    victim = pids["worker-tp1"]
    stream = StreamClient(s, completion("vsup-tiny-25m", LONG_PROMPTS_25M[1], 2000))
    stream.start()
    try:
        wait_stream_started(stream)
        stopped = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        stream.join(15)
        told = time.monotonic() - stopped
        assert not stream.is_alive(), \
            f"the client was not answered within 15 s of the hang\n{s.stderr()}"
        assert stream.error is None, stream.error
        assert error_events(stream.events), f"no error event: {stream.events[-3:]}"
        assert stream.events[-1] == "[DONE]", stream.events[-3:]
        assert told >= 0.9, f"the client was told {told:.2f}s after the hang, before the timeout"
        # Either detector may fire first, both on the 1000 ms collective timeout: worker-tp0,
        # waiting on the stopped rank inside a collective, or engine-core, when the stop came
        # after the step's last collective and worker-tp0 answered alone.
        assert re.search(r"timed out after 1000 ms|did not answer step \d+ within 1000 ms",
                         s.stderr()), s.stderr()
        code = s.wait_exit(15)
        assert code == 5, s.stderr()
        # The tree itself must not leave the stopped rank behind (nothing here resumes it).
        trees.wait_nothing_left(s)
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(victim, sig)
            except OSError:
                pass
