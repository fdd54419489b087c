#!/usr/bin/env python3
"""Writes one set of random Llama weights twice: as a Hugging Face model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) for vsup, and as a GGUF file (all F32)
for llama.cpp, so that both engines run exactly the same model.

    write_model.py --out DIR [--preset vsup-tiny-25m] [--seed 1]

Writes DIR/hf/ and DIR/model-f32.gguf, then DIR/manifest.json last (what was written, from which
preset and seed): a DIR whose manifest matches the request is left as it is (idempotent), any
other is rewritten. Nothing is written outside DIR.

The shapes are those of vsup's built-in presets (engine/llama_config.cpp): vsup-tiny-25m, the
default model, is hidden 512, MLP 1536, 8 layers, 8 query heads and 4 key/value heads of 64,
vocabulary 260 (vsup's byte tokenizer: ids 0..255 the bytes, then <|endoftext|>, <|im_start|>,
<|im_end|>, <|pad|>), untied lm_head. Values are uniform in +-sqrt(3 / columns) and the norms are
ones, as vsup's own dummy weights are (so activations stay well-conditioned), but drawn from a
seeded generator here: the two files hold the same numbers, not vsup's dummy ones.

GGUF layout (format version 3, as llama.cpp's gguf-py writes it): the magic, version, tensor
and key/value counts, the key/value metadata, the tensor infos (name, dims innermost first, type
F32 = 0, offset), then the data, every tensor aligned to general.alignment (32). The names are
llama.cpp's for the llama architecture (token_embd, blk.N.attn_q, ..., output). Hugging Face
Llama checkpoints store q_proj/k_proj rows for the "rotate half" rotary convention; llama.cpp's
llama architecture rotates adjacent pairs, so, as llama.cpp's convert_hf_to_gguf.py does, the
rows of each head are permuted: GGUF row h*d + 2i + j = HF row h*d + j*d/2 + i (d the head
size, i < d/2, j in {0, 1}), with the key/value head count for k_proj.

Python 3 standard library only; NumPy is used when it imports (much faster), otherwise the
array module does the same work.
"""

import argparse
import array
import json
import math
import os
import random
import struct
import sys

try:
    import numpy as np
except ImportError:  # the standard-library path below does the same work, slower
    np = None

PRESETS = {
    "vsup-tiny-25m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                          vocab_size=260, max_position_embeddings=2048),
    "vsup-tiny-4m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         vocab_size=260, max_position_embeddings=2048),
}
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 256..259
FORMAT_VERSION = 1  # of this writer's output: bump when what it writes changes
ALIGNMENT = 32


def fail(message):
    sys.stderr.write("write_model.py: %s\n" % message)
    sys.exit(2)


# --- The weights ------------------------------------------------------------------------------

