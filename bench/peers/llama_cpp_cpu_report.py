#!/usr/bin/env python3
"""Helpers of bench/peers/llama_cpp_cpu.sh.

    llama_cpp_cpu_report.py types GGUF...   tensor types of each GGUF (counts and bytes per type,
                                            and which types the routed experts have)
    llama_cpp_cpu_report.py bytes GGUF      JSON: bytes one batch-1 decode step of llama.cpp reads
    llama_cpp_cpu_report.py table OUT_DIR   the side-by-side table of a `bench` run (markdown)

`types` and `bytes` read GGUF headers with llama.cpp's gguf-py (PYTHONPATH=LLAMA_DIR/src/gguf-py,
numpy needed); `table` needs only the standard library.

Bytes per decode step (batch 1), counted like dsv2's `floor.rs`: every tensor as stored in the
GGUF, except the token embedding (one row) and the routed experts (`*_exps`: expert_used_count
of expert_count), plus the cache: llama.cpp's DeepSeek-V2 (MLA) cache holds one K row of
kv_lora_rank + rope dims per layer and token (no V cache), at the cache type llama-bench
reports (f16 by default: 1,152 B per layer and token; dsv2's f32 cache holds 2,304).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FA = {-1: "auto", 0: "off", 1: "on"}
CACHE_TYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


def read_gguf(path):
    from gguf import GGUFReader  # noqa: PLC0415 (gguf-py of the llama.cpp checkout)

    r = GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def num(key):
        f = r.fields.get(f"{arch}.{key}")
        return None if f is None else int(f.parts[-1][0])

    meta = {"arch": arch, "block_count": num("block_count"), "expert_count": num("expert_count"),
            "expert_used_count": num("expert_used_count"), "kv_lora_rank": num("attention.kv_lora_rank"),
            "rope_dims": num("rope.dimension_count"), "vocab_size": num("vocab_size")}
    return r, meta


def cmd_types(paths):
    for p in paths:
        r, _ = read_gguf(p)
        by_type, exps = {}, set()
        for t in r.tensors:
            name = t.tensor_type.name
            n, b = by_type.get(name, (0, 0))
            by_type[name] = (n + 1, b + int(t.n_bytes))
            if t.name.endswith("_exps.weight"):
                exps.add(name)
        total = sum(b for _, b in by_type.values())
        parts = ", ".join(f"{k} {n} tensors {b / 1e9:.3f} GB" for k, (n, b) in sorted(by_type.items()))
        print(f"{Path(p).name}: {total / 1e9:.3f} GB of tensors: {parts}; routed experts: {sorted(exps)}",
              file=sys.stderr)


def cmd_bytes(path):
    r, meta = read_gguf(path)
    frac = meta["expert_used_count"] / meta["expert_count"] if meta["expert_count"] else 1.0
    step, weights, exps_all = 0.0, 0, 0
    for t in r.tensors:
        b = int(t.n_bytes)
        weights += b
        if t.name == "token_embd.weight":
            rows = int(t.shape[1]) if len(t.shape) > 1 else 1  # gguf shape is [in, out]
            step += b / rows
        elif t.name.endswith("_exps.weight"):
            step += b * frac
            exps_all += b
        else:
            step += b
    cache_values = meta["block_count"] * (meta["kv_lora_rank"] + meta["rope_dims"])
    json.dump({"gguf": str(path), "weights_bytes": weights, "routed_experts_bytes": exps_all,
               "bytes_per_step_ctx0": step, "cache_values_per_token": cache_values, **meta},
              sys.stdout)
    print()


def load_json(p):
    p = Path(p)
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None


def fmt(x, d=1):
    return "–" if x is None else f"{x:,.{d}f}"


def cmd_table(out):
    out = Path(out)
    run = (out / "run.txt").read_text() if (out / "run.txt").exists() else ""
    fmts = sorted({p.stem.split("-")[1] for p in out.glob("dsv2-*.json")} |
                  {p.stem.split("-")[1] for p in out.glob("llama-*-prefill.json")},
                  key=lambda f: {"q8": 0, "q4": 1}.get(f, 2))
    rows, notes = [], []
    prompts, depths = set(), set()
    for f in fmts:
        d = load_json(out / f"dsv2-{f}.json")
        lp = load_json(out / f"llama-{f}-prefill.json") or []
        ld = load_json(out / f"llama-{f}-decode.json") or []
        lb = load_json(out / f"llama-{f}-bytes.json")
        bw = d["bandwidth_gbps"] * 1e9 if d else None
        # llama.cpp
        pre = {x["n_prompt"]: (x["avg_ts"], x["stddev_ts"]) for x in lp if x["n_gen"] == 0}
        dec, type_k = {}, "f16"
        for x in ld:
            if x["n_prompt"] == 0:
                dec[x.get("n_depth", 0)] = (x["avg_ts"], x["stddev_ts"])
                type_k = x.get("type_k", type_k)
        prompts |= set(pre)
        depths |= set(dec)
        lrow = {"engine": "llama.cpp", "format": f, "prefill": {}, "decode": {}}
        for p, (ts, sd) in pre.items():
            lrow["prefill"][p] = f"{ts:,.1f} ± {sd:.1f}"
        for c, (ts, sd) in dec.items():
            frac = None
            if lb and bw:
                step = lb["bytes_per_step_ctx0"] + c * lb["cache_values_per_token"] * CACHE_TYPE_BYTES.get(type_k, 2)
                frac = step * ts / bw
            lrow["decode"][c] = f"{ts:,.2f} ± {sd:.2f}" + (f" ({frac:.0%})" if frac is not None else "")
        if lb:
            lrow["weights"] = f"{lb['weights_bytes'] / 1e9:.2f} GB"
            lrow["step"] = f"{lb['bytes_per_step_ctx0'] / 1e9:.3f} GB"
        if lp:
            x = lp[0]
            notes.append(f"llama.cpp {f}: {x.get('model_type', '?')}, build {x.get('build_commit', '?')} "
                         f"({x.get('build_number', '?')}), {x.get('n_threads', '?')} threads, "
                         f"cache {type_k}, flash_attn {FA.get(x.get('flash_attn'), x.get('flash_attn'))}, "
                         f"repack {x.get('repack', '?')}, "
                         f"{x.get('cpu_info', '')}")
        # dsv2
        if d:
            extra = next((line.split(":", 1)[1].strip() for line in run.splitlines()
                          if line.startswith("dsv2 extra flags:")), "none")
            engine = "dsv2" if extra == "none" else f"dsv2 `{extra}`"
            drow = {"engine": engine, "format": f, "prefill": {}, "decode": {}}
            for x in d["prefill"]:
                drow["prefill"][x["prompt_tokens"]] = f"{x['tokens_per_s']:,.1f}"
                prompts.add(x["prompt_tokens"])
            step0 = None
            for x in d["decode"]:
                if x["batch"] != 1:
                    continue
                depths.add(x["context"])
                # Against the same best-of probe as llama.cpp's cells (dsv2's own row
                # fraction uses the probe passes between its steps).
                frac = x["bytes_per_step"] * x["tokens_per_s"] / bw
                drow["decode"][x["context"]] = f"{x['tokens_per_s']:,.2f} ({frac:.0%})"
                if x["context"] == 0:
                    step0 = x["bytes_per_step"]
            drow["weights"] = f"{d['weight_bytes'] / 1e9:.2f} GB" if "weight_bytes" in d else "–"
            drow["step"] = f"{step0 / 1e9:.3f} GB" if step0 else "–"
            notes.append(f"dsv2 {f}: load {d['load_s']:.1f} s, peak RSS {d['peak_rss_bytes'] / 1e9:.2f} GB, "
                         f"read bandwidth measured in the same run {d['bandwidth_gbps']:.1f} GB/s, "
                         f"latent cache {d['kv_bytes_per_token']:,} B/token")
            rows += [lrow, drow]
        else:
            rows.append(lrow)
    prompts, depths = sorted(prompts), sorted(depths)
    head = (["format", "engine", "weights", "bytes/step ctx 0"]
            + [f"prefill {p} tok/s" for p in prompts]
            + [f"decode ctx {c} tok/s (of floor)" for c in depths])
    print(run.strip())
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["format"], r["engine"], r.get("weights", "–"), r.get("step", "–")]
        cells += [r["prefill"].get(p, "–") for p in prompts]
        cells += [r["decode"].get(c, "–") for c in depths]
        print("| " + " | ".join(cells) + " |")
    print()
    for n in notes:
        print(f"- {n}")
    print("- of floor = bytes a decode step reads (weights touched + cache) x tokens/s / the best "
          "read bandwidth dsv2's probes measured in the same run, for each format (both engines "
          "against the same figure); llama.cpp figures are "
          "llama-bench's mean ± stddev over its repetitions")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"types": lambda: cmd_types(args), "bytes": lambda: cmd_bytes(args[0]),
     "table": lambda: cmd_table(args[0])}[cmd]()


if __name__ == "__main__":
    main()
