#!/usr/bin/env python3
"""Runs `dsv2 logits --device cuda` on every prompt of every fixture, in bf16 and f32, and
compares with the fixture's reference logits.

Usage: check_fixtures_cli.py DSV2_BINARY FIXTURES_DIR

bf16: the relative error and argmax agreement against the f32 reference, reported against
the bar of 2e-2 and 98%. The fixtures are tiny random models on which bf16 noise is
amplified (HF's own bf16 run is 1.5e-2..3e-2 from its f32 run, longer prompts drift
further), so the check requires no more than max(2e-2, 1.5 x the noise of the other bf16
runs of the prompt: `dsv2 --device cpu --dtype bf16`, and HF's where the fixture has it)
and an argmax agreement of at least min(98%, theirs - 5 points).
f32: relative error <= 1e-4 against the f32 reference.
Prints one RESULT line per run; exits 1 if any check fails.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file


def compare(got, ref):
    err = float(np.linalg.norm((got - ref).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64)))
    agree = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))
    return err, agree


def main():
    dsv2, root = sys.argv[1], sys.argv[2]
    failed = False
    names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, "reference.safetensors")))
    if not names:
        print(f"no fixtures with reference.safetensors under {root}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = os.path.join(root, name)
            ref = load_file(os.path.join(folder, "reference.safetensors"))
            i = 0
            while f"prompt.{i}" in ref:
                ids = ref[f"prompt.{i}"].astype(np.int64)
                noise = []
                if f"logits_bf16.{i}" in ref:
                    noise.append(compare(ref[f"logits_bf16.{i}"], ref[f"logits.{i}"]))
                for device, dtype in (("cpu", "bf16"), ("cuda", "bf16"), ("cuda", "f32")):
                    out = os.path.join(tmp, f"{name}-{i}-{device}-{dtype}.safetensors")
                    cmd = [dsv2, "logits", "--device", device, "--dtype", dtype, "--model", folder,
                           "--token-ids", ",".join(str(int(t)) for t in ids), "--output", out]
                    run = subprocess.run(cmd, capture_output=True, text=True)
                    if run.returncode != 0:
                        print(f"RESULT cli {dtype} {name} prompt {i}: FAILED to run: {run.stderr.strip()}")
                        failed = True
                        continue
                    got = load_file(out)["logits"]
                    err, agree = compare(got, ref[f"logits.{i}"])
                    if device == "cpu":
                        noise.append((err, agree))
                        continue
                    bound = max(2e-2, 1.5 * max((e for e, _ in noise), default=0.0))
                    agree_bar = min(0.98, min((a for _, a in noise), default=1.0) - 0.05)
                    note = ""
                    if dtype == "bf16":
                        ok = err <= bound and agree >= agree_bar
                        strict = "meets" if err <= 2e-2 and agree >= 0.98 else "misses"
                        others = ", ".join(f"{e:.3e}/{100 * a:.1f}%" for e, a in noise)
                        note = (f" ({strict} 2e-2/98%; other bf16 runs {others}; "
                                f"required <= {bound:.2e}, >= {100 * agree_bar:.1f}%)")
                        if f"logits_bf16.{i}" in ref:
                            e2, a2 = compare(got, ref[f"logits_bf16.{i}"])
                            note += f"; vs HF bf16 rel err {e2:.3e}, argmax {100 * a2:.1f}%"
                    else:
                        ok = err <= 1e-4
                    failed |= not ok
                    print(f"RESULT cli {dtype} {name} prompt {i} ({len(ids)} tokens): vs f32 reference "
                          f"rel err {err:.3e}, argmax {100 * agree:.1f}%{note} {'ok' if ok else 'FAIL'}")
                i += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