def hf_tensors(c):
    """(name, [rows, cols] or [n]) in the order they are written, as vsup expects them."""
    H, d = c["hidden_size"], c["head_dim"]
    out = [("model.embed_tokens.weight", [c["vocab_size"], H])]
    for i in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % i
        out += [
            (p + "input_layernorm.weight", [H]),
            (p + "self_attn.q_proj.weight", [c["num_attention_heads"] * d, H]),
            (p + "self_attn.k_proj.weight", [c["num_key_value_heads"] * d, H]),
            (p + "self_attn.v_proj.weight", [c["num_key_value_heads"] * d, H]),
            (p + "self_attn.o_proj.weight", [H, c["num_attention_heads"] * d]),
            (p + "post_attention_layernorm.weight", [H]),
            (p + "mlp.gate_proj.weight", [c["intermediate_size"], H]),
            (p + "mlp.up_proj.weight", [c["intermediate_size"], H]),
            (p + "mlp.down_proj.weight", [H, c["intermediate_size"]]),
        ]
    out += [("model.norm.weight", [H]), ("lm_head.weight", [c["vocab_size"], H])]
    return out


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<group>.<what>.weight
    layer, what = parts[2], ".".join(parts[3:5])
    names = {
        "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if what not in names:
        raise ValueError("no GGUF name for " + hf)
    return "blk.%s.%s.weight" % (layer, names[what])


def rotary_row_order(rows, heads):
    """perm[new] = old: the HF ("rotate half") q/k rows in llama.cpp's adjacent-pair order."""
    d = rows // heads
    perm = [0] * rows
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                perm[h * d + 2 * i + j] = h * d + j * (d // 2) + i
    return perm


class Tensor:
    """One tensor's float32 values, row-major, as NumPy array or array('f')."""

    def __init__(self, shape, values):
        self.shape = shape
        self.values = values

    def tobytes(self):
        if np is not None:
            return self.values.astype("<f4", copy=False).tobytes()
        if sys.byteorder != "little":
            v = array.array("f", self.values)
            v.byteswap()
            return v.tobytes()
        return self.values.tobytes()

    def rows_permuted(self, perm):
        cols = self.shape[1]
        if np is not None:
            return Tensor(self.shape, self.values.reshape(self.shape)[perm].reshape(-1))
        out = array.array("f")
        for old in perm:
            out.extend(self.values[old * cols:(old + 1) * cols])
        return Tensor(self.shape, out)


def make_tensor(name, shape, rng):
    n = 1
    for s in shape:
        n *= s
    if name.endswith("norm.weight"):
        return Tensor(shape, np.ones(n, dtype=np.float32) if np is not None
                      else array.array("f", [1.0]) * n)
    bound = math.sqrt(3.0 / shape[-1])
    if np is not None:
        return Tensor(shape, rng.uniform(-bound, bound, n).astype(np.float32))
    u = rng.random
    return Tensor(shape, array.array("f", [(2.0 * u() - 1.0) * bound for _ in range(n)]))


# --- Hugging Face directory -------------------------------------------------------------------

def write_safetensors(path, named):
    header, offset = {}, 0
    for name, t in named:
        size = 4
        for s in t.shape:
            size *= s
        header[name] = {"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in named:
            f.write(t.tobytes())


def byte_level_alphabet():
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
          list(range(ord("\xae"), ord("\xff") + 1)))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_hf(directory, c):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"], "max_position_embeddings": c["max_position_embeddings"],
        "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 256, "eos_token_id": [256, 258], "torch_dtype": "float32",
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # Byte-level BPE with no merges: token b is byte b, as in vsup's byte tokenizer.
    alphabet = byte_level_alphabet()
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 256 + i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, s in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {alphabet[b]: b for b in range(256)}, "merges": []},
    }
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    chatml = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
              "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
              "{{'<|im_start|>assistant\\n'}}{% endif %}")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                   "chat_template": chatml}, f, indent=2)


# --- GGUF -------------------------------------------------------------------------------------

U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9  # GGUFValueType


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, kind, value, item_kind=None):
    out = gguf_string(key) + struct.pack("<I", kind)
    scalar = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?"}
    if kind in scalar:
        return out + struct.pack(scalar[kind], value)
    if kind == STRING:
        return out + gguf_string(value)
    out += struct.pack("<IQ", item_kind, len(value))
    if item_kind == STRING:
        return out + b"".join(gguf_string(v) for v in value)
    return out + array_bytes(item_kind, value)


