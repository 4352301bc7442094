"""A functional Flax Llama (GQA, RoPE with llama3 / linear / YaRN scaling, RMSNorm, SwiGLU; the
other families' variations: Qwen2's q/k/v biases, Qwen3's q/k head norms, Mistral's window,
Gemma's scaled embeddings and GELU gating, Gemma 2's sandwich norms and soft caps) with a LoRA
hook on every one of q, k, v, o, gate, up, down, driven by a per-token adapter slot.

Parameters are a plain pytree (``model.apply({"params": params}, ...)``) whose leaves carry logical
axis names (``jaxlora.sharding`` maps them to a mesh); layers are stacked on a leading ``layers``
axis by ``nn.scan``. ``kernel`` leaves are HF ``weight.T``.

Three ways to run attention, chosen by the ``kv`` argument:
- ``kv=None``: the whole sequence is in the batch (training, evaluation, fidelity tests);
  causal attention over it, with an optional padding mask.
- ``KVCache(mode="prefill")``: a chunk of a sequence whose earlier tokens sit in the paged cache;
  the chunk's K/V are written to their pages, then the chunk attends over the gathered context.
- ``KVCache(mode="decode")``: one token per row, attention reads K/V through the page table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.lora import LoraInputs
from pallas_kernels import layout
from pallas_kernels import lora_matmul as matmul_ops
from pallas_kernels import residual_norm as norm_ops
from pallas_kernels import sgmv as sgmv_ops
from pallas_kernels import swiglu as swiglu_ops

Dtype = jnp.dtype


@flax.struct.dataclass
class KVCache:
    """The paged KV cache as one forward pass sees it (see pallas_kernels/paged_attention.py)."""

    k_pool: jax.Array  # (L, num_pages, page_size, KVH, D)
    v_pool: jax.Array  # (L, num_pages, page_size, KVH, D)
    page_table: jax.Array  # (B, max_pages_per_seq) int32
    seq_lens: jax.Array  # (B,) int32: tokens in the cache once this pass has written its own
    token_valid: jax.Array  # (B, S) bool: padding tokens of a chunk are neither written nor read
    mode: str = flax.struct.field(pytree_node=False, default="decode")
    # "reference" (jnp, CPU) | "pallas" | "pallas_interpret"
    impl: str = flax.struct.field(pytree_node=False, default="reference")
    # "xla": RoPE and the K/V writes are XLA fusions and scatters (apply_rope, write_kv);
    # "pallas": one Pallas launch rotates q and k and writes k and v (rope_write_kv_kernel)
    # where impl is a Pallas one.
    write_impl: str = flax.struct.field(pytree_node=False, default="xla")
    # token_valid as int32 for the Pallas write, converted once per step outside the layer loop
    # (XLA leaves the conversion inside the scan, one more kernel per layer); None: convert there.
    write_valid: jax.Array | None = None
    # The decode attention launch's config (pallas_kernels.paged_attention.PagedAttentionConfig);
    # None: its heuristic for the step's shapes.
    attention_config: object = flax.struct.field(pytree_node=False, default=None)
    # Prefill attention over page tables longer than this many positions runs block by block
    # up to the longest row (RunnerConfig.prefill_key_block); None: one pass over the table.
    prefill_key_block: int | None = flax.struct.field(pytree_node=False, default=None)
    # The one-pass prefill attention's jax.nn.dot_product_attention implementation
    # (RunnerConfig.prefill_attention): "xla", "cudnn" (bf16 / fp16 on a GPU, else "xla") or
    # "auto" (cuDNN's there for heads of at most AUTO_CUDNN_MAX_HEAD_DIM, else XLA's).
    prefill_attention: str = flax.struct.field(pytree_node=False, default="xla")


def _unscaled_inverse_frequencies(theta: float, dim: int) -> jax.Array:
    """(dim / 2,) float32: RoPE's frequencies of base ``theta``, before any scaling."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """(head_dim / 2,) float32: RoPE's frequencies after config.rope_scaling, as transformers'
    ROPE_INIT_FUNCTIONS compute them."""
    dim = config.head_dim
    inv_freq = _unscaled_inverse_frequencies(config.rope_theta, dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(config.rope_theta, dim, scaling)
    # Llama 3.1 frequency-dependent scaling, as transformers' _compute_llama3_parameters.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _yarn_inverse_frequencies(theta: float, dim: int, scaling) -> jax.Array:
    """YaRN (transformers' _compute_yarn_parameters): dimensions that turn fewer than
    beta_slow times over the original context are interpolated (divided by factor), those that
    turn more than beta_fast times kept, a linear ramp between."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    extrapolated = 1.0 / (theta**exponents)
    interpolated = 1.0 / (scaling.factor * theta**exponents)

    def correction_dim(rotations: float) -> float:
        turns = scaling.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp
    return interpolated * (1 - kept) + extrapolated * kept


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (B, S, D/2) float32, of positions (B, S), times ``scale`` (YaRN's
    attention scaling): the same for every layer, so the model computes them once per step,
    outside its layer loop (XLA does not hoist them out of a scan: a cos/sin kernel per layer
    otherwise)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    if scale == 1.0:
        return jnp.cos(freqs), jnp.sin(freqs)
    return scale * jnp.cos(freqs), scale * jnp.sin(freqs)


def model_rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, ...]:
    """``rope_tables`` of the model's RoPE: its scaled frequencies and cos / sin scale; for a
    model whose sliding layers have a RoPE of their own (Gemma 3's local base, unscaled) those
    layers' (cos, sin) follow: (cos, sin, local cos, local sin), ``layer_rope`` picks."""
    scale = 1.0 if config.rope_scaling is None else config.rope_scaling.attention_scaling
    tables = rope_tables(positions, rope_inverse_frequencies(config), scale)
    if config.local_rope_theta is None:
        return tables
    local = _unscaled_inverse_frequencies(config.local_rope_theta, config.head_dim)
    return tables + rope_tables(positions, local)


def layer_rope(config: ModelConfig, layer, tables: tuple[jax.Array, ...]):
    """The (cos, sin) of ``layer`` (traced) out of ``model_rope_tables``."""
    if len(tables) == 2:
        return tables
    sliding = _layer_sliding(config, layer)
    full, local = tables[:2], tables[2:]
    return tuple(jnp.where(sliding, lo, fu) for fu, lo in zip(full, local, strict=True))


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array | None = None,
    tables: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """x: (B, S, N, D); positions: (B, S). HF's rotate-half convention. ``tables``: the
    positions' ``rope_tables``, when already computed."""
    from pallas_kernels.paged_attention import rotate_half_reference

    cos, sin = tables if tables is not None else rope_tables(positions, inv_freq)
    return rotate_half_reference(x, cos, sin)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype
    param_dtype: Dtype
    axis_name: str = "embed"  # the scale's logical axis ("head_dim" for Qwen3's q/k norms)

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return norm_ops.rms_norm(x, scale, self.eps, self.dtype)


def _dense(
    features: int, axes: tuple[str, str], name: str, dtype, param_dtype, *, bias: bool = False
) -> nn.Dense:
    # A bias (Qwen2's q, k, v) starts random, not zero as HF's does, so that random models
    # exercise it.
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes[1:]),
    )


# The step's parameter form: each column-parallel group (q|k|v, gate|up) stored as one kernel, so
# that a decode step runs one GEMM per group instead of two or three. The kernel is
# (E, groups, n) with n the concatenation of each member's 1/groups share of columns: with
# groups = the tensor-parallel size (the groups axis on the mesh), each device holds exactly the
# q, k, v (gate, up) columns of its own shard and splits its output locally.
FUSED_PROJECTIONS = {
    "attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}


def _fused_projection(module: nn.Module, name: str, x: jax.Array, widths, dtype, *, whole=False):
    """``x @ kernel`` of the fused kernel ``name`` split into the members' outputs (each
    (..., width)), or None when the module's parameters are the separate (canonical) ones.
    ``whole``: the output unsplit, (..., sum(widths)), where the kernel is one group (its
    columns are then the members' in order); None otherwise."""
    if not module.has_variable("params", name):
        return None
    fused = module.get_variable("params", name)
    kernel = fused["kernel"]  # (E, groups, n)
    in_width, groups, n = kernel.shape
    if whole and groups != 1:
        return None
    # One (E, groups * n) matrix (a free reshape: the groups are the major columns), the plain
    # 2-D operand of the other projections' GEMMs.
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype).reshape(in_width, groups * n))
    if "bias" in fused:  # (groups, n), as nn.Dense adds it: in the compute dtype
        y = y + fused["bias"].astype(dtype).reshape(groups * n)
    if whole:
        return y
    y = y.reshape(*y.shape[:-1], groups, n)  # (..., groups, n)
    outputs, lo = [], 0
    for width in widths:
        share = width // groups
        outputs.append(y[..., lo : lo + share].reshape(*x.shape[:-1], width))
        lo += share
    return outputs


