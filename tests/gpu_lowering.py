"""Lowering for an abstract NVIDIA GPU on any machine.

Interpret mode runs a kernel's jaxpr with jnp ops; it never meets the Pallas Triton lowering
(jaxpr -> Triton IR), which has its own type rules. That lowering needs no GPU, only a device
kind: here it runs on CPU for an abstract H100, so CI catches a kernel that interprets fine but
does not lower for the GPU (a select between weak-typed literals once lowered to an i1/i32
mismatch). Compiling the IR to PTX still needs a GPU (the ``gpu``-marked tests).
"""

from __future__ import annotations

import jax

GPU_KIND = "NVIDIA H100"


def lower_for_gpu(fn, *args) -> str:
    """StableHLO text of jit(fn)(*args) lowered for CUDA (args may be arrays or shape structs);
    each Pallas kernel in it is a ``xla.gpu.triton`` custom call (see ``triton_kernels``)."""
    device = jax.sharding.AbstractDevice(device_kind=GPU_KIND, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def triton_kernels(text: str) -> int:
    return text.count("xla.gpu.triton")
