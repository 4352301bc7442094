"""What Triton makes of our Pallas kernels, on any machine: each kernel's MMA layout, shared
memory and the instructions of its K loop, from the SASS of the kernel compiled for an H100.

JAX lowers a Pallas Triton kernel to Triton IR on any machine (``pallas_call(debug=True)`` prints
it); XLA compiles that IR with the Triton built into jaxlib, on the GPU only. Here the same IR
goes through the ``triton`` package's compiler instead (``pip install triton``, the version the
GPU machine has, see constraints.txt) for ``sm_90`` and its bundled ``nvdisasm``: the passes are
Triton 3.6's, not necessarily jaxlib's, so this is a close reading of what runs, not the binary
itself. It shows what a timing cannot: which MMA instructions a dot became (``HMMA``, the warp
MMA, or ``HGMMA``, Hopper's warpgroup MMA), how the warps split a tile, whether the K loop's loads
are asynchronous copies (``LDGSTS``) and how many instructions a K step costs.

    python scripts/kernel_report.py --tokens=32 --lora=shrink
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import os
import re
import subprocess
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlora.errors import ConfigError

GPU_KIND = "NVIDIA H100"
CAPABILITY = 90  # sm_90

# Instructions of a K loop worth counting: the MMAs, asynchronous global-to-shared copies,
# shared-memory matrix loads, plain global loads and barriers.
# LDG.128: the global loads of 16 bytes a thread (vectorized), FFMA the CUDA cores' fused adds,
# LDL / STL local-memory loads and stores: register spills; STS / LDS shared-memory stores and
# loads (besides LDGSTS and LDSM: layout conversions go through them), STG global stores.
COUNTED = (
    "HMMA",
    "HGMMA",
    "LDGSTS",
    "LDSM",
    "LDG",
    "LDG.128",
    "FFMA",
    "BAR",
    "STS",
    "LDS",
    "STG",
    "LDL",
    "STL",
)


@dataclasses.dataclass(frozen=True)
class KernelReport:
    name: str
    num_warps: int
    num_stages: int
    shared_bytes: int
    mma: tuple[str, ...]  # each MMA layout: "v2 warps [1, 4]" (HMMA) or "v3 warps [4, 1]" (HGMMA)
    loop_instructions: int  # SASS instructions of the K loop (the loop with the most MMAs)
    loop_counts: dict[str, int]  # COUNTED instructions in it
    kernel_counts: dict[str, int]  # COUNTED instructions in the whole kernel (loops unrolled
    # by the compiler have no loop)

    def row(self) -> str:
        def counts(c):
            return " ".join(f"{op} {n}" for op, n in c.items() if n) or "-"

        return (
            f"{self.name:58s} w{self.num_warps} s{self.num_stages} "
            f"smem {self.shared_bytes // 1024:3d} KiB  {'; '.join(self.mma) or 'no MMA':18s} "
            f"K loop {self.loop_instructions:4d} instr: {counts(self.loop_counts)} | "
            f"kernel: {counts(self.kernel_counts)}"
        )


def lower_for_gpu(fn, *args) -> str:
    """StableHLO text of jit(fn)(*args) lowered for an abstract H100 (args: arrays or shape
    structs); also prints each Pallas kernel's Triton module (see ``triton_modules``)."""
    device = jax.sharding.AbstractDevice(device_kind=GPU_KIND, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def lower_printing_modules(fn, *args) -> tuple[str, str]:
    """(``lower_for_gpu``'s StableHLO text, what ``pallas_call(debug=True)`` printed meanwhile:
    each Pallas kernel's jaxpr and Triton module)."""
    printed = io.StringIO()
    with (
        mock.patch.object(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True)),
        contextlib.redirect_stdout(printed),
    ):
        stablehlo = lower_for_gpu(fn, *args)
    return stablehlo, printed.getvalue()


def triton_modules(fn, *args) -> dict[str, tuple[str, int, int]]:
    """name -> (Triton IR text without debug info, num_warps, num_stages) of every Pallas kernel
    of jit(fn)(*args), lowered for an abstract H100."""
    stablehlo, printed = lower_printing_modules(fn, *args)
    launch = {}
    for call in re.finditer(r"mhlo\.backend_config = \{([^\n]*)\}", stablehlo):
        fields = call.group(1)
        name = re.search(r'name = "([^"]*)"', fields)
        warps = re.search(r"num_warps = (\d+)", fields)
        stages = re.search(r"num_stages = (\d+)", fields)
        if name and warps and stages:
            launch[name.group(1)] = (int(warps.group(1)), int(stages.group(1)))
    modules = {}
    for text in _printed_modules(printed):
        name = re.match(r"module @(\S+)", text).group(1)
        warps, stages = launch.get(name, (4, 3))
        modules[name] = (text, warps, stages)
    return modules