def projections_fused(params) -> bool:
    """Whether ``params`` (a model's parameter tree) holds the fused projection form."""
    layers = params.get("layers") if isinstance(params, Mapping) else None
    attn = layers.get("attn") if isinstance(layers, Mapping) else None
    return isinstance(attn, Mapping) and FUSED_PROJECTIONS["attn"][0] in attn


def fuse_projections(params, *, groups: int = 1, sharding=None):
    """The parameters with q|k|v and gate|up each stored as one kernel (see FUSED_PROJECTIONS).

    ``params``: the canonical tree (``init_params``, the HF loaders), stacked layers;
    ``groups``: the tensor-parallel size the kernels will be split over; ``sharding``: where the
    fused kernels go (e.g. ``jaxlora.sharding.fused_projection_sharding(mesh)``), None for the
    default device. Already fused parameters are returned as they are. The other leaves are
    shared with ``params``, not copied; the caller drops ``params`` to free the separate
    kernels. ``Llama.apply`` accepts either form and computes the same function.
    """
    if projections_fused(params):
        return params
    layers = dict(params["layers"])
    for module_name, (fused_name, members) in FUSED_PROJECTIONS.items():
        module = dict(layers[module_name])
        parts = [module.pop(m) for m in members]
        kernels = [part["kernel"] for part in parts]
        for m, k in zip(members, kernels, strict=True):
            if k.shape[-1] % groups:
                raise ConfigError(
                    f"fuse_projections: {module_name}.{m} has {k.shape[-1]} output columns, "
                    f"expected a multiple of groups={groups}"
                )
        fused = {"kernel": _concat_groups(kernels, groups, sharding)}
        if "bias" in parts[0]:  # (L, width) each -> (L, groups, n), the kernel's columns
            fused["bias"] = _concat_groups([part["bias"] for part in parts], groups, None)
        module[fused_name] = fused
        layers[module_name] = module
    return {**params, "layers": layers}


def unfuse_projections(params):
    """The canonical (separate q, k, v, gate, up) tree of fused parameters (a copy of those
    kernels); canonical parameters are returned as they are."""
    if not projections_fused(params):
        return params
    layers = dict(params["layers"])
    for module_name, (fused_name, members) in FUSED_PROJECTIONS.items():
        module = dict(layers[module_name])
        fused = module.pop(fused_name)
        kernel = fused["kernel"]  # (L, E, groups, n)
        members_n = _member_widths(params, module_name, kernel)
        lo = 0
        for m, share in zip(members, members_n, strict=True):
            part = kernel[..., lo : lo + share]
            module[m] = {"kernel": part.reshape(*part.shape[:-2], -1)}
            if "bias" in fused:  # (L, groups, n)
                bias = fused["bias"][..., lo : lo + share]
                module[m]["bias"] = bias.reshape(*bias.shape[:-2], -1)
            lo += share
        layers[module_name] = module
    return {**params, "layers": layers}


