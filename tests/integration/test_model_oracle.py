"""The CPU engine's logits against an independent NumPy reference of the Hugging Face Llama model.

Tiny random Llama checkpoints are written by hand (config.json + safetensors, llama_ref.py);
`vsup-logits` ($VSUP_LOGITS) loads one, prefills a prompt and feeds decode tokens through the
paged KV cache (block size 4, so the cache crosses blocks), and prints the logits as JSON. Each
row must match the float64 reference to max|got - ref| / max|ref| <= 1e-4, at TP = 1, 2 and 4.
Loader errors must exit 1 with "vsup-logits: <message>" naming what was wrong.

The reference's own consistency (two independent forms agree, RoPE and GQA properties, the
safetensors writer) is checked first, without the binary.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import llama_ref as ref
from llama_ref import LlamaConfig

TOLERANCE = 1e-4
RUN_TIMEOUT_S = 60

BASE = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
PROMPT = [5, 17, 93, 42, 0, 61, 88]  # 7 tokens: blocks of 4 hold positions 0-3 and 4-7
DECODE = [3, 95, 27, 50, 11]  # positions 7..11: the cache grows into a third block
BLOCK_SIZE = 4

# name -> (config, storage dtype, shard files, TP degrees to run at)
VARIANTS = {
    "f32": (BASE, "F32", 1, (1, 2, 4)),
    "f32-tied": (replace(BASE, tie_word_embeddings=True), "F32", 1, (1, 2, 4)),
    "head-dim-32": (replace(BASE, head_dim=32), "F32", 1, (1, 2, 4)),  # 4 x 32 != H = 64
    "bf16": (BASE, "BF16", 1, (1, 2, 4)),
    "f16": (BASE, "F16", 1, (1, 2, 4)),
    "f32-two-shards": (BASE, "F32", 2, (2,)),  # model.safetensors.index.json
}


# ---------------------------------------------------------------------------------------------
# Running the tool


@pytest.fixture(scope="session")
def logits_bin() -> str:
    path = os.environ.get("VSUP_LOGITS")
    if not path:
        pytest.fail("VSUP_LOGITS is not set: point it at the built vsup-logits binary "
                    "(VSUP_LOGITS=build/tools/vsup-logits); the model oracle tests need it",
                    pytrace=False)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"VSUP_LOGITS={path} is not an executable file", pytrace=False)
    return os.path.realpath(path)


def run_tool(binary: str, model: Path, *, tp: int = 1, prompt=PROMPT, decode=DECODE,
             block_size: int = BLOCK_SIZE) -> subprocess.CompletedProcess:
    argv = [binary, "--model", str(model), "--tp", str(tp), "--prompt", ",".join(map(str, prompt))]
    if decode:
        argv += ["--decode", ",".join(map(str, decode))]
    argv += ["--block-size", str(block_size)]
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} did not finish within {RUN_TIMEOUT_S}s", pytrace=False)


def tool_logits(binary: str, model: Path, tp: int, vocab: int) -> np.ndarray:
    r = run_tool(binary, model, tp=tp)
    assert r.returncode == 0, (f"vsup-logits --tp {tp} on {model} exited {r.returncode}\n"
                               f"stderr:\n{r.stderr[-4000:]}")
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"vsup-logits printed no JSON object ({e}); stdout starts: {r.stdout[:500]!r}",
                    pytrace=False)
    assert out.get("vocab") == vocab, f"vocab {out.get('vocab')}, expected {vocab}"
    logits = np.array(out["logits"], dtype=np.float64)
    assert logits.shape == (1 + len(DECODE), vocab), f"logits shape {logits.shape}"
    assert np.isfinite(logits).all(), "non-finite logits"
    return logits


def compare(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """Asserts max|got - want| / max|want| <= TOLERANCE; prints and returns that ratio."""
    err = np.abs(got - want)
    row, col = np.unravel_index(int(np.argmax(err)), err.shape)
    rel = float(err.max() / np.abs(want).max())
    report = (f"{what}: max|got-ref|/max|ref| = {rel:.3g} (limit {TOLERANCE:g}); worst at row "
              f"{row} ({'prefill' if row == 0 else f'decode token {row}'}), token {col}: "
              f"got {got[row, col]:.7g}, ref {want[row, col]:.7g}")
    print(report)
    assert rel <= TOLERANCE, report
    return rel


# ---------------------------------------------------------------------------------------------
# Models, written once per module; the tool's output cached per (variant, tp)


class Model:
    def __init__(self, name: str, directory: Path, cfg: LlamaConfig, dtype: str, shards: int):
        self.name = name
        self.dir = directory
        self.cfg = cfg
        weights = ref.random_weights(cfg, seed=1234)
        self.stored = ref.write_model(directory, cfg, weights, dtype, shards=shards)
        self.ref = ref.reference_logits(self.stored, cfg, PROMPT, DECODE)
        self.outputs: dict[int, np.ndarray] = {}

    def logits(self, binary: str, tp: int) -> np.ndarray:
        if tp not in self.outputs:
            self.outputs[tp] = tool_logits(binary, self.dir, tp, self.cfg.vocab_size)
        return self.outputs[tp]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("models")
    return {name: Model(name, root / name, cfg, dtype, shards)
            for name, (cfg, dtype, shards, _) in VARIANTS.items()}


CASES = [(name, tp) for name, (_, _, _, tps) in VARIANTS.items() for tp in tps]


@pytest.mark.parametrize("variant,tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_logits_match_the_reference(logits_bin, models, variant, tp):
    m = models[variant]
    compare(m.logits(logits_bin, tp), m.ref, f"{variant} TP={tp}")


@pytest.mark.parametrize("variant", ["f32", "f32-tied", "head-dim-32", "bf16"])
def test_greedy_tokens_do_not_depend_on_tp(logits_bin, models, variant):
    m = models[variant]
    want = m.ref.argmax(axis=1)
    # The check means something only if no position's top two logits (nearly) tie.
    top2 = np.sort(m.ref, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).min()
    assert margin > 1e-3 * np.abs(m.ref).max(), f"near-tie in the reference (margin {margin})"
    base = m.logits(logits_bin, 1).argmax(axis=1)
    assert list(base) == list(want), f"TP=1 greedy tokens {list(base)}, reference {list(want)}"
    for tp in (2, 4):
        got = m.logits(logits_bin, tp).argmax(axis=1)
        assert list(got) == list(base), f"TP={tp} greedy tokens {list(got)}, TP=1 {list(base)}"


# ---------------------------------------------------------------------------------------------
# Loader errors

SMALL = replace(BASE, num_hidden_layers=1)


def write_small(directory: Path, mutate=None, config_overrides=None) -> Path:
    """A one-layer F32 model; MUTATE(raw tensors) may change what is written."""
    directory.mkdir(parents=True, exist_ok=True)
    raw, _ = ref.encode_model(ref.random_weights(SMALL, seed=7), "F32")
    if mutate is not None:
        mutate(raw)
    ref.write_safetensors(directory / "model.safetensors", raw)
    config = SMALL.to_json()
    config.update(config_overrides or {})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def expect_failure(binary: str, model: Path, *needles: str) -> str:
    r = run_tool(binary, model)
    assert r.returncode == 1, (f"expected exit status 1, got {r.returncode}\n"
                               f"stdout: {r.stdout[:500]}\nstderr:\n{r.stderr[-2000:]}")
    lines = [l for l in r.stderr.splitlines() if l.startswith("vsup-logits: ")]
    assert lines, f"no 'vsup-logits: <message>' line on stderr:\n{r.stderr[-2000:]}"
    message = "\n".join(lines)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error message:\n{message}"
    return message


def test_missing_model_directory_is_an_error(logits_bin, tmp_path):
    expect_failure(logits_bin, tmp_path / "no-such-model", str(tmp_path / "no-such-model"))


def test_directory_without_safetensors_is_an_error(logits_bin, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_json()))
    expect_failure(logits_bin, tmp_path, str(tmp_path), "no *.safetensors")


def test_missing_config_json_is_an_error(logits_bin, tmp_path):
    write_small(tmp_path)
    (tmp_path / "config.json").unlink()
    expect_failure(logits_bin, tmp_path, "config.json")


def test_unsupported_architecture_is_an_error(logits_bin, tmp_path):
    write_small(tmp_path, config_overrides={"architectures": ["GPT2LMHeadModel"],
                                            "model_type": "gpt2"})
    expect_failure(logits_bin, tmp_path, "config.json", "GPT2LMHeadModel")


def test_missing_tensor_is_an_error(logits_bin, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    write_small(tmp_path, mutate=lambda raw: raw.pop(name))
    expect_failure(logits_bin, tmp_path, f"'{name}'", "not found")


def test_tensor_of_the_wrong_shape_is_an_error(logits_bin, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"

    def narrow(raw):
        data, _ = ref.encode(np.zeros((64, 32), dtype=np.float32), "F32")
        raw[name] = ref.RawTensor("F32", (64, 32), data)

    write_small(tmp_path, mutate=narrow)
    expect_failure(logits_bin, tmp_path, f"'{name}'", "[64, 32]", "[64, 64]")


def test_tensor_of_an_unsupported_dtype_is_an_error(logits_bin, tmp_path):
    name = "model.layers.0.self_attn.v_proj.weight"

    def to_int8(raw):
        data, _ = ref.encode(np.ones((32, 64)), "I8")
        raw[name] = ref.RawTensor("I8", (32, 64), data)

    write_small(tmp_path, mutate=to_int8)
    expect_failure(logits_bin, tmp_path, f"'{name}'", "I8")


# ---------------------------------------------------------------------------------------------
# The reference on its own (no binary needed)


def test_reference_whole_sequence_and_kv_cache_forms_agree():
    for cfg in (BASE, replace(BASE, tie_word_embeddings=True), replace(BASE, head_dim=32),
                replace(BASE, num_key_value_heads=1), replace(BASE, num_key_value_heads=4)):
        w = ref.random_weights(cfg, seed=99)
        full = ref.reference_logits(w, cfg, PROMPT, DECODE)
        step = ref.incremental_logits(w, cfg, PROMPT, DECODE)
        assert np.abs(full - step).max() <= 1e-12 * np.abs(full).max(), cfg


def test_reference_logits_are_order_one_and_every_layer_matters():
    w = ref.random_weights(BASE, seed=1234)
    logits = ref.reference_logits(w, BASE, PROMPT, DECODE)
    assert 0.3 < logits.std() < 5, logits.std()
    # Each layer's attention and MLP move the logits by a visible amount.
    for part in ("self_attn.o_proj", "mlp.down_proj"):
        for i in range(BASE.num_hidden_layers):
            w2 = dict(w)
            name = f"model.layers.{i}.{part}.weight"
            w2[name] = np.zeros_like(w[name])
            diff = np.abs(ref.reference_logits(w2, BASE, PROMPT, DECODE) - logits).max()
            assert diff > 0.05 * np.abs(logits).max(), (part, i, diff)
    # So do the norm weights (they are not all ones) and the tying choice.
    w2 = dict(w)
    w2["model.norm.weight"] = np.ones_like(w["model.norm.weight"])
    assert np.abs(ref.reference_logits(w2, BASE, PROMPT, DECODE) - logits).max() > 0.05


def test_reference_is_causal():
    w = ref.random_weights(BASE, seed=5)
    a = ref.forward(w, BASE, PROMPT)
    b = ref.forward(w, BASE, PROMPT + DECODE)
    assert np.allclose(a, b[:len(PROMPT)], rtol=0, atol=1e-12)
    assert not np.allclose(a[-1], ref.forward(w, BASE, [1] + PROMPT[1:])[-1])


def test_rope_is_identity_at_position_zero_and_a_rotation_elsewhere():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16))
    cos, sin = ref.rope_cos_sin([0], 16, 10000.0)
    assert np.array_equal(ref.apply_rope(x[:, :1], cos, sin), x[:, :1])
    cos, sin = ref.rope_cos_sin(np.arange(5), 16, 10000.0)
    y = ref.apply_rope(x, cos, sin)
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    # q(m) . k(n) depends on m - n only.
    q, k = rng.standard_normal(16), rng.standard_normal(16)

    def dot(m, n):
        cm, sm = ref.rope_cos_sin([m], 16, 10000.0)
        cn, sn = ref.rope_cos_sin([n], 16, 10000.0)
        return float(ref.apply_rope(q[None], cm, sm) @ ref.apply_rope(k[None], cn, sn).T)

    assert math.isclose(dot(7, 3), dot(104, 100), rel_tol=1e-9)
    assert not math.isclose(dot(7, 3), dot(7, 4), rel_tol=1e-3)
    # The pair layout is (j, j + hd/2): the first frequency turns x0 into x8 at 90 degrees.
    e0 = np.zeros(16)
    e0[0] = 1.0
    c, s = ref.rope_cos_sin([math.pi / 2], 16, 10000.0)
    rotated = ref.apply_rope(e0[None], c, s)[0]
    assert math.isclose(rotated[8], 1.0, abs_tol=1e-12) and abs(rotated[0]) < 1e-12


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    # kv head g serves query heads g*group .. g*group + group - 1 (HF repeat_kv).
    cfg = BASE
    w = ref.random_weights(cfg, seed=11)
    mha = replace(cfg, num_key_value_heads=cfg.num_attention_heads)
    w_mha = dict(w)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            heads = w[name].reshape(cfg.num_key_value_heads, cfg.hd, cfg.hidden_size)
            w_mha[name] = np.repeat(heads, group, axis=0).reshape(-1, cfg.hidden_size)
    a = ref.forward(w, cfg, PROMPT + DECODE)
    b = ref.forward(w_mha, mha, PROMPT + DECODE)
    assert np.allclose(a, b, rtol=0, atol=1e-12)


def test_one_token_attention_is_the_value_and_tying_uses_the_embeddings():
    cfg = replace(BASE, num_hidden_layers=1, tie_word_embeddings=True)
    w = ref.random_weights(cfg, seed=3)
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    t = 42
    x = w64["model.embed_tokens.weight"][t]
    p = "model.layers.0."
    h = ref.rms_norm(x, w64[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    v = w64[p + "self_attn.v_proj.weight"] @ h
    attn = np.repeat(v.reshape(cfg.num_key_value_heads, cfg.hd), 2, axis=0).reshape(-1)
    x = x + w64[p + "self_attn.o_proj.weight"] @ attn
    h = ref.rms_norm(x, w64[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    g = w64[p + "mlp.gate_proj.weight"] @ h
    up = w64[p + "mlp.up_proj.weight"] @ h
    x = x + w64[p + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * up)
    x = ref.rms_norm(x, w64["model.norm.weight"], cfg.rms_norm_eps)
    want = w64["model.embed_tokens.weight"] @ x
    assert np.allclose(ref.forward(w, cfg, [t])[0], want, rtol=1e-12, atol=1e-12)


def test_bf16_rounds_to_nearest_even():
    one = 1.0
    ulp = 2.0 ** -7  # BF16 spacing at 1.0
    xs = np.array([one, one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2 ** -20,
                   -(one + ulp / 2 + 2 ** -20), 3.0e38, 1e-40, 0.0], dtype=np.float32)
    got = ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(xs)).astype(np.float64)
    want = [one, one, one + 2 * ulp, one + ulp, -(one + ulp), None, None, 0.0]
    for g, w_, x in zip(got, want, xs):
        if w_ is not None:
            assert g == w_, (x, g, w_)
    assert abs(got[5] - 3.0e38) <= 3.0e38 * 2 ** -8  # large values round, not overflow
    assert list(ref.f32_to_bf16_bits(np.float32(1.0))) == [0x3F80]


def test_safetensors_writer_round_trips_each_dtype(tmp_path):
    w = ref.random_weights(BASE, seed=2)
    for dtype, tol in (("F32", 0), ("F16", 2 ** -10), ("BF16", 2 ** -7)):
        d = tmp_path / dtype
        stored = ref.write_model(d, BASE, w, dtype, shards=1 if dtype != "F32" else 2)
        files = sorted(d.glob("*.safetensors"))
        assert len(files) == (2 if dtype == "F32" else 1)
        back = {}
        for f in files:
            back.update(ref.read_safetensors(f))
            raw = f.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            assert (8 + n) % 8 == 0
            assert json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
        assert set(back) == set(ref.tensor_shapes(BASE))
        for name, values in back.items():
            assert np.array_equal(values, stored[name]), name
            assert np.abs(values - w[name]).max() <= tol * np.abs(w[name]).max(), (dtype, name)
        config = json.loads((d / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    index = json.loads((tmp_path / "F32" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref.tensor_shapes(BASE))
    tied = ref.tensor_shapes(replace(BASE, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