def _printed_modules(printed: str) -> list[str]:
    """The Triton modules ``pallas_call(debug=True)`` printed, debug locations removed so that
    the ``triton`` package's parser reads them."""
    modules, lines = [], None
    for line in printed.split("\n"):
        if line.startswith("module @"):
            lines = []
        if lines is None or line.startswith("#loc"):
            continue
        line = re.sub(r' "[^"]*:"\(#loc\d*\)| #loc\d*| \[unknown\]', "", line)
        lines.append(line)
        if line == "}":
            modules.append("\n".join(lines) + "\n")
            lines = None
    return modules


def compile_module(text: str, *, num_warps: int, num_stages: int) -> dict[str, object]:
    """Triton's stages of one module for sm_90: {"ttgir": str, "ptx": str, "sass": str,
    "shared": bytes of shared memory}. Needs the ``triton`` package."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise ConfigError(
            "jaxlora/bench/compiler_report.py: the compiler report needs the 'triton' package "
            "(pip install -c constraints.txt triton)"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(text)
        kernel = triton.compile(
            path,
            target=GPUTarget("cuda", CAPABILITY, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        sass = subprocess.run(
            [nvdisasm, "-c", cubin], check=True, capture_output=True, text=True
        ).stdout
    return {
        "ttgir": kernel.asm["ttgir"],
        "ptx": kernel.asm["ptx"],
        "sass": sass,
        "shared": int(kernel.metadata.shared),
    }


def mma_layouts(ttgir: str) -> tuple[str, ...]:
    """Each MMA layout of a TTGIR module: version and warps per CTA (along M, along N)."""
    return tuple(
        f"v{major} warps [{warps}]"
        for major, warps in re.findall(
            r"#ttg\.nvidia_mma<\{versionMajor = (\d+),[^}]*warpsPerCTA = \[([\d, ]+)\]", ttgir
        )
    )


def _opcodes(line: str) -> list[str]:
    """The names a SASS line counts under: its opcode (after the predicate) and, for a global
    load of 16 bytes a thread, LDG.128 too; [] for a line without an instruction."""
    op = re.search(r"\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)", line)
    if not op:
        return []
    parts = op.group(1).split(".")
    return [parts[0], "LDG.128"] if parts[0] == "LDG" and "128" in parts else [parts[0]]


def _counts(lines) -> dict[str, int]:
    counts = collections.Counter(name for line in lines for name in _opcodes(line))
    return {op: counts[op] for op in COUNTED}


def kernel_counts(sass: str) -> dict[str, int]:
    return _counts(sass.split("\n"))


def k_loop(sass: str) -> tuple[int, dict[str, int]]:
    """(instructions, COUNTED instruction counts) of the SASS loop with the most MMAs, then
    the most global loads (the body between a label and the backward branch to it); (0, {})
    without one."""
    lines = sass.split("\n")
    labels = {}
    for i, line in enumerate(lines):
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = i
    best, best_key = (0, {}), (0, 0, 0)
    for i, line in enumerate(lines):
        branch = re.search(r"BRA `?\(?\.(L_x_\d+)", line)
        if not branch or labels.get(branch.group(1), i) >= i:
            continue
        body = [x for x in lines[labels[branch.group(1)] : i + 1] if _opcodes(x)]
        counts = _counts(body)
        key = (
            counts["HMMA"] + counts["HGMMA"],
            counts["LDG"] + counts["LDGSTS"],
            len(body),
        )
        if key[:2] > best_key[:2]:
            best, best_key = (len(body), counts), key
    return best


def report(fn, *args) -> list[KernelReport]:
    """A ``KernelReport`` of every Pallas kernel of jit(fn)(*args), compiled for sm_90."""
    out = []
    for name, (text, warps, stages) in triton_modules(fn, *args).items():
        asm = compile_module(text, num_warps=warps, num_stages=stages)
        instructions, counts = k_loop(asm["sass"])
        out.append(
            KernelReport(
                name=name,
                num_warps=warps,
                num_stages=stages,
                shared_bytes=asm["shared"],
                mma=mma_layouts(asm["ttgir"]),
                loop_instructions=instructions,
                loop_counts=counts,
                kernel_counts=kernel_counts(asm["sass"]),
            )
        )
    return out


LORA_MODES = ("none", "expand", "shrink")


def _struct(shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _slot_tables(slots: int, max_pages: int, num_tokens: int) -> tuple:
    """Shapes of the SGMV operands after the pools: A pages, B pages, ranks, scales, token
    slots (the order ``sgmv_apply`` and ``lora_projection`` take them in)."""
    return (
        _struct((slots, 7, max_pages), jnp.int32),
        _struct((slots, 7, max_pages), jnp.int32),
        _struct((slots, 7), jnp.int32),
        _struct((slots, 7), jnp.float32),
        _struct((num_tokens,), jnp.int32),
    )


def projection_report(
    group: str,
    num_tokens: int,
    *,
    lora: str = "expand",
    config=None,
    shrink_rows: int = 32,
    pool_rank: int = 64,
    layers: int = 32,
    slots: int = 8,
) -> list[KernelReport]:
    """The kernels of one llama-2-7b decode projection (``jaxlora.bench.projection``'s groups)
    at ``num_tokens`` tokens, bf16: ``lora`` "none" (``lora_matmul``), "expand" (the SGMV shrink,
    then ``lora_matmul`` with the expand epilogue) or "shrink" (``lora_matmul`` running the
    shrink of ``shrink_rows`` rank rows itself). Shapes only: nothing is allocated."""
    from jaxlora.bench.projection import LLAMA2_7B_GROUPS
    from pallas_kernels.lora_matmul import lora_matmul, lora_projection

    if group not in LLAMA2_7B_GROUPS:
        raise ConfigError(
            f"jaxlora/bench/compiler_report.py: group {group!r}: expected one of "
            f"{sorted(LLAMA2_7B_GROUPS)}"
        )
    if lora not in LORA_MODES:
        raise ConfigError(
            f"jaxlora/bench/compiler_report.py: lora {lora!r}: expected one of {LORA_MODES}"
        )
    in_width, widths, weights = LLAMA2_7B_GROUPS[group]
    rows, pages = 16, 64
    table = -(-pool_rank // rows)

    x = _struct((num_tokens, in_width))
    w = _struct((layers, in_width, sum(widths)))
    layer = _struct((), jnp.int32)
    if lora == "none":
        return report(lambda x, w, layer: lora_matmul(x, w, layer, config=config), x, w, layer)
    operands = (
        _struct((layers, pages, rows, in_width)),
        tuple(_struct((layers, pages, rows, width)) for width in widths),
        *_slot_tables(slots, table, num_tokens),
    )
    extra = (_struct((2, shrink_rows), jnp.int32),) if lora == "shrink" else ()

    def run(x, w, layer, operands, *extra):
        return lora_projection(
            x,
            w,
            *operands,
            layer,
            weights=weights,
            config=config,
            shrink_rows=extra[0] if extra else None,
        )

    return report(run, x, w, layer, operands, *extra)


def sgmv_report(
    num_tokens: int,
    *,
    out: str = "3x4096",
    rank: int = 16,
    hidden: int = 4096,
    slots: int = 256,
    layers: int = 2,
    config=None,
    per_token: bool = False,
) -> list[KernelReport]:
    """The SGMV shrink and expand of issue 3's kernel grid (``scripts/bench_kernels.py``'s
    ``--outs`` groups: WIDTH or GxWIDTH) at ``num_tokens`` tokens and ``rank``, bf16, as
    ``sgmv_apply`` runs them (decode or prefill regime by T, or per token with ``per_token``;
    the prefill metadata built in the step). Shapes only."""
    from jaxlora.bench.kernels import parse_group
    from pallas_kernels.sgmv import sgmv_apply

    group = parse_group(out)
    rows = 16
    pages_per_adapter = -(-rank // rows)
    pages = slots * len(group.widths) * pages_per_adapter

    args = (
        _struct((num_tokens, hidden)),
        _struct((num_tokens, sum(group.widths))),
        _struct((layers, pages, rows, hidden)),
        tuple(_struct((layers, pages, rows, width)) for width in group.widths),
        *_slot_tables(slots, pages_per_adapter, num_tokens),
        _struct((), jnp.int32),
    )

    def run(x, y, a_pool, b_pools, a_pages, b_pages, ranks, scales, token_slot, layer):
        return sgmv_apply(
            x,
            y,
            a_pool,
            b_pools,
            a_pages,
            b_pages,
            ranks,
            scales,
            token_slot,
            layer,
            weights=group.weights,
            config=config,
            per_token=per_token,
        )

    return report(run, *args)
