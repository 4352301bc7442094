"""Probe (seventh session, H200): separate vs fused q|k|v and gate|up GEMMs in an unrolled 8-layer
decode forward of llama-2-7b projection shapes, no attention. Run: PYTHONPATH=. python3 THIS_FILE
(imports scripts/bench_kernels.py for the copy bandwidth). Results: fusion_probe.json."""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
import bench_kernels  # noqa: E402

bench_kernels.FLAGS(sys.argv[:1])
E, I, L = 4096, 11008, int(os.environ.get("LAYERS", "8"))
out = {}
flush = bench_kernels.fill(((256 << 20) // 4,), jnp.float32, 5, 1.0)
copy_gbps, _, flush = bench_kernels.measure_copy_bandwidth(flush)
out["copy_GBps"] = copy_gbps
print("copy", copy_gbps, flush=True)

key = jax.random.PRNGKey(0)


def w(k, shape):
    return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


layers = []
for i in range(L):
    ks = jax.random.split(jax.random.fold_in(key, i), 4)
    layers.append(
        dict(
            qkv=w(ks[0], (E, 3 * E)),
            o=w(ks[1], (E, E)),
            gu=w(ks[2], (E, 2 * I)),
            down=w(ks[3], (I, E)),
        )
    )
sep_layers = [
    dict(
        q=p["qkv"][:, :E],
        k=p["qkv"][:, E : 2 * E],
        v=p["qkv"][:, 2 * E :],
        o=p["o"],
        g=p["gu"][:, :I],
        u=p["gu"][:, I:],
        down=p["down"],
    )
    for p in layers
]
sep_layers = jax.block_until_ready(jax.tree.map(lambda a: a.copy(), sep_layers))
weight_bytes = sum(a.size * 2 for a in jax.tree.leaves(layers))


def norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype)


def fwd_fused(ps, x):
    for p in ps:
        h = norm(x)
        qkv = h @ p["qkv"]
        q, k, v = qkv[:, :E], qkv[:, E : 2 * E], qkv[:, 2 * E :]
        a = (q.astype(jnp.float32) * jax.nn.sigmoid(k.astype(jnp.float32)) + v).astype(x.dtype)
        x = x + a @ p["o"]
        h = norm(x)
        gu = h @ p["gu"]
        hid = (jax.nn.silu(gu[:, :I].astype(jnp.float32)) * gu[:, I:]).astype(x.dtype)
        x = x + hid @ p["down"]
    return norm(x)


def fwd_sep(ps, x):
    for p in ps:
        h = norm(x)
        q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
        a = (q.astype(jnp.float32) * jax.nn.sigmoid(k.astype(jnp.float32)) + v).astype(x.dtype)
        x = x + a @ p["o"]
        h = norm(x)
        g, u = h @ p["g"], h @ p["u"]
        hid = (jax.nn.silu(g.astype(jnp.float32)) * u).astype(x.dtype)
        x = x + hid @ p["down"]
    return norm(x)


rows = []
for _xla_flags in [""]:
    for batch in (8, 32, 64, 128):
        x0 = w(jax.random.PRNGKey(batch), (batch, E)) * 50
        for name, fn, ps in (("separate", fwd_sep, sep_layers), ("fused", fwd_fused, layers)):
            f = jax.jit(fn)
            t0 = time.perf_counter()
            x = jax.block_until_ready(f(ps, x0))
            compile_s = time.perf_counter() - t0
            meds = []
            for _rep in range(5):
                x = jax.block_until_ready(f(ps, x))
                n = 30
                t0 = time.perf_counter()
                for _ in range(n):
                    x = f(ps, x)
                jax.block_until_ready(x)
                meds.append((time.perf_counter() - t0) / n * 1e3)
            meds.sort()
            ms = meds[len(meds) // 2]
            roof = weight_bytes / copy_gbps / 1e6
            row = dict(
                batch=batch,
                form=name,
                ms=ms,
                roofline_ms=roof,
                ratio=ms / roof,
                compile_s=compile_s,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
out["rows"] = rows
out["layers"] = L
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fusion_probe.json"), "w"), indent=1)
