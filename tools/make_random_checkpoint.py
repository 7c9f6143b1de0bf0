#!/usr/bin/env python3
"""Write a random-weight DeepSeek-V2 checkpoint in the HuggingFace hub layout.

    python3 tools/make_random_checkpoint.py OUT_DIR [--config CONFIG.json] [--layers N]
        [--seed 0] [--std 0.02] [--shard-gb 8] [--check-index INDEX.json]

Writes into OUT_DIR:
  config.json                       CONFIG (default: bench/peers/deepseek-v2-lite-config.json,
                                    the hub's V2-Lite config) with num_hidden_layers = N
  generation_config.json            bos/eos of the config (the hub file's ids)
  model-0000K-of-0000M.safetensors  bf16 weights with the hub's exact tensor names and order:
                                    per-expert `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`
                                    (not transformers 5's fused names), shards of at most
                                    --shard-gb GB (8: the hub's V2-Lite has 4 shards)
  model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map"}
  tokenizer.json, tokenizer_config.json
                                    the DeepSeek-V2 tokenizer vendored in assets/tokenizer/

Weights: matrices normal(0, --std) rounded to bf16 (round to nearest even), norms ones.
Each tensor is drawn from its own generator seeded with (--seed, crc32 of its name), so a
tensor's values do not depend on --layers, on the shard size or on the order of writing.

Memory: nothing is held but one chunk of one tensor (64 MiB): each shard's header is
written first (all shapes are known from the config), then its tensors, chunk by chunk.
Only numpy is needed.

Sizes: V2-Lite with all 27 layers is 31.4 GB (the hub's total_size, 31,412,968,448 B);
--layers 8 is 9.2 GB (layer 0 dense + 7 MoE layers, embeddings and lm_head 0.84 GB).

--check-index INDEX.json compares the tensor names with a hub index (e.g.
../shared/reference/deepseek-v2-lite/model.safetensors.index.json): with all layers they
must be equal (names and total_size); with --layers N, the written names must be exactly the
hub's names of layers < N plus the non-layer tensors. It checks before writing anything;
with --dry-run it only checks and prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "bench" / "peers" / "deepseek-v2-lite-config.json"
TOKENIZER_DIR = REPO / "assets" / "tokenizer"
CHUNK = 16 * 1024 * 1024  # values per generated chunk (64 MiB of f32)


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape [out, in], kind) of every tensor, in the hub checkpoint's order.

    kind: "norm" (ones) or "matrix" (random)."""
    d = cfg["hidden_size"]
    h = cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_lora = cfg["kv_lora_rank"]
    q_lora = cfg.get("q_lora_rank")
    vocab = cfg["vocab_size"]
    n_routed = cfg.get("n_routed_experts")
    first_dense = cfg.get("first_k_dense_replace", 0)
    freq = cfg.get("moe_layer_freq", 1)
    out = [("model.embed_tokens.weight", (vocab, d), "matrix"),
           ("model.norm.weight", (d,), "norm")]
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, d), "matrix"))

    def mlp(prefix, inter):
        return [(f"{prefix}.gate_proj.weight", (inter, d), "matrix"),
                (f"{prefix}.up_proj.weight", (inter, d), "matrix"),
                (f"{prefix}.down_proj.weight", (d, inter), "matrix")]

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        if q_lora is None:
            out.append((f"{p}.self_attn.q_proj.weight", (h * (nope + rope), d), "matrix"))
        else:
            out += [(f"{p}.self_attn.q_a_proj.weight", (q_lora, d), "matrix"),
                    (f"{p}.self_attn.q_a_layernorm.weight", (q_lora,), "norm"),
                    (f"{p}.self_attn.q_b_proj.weight", (h * (nope + rope), q_lora), "matrix")]
        out += [(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, d), "matrix"),
                (f"{p}.self_attn.kv_a_layernorm.weight", (kv_lora,), "norm"),
                (f"{p}.self_attn.kv_b_proj.weight", (h * (nope + v), kv_lora), "matrix"),
                (f"{p}.self_attn.o_proj.weight", (d, h * v), "matrix")]
        if n_routed is not None and i >= first_dense and i % freq == 0:
            im = cfg["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (n_routed, d), "matrix"))
            if cfg.get("n_shared_experts"):
                out += mlp(f"{p}.mlp.shared_experts", im * cfg["n_shared_experts"])
            for e in range(n_routed):
                out += mlp(f"{p}.mlp.experts.{e}", im)
        else:
            out += mlp(f"{p}.mlp", cfg["intermediate_size"])
        out += [(f"{p}.input_layernorm.weight", (d,), "norm"),
                (f"{p}.post_attention_layernorm.weight", (d,), "norm")]
    return out


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(items, shard_bytes: int):
    shards, cur, size = [], [], 0
    for it in items:
        b = numel(it[1]) * 2
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += b
    if cur:
        shards.append(cur)
    return shards


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even, in place on x's buffer."""
    u = x.view(np.uint32)
    lsb = (u >> 16) & 1
    u += np.uint32(0x7FFF)
    u += lsb
    u >>= 16
    return u.astype(np.uint16)


def write_tensor(f, name, shape, kind, seed, std):
    n = numel(shape)
    if kind == "norm":
        f.write(np.full(n, 0x3F80, dtype=np.uint16).tobytes())  # bf16 1.0
        return
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
    done = 0
    while done < n:
        m = min(CHUNK, n - done)
        x = rng.standard_normal(m, dtype=np.float32)
        x *= np.float32(std)
        f.write(to_bf16(x).tobytes())
        done += m


def check_index(items, cfg, index_path: Path, full_layers: int):
    ref = json.loads(index_path.read_text())
    ref_names = list(ref["weight_map"])
    names = [t[0] for t in items]
    n = cfg["num_hidden_layers"]

    def keep(name):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is None or int(m.group(1)) < n

    want = [x for x in ref_names if keep(x)]
    if set(names) != set(want):
        missing = sorted(set(want) - set(names))[:5]
        extra = sorted(set(names) - set(want))[:5]
        sys.exit(f"tensor names differ from {index_path}: missing {missing}, extra {extra}")
    if names != want:
        print(f"note: same names as {index_path.name}, in another order", file=sys.stderr)
    if n == full_layers:
        total = sum(numel(t[1]) * 2 for t in items)
        if total != ref["metadata"]["total_size"]:
            sys.exit(f"total_size {total} != hub's {ref['metadata']['total_size']}")
        print(f"check: names and total_size ({total} B) equal {index_path}", file=sys.stderr)
    else:
        print(f"check: {len(names)} names = the hub's non-layer tensors and layers < {n}",
              file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--layers", type=int, help="keep the first N layers (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--shard-gb", type=float, default=8.0)
    ap.add_argument("--check-index", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
    args = ap.parse_args()

    cfg = json.loads(args.config.read_text())
    full_layers = cfg["num_hidden_layers"]
    if args.layers is not None:
        if not 1 <= args.layers <= full_layers:
            sys.exit(f"--layers must be in 1..{full_layers}")
        cfg["num_hidden_layers"] = args.layers
    cfg["torch_dtype"] = "bfloat16"
    items = tensors(cfg)
    if args.check_index:
        check_index(items, cfg, args.check_index, full_layers)
    shards = plan_shards(items, int(args.shard_gb * 1e9))
    total = sum(numel(t[1]) * 2 for t in items)
    params = total // 2
    print(f"{cfg['num_hidden_layers']} layers, {len(items)} tensors, {params / 1e9:.3f} B params, "
          f"{total / 1e9:.3f} GB bf16 in {len(shards)} shards", file=sys.stderr)
    if args.dry_run:
        return
    need = total + (1 << 30)
    probe = args.out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        sys.exit(f"not enough disk: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()) and not args.force:
        sys.exit(f"{args.out} is not empty (use --force to overwrite)")
    for old in args.out.glob("model-*.safetensors"):
        old.unlink()

    t0 = time.time()
    weight_map = {}
    width = 5
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            b = numel(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
            off += b
            weight_map[name] = fname
        hj = json.dumps(header, separators=(",", ":")).encode()
        hj += b" " * (-len(hj) % 8)
        path = args.out / fname
        with open(str(path) + ".part", "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for i, (name, shape, kind) in enumerate(shard):
                write_tensor(f, name, shape, kind, args.seed, args.std)
                if i % 64 == 0 or i == len(shard) - 1:
                    done = f.tell()
                    print(f"\r{fname}: {i + 1}/{len(shard)} tensors, {done / 1e9:.2f} GB, "
                          f"{time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
            assert f.tell() == 8 + len(hj) + off
        os.replace(str(path) + ".part", path)
        print(file=sys.stderr)

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": cfg.get("bos_token_id"),
           "eos_token_id": cfg.get("eos_token_id")}
    (args.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, args.out / name)
    print(f"wrote {args.out} ({total / 1e9:.3f} GB of weights) in {time.time() - t0:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
