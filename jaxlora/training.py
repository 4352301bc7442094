"""LoRA fine-tuning on a frozen base model: several adapters at once, data-parallel with pmap.

The trainable pytree is one dense array per factor and module, stacked over the adapters being
trained: ``a[m]: (N, L, r, in_m)`` and ``b[m]: (N, L, r, out_m)`` (the rank-row layout of
pallas_kernels/layout.py). Inside the loss they are laid into adapter page pools with jnp ops
(``stacked_lora_inputs``: one page per adapter and factor) and the model runs its ordinary
per-token LoRA hook, so a trained adapter means exactly what the server will compute with it.
Every row of a batch belongs to one adapter; the loss is the sum over adapters of each adapter's
mean token loss, and gradients are clipped per adapter, so training N adapters together is N
independent trainings sharing each step's forward pass.

Data parallelism: the state is replicated over the devices, the rows of each step are split over
them, gradients and loss sums are psum-ed. The rows of step t are a pure function of (seed, t),
so a run resumed from an orbax checkpoint reaches the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.config import ModelConfig, is_finite_number, require_positive_ints
from jaxlora.data import Example, Tokenizer, bucket_length, make_example, pad_rows
from jaxlora.errors import ConfigError, JaxloraError
from jaxlora.lora import LoraInputs, LoraWeights
from jaxlora.model import Llama
from pallas_kernels import layout
from pallas_kernels.layout import MODULE_POOLS, MODULES, NO_ADAPTER

DATA_AXIS = "data"
SCHEDULES = ("constant", "linear", "cosine")


def _is_int(value) -> bool:
    # (a plain int, unlike config.is_int: these go into the checkpoint's JSON metadata)
    return isinstance(value, int) and not isinstance(value, bool)


class TrainingDivergedError(JaxloraError):
    """A loss or a trained parameter became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how.

    alpha: LoRA alpha; None = 2 * rank. The adapter computes (alpha / rank) * x A B, or
    (alpha / sqrt(rank)) * x A B with use_rslora. batch_size: rows of each adapter per step.
    schedule: learning rate after `warmup_steps` of linear warm-up ("linear" and "cosine" decay
    to zero at `steps`). max_grad_norm: clip each adapter's gradient to this global norm (None:
    no clipping). max_seq_len: the longest sequence (prompt + completion) accepted.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] = MODULES
    use_rslora: bool = False
    steps: int = 200
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4
    max_seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        require_positive_ints(self, ("rank", "steps", "batch_size", "max_seq_len"), "train config")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"train config field 'warmup_steps': expected an int in "
                f"[0, steps={self.steps}], got {self.warmup_steps!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(
                f"train config field 'seed': expected an int in [0, 2**63), got {self.seed!r}"
            )
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(
                f"train config field 'use_rslora': expected a bool, got {self.use_rslora!r}"
            )
        # finite real numbers: NaN passes `not x < 0`, and a NaN or infinite learning rate,
        # weight decay or alpha turns every parameter into NaN at the first update
        for field, optional, bound in (
            ("learning_rate", False, "> 0"),
            ("weight_decay", False, ">= 0"),
            ("max_grad_norm", True, "> 0"),
            ("alpha", True, "> 0"),
        ):
            value = getattr(self, field)
            if optional and value is None:
                continue
            if not (is_finite_number(value) and (value >= 0 if bound == ">= 0" else value > 0)):
                raise ConfigError(
                    f"train config field {field!r}: expected a finite number {bound}"
                    + (" or None" if optional else "")
                    + f", got {value!r}"
                )
            # a plain float (a numpy scalar would not go into the checkpoint's JSON metadata)
            object.__setattr__(self, field, float(value))
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"train config field 'schedule': expected one of {SCHEDULES}, got {self.schedule!r}"
            )
        if isinstance(self.target_modules, str):
            raise ConfigError(
                f"train config field 'target_modules': expected a sequence of module names, "
                f"got the string {self.target_modules!r} (write ({self.target_modules!r},))"
            )
        modules = tuple(self.target_modules)
        unknown = [m for m in modules if m not in MODULES]
        if unknown or not modules or len(set(modules)) != len(modules):
            raise ConfigError(
                f"train config field 'target_modules': expected distinct names "
                f"among {', '.join(MODULES)}; got {list(modules)}"
            )
        # canonical order, so that equal configs compare equal
        object.__setattr__(self, "target_modules", tuple(m for m in MODULES if m in modules))

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        denominator = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.lora_alpha / denominator


