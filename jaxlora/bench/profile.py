"""Where a step's time goes: the GPU kernels of a few engine iterations, from the JAX profiler,
grouped by what they compute (base GEMMs, attention, LoRA SGMV, memory copies and sets, other
XLA kernels), beside the iterations' wall time. Wall time the kernels do not cover is the host:
building the batch, dispatch, argument transfers and the sampler's round trip."""

from __future__ import annotations

import glob
import itertools
import os
import re
import tempfile
import time

import jax

# First match wins: a Pallas kernel is named after its pallas_call, XLA's cuBLAS/cuBLASLt GEMMs
# carry gemm-library kernel names (nvjet on Hopper, xmma/cutlass/gemv elsewhere).
CATEGORIES = (
    ("lora", re.compile(r"sgmv", re.I)),
    ("attention", re.compile(r"attention", re.I)),
    ("gemm", re.compile(r"nvjet|gemm|xmma|cutlass|gemv|cublas|matmul|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
)
OTHER = "other"
LAUNCH_GAP_NS = 50_000


def category(kernel_name: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return OTHER


def gpu_events(trace_dir: str) -> list[tuple[str, int, int]]:
    """(name, start_ns, duration_ns) of every activity on the GPU streams of the newest trace in
    trace_dir, by start time; empty where the trace has no GPU (CPU runs)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            events.extend((e.name, e.start_ns, e.duration_ns) for e in line.events)
    events.sort(key=lambda e: e[1])
    return events


def _union(events) -> list[list[int]]:
    """The intervals during which at least one kernel ran (streams may overlap), in order."""
    spans: list[list[int]] = []
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    return spans


def busy_ns(events) -> int:
    """Time at least one kernel ran."""
    return sum(stop - start for start, stop in _union(events))


def idle_gaps_ns(events) -> list[int]:
    """The idle stretches between kernels: short ones are the GPU waiting for the host to launch
    the next kernel of a step, long ones the host's work between steps."""
    spans = _union(events)
    return [b[0] - a[1] for a, b in itertools.pairwise(spans)]


def breakdown(events, steps: int, wall_s: float, *, top: int = 40) -> dict:
    """Per-iteration milliseconds of each category, the busy union and the wall time, the kernel
    count, and the costliest kernel names (total ms per iteration and launches per iteration)."""
    steps = max(1, steps)
    per_category: dict[str, float] = {}
    per_name: dict[str, list] = {}
    for name, _, duration in events:
        c = category(name)
        per_category[c] = per_category.get(c, 0.0) + duration
        entry = per_name.setdefault(name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    ms = {c: per_category.get(c, 0.0) / steps / 1e6 for c in [n for n, _ in CATEGORIES] + [OTHER]}
    busy_ms = busy_ns(events) / steps / 1e6
    wall_ms = wall_s / steps * 1e3
    gaps = idle_gaps_ns(events)
    short = [g for g in gaps if g < LAUNCH_GAP_NS]
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "idle_ms": max(0.0, wall_ms - busy_ms),
        "kernels_per_step": len(events) / steps,
        # Idle time between kernels closer than LAUNCH_GAP_NS, and the number of longer gaps.
        "launch_gap_ms": sum(short) / steps / 1e6,
        "long_gaps_per_step": (len(gaps) - len(short)) / steps,
        "long_gap_ms": (sum(gaps) - sum(short)) / steps / 1e6,
        "category_ms": ms,
        "top_kernels": [
            {"name": n[:120], "category": category(n), "ms": t / steps / 1e6, "launches": c / steps}
            for n, (t, c) in kernels
        ],
    }


def trace_gpu_events(run) -> list[tuple[str, int, int]]:
    """Runs run() under the JAX profiler; its GPU activities (``gpu_events``)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        return gpu_events(trace_dir)


def profile_iterations(step, steps: int) -> dict | None:
    """Runs step() `steps` times under the JAX profiler; the breakdown of their GPU kernels,
    or None where the trace holds no GPU activity."""
    wall = []

    def run():
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall.append(time.perf_counter() - start)

    events = trace_gpu_events(run)
    if not events:
        return None
    return breakdown(events, steps, wall[0])


def format_breakdown(label: str, b: dict) -> str:
    cats = "  ".join(f"{c} {ms:.2f}" for c, ms in b["category_ms"].items())
    lines = [
        f"profile {label}: wall {b['wall_ms']:.2f} ms/step, GPU busy {b['busy_ms']:.2f}, "
        f"idle {b['idle_ms']:.2f} (between kernels < 50 us apart: "
        f"{b['launch_gap_ms']:.2f}, longer gaps {b['long_gap_ms']:.2f} in "
        f"{b['long_gaps_per_step']:.1f}); {b['kernels_per_step']:.0f} kernels/step; {cats}"
    ]
    lines += [
        f"    {k['ms']:7.3f} ms {k['launches']:6.1f}x  {k['category']:<9} {k['name']}"
        for k in b["top_kernels"]
    ]
    return "\n".join(lines)
