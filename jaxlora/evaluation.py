"""Offline evaluation of many adapters on their held-out sets, data-parallel with jax.pmap.

Per adapter: teacher-forced loss (mean token negative log-likelihood of the completions),
perplexity, token accuracy (argmax = target), and greedy exact match. Greedy decoding reproduces a
completion exactly iff every teacher-forced argmax over the completion is right (by induction on
the position: with a correct prefix, the greedy step sees exactly the teacher-forced context), so
exact match costs no generation: it is "every completion token correct".

Batches mix adapters: each row is one example, each token carries its row's adapter slot, and the
model's LoRA hook runs exactly as in serving (Pallas SGMV kernels on GPU, the jnp reference on
CPU). The base params and the adapters resident in a group are replicated on every device; each
step's rows are split over the devices; per-row statistics are all-gathered across devices (exact:
no floating-point reduction order depends on the device count) and summed per adapter on the host
in float64, in example order. The metrics are therefore identical whatever the number of devices.

Rows are padded to power-of-two lengths and batches never mix lengths, so a row's padded length
(and so its arithmetic) depends only on its own length, not on which rows share its batch.

Multi-host: call ``jax.distributed.initialize()`` first (scripts/evaluate.py --distributed);
pmap then spans every host's devices, each process feeds its own devices their share of each
global batch and reads the gathered statistics; process 0 writes the reports.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.data import Example, bucket_length, pad_rows
from jaxlora.errors import ConfigError, UnknownAdapterError
from jaxlora.lora import LoraInputs, LoraWeights, pack_adapters
from jaxlora.model import Llama
from jaxlora.training import stacked_lora_inputs
from pallas_kernels import layout
from pallas_kernels.layout import MODULES, NO_ADAPTER

EVAL_AXIS = "eval"
LORA_IMPLS = ("auto", "reference", "pallas")
BASE_MODEL_LABEL = "(base model)"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How to batch an evaluation.

    batch_size: rows per device per step. min_bucket: the shortest padded length (lengths are
    padded to powers of two from here). max_seq_len: the longest sequence accepted (None: the
    model's max_position_embeddings). max_resident_adapters: adapters replicated on the devices
    at once (None: every adapter in use); more are evaluated group after group.
    one_adapter_at_a_time: every batch holds one adapter's examples and only that adapter is
    resident (the baseline of systems that cannot batch across adapters). lora_impl: "auto"
    (Pallas kernels on GPU, jnp reference elsewhere), "reference" or "pallas".
    rows_per_page: rank-rows per page of the adapter pools built for loaded adapters.
    """

    batch_size: int = 8
    min_bucket: int = 16
    max_seq_len: int | None = None
    max_resident_adapters: int | None = None
    one_adapter_at_a_time: bool = False
    lora_impl: str = "auto"
    rows_per_page: int = 16

    def __post_init__(self):
        for field in ("batch_size", "min_bucket", "rows_per_page"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"eval config field {field!r}: expected a positive int, got {value!r}"
                )
        for field in ("max_seq_len", "max_resident_adapters"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(
                    f"eval config field {field!r}: expected a positive int or None, got {value!r}"
                )
        if self.lora_impl not in LORA_IMPLS:
            raise ConfigError(
                f"eval config field 'lora_impl': expected one of {LORA_IMPLS}, got "
                f"{self.lora_impl!r}"
            )


# --------------------------------------------------------------------------------------------
# Adapter sources: what can be made resident, and how


class AdapterSource(abc.ABC):
    """Named adapters that can be laid into page pools, a group at a time.

    ``lora_inputs(names, capacity, ...)`` returns pools whose shapes depend only on the source and
    the capacity (never on which names), so every group reuses one compiled step.
    """

    @property
    @abc.abstractmethod
    def names(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def lora_inputs(
        self, names: Sequence[str], capacity: int, *, dtype, impl: str
    ) -> LoraInputs: ...


class _PackedSource(AdapterSource):
    """Adapters of any ranks and modules, packed on the host by ``jaxlora.lora.pack_adapters``."""

    def __init__(
        self, config: ModelConfig, ranks: Mapping[str, Mapping[str, int]], *, rows_per_page: int
    ):
        self.config = config
        self._ranks = {name: dict(r) for name, r in ranks.items()}
        self.rows_per_page = rows_per_page

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._ranks)

    @abc.abstractmethod
    def load(self, name: str) -> LoraWeights: ...

    def pool_config(self, capacity: int) -> LoraPoolConfig:
        max_rank = max((r for ranks in self._ranks.values() for r in ranks.values()), default=1)
        # Each pool holds `capacity` of the adapters that take the most of its pages.
        most = dict.fromkeys(layout.POOL_AXES, 1)
        for ranks in self._ranks.values():
            for axis, n in layout.pool_pages_needed(ranks, self.rows_per_page).items():
                most[axis] = max(most[axis], n)
        return LoraPoolConfig(
            max_rank=max(1, max_rank),
            rows_per_page=self.rows_per_page,
            pages_per_pool=capacity * max(most.values()),
            max_slots=capacity,
            axis_pages=tuple((axis, capacity * n) for axis, n in most.items()),
        )

    def lora_inputs(self, names, capacity, *, dtype, impl):
        weights = [self.load(name) for name in names]
        return pack_adapters(
            self.config, weights, self.pool_config(capacity), dtype=dtype, impl=impl
        )


class HostAdapters(_PackedSource):
    """Adapters already in host memory (trained in this process, or loaded by the caller)."""

    def __init__(
        self, config: ModelConfig, adapters: Mapping[str, LoraWeights], *, rows_per_page: int = 16
    ):
        super().__init__(
            config, {name: w.ranks for name, w in adapters.items()}, rows_per_page=rows_per_page
        )
        self._adapters = dict(adapters)

    def load(self, name: str) -> LoraWeights:
        return self._adapters[name]


class PeftAdapters(_PackedSource):
    """PEFT adapter directories; headers are checked up front, weights read when resident."""

    def __init__(
        self,
        config: ModelConfig,
        paths: Mapping[str, str | os.PathLike],
        *,
        max_rank: int = 256,
        rows_per_page: int = 16,
        dtype=np.float32,
    ):
        from jaxlora.formats import read_peft_adapter_spec

        self._specs = {
            name: read_peft_adapter_spec(path, config, max_rank=max_rank, name=name)
            for name, path in paths.items()
        }
        super().__init__(
            config,
            {name: spec.ranks for name, spec in self._specs.items()},
            rows_per_page=rows_per_page,
        )
        self._paths = {name: os.fspath(path) for name, path in paths.items()}
        self._max_rank = max_rank
        self._dtype = dtype

    def load(self, name: str) -> LoraWeights:
        from jaxlora.formats import load_peft_adapter

        return load_peft_adapter(
            self._paths[name], self.config, max_rank=self._max_rank, name=name, dtype=self._dtype
        )


class RandomAdapters(AdapterSource):
    """`count` random adapters of one rank, generated on the device (benchmarks, tests).

    Adapter i's weights depend only on (seed, i), whichever group it is made resident with.
    A rows ~ N(0, 1/in), B rows ~ N(0, 1/r): each layer's LoRA delta is of the order of `scale`
    times its input's RMS.
    """

    def __init__(
        self,
        config: ModelConfig,
        count: int,
        *,
        rank: int = 16,
        target_modules: Sequence[str] = MODULES,
        scale: float = 0.1,
        seed: int = 0,
        prefix: str = "random-",
    ):
        if count <= 0 or rank <= 0:
            raise ConfigError(
                f"RandomAdapters: count and rank must be positive, got count={count}, rank={rank}"
            )
        unknown = [m for m in target_modules if m not in MODULES]
        if unknown or not target_modules:
            raise ConfigError(
                f"RandomAdapters: target_modules {list(target_modules)}; expected "
                f"names among {', '.join(MODULES)}"
            )
        self.config = config
        self.rank = rank
        self.target_modules = tuple(m for m in MODULES if m in target_modules)
        self.scale = scale
        self.seed = seed
        width = len(str(count - 1))
        self._names = tuple(f"{prefix}{i:0{width}d}" for i in range(count))
        self._index = {name: i for i, name in enumerate(self._names)}

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def lora_inputs(self, names, capacity, *, dtype, impl):
        indices = np.full(capacity, -1, np.int32)
        indices[: len(names)] = [self._index[n] for n in names]
        a, b = _random_stacked(
            self.config,
            jnp.asarray(indices),
            self.rank,
            self.target_modules,
            self.seed,
            jnp.dtype(dtype),
        )
        return stacked_lora_inputs(
            self.config, a, b, dict.fromkeys(self.target_modules, self.scale), impl=impl
        )


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _random_stacked(config: ModelConfig, indices, rank, modules, seed, dtype):
    shapes = config.module_shapes()
    key = jax.random.PRNGKey(seed)

    def one(index, m, factor, width, std):
        k = jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(key, index), layout.MODULE_INDEX[m]), factor
        )
        rows = jax.random.normal(k, (config.num_layers, rank, width), jnp.float32) * std
        return jnp.where(index >= 0, rows, 0.0).astype(dtype)  # index -1: an empty slot

    a, b = {}, {}
    for m in modules:
        fan_in, fan_out = shapes[m]
        a[m] = jax.vmap(lambda i, m=m, w=fan_in: one(i, m, 0, w, 1 / math.sqrt(w)))(indices)
        b[m] = jax.vmap(lambda i, m=m, w=fan_out: one(i, m, 1, w, 1 / math.sqrt(rank)))(indices)
    return a, b