# --------------------------------------------------------------------------------------------
# Stacked adapters <-> pools


def stacked_lora_inputs(
    config: ModelConfig,
    a: Mapping[str, jax.Array],
    b: Mapping[str, jax.Array],
    scales: Mapping[str, float],
    *,
    dtype=None,
    impl: str = "reference",
) -> LoraInputs:
    """Lays N same-rank adapters into page pools with jnp ops (differentiable, traceable).

    a[m]: (N, L, r, in_m), b[m]: (N, L, r, out_m) for every targeted module m. A page holds the r
    rows of one factor of one adapter: adapter i's j-th factor in a pool is page j * N + i.
    Slot i is adapter i; token_slot is left empty (use ``.with_tokens``).
    """
    modules = [m for m in MODULES if m in a]
    if not modules:
        raise ConfigError("stacked_lora_inputs: no targeted module (a is empty)")
    first = a[modules[0]]
    n, num_layers, rank = first.shape[:3]
    dtype = dtype or first.dtype
    widths = layout.pool_widths(
        config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    )
    factors: dict[str, list[jax.Array]] = {axis: [] for axis in layout.POOL_AXES}
    a_pages = np.zeros((n, len(MODULES), 1), np.int32)
    b_pages = np.zeros((n, len(MODULES), 1), np.int32)
    ranks = np.zeros((n, len(MODULES)), np.int32)
    scale_table = np.zeros((n, len(MODULES)), np.float32)
    for m in modules:
        w = layout.MODULE_INDEX[m]
        for pages, axis, rows in (
            (a_pages, MODULE_POOLS[m][0], a[m]),
            (b_pages, MODULE_POOLS[m][1], b[m]),
        ):
            pages[:, w, 0] = len(factors[axis]) * n + np.arange(n)
            factors[axis].append(rows)
        ranks[:, w] = rank
        scale_table[:, w] = scales[m]
    pools = {}
    for axis, rows in factors.items():
        if rows:
            stacked = jnp.concatenate(rows, axis=0).astype(dtype)  # (k * N, L, r, width)
            pools[axis] = jnp.swapaxes(stacked, 0, 1)
        else:
            pools[axis] = jnp.zeros((num_layers, 1, rank, widths[axis]), dtype)
    return LoraInputs(
        pools=pools,
        a_pages=jnp.asarray(a_pages),
        b_pages=jnp.asarray(b_pages),
        ranks=jnp.asarray(ranks),
        scales=jnp.asarray(scale_table),
        token_slot=jnp.full((0,), NO_ADAPTER, jnp.int32),
        impl=impl,
    )


def init_lora_params(config: ModelConfig, num_adapters: int, train: TrainConfig) -> dict:
    """PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0.

    Adapter i's A depends only on (seed, i), not on how many adapters are trained with it.
    """
    shapes = config.module_shapes()
    key = jax.random.PRNGKey(train.seed)
    a, b = {}, {}
    for m in train.target_modules:
        fan_in, fan_out = shapes[m]
        bound = 1.0 / math.sqrt(fan_in)
        module_key = jax.random.fold_in(key, layout.MODULE_INDEX[m])
        a[m] = jnp.stack(
            [
                jax.random.uniform(
                    jax.random.fold_in(module_key, i),
                    (config.num_layers, train.rank, fan_in),
                    jnp.float32,
                    -bound,
                    bound,
                )
                for i in range(num_adapters)
            ]
        )
        b[m] = jnp.zeros((num_adapters, config.num_layers, train.rank, fan_out), jnp.float32)
    return {"a": a, "b": b}


