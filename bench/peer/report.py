#!/usr/bin/env python3
"""The comparing half of bench/peer_llama_cpp.sh (Python 3 standard library only).

    report.py greedy --llama L.json --vsup V.json
        L.json: peer_greedy's output ({"vocab", "tokens", "logits"}); V.json: vsup-logits' output
        for the same prompt with --decode tokens[0..n-2] ({"vocab", "logits"}). Row i of both
        is the logits that chose token i. Exit status 0 when vsup's arg-max equals llama.cpp's
        token at every step and every logit is within --tolerance (default 1e-3; both engines
        computing in fp32 agree to about 1e-5), 1 (saying where) when not.

    report.py table --llama-bench LB.json --vsup VS --threads N [--json] [--note TEXT]
        LB.json: `llama-bench -o json` (rows pp128, pp512, tg128, each possibly at several
        flash-attention settings: the fastest counts); VS: cpu_engine_bench's --json
        object (its "tp1" entry) or, from a build without --json, its markdown table (the TP 1
        rows "decode, batch 1" and "prefill, T tokens"). Prints one markdown table, a row per
        case with tokens/s of both and vsup / llama.cpp; with --json one JSON object instead.
"""

import argparse
import json
import re
import sys


def fail(message):
    sys.stderr.write("report.py: %s\n" % message)
    sys.exit(1)


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail("%s %s: %s" % (what, path, e))


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


def margin(row):
    top = sorted(row)[-2:]
    return top[1] - top[0]


def greedy(args):
    llama = load_json(args.llama, "llama.cpp's greedy output")
    vsup = load_json(args.vsup, "vsup-logits' output")
    if llama["vocab"] != vsup["vocab"]:
        fail("vocabularies differ: llama.cpp %d, vsup %d" % (llama["vocab"], vsup["vocab"]))
    tokens, lrows, vrows = llama["tokens"], llama["logits"], vsup["logits"]
    if len(vrows) != len(tokens) or len(lrows) != len(tokens):
        fail("expected %d logit rows from each, got llama.cpp %d, vsup %d" %
             (len(tokens), len(lrows), len(vrows)))
    worst = 0.0
    for i, (t, lrow, vrow) in enumerate(zip(tokens, lrows, vrows)):
        worst = max(worst, max(abs(a - b) for a, b in zip(lrow, vrow)))
        mine = argmax(vrow)
        if mine != t:
            fail("GREEDY TOKENS DIFFER at generated token %d: llama.cpp chose %d, vsup %d "
                 "(top-2 margins: llama.cpp %.3g, vsup %.3g; largest |logit difference| so far "
                 "%.3g). llama.cpp's tokens: %s" %
                 (i, t, mine, margin(lrow), margin(vrow), worst, tokens))
    if worst > args.tolerance:
        fail("LOGITS DIFFER by up to %.3g (more than --tolerance %.3g) although the greedy tokens "
             "agree: %s" % (worst, args.tolerance, tokens))
    smallest = min(margin(r) for r in lrows)
    print("greedy check: the same %d tokens %s; largest |logit difference| %.2g, smallest "
          "top-2 margin %.2g" % (len(tokens), tokens, worst, smallest))


def llama_rows(path):
    """Per case, llama-bench's fastest row (over its flash-attention settings)."""
    rows = load_json(path, "llama-bench's output")
    if not isinstance(rows, list):
        fail("%s: expected llama-bench's JSON list" % path)
    out = {}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            key = "prefill_%d" % r["n_prompt"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            key = "decode_b1"
        else:
            continue
        if key not in out or r["avg_ts"] > out[key]["avg_ts"]:
            out[key] = r
    return out


def vsup_rows(path):
    text = open(path).read()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    out = {}
    if isinstance(obj, dict):
        tp1 = obj.get("tp1", obj)
        for key, value in tp1.items():
            m = re.fullmatch(r"(decode_b1|prefill_\d+)_tok_s", key)
            if m:
                out[m.group(1)] = float(value)
        if not out:
            fail("%s: no tp1 decode_b1_tok_s / prefill_<T>_tok_s in cpu_engine_bench's JSON" % path)
        return out
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] != "1":
            continue
        m = re.fullmatch(r"decode, batch 1", cells[1])
        p = re.fullmatch(r"prefill, (\d+) tokens", cells[1])
        if m:
            out["decode_b1"] = float(cells[2])
        elif p:
            out["prefill_%s" % p.group(1)] = float(cells[2])
    if not out:
        fail("%s: no TP 1 rows in cpu_engine_bench's table" % path)
    return out


def table(args):
    llama = llama_rows(args.llama_bench)
    vsup = vsup_rows(args.vsup)
    cases = [("decode_b1", "decode, batch 1"), ("prefill_128", "prefill, 128 tokens"),
             ("prefill_512", "prefill, 512 tokens")]
    result = {"threads": args.threads, "note": args.note}
    lines = ["| case | vsup tok/s | llama.cpp tok/s (± sd, its faster flash-attention setting) "
             "| vsup / llama.cpp |", "|---|---:|---:|---:|"]
    for key, label in cases:
        if key not in llama or key not in vsup:
            fail("no %s row from %s" % (key, "llama-bench" if key not in llama else
                                         "cpu_engine_bench"))
        l, v = llama[key], vsup[key]
        ratio = v / l["avg_ts"]
        result["%s_vsup_tok_s" % key] = round(v, 2)
        result["%s_llama_cpp_tok_s" % key] = round(l["avg_ts"], 2)
        result["%s_llama_cpp_sd_tok_s" % key] = round(l.get("stddev_ts", 0.0), 2)
        result["%s_vs_llama_cpp" % key] = round(ratio, 3)
        fa = l.get("flash_attn")
        result["%s_llama_cpp_flash_attn" % key] = fa
        fa_text = {0: "FA off", 1: "FA on", -1: "FA auto", False: "FA off", True: "FA on"}.get(fa, "FA ?")
        lines.append("| %s | %.0f | %.0f (± %.0f, %s) | %.2f |" %
                     (label, v, l["avg_ts"], l.get("stddev_ts", 0.0), fa_text, ratio))
    any_row = next(iter(llama.values()))
    result["llama_cpp_build"] = "%s (%s)" % (any_row.get("build_commit", "?"),
                                             any_row.get("build_number", "?"))
    result["cpu"] = any_row.get("cpu_info", "?")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description="the comparing half of bench/peer_llama_cpp.sh")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("--llama", required=True)
    g.add_argument("--vsup", required=True)
    g.add_argument("--tolerance", type=float, default=1e-3)
    t = sub.add_parser("table")
    t.add_argument("--llama-bench", required=True)
    t.add_argument("--vsup", required=True)
    t.add_argument("--threads", type=int, required=True)
    t.add_argument("--note", default="")
    t.add_argument("--json", action="store_true")
    args = ap.parse_args()
    greedy(args) if args.command == "greedy" else table(args)


if __name__ == "__main__":
    main()
