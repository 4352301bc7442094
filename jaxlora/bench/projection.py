"""Decode-step projections: XLA's GEMM (+ the SGMV delta) against ``lora_matmul`` (GPU).

A row is one projection shape of a decode step (T tokens, K inputs, the group's output widths) and
one workload (no LoRA, one adapter, every token its own adapter). Each implementation runs
``layers`` stacked weights (distinct, so that every projection reads its weights from device
memory) ``passes`` times inside one jit (unrolled, as the model's step), each projection's
input computed from the previous output (nothing can be hoisted or overlapped across
projections); the time of a projection is the median wall time of a call over the number of
projections in it, so one call's dispatch is spread over many projections. Bytes of a
projection: the weights, x read, y written, and each distinct adapter's A and B rows. The copy
ceiling is measured in the same run.

Implementations:
- ``xla``: ``x @ W[l]`` by XLA (static layer slices, as the unrolled model step); with LoRA the
  model's SGMV delta (shrink + expand launches) added by XLA;
- ``fused:NAME``: ``sgmv_shrink`` (with LoRA) then ``lora_matmul`` with config NAME, the base GEMM
  and the expand in one launch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.bench.profile import trace_gpu_events
from jaxlora.errors import ConfigError
from pallas_kernels.lora_matmul import MatmulConfig, lora_matmul, lora_projection
from pallas_kernels.sgmv import choose_per_token, sgmv_delta

# The q|k|v (q, k, v widths), o, gate|up and down projections of llama-2-7b.
LLAMA2_7B_GROUPS = {
    "qkv": (4096, (4096, 4096, 4096), (0, 1, 2)),
    "o": (4096, (4096,), (3,)),
    "gate_up": (4096, (11008, 11008), (4, 5)),
    "down": (11008, (4096,), (6,)),
}


def copy_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best read+write rate of a device copy of ``nbytes`` (bf16), GB/s, from the copy kernel's
    duration in a JAX profiler trace (wall clock around one call adds the launch and the wait,
    and a chain of copies in one jit fuses into a single pass). Falls back to wall clock where
    the trace has no GPU activity."""
    a = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a * jnp.bfloat16(1.0009765625))
    a = step(a).block_until_ready()
    wall = []

    def run():
        nonlocal a
        for _ in range(repeats):
            start = time.perf_counter()
            a = step(a)
            a.block_until_ready()
            wall.append(time.perf_counter() - start)

    events = trace_gpu_events(run)
    durations = [ns for _, _, ns in events if ns > 0]
    best_s = min(durations) / 1e9 if durations else min(wall)
    return 2 * nbytes / best_s / 1e9


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a_pool", "b_pools", "a_pages", "b_pages", "ranks", "scales", "token_slot"],
    meta_fields=["weights", "adapter_bytes", "per_token"],
)
@dataclasses.dataclass(frozen=True)
class LoraCase:
    """Pools and slot tables of ``num_adapters`` rank-``rank`` adapters for one group."""

    a_pool: jax.Array
    b_pools: tuple[jax.Array, ...]
    a_pages: jax.Array
    b_pages: jax.Array
    ranks: jax.Array
    scales: jax.Array
    token_slot: jax.Array
    weights: tuple[int, ...]
    adapter_bytes: int
    # The shrink's regime as the engine picks it for a decode step (choose_per_token): one
    # program per token's rank rows where the adapters have about one token each.
    per_token: bool = False