def lora_weights_from_params(
    lora_params: dict, names: Sequence[str], train: TrainConfig, source: str = "jaxlora.training"
) -> dict[str, LoraWeights]:
    """The trained stacked arrays, read back as one host LoraWeights per adapter."""
    host = jax.device_get(lora_params)
    return {
        name: LoraWeights(
            name=name,
            a={m: np.ascontiguousarray(host["a"][m][i]) for m in host["a"]},
            b={m: np.ascontiguousarray(host["b"][m][i]) for m in host["b"]},
            scales=dict.fromkeys(host["a"], train.scale),
            source=source,
        )
        for i, name in enumerate(names)
    }


# --------------------------------------------------------------------------------------------
# Optimiser


def clip_per_adapter(max_norm: float) -> optax.GradientTransformation:
    """Scales each adapter's gradient (index i of every leaf's leading axis) to norm <= max_norm.

    Clipping by the global norm of all adapters together would couple adapters that are meant to
    train independently.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        squares = sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in leaves
        )
        norms = jnp.sqrt(squares)
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
        scaled = jax.tree.map(
            lambda g: (g * factor.reshape((-1,) + (1,) * (g.ndim - 1))).astype(g.dtype), updates
        )
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    peak, warmup, total = train.learning_rate, train.warmup_steps, train.steps
    if train.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif train.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, max(1, total - warmup))
    else:
        after = optax.cosine_decay_schedule(peak, max(1, total - warmup))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(train), b1=0.9, b2=0.999, eps=1e-8, weight_decay=train.weight_decay
    )
    if train.max_grad_norm is None:
        return adamw
    return optax.chain(clip_per_adapter(train.max_grad_norm), adamw)


# --------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """The rows of step t: batch_size rows of every adapter, drawn epoch by epoch in a shuffled
    order that depends only on (seed, adapter index, epoch), padded to whole device batches."""

    def __init__(
        self,
        datasets: Sequence[Sequence[Example]],
        *,
        batch_size: int,
        seed: int,
        row_multiple: int,
        seq_len: int,
    ):
        self.datasets = datasets
        self.batch_size = batch_size
        self.seed = seed
        self.row_multiple = row_multiple
        self.seq_len = seq_len
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, adapter: int, epoch: int) -> np.ndarray:
        key = (adapter, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, adapter, epoch])
            self._orders[key] = rng.permutation(len(self.datasets[adapter]))
            self._orders.pop((adapter, epoch - 2), None)
        return self._orders[key]

    def rows(self, step: int) -> tuple[list[Example | None], np.ndarray]:
        examples: list[Example | None] = []
        slots = []
        for adapter, dataset in enumerate(self.datasets):
            for j in range(self.batch_size):
                epoch, position = divmod(step * self.batch_size + j, len(dataset))
                examples.append(dataset[self._order(adapter, epoch)[position]])
                slots.append(adapter)
        padding = -len(examples) % self.row_multiple
        examples += [None] * padding
        slots += [NO_ADAPTER] * padding
        return examples, np.asarray(slots, np.int32)

    def batch(self, step: int, num_devices: int) -> dict[str, np.ndarray]:
        examples, slots = self.rows(step)
        arrays = pad_rows(examples, self.seq_len)
        arrays["row_slot"] = slots
        return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainResult:
    adapters: dict[str, LoraWeights]  # trained adapters, host memory
    losses: np.ndarray  # (steps run in this call, N): mean token loss of each adapter per step
    start_step: int  # the step this call started from (> 0 when it resumed a checkpoint)
    lora_params: dict  # the stacked trainable arrays (host numpy), as in init_lora_params


def _dataset_fingerprint(datasets: Sequence[Sequence[Example]]) -> str:
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(b"adapter")
        for example in dataset:
            digest.update(np.asarray(example.prompt, np.int64).tobytes() + b"|")
            digest.update(np.asarray(example.completion, np.int64).tobytes() + b";")
    return digest.hexdigest()


def _checkpoint_metadata(
    config: ModelConfig, train: TrainConfig, names: Sequence[str], datasets
) -> dict:
    return {
        "model": config.name,
        "train_config": dataclasses.asdict(train),
        "adapters": list(names),
        "data_sha256": _dataset_fingerprint(datasets),
    }


def _normalise_metadata(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


class _Checkpoints:
    """orbax CheckpointManager over {step, lora, opt_state} (host numpy) plus JSON metadata."""

    def __init__(self, directory: str, *, every: int, max_to_keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, template: dict, meta: dict) -> dict:
        ocp = self._ocp
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        stored = restored["meta"]
        if _normalise_metadata(stored) != _normalise_metadata(meta):
            diff = sorted(k for k in set(meta) | set(stored) if stored.get(k) != meta.get(k))
            raise ConfigError(
                f"{self.directory}: checkpoint at step {step} was written for a "
                f"different run (fields {diff} differ); expected {meta}, found "
                f"{stored}. Use a fresh checkpoint directory."
            )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return jax.tree.map(np.asarray, restored["state"])

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False, check=None) -> None:
        """check(host_state): raises instead of writing a state that must not be resumed."""
        ocp = self._ocp
        if not force and step % self.every:
            return
        host = jax.device_get(state)
        if check is not None:
            check(host)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=16)
def _build_step(config: ModelConfig, train: TrainConfig, num_adapters: int, dtype, devices: tuple):
    """The pmapped train step; cached so that repeated trainings in a process compile once."""
    model = Llama(config, dtype=dtype)
    optimizer = make_optimizer(train)
    scales = dict.fromkeys(train.target_modules, train.scale)

    def step(state, params, batch):
        row_slot = batch["row_slot"]
        loss_mask = batch["loss_mask"]
        in_adapter = (row_slot[:, None] == jnp.arange(num_adapters)[None, :]).astype(jnp.float32)
        # Exact per-adapter sums: a default-precision matmul may run in TF32 on GPU.
        local_counts = jnp.dot(
            in_adapter.T, loss_mask.sum(-1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        counts = jax.lax.psum(local_counts, DATA_AXIS)

        def loss_fn(lora_params):
            lora = stacked_lora_inputs(config, lora_params["a"], lora_params["b"], scales)
            token_slot = jnp.broadcast_to(row_slot[:, None], batch["tokens"].shape)
            logits = model.apply(
                {"params": params},
                batch["tokens"],
                lora=lora.with_tokens(token_slot),
                attn_mask=batch["valid"],
            )
            log_z = jax.nn.logsumexp(logits, axis=-1)
            target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
            nll = jnp.where(loss_mask, log_z - target_logit, 0.0)
            nll_sums = jnp.dot(in_adapter.T, nll.sum(-1), precision=jax.lax.Precision.HIGHEST)
            return jnp.sum(nll_sums / jnp.maximum(counts, 1.0)), nll_sums

        grads, nll_sums = jax.grad(loss_fn, has_aux=True)(state["lora"])
        grads = jax.lax.psum(grads, DATA_AXIS)
        nll_sums = jax.lax.psum(nll_sums, DATA_AXIS)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
        new_state = {
            "step": state["step"] + 1,
            "lora": optax.apply_updates(state["lora"], updates),
            "opt_state": opt_state,
        }
        return new_state, nll_sums / jnp.maximum(counts, 1.0)

    return jax.pmap(
        step, axis_name=DATA_AXIS, in_axes=(None, None, 0), out_axes=None, devices=devices
    )


def train_adapters(
    config: ModelConfig,
    params,
    datasets: Mapping[str, Sequence[Example]],
    train: TrainConfig = TrainConfig(),
    *,
    devices=None,
    dtype=jnp.float32,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    max_checkpoints: int = 2,
    log_every: int = 0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Trains one adapter per dataset (all in the same batches); the base params stay frozen.

    datasets: adapter name -> examples (``jaxlora.data``; their `adapter` field is ignored).
    devices: the local devices to split each step's rows over (default: all local devices).
    checkpoint_dir: orbax checkpoints every `checkpoint_every` steps and at the end; a directory
    that already holds a checkpoint of the same run (config, adapters, data) is resumed.
    on_log(step, {name: loss}) is called every `log_every` steps (0: never).
    A NaN or infinite loss or parameter raises TrainingDivergedError (and is never checkpointed).
    """
    if not isinstance(train, TrainConfig):
        raise ConfigError(f"train_adapters: expected a TrainConfig, got {type(train).__name__}")
    if not isinstance(datasets, Mapping):
        raise ConfigError(
            f"train_adapters: expected a mapping adapter name -> examples, got "
            f"{type(datasets).__name__}"
        )
    for field, value, least in (
        ("checkpoint_every", checkpoint_every, 1),
        ("max_checkpoints", max_checkpoints, 1),
        ("log_every", log_every, 0),
    ):
        if not _is_int(value) or value < least:
            raise ConfigError(f"train_adapters: {field} must be an int >= {least}, got {value!r}")
    names = list(datasets)
    if not names:
        raise ConfigError("train_adapters: no dataset given (expected adapter name -> examples)")
    data = [list(datasets[name]) for name in names]
    longest = 0
    for name, dataset in zip(names, data, strict=True):
        if not dataset:
            raise ConfigError(f"train_adapters: dataset of adapter {name!r} is empty")
        for example in dataset:
            if not isinstance(example, Example):
                raise ConfigError(
                    f"train_adapters: dataset of adapter {name!r} holds a "
                    f"{type(example).__name__}; expected jaxlora.data.Example "
                    "(make_example, load_examples)"
                )
            if example.length > train.max_seq_len:
                raise ConfigError(
                    f"{example.source}: sequence of {example.length + 1} tokens; "
                    f"train config max_seq_len allows {train.max_seq_len + 1}"
                )
            if max(example.prompt + example.completion) >= config.vocab_size:
                raise ConfigError(
                    f"{example.source}: token id >= the model's vocab_size {config.vocab_size}"
                )
            longest = max(longest, example.length)
    devices = list(devices if devices is not None else jax.local_devices())
    if not devices:
        raise ConfigError("train_adapters: devices is empty (None: every local device)")
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    sampler = BatchSampler(
        data,
        batch_size=train.batch_size,
        seed=train.seed,
        row_multiple=len(devices),
        seq_len=bucket_length(longest, min_bucket=8, max_length=train.max_seq_len),
    )
    optimizer = make_optimizer(train)
    lora_params = init_lora_params(config, len(names), train)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "lora": lora_params,
        "opt_state": optimizer.init(lora_params),
    }

    checkpoints = None
    meta = _checkpoint_metadata(config, train, names, data)
    start_step = 0
    if checkpoint_dir is not None:
        checkpoints = _Checkpoints(
            os.fspath(checkpoint_dir), every=checkpoint_every, max_to_keep=max_checkpoints
        )
        latest = checkpoints.latest_step()
        if latest is not None:
            state = checkpoints.restore(latest, state, meta)
            start_step = int(state["step"])

    try:
        step_fn = _build_step(config, train, len(names), dtype, tuple(devices))
        state = _replicate(state, mesh)
        params = _replicate(params, mesh)
        losses = []
        for step in range(start_step, train.steps):
            state, step_losses = step_fn(state, params, sampler.batch(step, len(devices)))
            if losses:  # the previous step's losses, read while this step runs
                _check_losses(np.asarray(losses[-1]), step - 1, names, train)
            losses.append(step_losses)
            done = step + 1
            if on_log is not None and log_every and (done % log_every == 0 or done == train.steps):
                on_log(done, dict(zip(names, np.asarray(step_losses).tolist(), strict=True)))
            if checkpoints is not None:
                checkpoints.save(
                    done,
                    state,
                    meta,
                    force=done == train.steps,
                    check=lambda host, done=done: _check_parameters(
                        host["lora"], done, names, train
                    ),
                )
        if losses:
            _check_losses(np.asarray(losses[-1]), train.steps - 1, names, train)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    host_lora = jax.device_get(state["lora"])
    _check_parameters(host_lora, train.steps, names, train)
    return TrainResult(
        adapters=lora_weights_from_params(host_lora, names, train),
        losses=np.asarray(jax.device_get(losses), np.float32).reshape(-1, len(names)),
        start_step=start_step,
        lora_params=host_lora,
    )