def synthetic_examples(
    adapters: Sequence[str | None],
    per_adapter: int,
    *,
    prompt_len: int,
    completion_len: int,
    vocab_size: int,
    seed: int = 0,
) -> list[Example]:
    """Random-token examples, `per_adapter` for each adapter, interleaved (for benchmarks).

    Interleaving means consecutive examples belong to different adapters, the order in which
    requests for many adapters arrive at a shared service.
    """
    if per_adapter <= 0 or prompt_len <= 0 or completion_len <= 0:
        raise ConfigError(
            f"synthetic_examples: per_adapter ({per_adapter}), prompt_len "
            f"({prompt_len}) and completion_len ({completion_len}) must be positive"
        )
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(per_adapter):
        for adapter in adapters:
            ids = rng.integers(0, vocab_size, prompt_len + completion_len).tolist()
            examples.append(
                Example(
                    adapter,
                    tuple(ids[:prompt_len]),
                    tuple(ids[prompt_len:]),
                    f"synthetic[{adapter}][{i}]",
                )
            )
    return examples


# --------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass(frozen=True)
class AdapterMetrics:
    adapter: str | None  # None: the base model
    examples: int
    tokens: int  # completion tokens scored
    loss: float  # mean negative log-likelihood per token (nats)
    perplexity: float
    accuracy: float  # fraction of completion tokens whose argmax is the target
    exact_match: float  # fraction of examples whose greedy continuation is the completion

    @property
    def label(self) -> str:
        return BASE_MODEL_LABEL if self.adapter is None else self.adapter


