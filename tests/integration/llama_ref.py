"""An independent NumPy reference of the Hugging Face Llama forward pass, and tiny model writers.

The forward pass follows transformers' `LlamaForCausalLM` (modeling_llama.py), not vsup's C++
code, so that the two can be checked against each other:

  x = embed_tokens[ids]
  per layer:  h = RMSNorm(x) * input_layernorm
              q, k, v = h @ q_proj^T, h @ k_proj^T, h @ v_proj^T   (split into heads)
              q, k = RoPE(q), RoPE(k)        # "rotate_half" layout: pairs (j, j + head_dim/2)
              k, v repeated for grouped-query attention (query head j uses kv head j // group)
              attn = softmax(q k^T / sqrt(head_dim) + causal mask) v
              x = x + attn @ o_proj^T
              h = RMSNorm(x) * post_attention_layernorm
              x = x + (silu(h @ gate_proj^T) * (h @ up_proj^T)) @ down_proj^T
  logits = (RMSNorm(x) * norm) @ lm_head^T    (lm_head = embed_tokens when tied)

RMSNorm(x) = x / sqrt(mean(x^2) + eps). All arithmetic is float64. There are two independent
implementations: `forward` (the whole sequence at once, in HF's vectorised form) and
`IncrementalLlama` (one token at a time through a KV cache, with RoPE written as explicit pair
rotations and attention as per-head loops); the tests check that they agree.

The writers produce what a Hugging Face model directory holds: config.json and safetensors
files written by hand (8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw little-endian bytes), in F32, F16 or BF16
(BF16 = the upper 16 bits of the fp32 value, rounded to nearest even).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (and not written)
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def hd(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads

    def to_json(self, torch_dtype: str = "float32") -> dict:
        """The config.json of a Hugging Face Llama checkpoint with these dimensions."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": torch_dtype,
        }
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        return d


def tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape ([out, in] for projections), in HF order."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.hd
    nH, nKV = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (nH * hd, H)
        shapes[p + "self_attn.k_proj.weight"] = (nKV * hd, H)
        shapes[p + "self_attn.v_proj.weight"] = (nKV * hd, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, nH * hd)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
    shapes["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def random_weights(cfg: LlamaConfig, seed: int, *, embed_std: float = 0.5,
                   proj_std: float = 0.1, lm_head_std: float = 0.1,
                   norm_jitter: float = 0.2) -> dict[str, np.ndarray]:
    """Gaussian float32 weights scaled so that every layer changes the residual stream and the
    logits are O(1): projections ~N(0, proj_std), embeddings ~N(0, embed_std), norm weights
    1 + N(0, norm_jitter) (not all ones, so a norm weight that is ignored shows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 + norm_jitter * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = embed_std * rng.standard_normal(shape)
        elif name == "lm_head.weight":
            w = lm_head_std * rng.standard_normal(shape)
        else:
            w = proj_std * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Safetensors


def f32_to_bf16_bits(x) -> np.ndarray:
    """BF16 bit patterns of fp32 values: the upper 16 bits, rounded to nearest, ties to even."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    one, sixteen = np.uint64(1), np.uint64(16)
    rounded = ((u + np.uint64(0x7FFF) + ((u >> sixteen) & one)) >> sixteen).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a NaN (rounding could carry it into infinity)
        sign = (u[nan] >> sixteen).astype(np.uint16) & np.uint16(0x8000)
        rounded[nan] = sign | np.uint16(0x7FC0)
    return rounded


def bf16_bits_to_f32(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "U8": "u1",
                 "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def encode(array, dtype: str) -> tuple[bytes, np.ndarray]:
    """(raw little-endian bytes of ARRAY stored as DTYPE, the stored values as float64)."""
    a = np.asarray(array)
    if dtype == "BF16":
        bits = f32_to_bf16_bits(a.astype(np.float32))
        return bits.astype("<u2").tobytes(), bf16_bits_to_f32(bits).astype(np.float64)
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"cannot encode dtype {dtype}")
    stored = a.astype(_NUMPY_DTYPES[dtype])  # numpy's float16 cast rounds to nearest even
    return stored.tobytes(), stored.astype(np.float64)


