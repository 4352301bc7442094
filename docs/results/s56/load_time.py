"""Fifty-sixth session: how long load_hf_checkpoint takes on a llama-2-7b-shaped bf16 checkpoint
(transformers' safetensors shards at argv[1]) with the fifty-fifth session's finiteness check of
every base weight, and without it (the check replaced by a no-op), alternating, twice each; the
page cache is warmed by a first untimed load so that both read the same cached files."""

import sys
import time

import jax.numpy as jnp

from jaxlora.formats import _safetensors, hf

path = sys.argv[1]
checked = _safetensors.check_finite
calls = {"n": 0, "s": 0.0}


def timed_check(*args):
    t = time.perf_counter()
    checked(*args)
    calls["n"] += 1
    calls["s"] += time.perf_counter() - t


def load(check) -> float:
    hf._safetensors.check_finite = check
    t = time.perf_counter()
    config, params = hf.load_hf_checkpoint(path, dtype=jnp.bfloat16)
    return time.perf_counter() - t


load(lambda *a: None)  # warms the page cache
for run in range(2):
    calls.update(n=0, s=0.0)
    with_check = load(timed_check)
    print(
        f"run {run}: with the check {with_check:.2f} s ({calls['n']} tensors checked in "
        f"{calls['s']:.2f} s)",
        flush=True,
    )
    without = load(lambda *a: None)
    print(f"run {run}: without it     {without:.2f} s", flush=True)