@dataclasses.dataclass
class EvalReport:
    adapters: list[AdapterMetrics]  # in order of first appearance in the data
    devices: int
    device_kind: str
    mode: str  # "mixed" | "one_adapter_at_a_time"
    lora_impl: str
    steps: int
    rows: int  # real rows (examples); padding rows excluded
    padded_rows: int
    tokens_forwarded: int  # real positions run through the model (padding excluded)
    tokens_padded: int  # positions run including padding
    compile_s: float  # compiling (and the first run of) each step shape, before the timed loop
    eval_s: float  # the timed loop: adapter loads, host batching, steps, metric transfers
    tokens_per_s: float  # tokens_forwarded / eval_s

    def by_adapter(self) -> dict[str | None, AdapterMetrics]:
        return {m.adapter: m for m in self.adapters}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adapters"] = [dataclasses.asdict(m) for m in self.adapters]
        return out

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def csv_text(self) -> str:
        buffer = io.StringIO()
        fields = [f.name for f in dataclasses.fields(AdapterMetrics)]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for m in self.adapters:
            row = dataclasses.asdict(m)
            row["adapter"] = "" if m.adapter is None else m.adapter
            writer.writerow(row)
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            f.write(self.csv_text())

    def format_table(self) -> str:
        header = ("adapter", "examples", "tokens", "loss", "ppl", "token acc", "exact")
        rows = [
            (
                m.label,
                str(m.examples),
                str(m.tokens),
                f"{m.loss:.4f}",
                f"{m.perplexity:.3f}",
                f"{m.accuracy:.2%}",
                f"{m.exact_match:.2%}",
            )
            for m in self.adapters
        ]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
        lines.append(
            f"{self.rows} examples, {self.tokens_forwarded} tokens forwarded in "
            f"{self.steps} steps on {self.devices} x {self.device_kind} ({self.mode}, "
            f"lora={self.lora_impl}): {self.eval_s:.2f} s, {self.tokens_per_s:,.0f} "
            f"tokens/s (compile {self.compile_s:.1f} s excluded)"
        )
        return "\n".join(lines)