def lora_case(
    key,
    *,
    layers,
    in_width,
    widths,
    weights,
    rank,
    num_adapters,
    num_tokens,
    dtype,
    pool_rank=None,
):
    """``pool_rank``: the rank capacity of the slot tables (pages per weight, as the engine's
    ``LoraPoolConfig.max_rank``); None: the adapters' rank. The kernels' v columns and dot
    epilogue steps follow it; pages beyond an adapter's rank are never read."""
    g_count = len(widths)
    rows_per_page = 16
    pages = -(-rank // rows_per_page)
    table_pages = max(pages, -(-(pool_rank or rank) // rows_per_page))
    keys = jax.random.split(key, 2 + g_count)
    a_pool = (
        jax.random.normal(
            keys[0], (layers, num_adapters * g_count * pages, rows_per_page, in_width)
        )
        * 0.02
    ).astype(dtype)
    a_pages = np.zeros((num_adapters, 7, table_pages), np.int32)
    b_pages = np.zeros((num_adapters, 7, table_pages), np.int32)
    ranks = np.zeros((num_adapters, 7), np.int32)
    perm = np.random.default_rng(0).permutation(num_adapters * g_count * pages)
    for s in range(num_adapters):
        for g, w in enumerate(weights):
            ids = perm[(s * g_count + g) * pages : (s * g_count + g + 1) * pages]
            a_pages[s, w, :pages] = ids
            b_pages[s, w, :pages] = np.arange(s * pages, (s + 1) * pages)
            ranks[s, w] = rank
    b_pools = tuple(
        (
            jax.random.normal(keys[2 + g], (layers, num_adapters * pages, rows_per_page, width))
            * 0.02
        ).astype(dtype)
        for g, width in enumerate(widths)
    )
    token_slot = np.arange(num_tokens) % num_adapters
    itemsize = jnp.dtype(dtype).itemsize
    adapter_bytes = num_adapters * rank * (g_count * in_width + sum(widths)) * itemsize
    return LoraCase(
        a_pool=a_pool,
        b_pools=b_pools,
        a_pages=jnp.asarray(a_pages),
        b_pages=jnp.asarray(b_pages),
        ranks=jnp.asarray(ranks),
        scales=jnp.full((num_adapters, 7), 0.5, jnp.float32),
        token_slot=jnp.asarray(token_slot, jnp.int32),
        weights=tuple(weights),
        adapter_bytes=adapter_bytes,
        per_token=bool(choose_per_token(token_slot, ranks)),
    )


def _projection(impl, config, x, w, layer, lora):
    """One projection of the chain: (T, N) in x's dtype."""
    if impl == "xla":
        y = jnp.dot(x, w[layer])
        if lora is None:
            return y
        delta = sgmv_delta(
            x, *_operands(lora), layer, weights=lora.weights, per_token=lora.per_token
        )
        return (y.astype(jnp.float32) + delta).astype(y.dtype)
    if lora is None:
        return lora_matmul(x, w, layer, config=config)
    return lora_projection(
        x,
        w,
        *_operands(lora),
        layer,
        weights=lora.weights,
        config=config,
        per_token=lora.per_token,
    )


def _operands(lora: LoraCase):
    """The SGMV operands after x, as ``sgmv_delta`` and ``lora_projection`` take them."""
    return (
        lora.a_pool,
        lora.b_pools,
        lora.a_pages,
        lora.b_pages,
        lora.ranks,
        lora.scales,
        lora.token_slot,
    )


LAYER_LOOPS = ("unrolled", "scan")


def chain(impl, config, *, layers, passes, layer_loop="unrolled"):
    """A jitted function running ``layers * passes`` dependent projections. ``layer_loop``:
    "unrolled" like the model's unrolled step (static layer slices for XLA, one kernel
    compilation per call site), "scan" like its scan (a loop with a traced layer: one
    compilation; XLA's GEMM then copies the layer's slice of the stacked weights first)."""
    if layer_loop not in LAYER_LOOPS:
        raise ConfigError(
            f"jaxlora/bench/projection.py chain: layer_loop must be one of {LAYER_LOOPS}, "
            f"got {layer_loop!r}"
        )

    def mix(x, y):
        in_width = x.shape[1]
        reps = -(-in_width // y.shape[1])
        nxt = jnp.tile(y, (1, reps))[:, :in_width] if reps > 1 else y[:, :in_width]
        return (0.5 * x.astype(jnp.float32) + 0.5 * nxt.astype(jnp.float32)).astype(x.dtype)

    def run(x, w, lora):
        if layer_loop == "scan":

            def step(i, x):
                return mix(x, _projection(impl, config, x, w, i % layers, lora))

            return jax.lax.fori_loop(0, layers * passes, step, x)
        for _ in range(passes):
            for layer in range(layers):
                x = mix(x, _projection(impl, config, x, w, layer, lora))
        return x

    return jax.jit(run)


def time_chain(fn, args, *, calls: int, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` timings of ``calls`` back-to-back calls."""
    out = fn(*args)
    out.block_until_ready()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        out.block_until_ready()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def run_rows(
    *,
    tokens,
    groups,
    workloads,
    impls: dict[str, MatmulConfig | None],
    rank=16,
    pool_rank=None,
    layers=8,
    passes=4,
    layer_loop="unrolled",
    calls=5,
    repeats=5,
    dtype=jnp.bfloat16,
    copy=None,
    on_row=None,
):
    """The table's rows (dicts); ``impls`` maps a name to its MatmulConfig (None for ``xla``)."""
    copy = copy or copy_gbps()
    rows = []
    key = jax.random.PRNGKey(0)
    for group in groups:
        in_width, widths, weights = LLAMA2_7B_GROUPS[group]
        n_cols = sum(widths)
        key, wkey = jax.random.split(key)
        w = (jax.random.normal(wkey, (layers, in_width, n_cols)) * 0.02).astype(dtype)
        itemsize = jnp.dtype(dtype).itemsize
        for num_tokens in tokens:
            key, xkey = jax.random.split(key)
            x = jax.random.normal(xkey, (num_tokens, in_width)).astype(dtype)
            for workload in workloads:
                lora = None
                adapter_bytes = 0
                if workload != "no_lora":
                    num_adapters = adapters_for(workload, num_tokens)
                    lora = lora_case(
                        jax.random.PRNGKey(num_tokens),
                        layers=layers,
                        in_width=in_width,
                        widths=widths,
                        weights=weights,
                        rank=rank,
                        num_adapters=num_adapters,
                        num_tokens=num_tokens,
                        dtype=dtype,
                        pool_rank=pool_rank,
                    )
                    adapter_bytes = lora.adapter_bytes
                nbytes = (in_width * n_cols + num_tokens * (in_width + n_cols)) * itemsize
                nbytes += adapter_bytes
                limit_us = nbytes / (copy * 1e9) * 1e6
                row = dict(
                    group=group,
                    tokens=num_tokens,
                    workload=workload,
                    bytes=nbytes,
                    copy_gbps=copy,
                    roofline_us=limit_us,
                    us={},
                    errors={},
                )
                for name, config in impls.items():
                    impl = "xla" if config is None else "fused"
                    try:
                        fn = chain(
                            impl, config, layers=layers, passes=passes, layer_loop=layer_loop
                        )
                        seconds = time_chain(fn, (x, w, lora), calls=calls, repeats=repeats)
                        row["us"][name] = seconds / (layers * passes) * 1e6
                    except Exception as e:  # a config that does not compile is recorded
                        row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def format_row(row) -> str:
    us = row["us"]
    base = us.get("xla")
    parts = [
        f"{row['group']:>7} T={row['tokens']:<4} {row['workload']:<9} "
        f"{row['bytes'] / 1e6:7.1f} MB  limit {row['roofline_us']:7.1f} us"
    ]
    for name, t in sorted(us.items(), key=lambda kv: kv[1]):
        ratio = f" x{base / t:.2f}" if base else ""
        parts.append(f"{name} {t:.1f} ({row['roofline_us'] / t * 100:.0f}%{ratio})")
    if row["errors"]:
        parts.append(f"[{len(row['errors'])} failed: {', '.join(sorted(row['errors']))}]")
    return "  ".join(parts)


def adapters_for(workload: str, num_tokens: int) -> int:
    """Distinct adapters of a LoRA workload's ``num_tokens`` tokens (each token i uses adapter
    i % count): identical 1, uniform round(sqrt(T)) as the engine benchmark's
    (jaxlora/bench/workloads.py), distinct T."""
    if workload == "identical":
        return 1
    if workload == "uniform":
        return max(1, round(math.sqrt(num_tokens)))
    if workload == "distinct":
        return num_tokens
    raise ConfigError(
        f"--lora_workloads: unknown workload {workload!r}; expected identical, uniform or distinct"
    )


def config_grid(spec: str, variants: dict[str, dict] | None = None) -> dict[str, MatmulConfig]:
    """Configs from '[bmV]bnXbkYwZsW,...' names (e.g. 'bn64bk128w4s4', 'bm64bn32bk128w4s4');
    'default' is ``MatmulConfig()`` (blocks by shape); a name in ``variants`` is
    ``MatmulConfig.from_dict(variants[name])`` (e.g. ``{"rows": {"epilogue": "rows"}}``); a bad
    name or variant raises ``ValueError`` / ``ConfigError`` naming it."""
    out = {}
    variants = variants or {}
    for name in filter(None, (s.strip() for s in spec.split(","))):
        if name == "default":
            out[name] = MatmulConfig()
            continue
        if name in variants:
            out[name] = MatmulConfig.from_dict(variants[name], where=f"--variants[{name!r}]")
            continue
        fields = {}
        rest = name
        tags = (("bm", "block_m"), ("bn", "block_n"), ("bk", "block_k"), ("w", "num_warps"))
        for tag, field in (*tags, ("s", "num_stages")):
            if tag == "bm" and not rest.startswith(tag):
                continue
            if not rest.startswith(tag):
                raise ValueError(
                    f"config name {name!r}: expected [bm..]bn..bk..w..s.., at {rest!r}"
                )
            rest = rest[len(tag) :]
            digits = len(rest) - len(rest.lstrip("0123456789"))
            fields[field] = int(rest[:digits])
            rest = rest[digits:]
        out[name] = MatmulConfig(**fields)
    return out


def best_configs(rows, configs: dict[str, MatmulConfig]) -> dict[tuple[str, int], str]:
    """The fastest fused config of each (group, tokens) among ``rows``."""
    best = {}
    for row in rows:
        timed = {n: t for n, t in row["us"].items() if n in configs}
        if timed:
            best[(row["group"], row["tokens"])] = min(timed, key=timed.get)
    return best