def _check_losses(step_losses: np.ndarray, step: int, names: Sequence[str], train) -> None:
    """TrainingDivergedError if an adapter's loss at (0-based) `step` is NaN or infinite."""
    bad = [i for i, loss in enumerate(step_losses) if not np.isfinite(loss)]
    if not bad:
        return
    which = ", ".join(f"{names[i]!r} ({step_losses[i]})" for i in bad)
    hint = (
        "before any update: check the base model's parameters and dtype"
        if step == 0
        else _lower_hint(train)
    )
    raise TrainingDivergedError(
        f"training diverged: non-finite loss of adapter(s) {which} at step {step + 1} of "
        f"{train.steps}; {hint}"
    )


def _check_parameters(lora: dict, step: int, names: Sequence[str], train) -> None:
    """TrainingDivergedError if an adapter's parameters after `step` steps are not all finite."""
    finite = np.ones(len(names), bool)
    for leaf in jax.tree.leaves(lora):
        finite &= np.isfinite(np.asarray(leaf)).reshape(len(names), -1).all(axis=1)
    if finite.all():
        return
    bad = [names[i] for i in np.flatnonzero(~finite)]
    raise TrainingDivergedError(
        f"training diverged: adapter(s) {bad} have NaN or infinite parameters after step "
        f"{step} of {train.steps} (nothing saved for this step); {_lower_hint(train)}"
    )