def array_bytes(kind, values):
    a = array.array({I32: "i", F32: "f"}[kind], values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def write_gguf(path, c, named, name):
    H, d = c["hidden_size"], c["head_dim"]
    tokens = ["<0x%02X>" % b for b in range(256)] + SPECIALS
    kv = [
        gguf_kv("general.architecture", STRING, "llama"),
        gguf_kv("general.name", STRING, name),
        gguf_kv("general.file_type", U32, 0),  # all F32
        gguf_kv("general.alignment", U32, ALIGNMENT),
        gguf_kv("llama.vocab_size", U32, c["vocab_size"]),
        gguf_kv("llama.context_length", U32, c["max_position_embeddings"]),
        gguf_kv("llama.embedding_length", U32, H),
        gguf_kv("llama.block_count", U32, c["num_hidden_layers"]),
        gguf_kv("llama.feed_forward_length", U32, c["intermediate_size"]),
        gguf_kv("llama.attention.head_count", U32, c["num_attention_heads"]),
        gguf_kv("llama.attention.head_count_kv", U32, c["num_key_value_heads"]),
        gguf_kv("llama.attention.key_length", U32, d),
        gguf_kv("llama.attention.value_length", U32, d),
        gguf_kv("llama.rope.dimension_count", U32, d),
        gguf_kv("llama.rope.freq_base", F32, ROPE_THETA),
        gguf_kv("llama.attention.layer_norm_rms_epsilon", F32, RMS_EPS),
        # An SPM vocabulary whose ids 0..255 are byte tokens: the same ids as vsup's byte
        # tokenizer. The benchmark and the greedy check feed token ids, never text.
        gguf_kv("tokenizer.ggml.model", STRING, "llama"),
        gguf_kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
        gguf_kv("tokenizer.ggml.scores", ARRAY, [0.0] * len(tokens), F32),
        gguf_kv("tokenizer.ggml.token_type", ARRAY, [6] * 256 + [3] * len(SPECIALS), I32),
        gguf_kv("tokenizer.ggml.bos_token_id", U32, 256),
        gguf_kv("tokenizer.ggml.eos_token_id", U32, 256),
        gguf_kv("tokenizer.ggml.eot_token_id", U32, 258),
        gguf_kv("tokenizer.ggml.padding_token_id", U32, 259),
        gguf_kv("tokenizer.ggml.add_bos_token", BOOL, False),
        gguf_kv("tokenizer.ggml.add_eos_token", BOOL, False),
    ]
    q_perm = rotary_row_order(c["num_attention_heads"] * d, c["num_attention_heads"])
    k_perm = rotary_row_order(c["num_key_value_heads"] * d, c["num_key_value_heads"])
    out = []
    for hf, t in named:
        if hf.endswith("self_attn.q_proj.weight"):
            t = t.rows_permuted(q_perm)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = t.rows_permuted(k_perm)
        out.append((gguf_name(hf), t))

    def aligned(n):
        return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT

    infos, offset = [], 0
    for gname, t in out:
        dims = list(reversed(t.shape))  # GGUF: innermost (columns) first
        infos.append(gguf_string(gname) + struct.pack("<I", len(dims)) +
                     b"".join(struct.pack("<Q", x) for x in dims) + struct.pack("<IQ", 0, offset))
        size = 4
        for s in t.shape:
            size *= s
        offset = aligned(offset + size)
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(out), len(kv)))
        for item in kv + infos:
            f.write(item)
        f.write(b"\0" * (aligned(f.tell()) - f.tell()))
        start = f.tell()
        for _, t in out:
            data = t.tobytes()
            f.write(data)
            f.write(b"\0" * (aligned(f.tell() - start) - (f.tell() - start)))


# --- Main ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the folder to write (created if missing)")
    ap.add_argument("--preset", default="vsup-tiny-25m", choices=sorted(PRESETS),
                    help="the shape (vsup's preset of that name; default: vsup-tiny-25m)")
    ap.add_argument("--seed", type=int, default=1, help="the generator's seed (default 1)")
    args = ap.parse_args()

    c = PRESETS[args.preset]
    want = {"writer_version": FORMAT_VERSION, "preset": args.preset, "seed": args.seed,
            "config": c, "hf": "hf", "gguf": "model-f32.gguf"}
    manifest = os.path.join(args.out, "manifest.json")
    try:
        with open(manifest) as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = None
    if have == want and os.path.isfile(os.path.join(args.out, want["gguf"])) and \
            os.path.isfile(os.path.join(args.out, "hf", "model.safetensors")):
        print("write_model.py: %s already holds %s seed %d" % (args.out, args.preset, args.seed))
        return
    hf_dir = os.path.join(args.out, "hf")
    try:
        os.makedirs(hf_dir, exist_ok=True)
        if os.path.exists(manifest):
            os.remove(manifest)  # written last: its absence marks a partial folder
    except OSError as e:
        fail("cannot write %s: %s" % (args.out, e))

    rng = np.random.default_rng(args.seed) if np is not None else random.Random(args.seed)
    named = [(n, make_tensor(n, s, rng)) for n, s in hf_tensors(c)]
    name = "%s-random-seed%d" % (args.preset, args.seed)
    write_hf(hf_dir, c)
    write_safetensors(os.path.join(hf_dir, "model.safetensors"), named)
    write_gguf(os.path.join(args.out, want["gguf"]), c, named, name)
    with open(manifest, "w") as f:
        json.dump(want, f, indent=2)
    params = sum(t.values.size if np is not None else len(t.values) for _, t in named)
    print("write_model.py: wrote %s (%d parameters, %s) to %s/hf and %s/%s" %
          (args.preset, params, "numpy" if np is not None else "stdlib", args.out, args.out,
           want["gguf"]))


if __name__ == "__main__":
    main()
