"""Greedy completions from token-id prompts equal the reference continuations of the golden
fixtures (HF transformers, recorded by tools/fixtures/make_fixtures.py), alone and all
prompts of a fixture at once."""

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import WORK, client

FIXTURES = os.environ["DSV2_FIXTURES"]


def read_int_tensors(path):
    """The I64 tensors of a safetensors file, as lists (standard library only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "I64":
            continue
        start, end = meta["data_offsets"]
        count = (end - start) // 8
        out[name] = list(struct.unpack(f"<{count}q", data[start:end]))
    return out


def fixtures():
    if not os.path.isdir(FIXTURES):
        return []
    return sorted(d for d in os.listdir(FIXTURES)
                  if os.path.isfile(os.path.join(FIXTURES, d, "reference.safetensors")))


@pytest.mark.parametrize("name", fixtures() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no fixture has reference.safetensors yet"))])
def test_greedy_completions_equal_the_reference(name, start_server):
    import make_test_model
    ref = read_int_tensors(os.path.join(FIXTURES, name, "reference.safetensors"))
    cases = [(ref[f"prompt.{i}"], ref[f"greedy.{i}"]) for i in range(100)
             if f"prompt.{i}" in ref and f"greedy.{i}" in ref]
    assert cases, f"{name}: no prompt.i / greedy.i pairs"
    model = os.path.join(WORK, f"golden-{name}")
    make_test_model.main(os.path.join(FIXTURES, name), model)
    c = client(start_server(model=model).url, timeout=300)

    def run(case):
        prompt, want = case
        r = c.completions.create(model="deepseek-chat", prompt=prompt, max_tokens=len(want),
                                 temperature=0, extra_body={"return_token_ids": True,
                                                            "ignore_eos": True})
        return r.choices[0].model_extra["token_ids"]

    alone = [run(case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(run, cases))
    for i, (prompt, want) in enumerate(cases):
        assert alone[i] == want, f"{name} prompt {i} ({len(prompt)} tokens) alone"
        assert together[i] == want, f"{name} prompt {i} ({len(prompt)} tokens) batched"