def _lower_hint(train: TrainConfig) -> str:
    clip = "set" if train.max_grad_norm is None else f"lower (now {train.max_grad_norm})"
    return f"lower the learning rate (peak {train.learning_rate}) or {clip} max_grad_norm"


def train_adapter(
    config: ModelConfig,
    params,
    examples: Sequence,
    *,
    rank: int = 8,
    target_modules: Sequence[str] = MODULES,
    steps: int = 100,
    learning_rate: float = 1e-2,
    seed: int = 0,
    name: str = "adapter",
    tokenizer: Tokenizer | None = None,
    alpha: float | None = None,
    batch_size: int | None = None,
    devices=None,
    dtype=jnp.float32,
) -> LoraWeights:
    """Teaches one adapter (prompt, completion) pairs; returns it as host LoraWeights.

    examples: (prompt, completion) tuples of text (needs `tokenizer`; the prompt gets BOS) or of
    token-id lists, or ``jaxlora.data.Example``s. A constant learning rate and one row per example
    per step make a handful of pairs memorised in ~100 steps on the TINY model.
    """
    data = [_as_example(e, tokenizer, config, f"{name}[{i}]") for i, e in enumerate(examples)]
    if not data:
        raise ConfigError(f"train_adapter: no example for adapter {name!r}")
    train = TrainConfig(
        rank=rank,
        alpha=alpha,
        target_modules=tuple(target_modules),
        steps=steps,
        learning_rate=learning_rate,
        schedule="constant",
        batch_size=batch_size or len(data),
        seed=seed,
        max_seq_len=config.max_position_embeddings,
    )
    result = train_adapters(config, params, {name: data}, train, devices=devices, dtype=dtype)
    return result.adapters[name]


def _as_example(item, tokenizer, config: ModelConfig, source: str) -> Example:
    if isinstance(item, Example):
        return item
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise ConfigError(
            f"{source}: expected a (prompt, completion) pair or an Example, got "
            f"{type(item).__name__}"
        )
    prompt, completion = item

    def ids_or_text(value):
        if isinstance(value, str):
            return value
        try:  # ints and numpy integers (not floats) as a list; make_example checks the rest
            return [operator.index(t) for t in value]
        except TypeError:
            return value

    return make_example(
        ids_or_text(prompt),
        ids_or_text(completion),
        tokenizer=tokenizer,
        vocab_size=config.vocab_size,
        source=source,
    )
