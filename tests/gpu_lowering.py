"""Lowering for an abstract NVIDIA GPU on any machine.

Interpret mode runs a kernel's jaxpr with jnp ops; it never meets the Pallas Triton lowering
(jaxpr -> Triton IR), which has its own type rules. That lowering needs no GPU, only a device
kind: here it runs on CPU for an abstract H100, so CI catches a kernel that interprets fine but
does not lower for the GPU (a select between weak-typed literals once lowered to an i1/i32
mismatch). Some such kernels lower without an error into a Triton module that does not verify
(a loop whose upper bound became an i1): ``lower_for_gpu`` here fails on those too. XLA compiles
the IR to PTX only on a GPU (the ``gpu``-marked tests); jaxlora.bench.compiler_report compiles it
with the ``triton`` package for a report.
"""

from __future__ import annotations

import re

from jaxlora.bench.compiler_report import GPU_KIND, lower_printing_modules

__all__ = ["GPU_KIND", "lower_for_gpu", "triton_kernels"]

# MLIR prints a module that fails verification in its generic form.
_UNVERIFIED = re.compile(r'"builtin\.module"\(\) <\{sym_name = "([^"]*)"')


def lower_for_gpu(fn, *args) -> str:
    """StableHLO text of jit(fn)(*args) lowered for an abstract H100; fails when a Pallas
    kernel's Triton module does not verify (seen in the debug print of each module)."""
    text, printed = lower_printing_modules(fn, *args)
    unverified = _UNVERIFIED.findall(printed)
    assert not unverified, f"Triton modules that do not verify: {unverified}"
    return text


def triton_kernels(text: str) -> int:
    return text.count("xla.gpu.triton")
