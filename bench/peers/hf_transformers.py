#!/usr/bin/env python3
"""The HF transformers peer of `dsv2 bench`: DeepSeek-V2-Lite with random bf16 weights on
one GPU, timed on the same grid (prefill of N prompts of each length in one forward;
decode steps at each batch size over a cached context), with the fastest settings this
transformers offers that work here: attention `sdpa`; experts `grouped_mm`, then
`batched_mm`, then `eager` (the first that runs is kept); and for each decode row every
setting of `--decode-settings` that fits the deadline, the fastest reported as the row's
figure:
  dynamic  DynamicCache, eager forward (the cache grows each step)
  static   StaticCache (cache_implementation="static": preallocated, updated in place)
  compile  StaticCache and the forward through torch.compile(mode="reduce-overhead",
           fullgraph=False, dynamic=None), the settings of transformers' own CompileConfig
           for generate() with a static cache (inductor kernels replayed as CUDA graphs);
           its compile time is reported apart and not timed.
Prefill runs eager (one forward per shape; compiling it is not what transformers does).

The weights are this script's own random draw (normal, std 0.02 for matrices, ones for
norms, torch seed 0), not dsv2's: both models have the exact V2-Lite shapes and dtype,
which is what the timings depend on (routing spreads tokens over the experts in both).
The cached context of a decode row is random latents written straight into the cache
(as dsv2 bench writes its latents without a full prefill): attention costs the same
whatever the cached values.

Usage: hf_transformers.py [--prompt-lengths 512,2048] [--prefill-batch 4]
       [--batch-sizes 1,8,32,128,256] [--context 1024] [--decode-tokens 16]
       [--decode-settings dynamic,static,compile] [--deadline-s 300] [--json OUT.json]
Prints a table, and the JSON of every figure as the last line (the JSON file is
rewritten after every row, so a run cut short keeps what it measured).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# PEER_CONFIG / PEER_DEVICE: another config.json or device, to try the script on a small
# model without a GPU.
CONFIG = Path(os.environ.get("PEER_CONFIG", HERE / "deepseek-v2-lite-config.json"))
DEV = os.environ.get("PEER_DEVICE", "cuda")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_model(experts_impl):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    folder = Path(tempfile.mkdtemp())
    shutil.copy(CONFIG, folder / "config.json")
    config = DeepseekV2Config.from_pretrained(folder)
    with torch.device(DEV):
        model = DeepseekV2ForCausalLM._from_config(
            config,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            experts_implementation=experts_impl,
        ).eval()
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model, config


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, vocab, length, prompts):
    ids = torch.randint(0, vocab, (prompts, length), device=DEV)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up at this shape
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    out.logits.argmax(-1)
    sync()
    return time.perf_counter() - t0


@torch.no_grad()
def filled_cache(config, batch, context, static_len=None):
    """A cache holding `context` random latents per sequence in every layer: a
    DynamicCache, or a StaticCache of `static_len` positions."""
    from transformers import DynamicCache, StaticCache

    if static_len is not None:
        cache = StaticCache(config=config, max_cache_len=static_len)
    else:
        try:
            cache = DynamicCache(config=config)
        except TypeError:
            cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, 1, context, config.kv_lora_rank, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(batch, 1, context, config.qk_rope_head_dim, device=DEV, dtype=torch.bfloat16)
        cache.update(k, v, layer)
    return cache


WARMUP_STEPS = 3


@torch.no_grad()
def decode(forward, config, batch, context, steps, static):
    """Seconds of `steps` timed decode steps after WARMUP_STEPS untimed ones (the first
    of which compiles, for a compiled forward), and the seconds of those warm-up steps."""
    total = WARMUP_STEPS + steps
    cache = filled_cache(config, batch, context, static_len=context + total + 8 if static else None)
    nxt = torch.randint(0, config.vocab_size, (batch, 1), device=DEV)

    def step(pos):
        nonlocal nxt
        out = forward(
            input_ids=nxt,
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.full((batch, 1), pos, device=DEV),
            cache_position=torch.tensor([pos], device=DEV),
            logits_to_keep=1,
        )
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    sync()
    t0 = time.perf_counter()
    for i in range(WARMUP_STEPS):
        step(context + i)
    sync()
    t1 = time.perf_counter()
    for i in range(WARMUP_STEPS, total):
        step(context + i)
    sync()
    return time.perf_counter() - t1, t1 - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-lengths", default="512,2048")
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,8,32,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--decode-settings", default="dynamic,static,compile")
    ap.add_argument("--compile-min-s", type=float, default=90.0, help="least time left to try a compiled row")
    ap.add_argument("--deadline-s", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    import transformers

    result = {
        "peer": "hf-transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV,
        "weights": "random bf16 (torch seed 0; normal std 0.02, norms 1)",
        "attn_implementation": "sdpa",
        "prefill": [],
        "decode": [],
        "notes": [],
    }
    model = None
    for impl in ["grouped_mm", "batched_mm", "eager"]:
        try:
            model, config = build_model(impl)
            prefill(model, config.vocab_size, 16, 1)  # does this implementation run?
            result["experts_implementation"] = impl
            break
        except Exception as e:  # noqa: BLE001 - try the next implementation
            result["notes"].append(f"experts_implementation={impl} failed: {e!r}"[:300])
            model = None
            if DEV == "cuda":
                torch.cuda.empty_cache()
    if model is None:
        print(json.dumps(result))
        return 1
    result["load_s"] = time.perf_counter() - started
    log(f"hf peer: model ready in {result['load_s']:.1f} s ({result['experts_implementation']})")

    def time_left():
        return args.deadline_s - (time.perf_counter() - started)

    for length in [int(x) for x in args.prompt_lengths.split(",") if x]:
        if time_left() < 20:
            result["notes"].append(f"prefill {length}: skipped (deadline)")
            continue
        try:
            s = prefill(model, config.vocab_size, length, args.prefill_batch)
            toks = length * args.prefill_batch
            result["prefill"].append(
                {"prompt_tokens": length, "prompts": args.prefill_batch, "seconds": s, "tokens_per_s": toks / s}
            )
            log(f"hf peer: prefill {args.prefill_batch} x {length}: {toks / s:.0f} tokens/s")
        except Exception as e:  # noqa: BLE001
            result["notes"].append(f"prefill {length}: {e!r}"[:300])
            if DEV == "cuda":
                torch.cuda.empty_cache()
    settings = [x for x in args.decode_settings.split(",") if x]
    compiled = None
    if "compile" in settings:
        import torch._dynamo as dynamo

        # A new cache and batch size per row: let dynamo recompile rather than fall back.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False, dynamic=None)
    forwards = {"dynamic": (model, False), "static": (model, True), "compile": (compiled, True)}
    compiled_rows = 0
    batches = [int(x) for x in args.batch_sizes.split(",") if x]
    rows = {b: {"batch": b, "context": args.context, "steps": args.decode_tokens, "settings": {}} for b in batches}
    result["decode"] = list(rows.values())
    # The eager settings of every row first, then the compiled ones (the first two
    # compiles take a minute or more each), so that the deadline cuts compiles only.
    for phase in (["dynamic", "static"], ["compile"]):
        for batch in batches:
            row = rows[batch]
            for name in [x for x in settings if x in phase]:
                # From the third compiled row on, dynamo reuses the graph it compiled
                # with dynamic shapes for the second.
                compiling = name == "compile" and compiled_rows < 2
                need = args.compile_min_s if compiling else 15
                if time_left() < need:
                    row["settings"][name] = {"skipped": f"deadline ({time_left():.0f} s left)"}
                    continue
                try:
                    fwd, static = forwards[name]
                    compiled_rows += name == "compile"
                    s, warm = decode(fwd, config, batch, args.context, args.decode_tokens, static)
                    row["settings"][name] = {
                        "seconds": s,
                        "warmup_s": warm,
                        "ms_per_step": 1e3 * s / args.decode_tokens,
                        "tokens_per_s": batch * args.decode_tokens / s,
                    }
                    log(
                        f"hf peer: decode batch {batch} {name}: {batch * args.decode_tokens / s:.1f} tokens/s "
                        f"(warm-up {warm:.1f} s)"
                    )
                except Exception as e:  # noqa: BLE001
                    row["settings"][name] = {"failed": f"{e!r}"[:300]}
                    log(f"hf peer: decode batch {batch} {name} failed: {e!r}"[:300])
                if DEV == "cuda":
                    torch.cuda.empty_cache()
                ran = {k: v for k, v in row["settings"].items() if "seconds" in v}
                if ran:
                    best = min(ran, key=lambda k: ran[k]["seconds"])
                    row.update(
                        {"setting": best, **{k: ran[best][k] for k in ("seconds", "ms_per_step", "tokens_per_s")}}
                    )
                if args.json:
                    Path(args.json).write_text(json.dumps(result, indent=1))
    for row in rows.values():
        if "setting" not in row:
            result["notes"].append(f"decode batch {row['batch']}: no setting ran")
    result["total_s"] = time.perf_counter() - started
    print(f"HF transformers {result['transformers']} (torch {result['torch']}), {result['device']}")
    print(f"attention sdpa, experts {result['experts_implementation']}, load {result['load_s']:.1f} s")
    for r in result["prefill"]:
        print(f"prefill {r['prompts']} x {r['prompt_tokens']}: {r['seconds']:.3f} s, {r['tokens_per_s']:.1f} tokens/s")
    for r in result["decode"]:
        tried = ", ".join(
            f"{k} {v['ms_per_step']:.2f} ms" if "seconds" in v else f"{k} {next(iter(v))}"
            for k, v in r["settings"].items()
        )
        if "setting" in r:
            print(
                f"decode batch {r['batch']} context {r['context']}: {r['ms_per_step']:.2f} ms/step, "
                f"{r['tokens_per_s']:.1f} tokens/s ({r['setting']}; {tried})"
            )
        else:
            print(f"decode batch {r['batch']} context {r['context']}: no setting ran ({tried})")
    for n in result["notes"]:
        print("note:", n)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