def _member_widths(params, module_name, kernel):
    """Per-group column shares of a fused kernel's members, from the o / down kernels."""
    groups, n = kernel.shape[-2:]
    if module_name == "mlp":
        return (n // 2, n // 2)
    q_width = params["layers"]["attn"]["o_proj"]["kernel"].shape[-2]  # (L, q_size, E)
    kv_share = (n - q_width // groups) // 2
    return (q_width // groups, kv_share, kv_share)


def fused_logical_axes(axes):
    """The logical axes of ``fuse_projections``' tree from the canonical tree's axes: each fused
    kernel is (layers, embed, groups, n) with the groups on its members' output axis name."""
    layers = dict(axes["layers"])
    for module_name, (fused_name, members) in FUSED_PROJECTIONS.items():
        module = dict(layers[module_name])
        spec = module[members[0]]["kernel"]  # (layers, embed, heads | mlp)
        bias = module[members[0]].get("bias")  # (layers, heads)
        for m in members:
            module.pop(m)
        module[fused_name] = {"kernel": type(spec)(*spec, None)}
        if bias is not None:
            module[fused_name]["bias"] = type(bias)(*bias, None)
        layers[module_name] = module
    return {**axes, "layers": layers}


def _concat_groups(kernels, groups, sharding):
    def concat(kernels, xp):
        lead = kernels[0].shape[:-1]
        return xp.concatenate(
            [k.reshape(*lead, groups, k.shape[-1] // groups) for k in kernels], axis=-1
        )

    if sharding is None and all(isinstance(k, np.ndarray) for k in kernels):
        # Host weights (a loaded checkpoint) are fused on the host: no device memory for both
        # forms at once.
        return concat(kernels, np)
    return jax.jit(functools.partial(concat, xp=jnp), out_shardings=sharding)(kernels)


def _group_operands(group: str, lora: LoraInputs):
    """The SGMV operands of a module group after x: (A pool, B pools, A pages, B pages, ranks,
    scales, each token's slot), and the group's weight indices."""
    modules = layout.MODULE_GROUPS[group]
    weights = tuple(layout.MODULE_INDEX[m] for m in modules)
    a_pool = lora.pools[layout.MODULE_POOLS[modules[0]][0]]
    b_pools = tuple(lora.pools[layout.MODULE_POOLS[m][1]] for m in modules)
    token_slot = lora.token_slot.reshape(-1)
    operands = (a_pool, b_pools, lora.a_pages, lora.b_pages, lora.ranks, lora.scales, token_slot)
    return operands, weights


def lora_group_delta(
    group: str, x: jax.Array, out_dtype, layer: jax.Array, lora: LoraInputs
) -> jax.Array:
    """The LoRA delta (T, sum of the group's out widths), float32, of each token's adapter."""
    operands, weights = _group_operands(group, lora)
    if lora.impl == "reference":
        return sgmv_ops.sgmv_delta_reference(x, *operands, layer, weights=weights)
    return sgmv_ops.sgmv_delta(
        x, *operands, layer, weights=weights, out_dtype=out_dtype, **lora.sgmv_kwargs()
    )


def _with_lora(group: str, x: jax.Array, outputs: list[jax.Array], layer, lora):
    """Adds the group's LoRA delta to its base outputs (each (B, S, out_m)).

    One output holding the whole group (a fused GEMM's, or a single module's) is updated in
    place by the kernels (``LoraInputs.update`` "in_place": ``sgmv_apply``). Otherwise each
    output gets its own slice of the float32 delta, added and rounded once (the in-place
    update's arithmetic): XLA fuses these adds into the outputs' consumers, so LoRA adds no
    concatenate of the group's outputs and no separate sum of a split GEMM's partials."""
    if lora is None:
        return outputs
    b, s, _ = x.shape
    if len(outputs) == 1 and lora.impl != "reference" and lora.update == "in_place":
        (out,) = outputs
        operands, weights = _group_operands(group, lora)
        y = sgmv_ops.sgmv_apply(
            x.reshape(b * s, -1),
            out.reshape(b * s, -1),
            *operands,
            layer,
            weights=weights,
            **lora.sgmv_kwargs(),
        )
        return [y.reshape(out.shape)]
    delta = lora_group_delta(group, x.reshape(b * s, -1), outputs[0].dtype, layer, lora)
    results, lo = [], 0
    for out in outputs:
        hi = lo + out.shape[-1]
        part = delta[:, lo:hi].reshape(out.shape)
        results.append((out.astype(jnp.float32) + part).astype(out.dtype))
        lo = hi
    return results


@flax.struct.dataclass
class ProjectionKernels:
    """The layer-stacked projection kernels a decode step runs through ``lora_matmul``.

    kernels: group ("qkv", "o", "gate_up", "down") -> (L, K, N), the fused q|k|v and gate|up
    kernels of one tensor-parallel group (a free reshape of the parameters) and o, down as
    they are. The kernel reads a layer in place at the traced layer index."""

    kernels: dict[str, jax.Array]
    impl: str = flax.struct.field(pytree_node=False, default="pallas")  # or "pallas_interpret"
    # group -> (L, N) layer-stacked bias (Qwen2's "qkv"), added in lora_matmul's epilogue.
    biases: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
    config: object = flax.struct.field(pytree_node=False, default=None)  # MatmulConfig
    # The layer-stacked RMSNorm scales, "input" and "post" -> (L, D), where the residual adds
    # and the norms after o and down run in pallas_kernels.residual_norm (Llama.residual_norm),
    # with "attn_output" and "mlp_output" for sandwich norms (normalizing o's and down's
    # outputs before the adds, in the same launches); None: XLA runs them.
    norm_scales: dict[str, jax.Array] | None = None
    norm_warps: int = flax.struct.field(pytree_node=False, default=16)  # its num_warps
    # With norm_scales and a step whose LoRA shrink runs in SGMV (not in lora_matmul's K loop):
    # the norms before q|k|v and gate|up also run those groups' shrinks
    # (pallas_kernels.residual_norm.residual_rms_norm_shrink, ``fused_shrink_rows`` rank rows a
    # program), so that they need no launch of their own.
    norm_shrink: bool = flax.struct.field(pytree_node=False, default=False)
    # Likewise: SwiGLU and down's shrink in one launch (pallas_kernels.swiglu.swiglu_shrink).
    swiglu_shrink: bool = flax.struct.field(pytree_node=False, default=False)
    fused_shrink_rows: int = flax.struct.field(pytree_node=False, default=8)
    # In a step whose LoRA shrink runs in SGMV: o's shrink in the decode attention launch
    # (pallas_kernels.paged_attention.paged_attention_shrink), where it has one kv split.
    attention_shrink: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def interpret(self) -> bool:
        """Whether its Pallas kernels run in interpret mode (CPU tests)."""
        return self.impl == "pallas_interpret"

    def _sgmv_shrink_step(self, lora) -> bool:
        """A residual-norm step (norm_scales) whose LoRA shrink would run in SGMV launches."""
        return (
            self.norm_scales is not None
            and lora is not None
            and lora.impl != "reference"
            and lora.shrink_rows is None
        )

    def shrinks_in_norm(self, lora) -> bool:
        """Whether this step's q|k|v and gate|up shrinks run in the residual-norm launches."""
        return self.norm_shrink and self._sgmv_shrink_step(lora)

    def shrinks_in_swiglu(self, lora) -> bool:
        """Whether this step's down shrink runs in the SwiGLU launch."""
        return self.swiglu_shrink and self._sgmv_shrink_step(lora)

    def shrinks_in_attention(self, lora, num_tokens: int, width: int) -> bool:
        """Whether this step's o shrink may run in the attention launch (the launch's config
        must also have one kv split: ``_o_shrink_in_attention``): a step of SGMV shrinks whose
        o runs in lora_matmul, which takes the shrink's output."""
        return (
            self.attention_shrink
            and lora is not None
            and lora.impl != "reference"
            and lora.shrink_rows is None
            and self.applies("o", num_tokens, (width,))
        )

    def applies(self, group: str, num_tokens: int, widths, *, k_loop_shrink=False) -> bool:
        """Whether lora_matmul runs the group in a step of ``num_tokens`` tokens;
        ``k_loop_shrink``: the step's shrink runs in its K loop (``LoraInputs.shrink_rows``),
        which lets it run steps of up to ``max_tokens`` tokens, not ``plain_max_tokens``."""
        config = self.config or matmul_ops.MatmulConfig()
        limit = (
            config.max_tokens if k_loop_shrink else min(config.max_tokens, config.plain_max_tokens)
        )
        return group in self.kernels and num_tokens <= limit and config.block_n_for(widths) > 0


def projection_kernels(
    params,
    *,
    impl="pallas",
    config=None,
    residual_norm=False,
    norm_warps=16,
    norm_shrink=False,
    swiglu_shrink=False,
    fused_shrink_rows=8,
    attention_shrink=False,
) -> ProjectionKernels | None:
    """``ProjectionKernels`` of a fused parameter tree with one group (None otherwise: the
    canonical tree, or fused for tensor parallelism, keeps XLA's GEMMs); ``residual_norm``:
    with the stacked norm scales for ``pallas_kernels.residual_norm``; ``norm_shrink``: the
    q|k|v and gate|up shrinks in those launches (``ProjectionKernels.norm_shrink``);
    ``swiglu_shrink``: down's with SwiGLU (``ProjectionKernels.swiglu_shrink``);
    ``attention_shrink``: o's in the attention launch (``ProjectionKernels.attention_shrink``)."""
    if impl not in ("pallas", "pallas_interpret"):
        raise ConfigError(
            f"Llama.projection_kernel: expected 'xla', 'pallas' or 'pallas_interpret', got {impl!r}"
        )
    if not projections_fused(params):
        return None
    layers = params["layers"]
    qkv = layers["attn"]["qkv_proj"]["kernel"]  # (L, E, groups, n)
    gate_up = layers["mlp"]["gate_up_proj"]["kernel"]
    if qkv.shape[2] != 1 or gate_up.shape[2] != 1:
        return None
    kernels = {
        "qkv": qkv.reshape(*qkv.shape[:2], -1),
        "o": layers["attn"]["o_proj"]["kernel"],
        "gate_up": gate_up.reshape(*gate_up.shape[:2], -1),
        "down": layers["mlp"]["down_proj"]["kernel"],
    }
    biases = {}
    if "bias" in layers["attn"]["qkv_proj"]:  # (L, groups, n)
        bias = layers["attn"]["qkv_proj"]["bias"]
        biases["qkv"] = bias.reshape(bias.shape[0], -1)
    norm_scales = None
    if residual_norm:
        norm_scales = {
            "input": layers["input_layernorm"]["scale"],
            "post": layers["post_attention_layernorm"]["scale"],
        }
        if "attn_output_norm" in layers:  # Gemma 2 / 3's sandwich norms, before each add
            norm_scales["attn_output"] = layers["attn_output_norm"]["scale"]
            norm_scales["mlp_output"] = layers["mlp_output_norm"]["scale"]
            # (residual_rms_norm_shrink has no sandwich norm: their shrinks keep SGMV launches,
            # as swiglu_shrink keeps SiLU models'.)
            norm_shrink = False
    return ProjectionKernels(
        kernels=kernels,
        biases=biases,
        impl=impl,
        config=config,
        norm_scales=norm_scales,
        norm_warps=norm_warps,
        norm_shrink=norm_shrink,
        swiglu_shrink=swiglu_shrink,
        fused_shrink_rows=fused_shrink_rows,
        attention_shrink=attention_shrink,
    )


def scan_unroll_for_step(config: ModelConfig, kernels, num_tokens: int, lora=None) -> int:
    """Layers per scan iteration of a step by default: 2 where ``lora_matmul`` runs every
    projection group (it reads the stacked weights in place at the layer index, so the scan
    slices no weight), 1 where any of XLA's GEMMs runs. With 2, lax.scan slices a block of two
    layers of each weight, which XLA on the GPU copies before its own GEMMs (5.6-6.2 ms a 7B
    decode step on the H200); cuBLAS reads a one-layer slice in place. Where no GEMM needs the
    slices, two layers an iteration share out the loop's bookkeeping: 0.6-2.8% shorter batch-32
    and -64 async iterations on the H200 (docs/BENCHMARKS.md, thirty-first session)."""
    return 2 if kernels_run_every_group(config, kernels, num_tokens, lora) else 1


def kernels_run_every_group(config: ModelConfig, kernels, num_tokens: int, lora=None) -> bool:
    """Whether ``lora_matmul`` runs every projection group of a step of ``num_tokens``."""
    if kernels is None:
        return False
    out_width = {module: shape[1] for module, shape in config.module_shapes().items()}
    shrink = _k_loop_shrink(lora)
    return all(
        kernels.applies(
            group, num_tokens, tuple(out_width[m] for m in modules), k_loop_shrink=shrink
        )
        for group, modules in layout.MODULE_GROUPS.items()
    )


def _k_loop_shrink(lora) -> bool:
    """Whether lora_matmul runs the step's LoRA shrink in its K loop (few adapters)."""
    return lora is not None and lora.shrink_rows is not None


def _kernel_projection(
    group: str, x: jax.Array, widths, layer, lora, kernels, *, split=True, partials=False, v=None
):
    """The group's outputs (each (B, S, width)), LoRA included, from one ``lora_matmul`` launch
    (after the LoRA shrink, or with ``v`` its output computed before), or with ``split=False``
    the launch's output (B, S, sum(widths)), or with ``partials=True`` its K split's partials
    (P, B * S, sum(widths)) unsummed; None where the kernel does not apply (then XLA's GEMM
    runs)."""
    b, s, _ = x.shape
    if kernels is None or not kernels.applies(
        group, b * s, widths, k_loop_shrink=_k_loop_shrink(lora)
    ):
        return None
    x2 = x.reshape(b * s, -1)
    interpret = kernels.interpret
    w = kernels.kernels[group]
    bias = kernels.biases.get(group)
    if lora is None:
        y = matmul_ops.lora_matmul(
            x2,
            w,
            layer,
            bias=bias,
            config=kernels.config,
            interpret=interpret,
            partials=partials,
        )
    else:
        operands, weights = _group_operands(group, lora)
        y = matmul_ops.lora_projection(
            x2,
            w,
            *operands,
            layer,
            weights=weights,
            kernel_meta=lora.kernel_meta,
            sgmv_config=lora.sgmv_config,
            config=kernels.config,
            interpret=interpret,
            shrink_rows=lora.shrink_rows,
            per_token=lora.per_token,
            partials=partials,
            v=v,
            bias=bias,
        )
    if partials:
        return y
    if not split:
        return y.reshape(b, s, -1)
    outputs, lo = [], 0
    for width in widths:
        outputs.append(y[:, lo : lo + width].reshape(b, s, width))
        lo += width
    return outputs


def _soft_cap(x, cap):
    """Gemma 2's soft cap: cap * tanh(x / cap) (no-op for cap None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _dense_attention(q, k, v, mask, sm_scale, softcap=None):
    """q: (B, S, NH, D); k, v: (B, K, KVH, D); mask: (B, S, K) bool; ``softcap``: the scores'
    soft cap (ModelConfig.attn_logit_softcapping)."""
    b, s, nh, d = q.shape
    kvh = k.shape[2]
    group = nh // kvh
    qg = q.reshape(b, s, kvh, group, d).astype(jnp.float32)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * sm_scale
    scores = _soft_cap(scores, softcap)
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32))
    return out.reshape(b, s, nh, d).astype(q.dtype)


class Attention(nn.Module):
    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(
        self,
        x,
        layer,
        positions,
        attn_mask,
        lora,
        kv,
        k_pool,
        v_pool,
        kernels=None,
        rope=None,
        o_partials=False,
        qkv_v=None,
    ):
        """(the o projection's output (B, S, hidden), k_pool, v_pool); with ``o_partials`` its
        ``lora_matmul`` partials (P, B * S, hidden) unsummed instead (the kernel must run o);
        ``qkv_v``: the q|k|v group's LoRA shrink, already run (the kernel must run q|k|v)."""
        cfg = self.config
        b, s, _ = x.shape
        dense = lambda f, axes, name: _dense(f, axes, name, self.dtype, self.param_dtype)  # noqa: E731
        widths = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        rope_kernel = kv is not None and kv.write_impl == "pallas" and kv.impl != "reference"
        fused = _kernel_projection(
            "qkv", x.astype(self.dtype), widths, layer, lora, kernels, split=False, v=qkv_v
        )
        if qkv_v is not None:
            _ran_in_kernel(fused, "qkv")
        if fused is None and rope_kernel:
            # The RoPE + K/V write kernel reads q|k|v in place: XLA's GEMM output unsplit, with
            # its LoRA delta, not split and concatenated again (a copy a layer).
            fused = _fused_projection(self, "qkv_proj", x, widths, self.dtype, whole=True)
            if fused is not None:
                fused = _with_lora("qkv", x, [fused], layer, lora)[0]
        if fused is not None:
            qkv = jnp.split(fused, np.cumsum(widths)[:-1], axis=-1)
        else:
            qkv = _fused_projection(self, "qkv_proj", x, widths, self.dtype)
            if qkv is None:
                biased = lambda f, axes, name: _dense(  # noqa: E731
                    f, axes, name, self.dtype, self.param_dtype, bias=cfg.qkv_bias
                )
                qkv = [
                    biased(cfg.q_size, ("embed", "heads"), "q_proj")(x),
                    biased(cfg.kv_size, ("embed", "kv_heads"), "k_proj")(x),
                    biased(cfg.kv_size, ("embed", "kv_heads"), "v_proj")(x),
                ]
            qkv = _with_lora("qkv", x, qkv, layer, lora)
        q, k, v = qkv
        q = q.reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        head_norms = None
        if cfg.qk_norm and _head_norms_in_rope_kernel(self, rope_kernel, fused, cfg):
            # The RoPE kernel below normalizes the heads it reads from q|k|v whole.
            head_norms = tuple(
                self.get_variable("params", name)["scale"] for name in ("q_norm", "k_norm")
            )
        elif cfg.qk_norm:
            head_norm = lambda name: RMSNorm(  # noqa: E731
                cfg.rms_norm_eps, self.dtype, self.param_dtype, "head_dim", name=name
            )
            q, k = head_norm("q_norm")(q), head_norm("k_norm")(k)
            # The RoPE kernel below reads q|k|v whole: the normed heads, concatenated again.
            fused, qkv = None, (q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1))
        rope = layer_rope(
            cfg, layer, rope if rope is not None else model_rope_tables(cfg, positions)
        )
        sm_scale = cfg.attention_scale
        if rope_kernel:
            from pallas_kernels import paged_attention as pa

            if fused is None:
                fused = jnp.concatenate(qkv, axis=-1)
            heads = cfg.num_heads + 2 * cfg.num_kv_heads
            cos, sin = rope
            # The kernel reads the projection's output in place (the slices above go unused).
            q, k_pool, v_pool = pa.rope_write_kv_kernel(
                fused.reshape(b, s, heads, cfg.head_dim),
                cos,
                sin,
                k_pool,
                v_pool,
                kv.page_table,
                positions,
                layer,
                kv.token_valid if kv.write_valid is None else kv.write_valid,
                head_norms=head_norms,
                head_norm_eps=cfg.rms_norm_eps,
                interpret=kv.impl == "pallas_interpret",
            )
        else:
            q = apply_rope(q, positions, tables=rope)
            k = apply_rope(k, positions, tables=rope)
            if kv is not None:
                from pallas_kernels import paged_attention as pa

                k_pool, v_pool = pa.write_kv(
                    k_pool, v_pool, k, v, kv.page_table, positions, layer, kv.token_valid
                )

        o_v = None
        window = cfg.attention_window
        if kv is None:
            mask_window = _mask_window(cfg, layer)
            mask = _causal_mask(positions[:, :, None], positions[:, None, :], mask_window)
            mask = mask if attn_mask is None else mask & attn_mask[:, None, :]
            out = _dense_attention(q, k, v, mask, sm_scale, cfg.attn_logit_softcapping)
        elif _o_shrink_in_attention(q, kv, k_pool, lora, kernels, cfg):
            out, o_v = _attention_and_o_shrink(
                q, layer, kv, k_pool, v_pool, sm_scale, lora, kernels, window
            )
        else:
            out = _cached_attention(q, positions, layer, kv, k_pool, v_pool, cfg)
        out = out.reshape(b, s, cfg.q_size)
        if o_partials:
            parts = _kernel_projection(
                "o", out, (cfg.hidden_size,), layer, lora, kernels, partials=True, v=o_v
            )
            return _ran_in_kernel(parts, "o"), k_pool, v_pool
        o = _kernel_projection("o", out, (cfg.hidden_size,), layer, lora, kernels, v=o_v)
        if o_v is not None:
            _ran_in_kernel(o, "o")
        if o is None:
            o = _with_lora(
                "o", out, [dense(cfg.hidden_size, ("heads", "embed"), "o_proj")(out)], layer, lora
            )
        return o[0], k_pool, v_pool


# A window no position reaches: Gemma 2's full layers, beside its sliding ones, in one scan body.
_UNBOUNDED_WINDOW = 1 << 30


def _layer_sliding(cfg: ModelConfig, layer) -> jax.Array:
    """() bool, traced: whether ``layer`` is one of the sliding layers (Gemma 2 / 3: all but
    every ModelConfig.sliding_period-th; Qwen2 / Qwen3: from ModelConfig.max_window_layers on)."""
    layer = jnp.asarray(layer, jnp.int32)
    if cfg.max_window_layers is not None:
        return layer >= cfg.max_window_layers
    return (layer + 1) % cfg.sliding_period != 0


def _layer_window(cfg: ModelConfig, layer) -> jax.Array | None:
    """() int32, traced: the sliding window of this layer where it depends on the layer
    (Gemma 2 / 3, Qwen2 / 3 with use_sliding_window: ModelConfig.local_window on the sliding
    layers, none on the full ones); None for every other model (Mistral's window is static:
    ModelConfig.attention_window)."""
    if cfg.local_window is None:
        return None
    sliding = _layer_sliding(cfg, layer)
    return jnp.where(sliding, cfg.local_window, _UNBOUNDED_WINDOW).astype(jnp.int32)


def _mask_window(cfg: ModelConfig, layer):
    """The window this layer's attention masks apply: the model's static one (Mistral's), the
    traced one of the layer (Gemma 2 / 3: ``_layer_window``), or None."""
    layer_window = _layer_window(cfg, layer)
    return cfg.attention_window if layer_window is None else layer_window


def _head_norms_in_rope_kernel(module: nn.Module, rope_kernel: bool, fused, cfg) -> bool:
    """Whether the RoPE + K/V write kernel runs Qwen3's q / k head norms: it reads q|k|v whole
    (one fused output), head_dim is a power of two, and the norms' scales exist (a model
    initialized through XLA's path made them)."""
    head_dim = cfg.head_dim
    return (
        rope_kernel
        and fused is not None
        and head_dim & (head_dim - 1) == 0
        and module.has_variable("params", "q_norm")
        and module.has_variable("params", "k_norm")
    )


def _o_shrink_in_attention(q, kv: KVCache, k_pool, lora, kernels, cfg) -> bool:
    """Whether this decode step runs o's LoRA shrink in the attention launch
    (``ProjectionKernels.shrinks_in_attention`` and a launch config of one kv split)."""
    from pallas_kernels import paged_attention as pa

    b, s = q.shape[:2]
    if (
        kernels is None
        # (The fused launch caps no score and takes no per-layer window.)
        or cfg.attn_logit_softcapping is not None
        or cfg.local_window is not None
        or kv.mode != "decode"
        or kv.impl == "reference"
        or not kernels.shrinks_in_attention(lora, b * s, cfg.hidden_size)
    ):
        return False
    config = pa.attention_config(
        q[:, 0], k_pool, kv.page_table, kv.attention_config, where="Attention"
    )
    return config.kv_splits == 1


def _attention_and_o_shrink(q, layer, kv: KVCache, k_pool, v_pool, sm_scale, lora, kernels, window):
    """Decode attention with o's LoRA shrink in its launch: (out (B, 1, NH, D), v)."""
    from pallas_kernels import paged_attention as pa

    operands, weights = _shrink_operands("o", lora)
    cache, launch = _decode_attention_args(q, layer, kv, k_pool, v_pool, sm_scale, window)
    out, v = pa.paged_attention_shrink(*cache, *operands, weights=weights, **launch)
    return out[:, None], v


def _decode_attention_args(q, layer, kv: KVCache, k_pool, v_pool, sm_scale, window):
    """The decode attention launch's operands (q, pools, page table, lengths, layer) and its
    keyword arguments."""
    cache = (q[:, 0], k_pool, v_pool, kv.page_table, kv.seq_lens, layer)
    launch = dict(
        sm_scale=sm_scale,
        window=window,
        config=kv.attention_config,
        interpret=kv.impl == "pallas_interpret",
    )
    return cache, launch


def _causal_mask(query_pos, key_pos, window):
    """Which keys each query attends to: the earlier ones and itself, and with a sliding
    window (ModelConfig.attention_window) only the last ``window`` of them (HF's mask)."""
    mask = key_pos <= query_pos
    return mask if window is None else mask & (key_pos > query_pos - window)


def _window_start(positions, window):
    """(B,) the first key a prefill chunk's rows read under a sliding window: its first query's
    window start (a row's tokens are consecutive from positions[:, 0])."""
    return jnp.maximum(positions[:, 0] - window + 1, 0)


def _unread_keys_zeroed(k, v, mask):
    """k, v (B, K, KVH, D) gathered from the pools, zero at the keys no token of their row
    attends to (``mask`` (B, S, K)): the slots past a row's length, or before its window, may
    hold another request's values, NaN or inf included, and a softmax weight of 0 times NaN
    is NaN."""
    read = jnp.any(mask, axis=1)[:, :, None, None]
    return jnp.where(read, k, 0), jnp.where(read, v, 0)


def _key_mask(positions, key_pos, kv: KVCache, window):
    """(B, S, K) which cached keys each of a chunk's tokens attends to: ``_causal_mask`` within
    the rows' lengths, none for padding tokens."""
    mask = _causal_mask(positions[:, :, None], key_pos, window)
    return mask & (key_pos < kv.seq_lens[:, None, None]) & kv.token_valid[:, :, None]


def _cached_attention(q, positions, layer, kv: KVCache, k_pool, v_pool, cfg: ModelConfig):
    """Attention of q over the pools, which already hold this step's K/V, with the model's
    query scale, soft cap (ModelConfig.attn_logit_softcapping) and window: the static one,
    whose prefill reads only the pages from the window's start, or the layer's traced one
    (``_layer_window``), read over the whole table."""
    from pallas_kernels import paged_attention as pa

    sm_scale, window, softcap = (
        cfg.attention_scale,
        cfg.attention_window,
        cfg.attn_logit_softcapping,
    )
    b, s = positions.shape
    if kv.mode == "decode":
        layer_window = _layer_window(cfg, layer)
        assert s == 1, "decode mode takes one token per row"
        if kv.impl == "reference":
            out = pa.paged_attention_reference(
                q[:, 0],
                k_pool,
                v_pool,
                kv.page_table,
                kv.seq_lens,
                layer,
                sm_scale=sm_scale,
                window=window,
                logit_softcap=softcap,
                layer_window=layer_window,
            )
        else:
            cache, launch = _decode_attention_args(q, layer, kv, k_pool, v_pool, sm_scale, window)
            out = pa.paged_attention(
                *cache, **launch, logit_softcap=softcap, layer_window=layer_window
            )
        return out[:, None]
    mask_window = _mask_window(cfg, layer)
    page_size, max_pages = k_pool.shape[2], kv.page_table.shape[1]
    # With a sliding window a row's queries read the keys from its window start on: the pages
    # from that one's (pa.window_pages) rather than the whole table (a 32k context's prefill
    # chunk of Mistral 7B v0.1 then reads 4,096 + S keys, not 32,768).
    span = max_pages if window is None else pa.window_pages(window, s, page_size)
    block = kv.prefill_key_block

    def blocked():
        return _blocked_cached_attention(
            q,
            positions,
            layer,
            kv,
            k_pool,
            v_pool,
            sm_scale,
            mask_window,
            max(1, block // page_size),
            softcap,
        )

    # A table past prefill_key_block takes the blocked path unless cuDNN's fused attention
    # runs its one pass: that one materializes no score matrix, so its memory grows with the
    # keys alone, and it was 1.4-2.3x faster (H100, llama-3-8b at max_model_len 32,768, eight
    # prompts of 4,608 / 8,192 / 16,384 tokens: 1.64 / 3.35 / 9.04 s against XLA's blocked
    # path's 2.34 / 6.54 / 20.46 s; fifty-second session). The jnp path (the CPU's, and the
    # tensor-parallel steps', which XLA partitions over the heads) blocks too: its dense
    # attention holds float32 scores and weights over the whole table, 4 GiB a prompt for a
    # 512-token chunk of 32 heads over 32,768 keys.
    # A static window's gather (span pages) counts as a table too: past the block it blocks
    # as well (Mistral v0.1's 4,096-key window and 2,048-token chunks read 6,160 keys).
    long_table = block is not None and min(span, max_pages) * page_size > block
    if long_table and (
        kv.impl == "reference"
        or softcap is not None
        or _prefill_attention_implementation(kv, q) != "cudnn"
    ):
        return blocked()
    if span < max_pages:
        first_page = _window_start(positions, window) // page_size
        max_len = span * page_size
        ck, cv = pa.gather_kv(k_pool, v_pool, kv.page_table, layer, max_len, first_page)
        key_pos = first_page[:, None, None] * page_size + jnp.arange(max_len)[None, None, :]
    else:
        max_len = max_pages * page_size
        ck, cv = pa.gather_kv(k_pool, v_pool, kv.page_table, layer, max_len)
        key_pos = jnp.arange(max_len)[None, None, :]
    # fp8 pools (KVCacheConfig.cache_dtype) are read in q's dtype; a no-op for pools in it.
    ck, cv = ck.astype(q.dtype), cv.astype(q.dtype)
    mask = _key_mask(positions, key_pos, kv, mask_window)
    ck, cv = _unread_keys_zeroed(ck, cv, mask)
    if kv.impl == "reference" or softcap is not None:
        # (XLA's dot_product_attention has no soft cap.)
        out = _dense_attention(q, ck, cv, mask, sm_scale, softcap)
        if kv.impl != "reference":
            out = jnp.where(kv.token_valid[:, :, None, None], out, 0)
    else:
        out = _one_pass_prefill_attention(
            q, ck, cv, mask[:, None], sm_scale, kv, xla_fallback=not long_table
        )
        if out is None:
            # cuDNN could not take the shapes, and XLA's one pass would score the long table.
            return blocked()
        out = jnp.where(kv.token_valid[:, :, None, None], out, 0)
    return out


def _one_pass_prefill_attention(q, k, v, mask, scale, kv: KVCache, *, xla_fallback=True):
    """jax.nn.dot_product_attention in KVCache.prefill_attention's implementation; XLA's where
    cuDNN's cannot take these shapes (jax's check raises NotImplementedError while tracing:
    head_dim past 128 before Hopper or 256 on it, or not a multiple of 8), or None there
    without ``xla_fallback``."""
    implementation = _prefill_attention_implementation(kv, q)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, implementation="cudnn"
            )
        except NotImplementedError:
            if not xla_fallback:
                return None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


# "auto" prefill attention takes cuDNN's for heads up to this wide: on an H100 its fused
# attention was faster than XLA's for heads of 128 and slower for gemma-2b's 256 (one KV head;
# RunnerConfig.prefill_attention).
AUTO_CUDNN_MAX_HEAD_DIM = 128


def _prefill_attention_implementation(kv: KVCache, q) -> str:
    """KVCache.prefill_attention where cuDNN's fused attention can run it (a GPU, bf16 or fp16
    activations; "auto": heads of at most AUTO_CUDNN_MAX_HEAD_DIM too), else "xla"."""
    wanted = kv.prefill_attention == "cudnn" or (
        kv.prefill_attention == "auto" and q.shape[-1] <= AUTO_CUDNN_MAX_HEAD_DIM
    )
    if wanted and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _blocked_cached_attention(
    q, positions, layer, kv, k_pool, v_pool, sm_scale, window, pages, softcap=None
):
    """Prefill attention over the pools block by block (``pages`` pages a block), from the
    block of the earliest key any row's window reads to the block of the longest row's last
    key: a loop of run-time length with an online softmax in float32, so that a chunk's cost
    follows its rows' contexts rather than the page table's width (max_model_len)."""
    from pallas_kernels import paged_attention as pa

    b, s, nh, d = q.shape
    page_size, kvh = k_pool.shape[2], k_pool.shape[3]
    group = nh // kvh
    block_len = pages * page_size
    num_blocks = -(-kv.page_table.shape[1] // pages)
    table = jnp.pad(kv.page_table, ((0, 0), (0, num_blocks * pages - kv.page_table.shape[1])))
    rows = jnp.any(kv.token_valid, axis=1)
    last = -(-jnp.max(jnp.where(rows, kv.seq_lens, 0)) // block_len)
    first = 0
    if window is not None:
        start = jnp.where(rows, _window_start(positions, window), jnp.iinfo(jnp.int32).max)
        first = jnp.minimum(jnp.min(start) // block_len, last)
    qg = q.reshape(b, s, kvh, group, d)

    def visit(index, carry):
        top, total, acc = carry
        block_pages = jax.lax.dynamic_slice_in_dim(table, index * pages, pages, axis=1)
        ck, cv = pa.gather_kv(k_pool, v_pool, block_pages, layer, block_len)
        key_pos = index * block_len + jnp.arange(block_len)[None, None, :]
        mask = _key_mask(positions, key_pos, kv, window)
        ck, cv = _unread_keys_zeroed(ck, cv, mask)
        mask = mask[:, None, None]  # (B, 1, 1, S, K)
        scores = jnp.einsum(
            "bskgd,btkd->bkgst", qg, ck.astype(q.dtype), preferred_element_type=jnp.float32
        )
        scores = jnp.where(mask, _soft_cap(scores * sm_scale, softcap), -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        # Rows with no key yet keep exponent 0 (their weights are masked to 0 below).
        shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        weights = jnp.where(mask, jnp.exp(scores - shift[..., None]), 0.0)
        rescale = jnp.exp(top - shift)
        total = total * rescale + jnp.sum(weights, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bkgst,btkd->bkgsd",
            weights.astype(q.dtype),
            cv.astype(q.dtype),
            preferred_element_type=jnp.float32,
        )
        return new_top, total, acc

    carry = (
        jnp.full((b, kvh, group, s), -jnp.inf, jnp.float32),
        jnp.zeros((b, kvh, group, s), jnp.float32),
        jnp.zeros((b, kvh, group, s, d), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(first, last, visit, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, nh, d).astype(q.dtype)
    return jnp.where(kv.token_valid[:, :, None, None], out, 0)


class MLP(nn.Module):
    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, layer, lora, kernels=None, down_partials=False, gate_up_v=None):
        """The down projection's output (B, S, hidden); with ``down_partials`` its
        ``lora_matmul`` partials (P, B * S, hidden) unsummed instead (the kernel must run down);
        ``gate_up_v``: the gate|up group's LoRA shrink, already run (the kernel must run it).
        With ``down_partials`` in a step where ``kernels.shrinks_in_swiglu`` SwiGLU and down's
        LoRA shrink run in one launch (``pallas_kernels.swiglu.swiglu_shrink``)."""
        cfg = self.config
        widths = (cfg.intermediate_size, cfg.intermediate_size)
        # (The fused launch computes SiLU: a GELU model's steps keep the two launches.)
        if down_partials and kernels.shrinks_in_swiglu(lora) and cfg.activation == "silu":
            # SwiGLU and down's LoRA shrink in one launch, on gate|up's output unsplit.
            gate_up = _kernel_projection(
                "gate_up",
                x.astype(self.dtype),
                widths,
                layer,
                lora,
                kernels,
                v=gate_up_v,
                split=False,
            )
            b, s, _ = x.shape
            hidden, down_v = _swiglu_and_shrink(
                _ran_in_kernel(gate_up, "gate_up").reshape(b * s, -1), layer, lora, kernels
            )
            parts = _kernel_projection(
                "down",
                hidden.reshape(b, s, -1),
                (cfg.hidden_size,),
                layer,
                lora,
                kernels,
                partials=True,
                v=down_v,
            )
            return _ran_in_kernel(parts, "down")
        gate_up = _kernel_projection(
            "gate_up", x.astype(self.dtype), widths, layer, lora, kernels, v=gate_up_v
        )
        if gate_up_v is not None:
            _ran_in_kernel(gate_up, "gate_up")
        if gate_up is None and lora is not None and lora.update == "in_place":
            # The fused GEMM's output whole, for the kernels to update in place; split after.
            whole = _fused_projection(self, "gate_up_proj", x, widths, self.dtype, whole=True)
            if whole is not None:
                whole = _with_lora("gate_up", x, [whole], layer, lora)[0]
                gate_up = jnp.split(whole, [widths[0]], axis=-1)
        if gate_up is None:
            gate_up = _fused_projection(self, "gate_up_proj", x, widths, self.dtype)
            if gate_up is None:
                gate_up = [
                    _dense(w, ("embed", "mlp"), name, self.dtype, self.param_dtype)(x)
                    for w, name in zip(widths, ("gate_proj", "up_proj"), strict=True)
                ]
            gate_up = _with_lora("gate_up", x, gate_up, layer, lora)
        gate, up = gate_up
        hidden = swiglu_ops.gated_activation(gate, up, self.dtype, cfg.activation)
        if down_partials:
            parts = _kernel_projection(
                "down", hidden, (cfg.hidden_size,), layer, lora, kernels, partials=True
            )
            return _ran_in_kernel(parts, "down")
        down = _kernel_projection("down", hidden, (cfg.hidden_size,), layer, lora, kernels)
        if down is None:
            dense = _dense(
                cfg.hidden_size, ("mlp", "embed"), "down_proj", self.dtype, self.param_dtype
            )
            down = _with_lora("down", hidden, [dense(hidden)], layer, lora)
        return down[0]


def _ran_in_kernel(parts, group):
    if parts is None:  # Llama takes the residual-norm path only where lora_matmul runs all
        raise AssertionError(f"the {group} projection's partials or v need lora_matmul to run it")
    return parts


def _shrink_operands(group: str, lora: LoraInputs):
    """The shrink's operands of a module group, in the order every shrink kernel takes them
    (A pool, A pages, ranks, each token's slot), and the group's weight indices."""
    (a_pool, _, a_pages, _, ranks, _, token_slot), weights = _group_operands(group, lora)
    return (a_pool, a_pages, ranks, token_slot), weights


def _norm_and_shrink(h, parts, scales, layer, group, lora, kernels, cfg):
    """``residual_rms_norm_shrink`` with the LoRA shrink of ``group``, the group that reads x:
    (h', x, v)."""
    operands, weights = _shrink_operands(group, lora)
    return norm_ops.residual_rms_norm_shrink(
        h,
        parts,
        scales,
        layer,
        *operands,
        eps=cfg.rms_norm_eps,
        weights=weights,
        rows=kernels.fused_shrink_rows,
        num_warps=kernels.norm_warps,
        interpret=kernels.interpret,
    )


def _swiglu_and_shrink(gate_up, layer, lora, kernels):
    """``swiglu_shrink`` of gate|up's output (T, 2 I) with down's LoRA shrink: (hidden, v)."""
    operands, weights = _shrink_operands("down", lora)
    return swiglu_ops.swiglu_shrink(
        gate_up,
        *operands,
        layer,
        weights=weights,
        rows=kernels.fused_shrink_rows,
        num_warps=kernels.norm_warps,
        interpret=kernels.interpret,
    )


def _group_shrink(group, x, layer, lora, kernels):
    """The SGMV shrink of ``group`` (the first layer's q|k|v, before the loop, where the
    residual-norm launches run the others): v (T, G, MP*R) float32."""
    operands, weights = _shrink_operands(group, lora)
    return sgmv_ops.sgmv_shrink(
        x.reshape(-1, x.shape[-1]),
        *operands,
        layer,
        weights=weights,
        kernel_meta=lora.kernel_meta,
        config=lora.sgmv_config,
        per_token=lora.per_token,
        interpret=kernels.interpret,
    )


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, carry, layer, positions, attn_mask, lora, kv, kernels=None, rope=None):
        """carry: (h, k_pool, v_pool); or (h, x, k_pool, v_pool) where the residual adds and
        the norms after o and down run in ``pallas_kernels.residual_norm`` (``x``: this
        layer's input, normalized by the layer before, or before the loop for the first); or
        (h, x, qkv_v, k_pool, v_pool) where those launches also run the q|k|v and gate|up LoRA
        shrinks (``qkv_v``: this layer's q|k|v shrink of x)."""
        if len(carry) in (4, 5):
            return self._with_residual_norm_kernel(
                carry, layer, positions, attn_mask, lora, kv, kernels, rope
            )
        h, k_pool, v_pool = carry
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn_out, k_pool, v_pool = Attention(cfg, self.dtype, self.param_dtype, name="attn")(
            norm("input_layernorm")(h),
            layer,
            positions,
            attn_mask,
            lora,
            kv,
            k_pool,
            v_pool,
            kernels,
            rope,
        )
        if cfg.sandwich_norms:
            attn_out = norm("attn_output_norm")(attn_out)
        h = h + attn_out
        mlp_out = MLP(cfg, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attention_layernorm")(h), layer, lora, kernels
        )
        if cfg.sandwich_norms:
            mlp_out = norm("mlp_output_norm")(mlp_out)
        h = h + mlp_out
        return (h, k_pool, v_pool), None

    def _with_residual_norm_kernel(
        self, carry, layer, positions, attn_mask, lora, kv, kernels, rope
    ):
        """One layer with o's and down's partials summed into the residual stream, and the
        norm after each (the next layer's input norm after down) in one launch each. The norm
        modules' parameters are read stacked from ``kernels.norm_scales`` at the layer index
        (the scan slices none of them)."""
        shrink = len(carry) == 5
        if shrink:
            h, x, qkv_v, k_pool, v_pool = carry
        else:
            (h, x, k_pool, v_pool), qkv_v = carry, None
        cfg = self.config
        shape = h.shape

        def norm(h, parts, scales, layer, group, out_scales, out_layer):
            if not shrink:
                h, x = norm_ops.residual_rms_norm(
                    h,
                    parts,
                    scales,
                    layer,
                    eps=cfg.rms_norm_eps,
                    out_scales=out_scales,
                    out_layer=out_layer,
                    num_warps=kernels.norm_warps,
                    interpret=kernels.interpret,
                )
                return h, x, None
            return _norm_and_shrink(h, parts, scales, layer, group, lora, kernels, cfg)

        parts, k_pool, v_pool = Attention(cfg, self.dtype, self.param_dtype, name="attn")(
            x,
            layer,
            positions,
            attn_mask,
            lora,
            kv,
            k_pool,
            v_pool,
            kernels,
            rope,
            o_partials=True,
            qkv_v=qkv_v,
        )
        scales = kernels.norm_scales
        h, x, gate_up_v = norm(
            h.reshape(-1, shape[-1]),
            parts,
            scales["post"],
            layer,
            "gate_up",
            scales.get("attn_output"),
            layer,
        )
        parts = MLP(cfg, self.dtype, self.param_dtype, name="mlp")(
            x.reshape(shape), layer, lora, kernels, down_partials=True, gate_up_v=gate_up_v
        )
        # The last layer's "next" norm reads its own scale (clamped), and its shrink the last
        # layer's A rows; its x and v go unused.
        # The sandwich norm of down's output is this layer's (not layer + 1's, the next norm's).
        h, x, qkv_v = norm(
            h, parts, scales["input"], layer + 1, "qkv", scales.get("mlp_output"), layer
        )
        if shrink:
            return (h.reshape(shape), x.reshape(shape), qkv_v, k_pool, v_pool), None
        return (h.reshape(shape), x.reshape(shape), k_pool, v_pool), None


class Llama(nn.Module):
    """``apply({"params": p}, tokens, ...)`` -> logits (B, S, V) float32 [, updated KVCache].

    ``logit_index`` (B,) int32 keeps only one position per row: logits (B, 1, V).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype | None = None
    # False: a Python loop over layers with static slices of the stacked weights instead of
    # lax.scan (whose per-layer dynamic slices XLA may materialize as copies before each GEMM).
    scan_layers: bool = True
    # Layers per scan iteration (lax.scan's ``unroll``): fewer loop iterations, and their
    # per-iteration copies and index fusions, for a longer compile. None: per step,
    # ``scan_unroll_for_step`` (2 where lora_matmul runs every projection, else 1).
    scan_unroll: int | None = None
    # "pallas" / "pallas_interpret": decode steps (T <= the config's plain_max_tokens, or
    # max_tokens where the step's LoRA shrink runs in the kernel's K loop) run each
    # projection group through pallas_kernels.lora_matmul (base GEMM + LoRA expand in one launch)
    # reading the stacked fused kernels in place; needs the fused one-group parameter form
    # (fuse_projections), else, and with "xla", XLA's GEMMs run.
    projection_kernel: str = "xla"
    projection_config: object = None  # pallas_kernels.lora_matmul.MatmulConfig
    # True: in steps where lora_matmul runs every projection group, the residual adds after o
    # and down and the RMSNorms after them run in pallas_kernels.residual_norm (two launches a
    # layer, the norm scales read stacked at the layer index) instead of XLA's fusions and the
    # scan's slices of the scales (RunnerConfig.residual_norm, "pallas" by default).
    residual_norm: bool = False
    residual_norm_warps: int = 16  # the residual_norm kernel's num_warps
    # True (with residual_norm): in those steps, where the LoRA shrink runs in SGMV, the
    # residual-norm launches also run the q|k|v and gate|up shrinks (RunnerConfig.norm_shrink).
    norm_shrink: bool = False
    # True (with residual_norm): in those steps SwiGLU and down's shrink run in one launch
    # (RunnerConfig.swiglu_shrink).
    swiglu_shrink: bool = False
    fused_shrink_rows: int = 8
    # True: in those steps, o's shrink runs in the decode attention launch where it has one kv
    # split (RunnerConfig.attention_shrink).
    attention_shrink: bool = False

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        *,
        lora: LoraInputs | None = None,
        kv: KVCache | None = None,
        attn_mask=None,
        logit_index=None,
        return_hidden=False,
    ):
        cfg = self.config
        param_dtype = self.param_dtype or self.dtype
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=param_dtype,
            name="embed_tokens",
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), ("vocab", "embed")
            ),
        )
        h = embed(tokens)
        if cfg.embedding_multiplier is not None:
            h = h * jnp.asarray(cfg.embedding_multiplier, h.dtype)
        pools = (kv.k_pool, kv.v_pool) if kv is not None else (None, None)
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if self.is_initializing():
            # nn.scan creates the stacked parameters with their `layers` logical axis.
            stack = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (h, k_pool, v_pool), _ = stack(cfg, self.dtype, param_dtype, name="layers")(
                (h, *pools), layer_ids, positions, attn_mask, lora, kv
            )
        else:
            # A plain lax.scan when running: nn.scan traces its body once more to find broadcast
            # values and refuses bodies with effects, which Pallas calls may carry.
            layer = DecoderLayer(cfg, self.dtype, param_dtype)
            stacked = self.variables["params"]["layers"]
            kernels = None
            if self.projection_kernel != "xla" and kv is not None and kv.mode == "decode":
                kernels = projection_kernels(
                    self.variables["params"],
                    impl=self.projection_kernel,
                    config=self.projection_config,
                    residual_norm=self.residual_norm,
                    norm_warps=self.residual_norm_warps,
                    norm_shrink=self.norm_shrink,
                    swiglu_shrink=self.swiglu_shrink,
                    fused_shrink_rows=self.fused_shrink_rows,
                    attention_shrink=self.attention_shrink,
                )
            rope = model_rope_tables(cfg, positions)
            if kv is not None and kv.write_impl == "pallas" and kv.write_valid is None:
                kv = kv.replace(write_valid=kv.token_valid.astype(jnp.int32))

            def body(carry, xs):
                layer_params, layer_id = xs
                carry, _ = layer.apply(
                    {"params": layer_params},
                    carry,
                    layer_id,
                    positions,
                    attn_mask,
                    lora,
                    kv,
                    kernels,
                    rope,
                )
                return carry, None

            carry = (h, *pools)
            if (
                kernels is not None
                and kernels.norm_scales is not None
                and kernels_run_every_group(cfg, kernels, b * s, lora)
            ):
                # The first layer's input norm here; each layer then normalizes the next one's
                # input with its own residual add (DecoderLayer's four-part carry).
                scale = kernels.norm_scales["input"][0]
                x = norm_ops.rms_norm(h, scale, cfg.rms_norm_eps, self.dtype)
                carry = (h, x, *pools)
                if kernels.shrinks_in_norm(lora):
                    carry = (h, x, _group_shrink("qkv", x, 0, lora, kernels), *pools)
            if self.scan_layers:
                unroll = self.scan_unroll
                if unroll is None:
                    unroll = scan_unroll_for_step(cfg, kernels, b * s, lora)
                carry, _ = jax.lax.scan(body, carry, (stacked, layer_ids), unroll=unroll)
            else:
                for i in range(cfg.num_layers):
                    carry, _ = body(
                        carry, (jax.tree.map(lambda w, i=i: w[i], stacked), layer_ids[i])
                    )
            h, k_pool, v_pool = carry[0], carry[-2], carry[-1]
        if logit_index is not None:
            # Only these positions (B,) need logits: skip the LM head everywhere else.
            h = jnp.take_along_axis(h, logit_index[:, None, None].astype(jnp.int32), axis=1)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, param_dtype, name="norm")(h)
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(cfg.vocab_size, ("embed", "vocab"), "lm_head", self.dtype, param_dtype)(
                h
            )
        logits = _soft_cap(logits.astype(jnp.float32), cfg.final_logit_softcapping)
        out = (logits, h) if return_hidden else logits
        if kv is None:
            return out
        return out, kv.replace(k_pool=k_pool, v_pool=v_pool, write_valid=None)


def lm_head(params, config: ModelConfig, hidden: jax.Array, dtype) -> jax.Array:
    """float32 logits of final (normed) hidden states, as ``Llama``'s head computes them (the
    tied embedding's ``attend``, or the lm_head Dense), for callers that run the head on
    slices of positions (prompt logprobs)."""
    if config.tie_word_embeddings:
        weight = params["embed_tokens"]["embedding"]
        logits = jnp.dot(hidden.astype(dtype), weight.astype(dtype).T)
    else:
        weight = params["lm_head"]["kernel"]
        logits = jax.lax.dot_general(
            hidden.astype(dtype), weight.astype(dtype), (((hidden.ndim - 1,), (0,)), ((), ()))
        )
    return _soft_cap(logits.astype(jnp.float32), config.final_logit_softcapping)


def init_params(
    config: ModelConfig, rng: jax.Array | int = 0, dtype=jnp.float32, *, fuse_groups: int = 0
):
    """Random parameters as a plain pytree (logical-axis boxes removed).

    fuse_groups > 0: the fused form (``fuse_projections(params, groups=fuse_groups)``, the same
    values) from one executable. Fusing device-resident kernels afterwards frees the separate
    ones below the fused, a hole the KV pools cannot use (llama-2-7b: 8.4 GiB of an H100's
    region, forty-first session); the fused outputs come from one executable instead.
    """
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    model = Llama(config, dtype=dtype)

    def init(rng):
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        return fuse_projections(params, groups=fuse_groups) if fuse_groups else params

    return jax.jit(init)(rng)


def logical_axes(config: ModelConfig):
    """The pytree of logical axis names of the parameters (PartitionSpecs of names)."""
    model = Llama(config)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return nn.get_partition_spec(boxed["params"])
