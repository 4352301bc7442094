"""Lowering for an abstract NVIDIA GPU on any machine.

Interpret mode runs a kernel's jaxpr with jnp ops; it never meets the Pallas Triton lowering
(jaxpr -> Triton IR), which has its own type rules. That lowering needs no GPU, only a device
kind: here it runs on CPU for an abstract H100, so CI catches a kernel that interprets fine but
does not lower for the GPU (a select between weak-typed literals once lowered to an i1/i32
mismatch). XLA compiles the IR to PTX only on a GPU (the ``gpu``-marked tests);
jaxlora.bench.compiler_report compiles it with the ``triton`` package for a report.
"""

from __future__ import annotations

from jaxlora.bench.compiler_report import GPU_KIND, lower_for_gpu

__all__ = ["GPU_KIND", "lower_for_gpu", "triton_kernels"]


def triton_kernels(text: str) -> int:
    return text.count("xla.gpu.triton")
