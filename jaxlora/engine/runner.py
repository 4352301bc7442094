"""Jit-compiled model steps over the paged KV cache, one compilation per shape bucket."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig, parse_json, require_positive_ints
from jaxlora.errors import ConfigError
from jaxlora.lora import LORA_UPDATES, LoraInputs
from jaxlora.model import KVCache, Llama, lm_head
from jaxlora.sampling import MAX_LOGPROBS, SampleOutput, sample
from pallas_kernels.lora_matmul import MatmulConfig, build_shrink_rows
from pallas_kernels.paged_attention import PagedAttentionConfig
from pallas_kernels.sgmv import SgmvConfig

log = logging.getLogger("jaxlora.engine")

# RunnerConfig.prefill_attention's choices: jax.nn.dot_product_attention's implementations, or
# "auto" (jaxlora.model._prefill_attention_implementation).
PREFILL_ATTENTIONS = ("auto", "xla", "cudnn")


@flax.struct.dataclass
class StepBatch:
    """Host-built, bucket-padded inputs of one step (all int32 / bool)."""

    tokens: jax.Array  # (B, S)
    positions: jax.Array  # (B, S)
    token_valid: jax.Array  # (B, S) bool
    page_table: jax.Array  # (B, max_pages_per_seq)
    seq_lens: jax.Array  # (B,) tokens in the cache after this step (0 = padding row)
    logit_index: jax.Array  # (B,) position in S whose logits are sampled
    token_slot: jax.Array  # (B, S) adapter slot, -1 = none
    # (B,) where the row's first token is read on the device: an index into the token register
    # (the tokens the previous iteration sampled, not yet seen by the host); -1 = tokens[:, 0].
    token_src: jax.Array


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_batch: int = 32  # decode rows per step
    prefill_chunk: int = 64  # tokens of one prompt fed per prefill step
    max_prefill_rows: int = 4  # prompts prefilled together in one step
    # attention / LoRA implementation: "auto" = Pallas kernels on GPU, jnp reference elsewhere
    impl: str = "auto"
    # Row counts a step is padded to (one compilation each); None = powers of two up to the max.
    decode_buckets: tuple[int, ...] | None = None
    prefill_buckets: tuple[int, ...] | None = None
    # Layer loop of the step. "scan": lax.scan over the stacked weights (one traced layer; 2 s
    # to compile a llama-2-7b shape on the H200). "unrolled": one static slice per layer; XLA
    # then reads each layer's weights in place instead of copying its dynamic slice before the
    # GEMMs, so the bare 7B decode forward took 4.6 ms instead of 11.6 ms, but 45 s to compile
    # each shape (docs/BENCHMARKS.md, scripts/bench_step.py). Unrolled is opt-in: in the engine
    # it shortened 7B decode steps 1.5-2.2x, but its warm-up compiled 10 step shapes in 340 s
    # against 57 s for 14 with the scan (16 threads, H200 machine).
    layer_loop: str = "scan"
    # Layers per iteration of the scan loop (lax.scan's ``unroll``; 1 = one layer traced once).
    # Each iteration also runs loop bookkeeping (the layer index, the norm scales' slices, the
    # counter), which unrolling shares out among the layers it holds. None: per step
    # (jaxlora.model.scan_unroll_for_step): 2 where lora_matmul runs every projection (it reads
    # the stacked weights in place; 7B decode on the H200: 0.6-2.8% shorter batch-32 and -64
    # iterations, thirty-first session), 1 where XLA's GEMMs run: with 2 layers an iteration
    # XLA copies the weight slices its own GEMMs read (5.6-6.2 ms a step), with 1 cuBLAS reads
    # them in place (docs/BENCHMARKS.md, thirtieth session).
    scan_unroll: int | None = None
    # Tuning of the SGMV kernels (None: SgmvConfig's defaults), e.g. where decode kernels stop.
    # Its ``deterministic`` field is the runner's (``deterministic`` below): one switch.
    sgmv: SgmvConfig | None = None
    # XLA compiler options of the model step (jax.jit's ``compiler_options``) as (name, value)
    # pairs, per engine rather than process-wide XLA_FLAGS. E.g. (("xla_gpu_enable_triton_gemm",
    # False),): cuBLAS GEMMs; on the H200 an 8-layer 7B step compiled 11x faster with them, at
    # -10% to +5% of the tokens/s (docs/BENCHMARKS.md). Checked when the runner is built.
    xla_options: tuple[tuple[str, bool | int | float | str], ...] = ()
    # XLA's own GEMMs in the model step (prefill, the LM head, decode projections lora_matmul
    # does not run: MatmulConfig.plain_max_tokens / max_tokens): "cublas"
    # (xla_gpu_enable_triton_gemm off) or "autotuned" (XLA's choice, mostly its Triton GEMM
    # fusions). In the scan layer loop a Triton GEMM fusion copies each layer's weight slice
    # first (5.6 ms a 7B decode step on the H200); cuBLAS reads a one-layer slice in place
    # (docs/BENCHMARKS.md, thirtieth session). "auto": "cublas" with the compiled Pallas impl
    # (a GPU), "autotuned" elsewhere. An xla_gpu_enable_triton_gemm entry in xla_options wins
    # over this.
    xla_gemms: str = "auto"
    # Store q|k|v and gate|up as one kernel each (jaxlora.model.fuse_projections) when the engine
    # starts: one GEMM per group instead of 3 and 2. Same function; on the H200 the projections
    # of an unrolled 7B decode step took 5-16% less time (docs/BENCHMARKS.md, seventh session).
    fuse_projections: bool = True
    # "pallas": decode steps run each projection group (fused q|k|v, o, gate|up, down) through
    # pallas_kernels.lora_matmul, the base GEMM with the LoRA expand in its epilogue, one launch
    # per group (with a Pallas impl, one device and fused projections; elsewhere XLA's GEMMs
    # run). "xla": XLA's GEMMs and the SGMV delta. "auto": "pallas" with the compiled Pallas
    # impl and the scan layer loop, where lora_matmul reads each layer's weights in place and
    # XLA's GEMMs copy the layer's slice first (32-layer 7B on the H200: 1.18-2.19x the tokens/s
    # of XLA's GEMMs in the scan; docs/BENCHMARKS.md, ninth session); "xla" otherwise (the
    # unrolled loop, where the two were within 3%, and interpret mode).
    projection_kernel: str = "auto"
    # lora_matmul's tuning (None: MatmulConfig's defaults), e.g. up to which T it runs.
    matmul: MatmulConfig | None = None
    # Who rotates q, k (RoPE) and writes each step's K/V into the paged cache: "pallas"
    # (pallas_kernels.paged_attention.rope_write_kv_kernel, one launch a layer, with a Pallas
    # impl; the reference impl keeps XLA's) or "xla" (a rotation fusion, two scatters and,
    # beside lora_matmul, the slices of q, k, v). 32-layer 7B decode on the H200: 0.9-4.5%
    # shorter steps with "pallas", one layer a scan iteration (docs/BENCHMARKS.md, twelfth
    # session).
    kv_write: str = "pallas"
    # Who adds o's and down's outputs into the residual stream and runs the RMSNorm after each,
    # in decode steps where lora_matmul runs every projection group: "pallas" (pallas_kernels.
    # residual_norm, two launches a layer reading lora_matmul's split-K partials and the
    # layer-stacked norm scales in place) or "xla" (XLA's fusions, and the scan's slices of the
    # scales). "pallas" by default since the thirty-third session: 7B async decode iterations
    # on the H200 1.1-1.8% shorter at batch 32 and 64 (the rows where lora_matmul runs every
    # group), 0.1-0.8% at batch 8, in 3-4 processes each (docs/BENCHMARKS.md).
    residual_norm: str = "pallas"
    # num_warps of its launches (one program a token row), and of the fused shrinks' below: 16
    # beat 8 by 0.4-0.9% and 4 by 1.0-1.7% at batch 32 in the same measurement.
    residual_norm_warps: int = 16
    # True (opt-in, thirty-third session; 7B async iterations on the H200 1.2-3.7% longer with
    # swiglu_shrink, thirty-fifth session, docs/BENCHMARKS.md): with residual_norm
    # "pallas", decode steps whose LoRA shrink runs in SGMV (many adapters: not in lora_matmul's
    # K loop) run the q|k|v and gate|up shrinks in the residual-norm launches before them
    # (pallas_kernels.residual_norm.residual_rms_norm_shrink, ``fused_shrink_rows`` rank rows a
    # program): 2 SGMV launches a layer instead of 4. On the H200 each of those shrinks took
    # 4.1-6.5 us of a batch-32 step for 1.0-2.9 us of A rows at the copy rate.
    norm_shrink: bool = False
    # True (opt-in, thirty-third session; slower with norm_shrink, above): in those steps SwiGLU and
    # down's LoRA shrink run in one launch (pallas_kernels.swiglu.swiglu_shrink) instead of an
    # XLA fusion and an SGMV launch (down's shrink: 6.5 us of a batch-32 H200 step a layer for
    # 2.6 us of A rows at the copy rate; SwiGLU 1.8 us).
    swiglu_shrink: bool = False
    fused_shrink_rows: int = 8  # rank rows a program of those fused shrinks
    # True (opt-in, thirty-fourth session; within 1% of the default on the H200 at batch 32,
    # thirty-fifth session): in decode steps whose LoRA
    # shrink runs in SGMV and whose attention launch has one kv split (with the heuristic
    # config, 7B's 32 kv heads: batch >= 9; llama-3-8b's 8: batch >= 33), o's
    # shrink runs in that launch (pallas_kernels.paged_attention.paged_attention_shrink: each
    # (row, kv head) program dots its heads' output with their A columns; XLA sums the heads'
    # shares) instead of an SGMV launch of its own (4-5 us of a batch-32 H200 step a layer).
    # With norm_shrink and swiglu_shrink, a layer then runs no SGMV shrink launch.
    attention_shrink: bool = False
    # The decode attention launch's config (PagedAttentionConfig: keys a block, kv splits,
    # warps); None: its heuristic for each step's shapes (about two programs an SM).
    paged_attention: PagedAttentionConfig | None = None
    # True (default): the same step gives the same bits on every run. No kernel of the step adds
    # into its output with atomics: where the SGMV shrink splits its reduction among programs,
    # they write float32 partials that are summed in one fixed order (SgmvConfig.deterministic).
    # With atomic adds the order of the float additions follows the GPU's scheduling, and greedy
    # tokens with LoRA differed between two passes over the same requests on the H200; with the
    # partials they did not, at a decode-step cost within 1% (docs/BENCHMARKS.md, fourteenth
    # session). False: atomic adds (no partials to sum).
    deterministic: bool = True
    # How the SGMV expand of a step whose projections run on XLA's GEMMs (prefill, decode steps
    # past lora_matmul's rows) updates a group's output: "in_place" (the default since the
    # forty-third session: sgmv_apply, the expand reads the GEMM's output and writes it back, 4
    # bytes an element in bf16) or "delta" (sgmv_delta, the sixth session's form: the expand
    # writes a float32 delta that an XLA fusion adds to the output, 12 bytes an element for
    # q|k|v, whose consumer is the RoPE kernel, 4 more than in place for the others). Both round
    # each output once: the same values. H100, llama-2-7b, two processes each way in two
    # orders: in place gave 1.1-1.8% more tokens/s at batch 32 with one or 32 adapters (the
    # prefill's) and 3.6-4.4% at batch 128 (decode steps 2.0-2.7% shorter), none without LoRA
    # (docs/BENCHMARKS.md, forty-third session).
    lora_update: str = "in_place"
    # Positions whose logits a prefill step that computes prompt logprobs holds at once: the LM
    # head runs over the chunk's positions in slices of this many (float32 (rows, slice, vocab):
    # llama-3's 128k vocabulary at 64 positions, 33 MB a row instead of 131 MB for 256).
    prompt_logprobs_positions: int = 64
    # Prefill steps whose page table holds more key positions than this attend block by block
    # over blocks of this many, only as far as the batch's longest row (an online softmax in a
    # loop of run-time length), unless cuDNN's fused attention runs them (prefill_attention:
    # it materializes no score matrix, and its one pass took eight 8,192-token llama-3-8b
    # prompts in 3.35 s against 6.54 s blocked, 16,384-token ones in 9.04 s against 20.46;
    # H100, fifty-second session): XLA's one pass would gather and score every key of the table
    # (a (rows, heads, chunk, keys) float32 matrix). Tables of at most this many positions
    # keep the one pass. None: always one pass.
    prefill_key_block: int | None = 4096
    # Contexts (key positions) a prefill step's page table is cut to: the engine gives each
    # prefill step the narrowest of these, rounded up to whole pages, that holds its longest
    # row, where that is narrower than the whole table (max_model_len; else the whole table).
    # The one-pass attention gathers, masks and scores every key of the table it is given, so
    # without a cut a 256-token prompt of an engine at --max_model_len=4096 reads 4,096 keys a
    # layer, and at 32,768 takes the blocked path (prefill_key_block). H100, llama-3-8b, eight
    # 256-token prompts in one step (fifty-first session, XLA's attention): 124.8 -> 76.0 ms at
    # max_model_len 4,096, 191.2 (blocked) -> 77.6 ms at 32,768. Past 4,096 the widths double,
    # so that cuDNN's one pass over a long prompt's table reads less than twice its context.
    # Each width narrower than the table is one more compiled prefill step per prefill bucket
    # and LoRA variant (warm-up compiles them): at max_model_len 4,096 two, at 32,768 five.
    # Empty: every prefill step gets the whole table.
    prefill_context_buckets: tuple[int, ...] = (512, 2048, 4096, 8192, 16384, 32768, 65536)
    # The one-pass prefill attention's implementation (jax.nn.dot_product_attention's): "xla"
    # (scores materialized, masked, soft-maxed), "cudnn" (cuDNN's fused attention, the mask
    # passed as a bias; bf16 / fp16 activations on a GPU, else "xla") or "auto": cuDNN's where
    # it runs and the heads are at most 128 wide, else XLA's. H100, 8 x 256-token prefills at
    # tables cut to 512 keys (fifty-first session): cuDNN's took llama-2-7b's step from 76.5 to
    # 66.0 ms, llama-3-8b's 76.0 -> 71.8, mistral-7b's 77.6 -> 73.5, but gemma-2b's (heads of
    # 256, one KV head) 27.3 -> 32.0 (and over a 4,096-key table 33.2 -> 59.9). Soft-capped
    # models and the blocked path keep their own.
    prefill_attention: str = "auto"

    def __post_init__(self):
        if not isinstance(self.deterministic, bool):
            raise ConfigError(
                f"runner config field deterministic: expected a bool, got {self.deterministic!r}"
            )
        if self.projection_kernel not in ("auto", "xla", "pallas"):
            raise ConfigError(
                f"runner config field projection_kernel: expected 'auto', 'xla' or 'pallas', "
                f"got {self.projection_kernel!r}"
            )
        if self.lora_update not in LORA_UPDATES:
            raise ConfigError(
                f"runner config field lora_update: expected one of {list(LORA_UPDATES)}, "
                f"got {self.lora_update!r}"
            )
        if self.residual_norm not in ("xla", "pallas"):
            raise ConfigError(
                f"runner config field residual_norm: expected 'xla' or 'pallas', "
                f"got {self.residual_norm!r}"
            )
        require_positive_ints(
            self,
            ("max_batch", "prefill_chunk", "max_prefill_rows", "prompt_logprobs_positions"),
            "runner config",
        )
        if self.prefill_key_block is not None:
            require_positive_ints(self, ("prefill_key_block",), "runner config")
        buckets = self.prefill_context_buckets
        if not isinstance(buckets, tuple | list) or any(
            not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in buckets
        ):
            raise ConfigError(
                "runner config field prefill_context_buckets: expected a tuple of positive "
                f"ints (key positions), got {buckets!r}"
            )
        object.__setattr__(self, "prefill_context_buckets", tuple(sorted(set(buckets))))
        if self.prefill_attention not in PREFILL_ATTENTIONS:
            raise ConfigError(
                f"runner config field prefill_attention: expected one of "
                f"{list(PREFILL_ATTENTIONS)}, got {self.prefill_attention!r}"
            )
        for field in ("residual_norm_warps", "fused_shrink_rows"):
            value = getattr(self, field)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < 1
                or value & (value - 1)
            ):
                raise ConfigError(
                    f"runner config field {field}: expected a power of two >= 1, got {value!r}"
                )
        if self.paged_attention is not None and not isinstance(
            self.paged_attention, PagedAttentionConfig
        ):
            raise ConfigError(
                f"runner config field paged_attention: expected a PagedAttentionConfig or None, "
                f"got {self.paged_attention!r}"
            )
        if not isinstance(self.attention_shrink, bool):
            raise ConfigError(
                f"runner config field attention_shrink: expected a bool, got "
                f"{self.attention_shrink!r}"
            )
        for field in ("norm_shrink", "swiglu_shrink"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise ConfigError(f"runner config field {field}: expected a bool, got {value!r}")
            if value and self.residual_norm != "pallas":
                raise ConfigError(
                    f"runner config field {field}: needs residual_norm='pallas' (the decode steps "
                    f"it changes), got residual_norm={self.residual_norm!r}"
                )
        if self.kv_write not in ("xla", "pallas"):
            raise ConfigError(
                f"runner config field kv_write: expected 'xla' or 'pallas', got {self.kv_write!r}"
            )
        unroll = self.scan_unroll
        if unroll is not None and (not isinstance(unroll, int) or unroll < 1):
            raise ConfigError(
                f"runner config field scan_unroll: expected an int >= 1 or None, got {unroll!r}"
            )
        if self.layer_loop not in ("scan", "unrolled"):
            raise ConfigError(
                f"runner config field layer_loop: expected 'scan' or 'unrolled', "
                f"got {self.layer_loop!r}"
            )
        if self.xla_gemms not in ("auto", "cublas", "autotuned"):
            raise ConfigError(
                f"runner config field xla_gemms: expected 'auto', 'cublas' or 'autotuned', "
                f"got {self.xla_gemms!r}"
            )
        options = self.xla_options
        if isinstance(options, dict):  # a mapping is accepted and kept as sorted pairs
            options = tuple(sorted(options.items()))
        if not isinstance(options, (tuple, list)):
            raise ConfigError(
                "runner config field xla_options: expected (name, value) pairs, got "
                f"{type(options).__name__}"
            )
        for pair in options:
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not pair[0].startswith("xla_")
                or not isinstance(pair[1], (bool, int, float, str))
            ):
                raise ConfigError(
                    "runner config field xla_options: expected (name, value) pairs with an "
                    f"'xla_...' option name and a bool, number or string value, got {pair!r}"
                )
        object.__setattr__(self, "xla_options", tuple(tuple(p) for p in options))

    def sgmv_config(self) -> SgmvConfig:
        """The SGMV kernels' config as the step runs them: ``sgmv`` (or the defaults), with
        the runner's ``deterministic``."""
        config = self.sgmv or SgmvConfig()
        if config.deterministic != self.deterministic:
            config = dataclasses.replace(config, deterministic=self.deterministic)
        return config

    def projection_kernel_for(self, impl: str) -> str:
        """``Llama.projection_kernel`` for a resolved impl: "xla", or the impl whose
        ``lora_matmul`` runs the decode projections."""
        choice = self.projection_kernel
        if choice == "auto":
            choice = "pallas" if impl == "pallas" and self.layer_loop == "scan" else "xla"
        return impl if choice == "pallas" and impl != "reference" else "xla"

    def compiler_options_for(self, impl: str) -> dict:
        """The model step's XLA compiler options for a resolved impl: ``xla_gemms`` as an
        option, then ``xla_options``."""
        gemms = self.xla_gemms
        if gemms == "auto":
            gemms = "cublas" if impl == "pallas" else "autotuned"
        options = {"xla_gpu_enable_triton_gemm": False} if gemms == "cublas" else {}
        return {**options, **dict(self.xla_options)}

    def scan_layers(self) -> bool:
        return self.layer_loop == "scan"

    @property
    def register_size(self) -> int:
        """Tokens one iteration samples at most: the decode rows, then the prefill rows (each
        mode's sampler writes its own part of the register, see ``register_offset``)."""
        return self.max_batch + self.max_prefill_rows

    def register_offset(self, mode: str) -> int:
        return 0 if mode == "decode" else self.max_batch

    def prefill_table_widths(self, max_pages: int, page_size: int) -> tuple[int, ...]:
        """The page-table widths (pages) prefill steps run at, narrowest first: each of
        prefill_context_buckets in whole pages where narrower than ``max_pages``, then
        ``max_pages`` (the whole table)."""
        cut = {-(-b // page_size) for b in self.prefill_context_buckets}
        return tuple(sorted(w for w in cut if w < max_pages)) + (max_pages,)

    def prefill_table_width(self, context: int, max_pages: int, page_size: int) -> int:
        """The page-table width of a prefill step whose longest row reaches ``context``
        positions (its cached keys and this step's): the narrowest that holds them."""
        needed = -(-context // page_size)
        return next(w for w in self.prefill_table_widths(max_pages, page_size) if w >= needed)

    def buckets(self, mode: str) -> tuple[int, ...]:
        limit = self.max_batch if mode == "decode" else self.max_prefill_rows
        given = self.decode_buckets if mode == "decode" else self.prefill_buckets
        if given is None:
            given = tuple(2**i for i in range(limit.bit_length()) if 2**i < limit) + (limit,)
        sizes = tuple(sorted({min(b, limit) for b in given} | {limit}))
        if sizes[0] < 1:
            raise ConfigError(f"runner config: {mode} buckets {given} must be positive")
        return sizes


_INT32, _FLOAT32, _BOOL = np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.bool_)
_UINT32 = np.dtype(np.uint32)
_INT32_MIN, _INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class PackedInputs:
    """A step's host-built inputs (the StepBatch and the LoRA metadata: some twenty small int32,
    bool and float32 arrays) laid end to end in one int32 buffer, so that a step makes one
    host-to-device transfer instead of one per array. ``layout`` (static: part of the step's
    compilation key) records each array's shape and dtype; ``unpack`` rebuilds them on the
    device as slices of the buffer."""

    buffer: np.ndarray  # (n,) int32
    treedef: jax.tree_util.PyTreeDef
    layout: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) per leaf

    @staticmethod
    def pack(tree) -> PackedInputs:
        # Runs on every step: the common dtypes take no checks and no copies (a view for float32
        # words, a ravel view for contiguous int32); only bool and other integers are converted.
        leaves, treedef = jax.tree.flatten(tree)
        parts, layout = [], []
        for leaf in leaves:
            array = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
            dtype = array.dtype
            if dtype == _INT32:
                parts.append(array.ravel())
                kind = "int32"
            elif dtype == _FLOAT32:
                parts.append(array.ravel().view(_INT32))
                kind = "float32"
            elif dtype == _BOOL:
                parts.append(array.ravel().astype(_INT32))
                kind = "bool"
            elif dtype == _UINT32:
                parts.append(array.ravel().view(_INT32))
                kind = "uint32"
            elif np.issubdtype(dtype, np.integer):
                if array.size and (array.min() < _INT32_MIN or array.max() > _INT32_MAX):
                    raise ValueError(f"step input of dtype {dtype} does not fit int32")
                parts.append(array.ravel().astype(_INT32))
                kind = "int32"
            else:
                raise TypeError(
                    f"step input dtype {dtype}: expected an integer, bool or float32 array"
                )
            layout.append((array.shape, kind))
        buffer = np.concatenate(parts) if parts else np.zeros(0, _INT32)
        return PackedInputs(buffer=buffer, treedef=treedef, layout=tuple(layout))

    @staticmethod
    def unpack(buffer: jax.Array, treedef, layout):
        """The inputs as device arrays (static slices of the buffer, inside the jitted step)."""
        leaves, offset = [], 0
        for shape, dtype in layout:
            size = int(np.prod(shape, dtype=np.int64))
            words = buffer[offset : offset + size].reshape(shape)
            offset += size
            if dtype == "bool":
                leaves.append(words != 0)
            elif dtype in ("float32", "uint32"):
                leaves.append(jax.lax.bitcast_convert_type(words, jnp.dtype(dtype)))
            else:
                leaves.append(words)
        return jax.tree.unflatten(treedef, leaves)


@functools.partial(
    jax.jit,
    static_argnames=(
        "treedef",
        "layout",
        "register_offset",
        "num_top_logprobs",
        "apply_filters",
    ),
)
def sample_step(
    logits,
    register,
    buffer,
    pending_register=None,
    *,
    treedef,
    layout,
    register_offset: int,
    num_top_logprobs: int,
    apply_filters: bool,
):
    """Samples a step's logits (B, V) under its packed ``SamplingBatch``; returns the results
    packed for one device-to-host copy, (B, 2 + 2n) int32 (``unpack_samples``), and the token
    register with the sampled tokens written at ``register_offset`` (the next step's rows read
    them there without a round trip through the host). pending_register: the register the
    step's model read its rows' tokens from (logit processing reads a row's pending output token
    there; the iteration's earlier launches may have rewritten ``register`` since)."""
    batch = PackedInputs.unpack(buffer, treedef, layout)
    out = sample(
        logits,
        batch,
        pending_register,
        num_top_logprobs=num_top_logprobs,
        apply_filters=apply_filters,
    )
    register = jax.lax.dynamic_update_slice(register, out.tokens, (register_offset,))
    as_words = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    packed = jnp.concatenate(
        [
            out.tokens[:, None],
            as_words(out.logprobs)[:, None],
            out.top_token_ids,
            as_words(out.top_logprobs),
        ],
        axis=1,
    )
    return packed, register


def unpack_samples(packed: np.ndarray) -> SampleOutput:
    """``sample_step``'s packed results on the host, as numpy views."""
    packed = np.asarray(packed)
    n = (packed.shape[1] - 2) // 2
    return SampleOutput(
        tokens=packed[:, 0],
        logprobs=packed[:, 1].view(np.float32),
        top_token_ids=packed[:, 2 : 2 + n],
        top_logprobs=packed[:, 2 + n :].view(np.float32),
    )


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket that holds n rows: bounded compilations."""
    return next(b for b in sizes if b >= n)


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def xla_options_from_json(text: str, *, where: str) -> tuple[tuple[str, object], ...]:
    """``RunnerConfig.xla_options`` from a JSON object (a flag); ``where`` names the source."""
    options = parse_json(text or "{}", where=where)
    if not isinstance(options, dict):
        raise ConfigError(
            f"{where}: expected a JSON object {{option name: value}}, got {type(options).__name__}"
        )
    try:
        return RunnerConfig(xla_options=options).xla_options
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _check_xla_options(options: dict) -> None:
    """Unknown option names or bad values fail here, not at the first step's compilation."""
    try:
        jax.jit(lambda: jnp.zeros((), jnp.int32), compiler_options=options).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"runner config field xla_options {options}: {e}") from e


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        params,
        runner: RunnerConfig,
        *,
        dtype=jnp.float32,
        register_sharding=None,
    ):
        self.config = config
        self.params = params
        self.runner = runner
        self.impl = resolve_impl(runner.impl)
        self.sgmv_config = runner.sgmv_config()  # what the kernels and their metadata use
        projection_kernel = runner.projection_kernel_for(self.impl)
        self.projection_kernel = projection_kernel
        self.model = Llama(
            config,
            dtype=dtype,
            scan_layers=runner.scan_layers(),
            scan_unroll=runner.scan_unroll,
            projection_kernel=projection_kernel,
            projection_config=runner.matmul,
            residual_norm=runner.residual_norm == "pallas" and projection_kernel != "xla",
            residual_norm_warps=runner.residual_norm_warps,
            norm_shrink=runner.norm_shrink,
            swiglu_shrink=runner.swiglu_shrink,
            fused_shrink_rows=runner.fused_shrink_rows,
            attention_shrink=runner.attention_shrink,
        )
        if runner.xla_options:  # the user's; the one xla_gemms adds is known to XLA
            _check_xla_options(dict(runner.xla_options))
        self.compiler_options = runner.compiler_options_for(self.impl)  # what the step gets
        self._step = jax.jit(
            self._packed_forward,
            static_argnames=("treedef", "layout", "mode", "use_lora", "per_token"),
            donate_argnums=(1, 2),
            compiler_options=self.compiler_options or None,
        )
        self.compiled_shapes: set[tuple] = set()
        # Every step takes a register of the same shape (one compilation per bucket); steps
        # whose rows all read their tokens from the host get this one.
        # It is committed like the registers the samplers return, so that both hit the same
        # compiled step.
        self.empty_register = jax.device_put(
            np.zeros(runner.register_size, np.int32), register_sharding or jax.devices()[0]
        )

    def shrink_rows(self, mode: str, num_tokens: int, ranks, num_slots: int) -> np.ndarray | None:
        """``LoraInputs.shrink_rows`` for a step whose adapters are slots 0..num_slots - 1: a
        decode step that ``lora_matmul`` runs, of at most ``MatmulConfig.shrink_max_tokens``
        tokens and few enough rank rows, runs the shrink in the kernel's K loop
        (``MatmulConfig.shrink_rows``); None otherwise."""
        config = self.runner.matmul or MatmulConfig()
        if (
            self.projection_kernel == "xla"
            or mode != "decode"
            or not config.shrink_rows
            or num_tokens > min(config.max_tokens, config.shrink_max_tokens)
        ):
            return None
        return build_shrink_rows(ranks, range(num_slots), config.shrink_rows)

    def _packed_forward(
        self,
        params,
        k_pool,
        v_pool,
        lora_pools,
        register,
        buffer,
        *,
        treedef,
        layout,
        mode: str,
        use_lora: bool,
        per_token: bool,
    ):
        batch, lora_meta, prompt_targets = PackedInputs.unpack(buffer, treedef, layout)
        if per_token:
            lora_meta = {**lora_meta, "per_token": True}
        return self._forward(
            params,
            k_pool,
            v_pool,
            lora_pools,
            batch,
            lora_meta,
            mode=mode,
            use_lora=use_lora,
            register=register,
            prompt_targets=prompt_targets,
        )

    def _forward(
        self,
        params,
        k_pool,
        v_pool,
        lora_pools,
        batch: StepBatch,
        lora_meta,
        *,
        mode: str,
        use_lora: bool,
        register=None,
        prompt_targets=None,
    ):
        tokens = batch.tokens
        if register is not None:
            src = batch.token_src
            from_device = register[jnp.clip(src, 0, register.shape[0] - 1)]
            tokens = tokens.at[:, 0].set(jnp.where(src >= 0, from_device, tokens[:, 0]))
        kv = KVCache(
            k_pool=k_pool,
            v_pool=v_pool,
            page_table=batch.page_table,
            seq_lens=batch.seq_lens,
            token_valid=batch.token_valid,
            mode=mode,
            impl=self.impl,
            write_impl=self.runner.kv_write,
            attention_config=self.runner.paged_attention,
            prefill_key_block=self.runner.prefill_key_block,
            prefill_attention=self.runner.prefill_attention,
        )
        lora = None
        if use_lora:
            lora = LoraInputs(
                pools=lora_pools,
                token_slot=batch.token_slot,
                impl=self.impl,
                sgmv_config=self.sgmv_config,
                update=self.runner.lora_update,
                **lora_meta,
            )
        if prompt_targets is None:
            logits, kv = self.model.apply(
                {"params": params},
                tokens,
                batch.positions,
                lora=lora,
                kv=kv,
                logit_index=batch.logit_index,  # (only the sampled position's logits)
            )
            return logits[:, 0], kv.k_pool, kv.v_pool
        # Prompt logprobs need every position's logits: the final hidden states (the model's
        # own logits go unused, and XLA drops them) through the LM head a slice at a time.
        (_, hidden), kv = self.model.apply(
            {"params": params},
            tokens,
            batch.positions,
            lora=lora,
            kv=kv,
            return_hidden=True,
        )
        dtype = self.model.dtype
        index = batch.logit_index.astype(jnp.int32)[:, None, None]
        sampled = lm_head(params, self.config, jnp.take_along_axis(hidden, index, axis=1), dtype)
        packed = sliced_prompt_logprobs(
            lambda h: lm_head(params, self.config, h, dtype),
            hidden,
            prompt_targets,
            self.runner.prompt_logprobs_positions,
        )
        return sampled[:, 0], kv.k_pool, kv.v_pool, packed

    def run(
        self,
        mode: str,
        k_pool,
        v_pool,
        lora_pools,
        batch: StepBatch,
        lora_meta,
        use_lora: bool,
        register: jax.Array | None = None,
        prompt_targets: np.ndarray | None = None,
    ):
        """Dispatches one step (asynchronously); returns logits (B, V) and the new KV pools.
        batch and lora_meta are host (numpy) arrays: they travel in one packed transfer.
        register: the device tokens that rows with ``token_src >= 0`` read (None: none do).
        prompt_targets: (B, S) int32, the prompt token that follows each position whose
        logprob a request asked for, -1 elsewhere (None: no row asks); the step then also
        returns them, (B, S, 2 + 2 * MAX_LOGPROBS) int32 (``unpack_prompt_logprobs``)."""
        key = _shape_key(mode, batch, lora_meta, use_lora, prompt_targets is not None)
        if key not in self.compiled_shapes:
            self.compiled_shapes.add(key)
            log.info(
                "compiling step mode=%s batch=%s table pages=%s lora=%s shrink in the kernel=%s "
                "per token=%s prompt logprobs=%s (%d compiled shapes)",
                *key,
                len(self.compiled_shapes),
            )
        args, static = self._step_arguments(
            mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora, register, prompt_targets
        )
        # The packed host array goes to jit as it is: jit's own transfer of it took ~0.1 ms less
        # of the host a step than jax.device_put's (whose fresh array also slowed the call that
        # took it). It is the step's one host-to-device transfer, so a caller's guard against
        # implicit transfers lets it through and still holds for everything else.
        with jax.transfer_guard_host_to_device("allow"):
            return self._step(*args, **static)

    def _step_arguments(
        self, mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora, register, targets
    ) -> tuple[tuple, dict]:
        """The compiled step's arguments (the host inputs packed in one int32 array) and its
        static ones."""
        arrays, per_token = _split_per_token(lora_meta)
        packed = PackedInputs.pack((batch, arrays, targets))
        register = self.empty_register if register is None else register
        args = (self.params, k_pool, v_pool, lora_pools, register, packed.buffer)
        static = dict(
            treedef=packed.treedef,
            layout=packed.layout,
            mode=mode,
            use_lora=use_lora,
            per_token=use_lora and per_token,
        )
        return args, static

    def lower(
        self, mode: str, k_pool, v_pool, lora_pools, batch: StepBatch, lora_meta, use_lora: bool
    ):
        """The step lowered for these shapes (``.compile()`` fills JAX's compilation cache, so
        a later ``run`` of the same shapes does not compile again)."""
        self.compiled_shapes.add(_shape_key(mode, batch, lora_meta, use_lora))
        args, static = self._step_arguments(
            mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora, None, None
        )
        return self._step.lower(*args, **static)

    def bucket_shapes(self, max_pages: int, page_size: int) -> list[tuple[str, int, int, int]]:
        """Every step shape the engine runs: (mode, rows, tokens a row, page-table width),
        decode steps over the whole table (``max_pages``), prefill steps at each of
        ``RunnerConfig.prefill_table_widths``."""
        r = self.runner
        return [("decode", b, 1, max_pages) for b in r.buckets("decode")] + [
            ("prefill", b, r.prefill_chunk, width)
            for b in r.buckets("prefill")
            for width in r.prefill_table_widths(max_pages, page_size)
        ]