class ProgressBar:
    """A one-line progress display on a terminal (a line per 10% elsewhere)."""

    def __init__(self, total: int, *, stream=None, enabled: bool = True, label: str = "eval"):
        self.total = max(1, total)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.label = label
        self.start = time.perf_counter()
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def update(self, done: int, tokens: int) -> None:
        if not self.enabled:
            return
        fraction = min(1.0, done / self.total)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        text = (
            f"{self.label} [{'#' * int(fraction * 30):<30}] {done}/{self.total} steps, "
            f"{tokens / elapsed:,.0f} tok/s"
        )
        if self.interactive:
            self.stream.write("\r" + text)
            self.stream.flush()
        elif int(fraction * 10) > self._last_decile:
            self._last_decile = int(fraction * 10)
            self.stream.write(text + "\n")

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass(frozen=True)
class _Step:
    group: int
    length: int  # padded positions per row
    rows: tuple[int, ...]  # example indices, -1 for padding rows; global batch order


def _plan_groups(
    examples: Sequence[Example], names: Sequence[str | None], config: EvalConfig
) -> tuple[list[tuple[str, ...]], list[list[int]], int]:
    """Resident adapter groups, the examples evaluated with each, and the pool capacity."""
    adapters = [n for n in names if n is not None]
    if config.one_adapter_at_a_time:
        groups = [(n,) for n in adapters]
        members = {n: g for g, n in enumerate(adapters)}
        if None in names:
            groups.append(())
            members[None] = len(groups) - 1
        capacity = 1
    else:
        capacity = max(1, min(len(adapters), config.max_resident_adapters or len(adapters)))
        groups = [tuple(adapters[i : i + capacity]) for i in range(0, len(adapters), capacity)]
        groups = groups or [()]
        members = {n: g for g, group in enumerate(groups) for n in group}
        members[None] = 0
    assigned: list[list[int]] = [[] for _ in groups]
    for i, example in enumerate(examples):
        assigned[members[example.adapter]].append(i)
    return groups, assigned, capacity


