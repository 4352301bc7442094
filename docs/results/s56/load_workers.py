"""Fifty-sixth session, call 2: load_hf_checkpoint's time on a llama-2-7b-shaped bf16 checkpoint
(argv[1]) after the tiled copies, on 1 worker and on the default (up to 8 threads), twice each
after an untimed load that warms the page cache; the finiteness check's share timed on 1 worker."""

import os
import sys
import time

import jax.numpy as jnp

from jaxlora.formats import _safetensors, hf

path = sys.argv[1]
checked = _safetensors.check_finite
spent = {"s": 0.0}


def timed_check(*args):
    t = time.perf_counter()
    checked(*args)
    spent["s"] += time.perf_counter() - t


def load(workers) -> float:
    t = time.perf_counter()
    hf.load_hf_checkpoint(path, dtype=jnp.bfloat16, workers=workers)
    return time.perf_counter() - t


print(f"cpus {os.cpu_count()}", flush=True)
load(None)  # warms the page cache
for run in range(2):
    print(f"run {run}: default workers {load(None):.2f} s", flush=True)
hf._safetensors.check_finite = timed_check
print(f"1 worker {load(1):.2f} s (the finiteness check {spent['s']:.2f} s of it)", flush=True)