def _shape_key(
    mode: str, batch: StepBatch, lora_meta, use_lora: bool, prompt_logprobs: bool = False
) -> tuple:
    """What a step compiles for: its mode, token shape, page-table width, LoRA or not and, with
    LoRA, whether lora_matmul runs the shrink (``shrink_rows`` in the metadata) and whether the
    SGMV kernels run per token (``per_token``); and whether it returns prompt logprobs."""
    return (
        mode,
        batch.tokens.shape,
        batch.page_table.shape[1],
        use_lora,
        use_lora and "shrink_rows" in lora_meta,
        use_lora and bool(lora_meta.get("per_token", False)),
        prompt_logprobs,
    )


def pack_prompt_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Each position's logprob of its target token, that token's rank (1 + the tokens more
    likely) and the MAX_LOGPROBS most likely tokens, from the model's own distribution:
    (B, S, 2 + 2n) int32 words for one device-to-host copy (``unpack_prompt_logprobs``).
    Positions with target -1 carry those of token 0."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.maximum(targets.astype(jnp.int32), 0)[..., None]
    chosen = jnp.take_along_axis(logprobs, target, axis=-1)
    rank = 1 + jnp.sum(logprobs > chosen, axis=-1, keepdims=True, dtype=jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    as_words = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return jnp.concatenate(
        [as_words(chosen), rank, top_ids.astype(jnp.int32), as_words(top_logprobs)], axis=-1
    )


def sliced_prompt_logprobs(head, hidden: jax.Array, targets: jax.Array, positions: int):
    """``pack_prompt_logprobs`` of ``head(hidden)`` (B, S, V) computed ``positions`` positions
    at a time (lax.map over slices), so that only one slice's logits exist at once."""
    b, s, h = hidden.shape
    positions = min(positions, s)
    slices = -(-s // positions)
    pad = slices * positions - s
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    packed = jax.lax.map(
        lambda part: pack_prompt_logprobs(head(part[0]), part[1]),
        (
            hidden.reshape(b, slices, positions, h).swapaxes(0, 1),
            targets.reshape(b, slices, positions).swapaxes(0, 1),
        ),
    )
    return packed.swapaxes(0, 1).reshape(b, slices * positions, -1)[:, :s]


def unpack_prompt_logprobs(packed: np.ndarray) -> tuple[np.ndarray, ...]:
    """``pack_prompt_logprobs``' words on the host: (logprob (B, S), rank (B, S), top ids
    (B, S, n), top logprobs (B, S, n)) as numpy views."""
    packed = np.asarray(packed)
    n = (packed.shape[-1] - 2) // 2
    return (
        packed[..., 0].view(np.float32),
        packed[..., 1],
        packed[..., 2 : 2 + n],
        packed[..., 2 + n :].view(np.float32),
    )


def _split_per_token(lora_meta: dict) -> tuple[dict, bool]:
    """The metadata's host arrays (one packed transfer) and its static ``per_token`` flag (a
    Python bool: the step compiles once for each value)."""
    arrays = {k: v for k, v in lora_meta.items() if k != "per_token"}
    return arrays, bool(lora_meta.get("per_token", False))


def empty_batch(rows: int, length: int, max_pages: int) -> StepBatch:
    """A batch of padding rows: writes nothing, reads nothing (used for warm-up)."""
    zeros = np.zeros((rows, length), np.int32)
    return StepBatch(
        tokens=zeros,
        positions=zeros,
        token_valid=np.zeros((rows, length), bool),
        page_table=np.zeros((rows, max_pages), np.int32),
        seq_lens=np.zeros(rows, np.int32),
        logit_index=np.zeros(rows, np.int32),
        token_slot=np.full((rows, length), -1, np.int32),
        token_src=np.full(rows, -1, np.int32),
    )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start