def _plan_steps(
    examples: Sequence[Example],
    assigned: Sequence[Sequence[int]],
    *,
    global_rows: int,
    min_bucket: int,
    max_length: int,
    num_devices: int = 1,
    row_buckets: bool = False,
) -> list[_Step]:
    """Steps of global_rows rows (padding rows -1). With row_buckets, a step's last, partial
    batch is padded only to the next power-of-two rows per device (one compilation per bucket):
    the one-adapter-at-a-time baseline then computes its examples, not padding, as a system
    that batches per adapter would."""
    steps = []
    for group, indices in enumerate(assigned):
        by_length: dict[int, list[int]] = {}
        for i in indices:
            length = bucket_length(examples[i].length, min_bucket=min_bucket, max_length=max_length)
            by_length.setdefault(length, []).append(i)
        for length in sorted(by_length):
            rows = by_length[length]
            for start in range(0, len(rows), global_rows):
                chunk = rows[start : start + global_rows]
                width = global_rows
                if row_buckets:
                    per_device = -(-len(chunk) // num_devices)
                    width = min(global_rows, num_devices * (1 << (per_device - 1).bit_length()))
                steps.append(_Step(group, length, tuple(chunk) + (-1,) * (width - len(chunk))))
    return steps


# --------------------------------------------------------------------------------------------
# The pmapped step


def _resolve_impl(requested: str, devices) -> str:
    on_gpu = all(d.platform == "gpu" for d in devices)
    if requested == "auto":
        return "pallas" if on_gpu else "reference"
    if requested == "pallas" and not on_gpu:
        return "pallas_interpret"
    return requested


@functools.lru_cache(maxsize=16)
def _build_eval_step(config: ModelConfig, dtype, devices: tuple, num_slots: int, impl: str):
    model = Llama(config, dtype=dtype)

    def step(params, lora: LoraInputs, tokens, targets, loss_mask, valid, row_slot):
        token_slot = jnp.broadcast_to(row_slot[:, None], tokens.shape)
        lora = lora.with_tokens(token_slot)
        if impl != "reference":
            from pallas_kernels.sgmv import build_sgmv_metadata_jnp

            # once per step, instead of once per kernel launch inside the layers
            lora = lora.replace(
                kernel_meta=build_sgmv_metadata_jnp(token_slot.reshape(-1), num_slots)
            )
        logits = model.apply({"params": params}, tokens, lora=lora, attn_mask=valid)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        nll = jnp.where(loss_mask, log_z - target_logit, 0.0).sum(-1)
        correct = (jnp.argmax(logits, axis=-1) == targets) & loss_mask
        counts = jnp.stack(
            [loss_mask.sum(-1), correct.sum(-1), jnp.all(correct | ~loss_mask, axis=-1)], axis=-1
        ).astype(jnp.int32)
        # all_gather, not psum: concatenation is exact, so no sum order depends on the devices
        return (
            jax.lax.all_gather(nll, EVAL_AXIS, tiled=True),
            jax.lax.all_gather(counts, EVAL_AXIS, tiled=True),
        )

    return jax.pmap(
        step,
        axis_name=EVAL_AXIS,
        in_axes=(None, None, 0, 0, 0, 0, 0),
        out_axes=None,
        devices=devices,
    )


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    config: ModelConfig,
    params,
    examples: Sequence[Example],
    adapters: AdapterSource | None = None,
    eval_config: EvalConfig = EvalConfig(),
    *,
    devices=None,
    dtype=jnp.float32,
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Evaluates every example with its adapter (None: the base model); see the module doc.

    devices: the devices to spread each step over (default: every device of every process).
    on_step(steps_done, steps_total) is called after each step (e.g. for a custom progress view).
    """
    if not examples:
        raise ConfigError("evaluate: no examples")
    if not isinstance(eval_config, EvalConfig):
        raise ConfigError(f"evaluate: expected an EvalConfig, got {type(eval_config).__name__}")
    if adapters is not None and not isinstance(adapters, AdapterSource):
        raise ConfigError(
            f"evaluate: adapters must be an AdapterSource (HostAdapters, PeftAdapters, "
            f"RandomAdapters) or None; got {type(adapters).__name__}"
        )
    for example in examples:
        if not isinstance(example, Example):
            raise ConfigError(
                f"evaluate: expected jaxlora.data.Example items (make_example, "
                f"load_examples); got {type(example).__name__}"
            )
    names: list[str | None] = list(dict.fromkeys(e.adapter for e in examples))
    known = set(adapters.names) if adapters is not None else set()
    for example in examples:
        if example.adapter is not None and example.adapter not in known:
            raise UnknownAdapterError(
                f"{example.source}: adapter {example.adapter!r} is not among the "
                f"{len(known)} adapters given"
                + (f" (e.g. {sorted(known)[:5]})" if known else " (none were given)")
            )
    max_length = eval_config.max_seq_len or config.max_position_embeddings
    for example in examples:
        if example.length > max_length:
            raise ConfigError(
                f"{example.source}: sequence of {example.length + 1} tokens; at "
                f"most {max_length + 1} allowed (eval config max_seq_len)"
            )
        if max(example.prompt + example.completion) >= config.vocab_size:
            raise ConfigError(
                f"{example.source}: token id >= the model's vocab_size {config.vocab_size}"
            )

    devices = list(devices if devices is not None else jax.devices())
    if not devices:
        raise ConfigError("evaluate: devices is empty (None: every device)")
    local = [d for d in devices if d.process_index == jax.process_index()]
    local_positions = [devices.index(d) for d in local]
    impl = _resolve_impl(eval_config.lora_impl, devices)
    mesh = Mesh(np.array(devices), (EVAL_AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = eval_config.batch_size
    groups, assigned, capacity = _plan_groups(examples, names, eval_config)
    plan = _plan_steps(
        examples,
        assigned,
        global_rows=batch * len(devices),
        min_bucket=eval_config.min_bucket,
        max_length=max_length,
        num_devices=len(devices),
        row_buckets=eval_config.one_adapter_at_a_time,
    )
    step_fn = _build_eval_step(config, dtype, tuple(devices), capacity, impl)
    params = jax.device_put(params, replicated)

    def group_lora(group: int) -> LoraInputs:
        if adapters is None:
            # the base model alone: one empty slot, so the step has its usual inputs
            lora = pack_adapters(
                config,
                [],
                LoraPoolConfig(max_rank=16, rows_per_page=16, pages_per_pool=1, max_slots=1),
                dtype=dtype,
                impl=impl,
            )
        else:
            lora = adapters.lora_inputs(groups[group], capacity, dtype=dtype, impl=impl)
        return jax.device_put(lora, replicated)

    def host_batch(step: _Step, lora_slots: dict[str | None, int]) -> dict[str, np.ndarray]:
        rows = [examples[i] if i >= 0 else None for i in step.rows]
        arrays = pad_rows(rows, step.length)
        arrays["row_slot"] = np.array(
            [lora_slots[r.adapter] if r is not None else NO_ADAPTER for r in rows], np.int32
        )
        # this process's devices only, as (local devices, rows per device, ...)
        per_device = len(step.rows) // len(devices)
        return {
            k: v.reshape(len(devices), per_device, *v.shape[1:])[local_positions]
            for k, v in arrays.items()
        }

    def run(lora, arrays):
        return step_fn(
            params,
            lora,
            arrays["tokens"],
            arrays["targets"],
            arrays["loss_mask"],
            arrays["valid"],
            arrays["row_slot"],
        )

    def slots_of(group: int) -> dict[str | None, int]:
        return {None: NO_ADAPTER, **{n: s for s, n in enumerate(groups[group])}}

    # Compile every step shape outside the timed loop (one run of a padding-only batch each).
    compile_start = time.perf_counter()
    if plan:
        lora = group_lora(plan[0].group)
        for length, width in sorted({(s.length, len(s.rows)) for s in plan}):
            jax.block_until_ready(
                run(lora, host_batch(_Step(plan[0].group, length, (-1,) * width), {}))
            )
        del lora
    compile_s = time.perf_counter() - compile_start

    nll = np.zeros(len(examples), np.float64)
    counts = np.zeros((len(examples), 3), np.int64)
    bar = ProgressBar(len(plan), enabled=progress and jax.process_index() == 0)
    tokens_forwarded = sum(e.length for e in examples)
    done_tokens = 0
    pending = None  # the step in flight: its results are read after the next one is dispatched

    def collect(step: _Step, outputs) -> int:
        step_nll, step_counts = (np.asarray(x) for x in outputs)
        real = np.asarray(step.rows) >= 0
        ids = np.asarray(step.rows)[real]
        nll[ids] = step_nll[real]
        counts[ids] = step_counts[real]
        return int(sum(examples[i].length for i in ids))

    start = time.perf_counter()
    current_group, lora, slots = -1, None, {}
    for index, step in enumerate(plan):
        if step.group != current_group:
            current_group, lora = step.group, None
            lora = group_lora(step.group)
            slots = slots_of(step.group)
        outputs = run(lora, host_batch(step, slots))
        if pending is not None:
            done_tokens += collect(*pending)
            bar.update(index, done_tokens)
            if on_step is not None:
                on_step(index, len(plan))
        pending = (step, outputs)
    if pending is not None:
        done_tokens += collect(*pending)
        bar.update(len(plan), done_tokens)
        if on_step is not None:
            on_step(len(plan), len(plan))
    eval_s = time.perf_counter() - start
    bar.close()

    metrics = []
    for name in names:
        ids = [i for i, e in enumerate(examples) if e.adapter == name]
        tokens = int(counts[ids, 0].sum())
        loss = float(np.sum(nll[ids])) / max(tokens, 1)
        metrics.append(
            AdapterMetrics(
                adapter=name,
                examples=len(ids),
                tokens=tokens,
                loss=loss,
                perplexity=math.exp(min(loss, 700.0)),
                accuracy=float(counts[ids, 1].sum()) / max(tokens, 1),
                exact_match=float(counts[ids, 2].sum()) / len(ids),
            )
        )
    return EvalReport(
        adapters=metrics,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        mode="one_adapter_at_a_time" if eval_config.one_adapter_at_a_time else "mixed",
        lora_impl=impl,
        steps=len(plan),
        rows=len(examples),
        padded_rows=sum(len(s.rows) for s in plan) - len(examples),
        tokens_forwarded=tokens_forwarded,
        tokens_padded=sum(s.length * len(s.rows) for s in plan),
        compile_s=compile_s,
        eval_s=eval_s,
        tokens_per_s=tokens_forwarded / eval_s if eval_s > 0 else 0.0,
    )