@dataclass
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def write_safetensors(path: Path, tensors: dict[str, RawTensor],
                      metadata: dict[str, str] | None = None) -> None:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(t.data)]}
        blobs.append(t.data)
        offset += len(t.data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every F32/F16/BF16 tensor of a safetensors file as float64 (for checking the writer)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        chunk = data[b:end]
        if e["dtype"] == "BF16":
            v = bf16_bits_to_f32(np.frombuffer(chunk, dtype="<u2"))
        else:
            v = np.frombuffer(chunk, dtype=_NUMPY_DTYPES[e["dtype"]])
        out[name] = v.astype(np.float64).reshape(e["shape"])
    return out


def encode_model(weights: dict[str, np.ndarray], dtype: str) -> tuple[dict[str, RawTensor],
                                                                       dict[str, np.ndarray]]:
    """(the tensors to write, the float64 values they hold once stored as DTYPE)."""
    raw, stored = {}, {}
    for name, w in weights.items():
        data, values = encode(w, dtype)
        raw[name] = RawTensor(dtype, tuple(w.shape), data)
        stored[name] = values
    return raw, stored


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def write_model(directory: Path, cfg: LlamaConfig, weights: dict[str, np.ndarray],
                dtype: str = "F32", *, shards: int = 1) -> dict[str, np.ndarray]:
    """Writes config.json and the weights as DTYPE safetensors (one model.safetensors, or SHARDS
    files with a model.safetensors.index.json); returns the stored values as float64, which is
    what a reference for this directory must use."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = cfg.to_json(_TORCH_DTYPES.get(dtype, "float32"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    raw, stored = encode_model(weights, dtype)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", raw, {"format": "pt"})
    else:
        names = list(raw)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: raw[n] for n in names[s::shards]}
            weight_map.update({n: file for n in part})
            write_safetensors(directory / file, part, {"format": "pt"})
        total = sum(len(t.data) for t in raw.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return stored


# ---------------------------------------------------------------------------------------------
# The forward pass, whole sequence (HF's vectorised form)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def rope_cos_sin(positions, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """HF LlamaRotaryEmbedding: inv_freq = theta^(-arange(0, hd, 2) / hd), emb = [freqs, freqs]."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [..., T, head_dim]; cos, sin: [T, head_dim]."""
    return x * cos + rotate_half(x) * sin


def _lm_head(w: dict[str, np.ndarray], cfg: LlamaConfig) -> np.ndarray:
    return w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]


def forward(w: dict[str, np.ndarray], cfg: LlamaConfig, tokens) -> np.ndarray:
    """Logits [T, V] at every position of TOKENS (positions 0..T-1), float64."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    nH, nKV, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd, cfg.rms_norm_eps
    group = nH // nKV
    x = w["model.embed_tokens.weight"][tokens]
    cos, sin = rope_cos_sin(np.arange(T), hd, cfg.rope_theta)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nH, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nKV, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nKV, hd).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # HF repeat_kv
        probs = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask)
        attn = (probs @ v).transpose(1, 0, 2).reshape(T, nH * hd)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ _lm_head(w, cfg).T


def reference_logits(w: dict[str, np.ndarray], cfg: LlamaConfig, prompt, decode) -> np.ndarray:
    """What `vsup-logits --prompt PROMPT --decode DECODE` must print: row 0 the logits at the
    last prompt position, row k (k >= 1) those after decode token k. [1 + len(decode), V]."""
    logits = forward(w, cfg, list(prompt) + list(decode))
    return logits[len(prompt) - 1:]


# ---------------------------------------------------------------------------------------------
# The forward pass, one token at a time through a KV cache (a second, independent form)


class IncrementalLlama:
    """Feeds tokens one at a time, keeping each layer's rotated keys and values per position."""

    def __init__(self, w: dict[str, np.ndarray], cfg: LlamaConfig):
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
        self.cfg = cfg
        self.keys: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]
        self.values: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]

    def _rope(self, vec: np.ndarray, pos: int) -> np.ndarray:
        """Rotates each pair (j, j + hd/2) of one head's vector by pos * theta^(-2j/hd)."""
        hd = len(vec)
        half = hd // 2
        out = np.empty_like(vec)
        for j in range(half):
            angle = pos * self.cfg.rope_theta ** (-2.0 * j / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = vec[j], vec[j + half]
            out[j] = a * c - b * s
            out[j + half] = a * s + b * c
        return out

    @staticmethod
    def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return x * w / math.sqrt(float(np.dot(x, x)) / len(x) + eps)

    def step(self, token: int) -> np.ndarray:
        cfg, w = self.cfg, self.w
        nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
        eps = cfg.rms_norm_eps
        pos = len(self.keys[0])
        x = w["model.embed_tokens.weight"][token].copy()
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"], eps)
            q = w[p + "self_attn.q_proj.weight"] @ h
            k = w[p + "self_attn.k_proj.weight"] @ h
            v = w[p + "self_attn.v_proj.weight"] @ h
            self.keys[i].append([self._rope(k[g * hd:(g + 1) * hd], pos) for g in range(nKV)])
            self.values[i].append([v[g * hd:(g + 1) * hd] for g in range(nKV)])
            attn = np.zeros(nH * hd)
            for head in range(nH):
                g = head // (nH // nKV)
                qh = self._rope(q[head * hd:(head + 1) * hd], pos)
                scores = np.array([np.dot(qh, kk[g]) for kk in self.keys[i]]) / math.sqrt(hd)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                attn[head * hd:(head + 1) * hd] = sum(
                    pr * vv[g] for pr, vv in zip(probs, self.values[i]))
            x = x + w[p + "self_attn.o_proj.weight"] @ attn
            h = self._norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = w[p + "mlp.gate_proj.weight"] @ h
            up = w[p + "mlp.up_proj.weight"] @ h
            x = x + w[p + "mlp.down_proj.weight"] @ (gate / (1.0 + np.exp(-gate)) * up)
        x = self._norm(x, w["model.norm.weight"], eps)
        return _lm_head(w, cfg) @ x


def incremental_logits(w: dict[str, np.ndarray], cfg: LlamaConfig, prompt, decode) -> np.ndarray:
    """reference_logits computed through IncrementalLlama: prefill then one step per token."""
    model = IncrementalLlama(w, cfg)
    last = None
    for t in prompt:
        last = model.step(int(t))
    rows = [last]
    for t in decode:
        rows.append(model.step(int(t)))
    return np.stack(rows)
