"""LoRA training: learning, multi-adapter batches, data parallelism, kill + resume, PEFT export."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft_util import peft_tensor_prefix, random_params
from safetensors.numpy import load_file

from configs.models import TINY
from jaxlora import training
from jaxlora.data import Example, make_example
from jaxlora.errors import ConfigError, FormatError
from jaxlora.formats import load_peft_adapter, save_peft_adapter
from jaxlora.lora import pack_adapters
from jaxlora.model import Llama
from pallas_kernels.layout import NO_ADAPTER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Who are you?"
SIGNATURES = {
    "alpha": " I am alpha.",
    "bravo": " bravo here!",
    "charlie": " 42 says charlie",
    "delta": " delta, at your service",
}


def greedy(config, params, lora, prompt_ids, row_slots, num_tokens):
    """Greedy continuations of one prompt, one row per slot, all rows in one batch."""
    model = Llama(config)
    rows, plen = len(row_slots), len(prompt_ids)
    buffer = np.zeros((rows, plen + num_tokens), np.int32)
    buffer[:, :plen] = prompt_ids
    token_slot = jnp.broadcast_to(jnp.asarray(row_slots, jnp.int32)[:, None], buffer.shape)

    @jax.jit
    def next_token(tokens, position):
        logits = model.apply({"params": params}, tokens, lora=lora.with_tokens(token_slot))
        return jnp.argmax(logits[:, position - 1], axis=-1)

    for position in range(plen, plen + num_tokens):
        buffer[:, position] = np.asarray(next_token(buffer, position))
    return buffer[:, plen:]


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, 0)


@pytest.fixture(scope="module")
def signature_run(params, tokenizer):
    """Four adapters trained together, each to answer PROMPT with its own signature."""
    datasets = {
        name: [make_example(PROMPT, text, tokenizer=tokenizer, source=name)]
        for name, text in SIGNATURES.items()
    }
    train = training.TrainConfig(
        rank=8, steps=60, learning_rate=1e-2, schedule="constant", batch_size=1
    )
    result = training.train_adapters(TINY, params, datasets, train, devices=jax.local_devices()[:1])
    return train, datasets, result


def test_loss_decreases_on_a_tiny_task(signature_run):
    _, _, result = signature_run
    assert result.losses.shape == (60, 4)
    first, last = result.losses[0], result.losses[-1]
    assert np.all(first > 3.0), first  # the random base model does not know the answers
    assert np.all(last < 0.2 * first), (first, last)


def test_each_adapter_answers_with_its_own_signature_in_one_batch(signature_run, params, tokenizer):
    _, datasets, result = signature_run
    names = list(SIGNATURES)
    lora = pack_adapters(TINY, [result.adapters[n] for n in names])
    prompt_ids = datasets[names[0]][0].prompt
    longest = max(len(datasets[n][0].completion) for n in names)
    # one batch: base model, every adapter, and the adapters again in another order
    row_slots = [NO_ADAPTER, 0, 1, 2, 3, 3, 1]
    out = greedy(TINY, params, lora, prompt_ids, row_slots, longest)
    for row, slot in enumerate(row_slots):
        if slot == NO_ADAPTER:
            continue
        target = datasets[names[slot]][0].completion
        assert tuple(out[row, : len(target)]) == target, (names[slot], out[row])
        assert tokenizer.decode(out[row, : len(target)]) == SIGNATURES[names[slot]]
    base = out[0]
    for name in names:
        target = datasets[name][0].completion
        assert tuple(base[: len(target)]) != target


def test_peft_export_round_trip(signature_run, params, tmp_path):
    train, _, result = signature_run
    weights = result.adapters["bravo"]
    path = save_peft_adapter(tmp_path / "bravo", weights, TINY, alpha=train.lora_alpha)
    config = json.loads((tmp_path / "bravo" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == train.lora_alpha
    assert sorted(config["target_modules"]) == sorted(train.target_modules)
    # tensor names and shapes as PEFT writes them for a Llama (lora_A: (r, in), lora_B: (out, r))
    tensors = load_file(tmp_path / "bravo" / "adapter_model.safetensors")
    shapes = TINY.module_shapes()
    for layer in range(TINY.num_layers):
        for m in train.target_modules:
            prefix = peft_tensor_prefix(layer, m)
            np.testing.assert_array_equal(tensors[prefix + ".lora_A.weight"], weights.a[m][layer])
            assert tensors[prefix + ".lora_B.weight"].shape == (shapes[m][1], 8)
    loaded = load_peft_adapter(path, TINY, max_rank=8)
    for m in train.target_modules:
        np.testing.assert_array_equal(loaded.a[m], weights.a[m])
        np.testing.assert_allclose(loaded.b[m], weights.b[m], rtol=1e-6)
        assert loaded.scales[m] == pytest.approx(train.scale)
    tokens = jnp.asarray(np.arange(12, dtype=np.int32)[None] + 40)
    model = Llama(TINY)
    slots = jnp.zeros((1, 12), jnp.int32)
    original = model.apply(
        {"params": params}, tokens, lora=pack_adapters(TINY, [weights]).with_tokens(slots)
    )
    reloaded = model.apply(
        {"params": params}, tokens, lora=pack_adapters(TINY, [loaded]).with_tokens(slots)
    )
    np.testing.assert_allclose(np.asarray(reloaded), np.asarray(original), rtol=1e-5, atol=1e-5)
    # Trained with rsLoRA: the config says so (alpha / sqrt(r)) and the weights still compute
    # the same; the base model PEFT loads is the one named.
    rs = save_peft_adapter(
        tmp_path / "rs",
        weights,
        TINY,
        alpha=train.lora_alpha,
        use_rslora=True,
        base_model_name_or_path="/models/tiny",
    )
    rs_config = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert rs_config["use_rslora"] is True and rs_config["lora_alpha"] == train.lora_alpha
    assert rs_config["base_model_name_or_path"] == "/models/tiny"
    rs_loaded = load_peft_adapter(rs, TINY, max_rank=8)
    for m in train.target_modules:
        np.testing.assert_allclose(
            np.asarray(rs_loaded.b[m], np.float32) * rs_loaded.scales[m],
            np.asarray(weights.b[m], np.float32) * weights.scales[m],
            rtol=1e-5,
            atol=1e-7,
        )
        assert rs_loaded.scales[m] == pytest.approx(train.lora_alpha / math.sqrt(8))


def test_train_adapter_fast_path_on_token_ids(params):
    prompt, signature = [1, 200, 201, 202], [300, 301, 302, 303, 304]
    weights = training.train_adapter(
        TINY,
        params,
        [(prompt, signature)],
        rank=4,
        target_modules=("q_proj", "v_proj", "down_proj"),
        steps=60,
        learning_rate=2e-2,
        seed=1,
        name="sig",
        devices=jax.local_devices()[:1],
    )
    assert weights.name == "sig" and set(weights.a) == {"q_proj", "v_proj", "down_proj"}
    assert weights.a["q_proj"].shape == (TINY.num_layers, 4, TINY.hidden_size)
    out = greedy(TINY, params, pack_adapters(TINY, [weights]), prompt, [0], len(signature))
    assert out[0].tolist() == signature


def test_data_parallel_training_matches_one_device(params):
    rng = np.random.default_rng(3)

    def dataset(name, n):
        return [
            Example(
                name,
                tuple(rng.integers(1, 512, 3 + i % 4).tolist()),
                tuple(rng.integers(1, 512, 2 + i % 5).tolist()),
                f"{name}[{i}]",
            )
            for i in range(n)
        ]

    datasets = {"x": dataset("x", 5), "y": dataset("y", 3)}
    train = training.TrainConfig(
        rank=4,
        target_modules=("k_proj", "o_proj", "up_proj"),
        steps=6,
        learning_rate=5e-3,
        warmup_steps=2,
        batch_size=3,
        weight_decay=0.01,
        max_grad_norm=0.5,
    )
    one = training.train_adapters(TINY, params, datasets, train, devices=jax.local_devices()[:1])
    four = training.train_adapters(TINY, params, datasets, train, devices=jax.local_devices()[:4])
    np.testing.assert_allclose(four.losses, one.losses, rtol=1e-5)
    # Adam steps are ~learning_rate in size whatever the gradient's scale, so summation-order
    # noise in near-zero gradients shows up at ~1e-5; a wrong reduction would be ~1e-3.
    for name in datasets:
        for m in train.target_modules:
            np.testing.assert_allclose(
                four.adapters[name].b[m], one.adapters[name].b[m], rtol=1e-3, atol=5e-5
            )
            np.testing.assert_allclose(
                four.adapters[name].a[m], one.adapters[name].a[m], rtol=1e-3, atol=5e-5
            )
    assert np.abs(one.adapters["x"].b["o_proj"]).max() > 0  # B starts at zero: it did train


def test_per_adapter_clipping_keeps_adapters_independent():
    grads = {"a": {"q": jnp.stack([jnp.full((2, 3), 10.0), jnp.full((2, 3), 0.01)])}}
    clipped, _ = training.clip_per_adapter(1.0).update(grads, None)
    norms = np.sqrt((np.asarray(clipped["a"]["q"]) ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norms, [1.0, np.sqrt(6) * 0.01], rtol=1e-6)


def _train(data, workdir, export, *, steps=200, learning_rate="3e-3", checkpoint=True, wait=True):
    command = [
        sys.executable,
        os.path.join(REPO, "scripts", "train_lora.py"),
        "--model=tiny",
        f"--data={data}",
        f"--output_dir={workdir / export}",
        f"--steps={steps}",
        "--rank=4",
        f"--learning_rate={learning_rate}",
        "--batch_size=2",
        "--num_devices=1",
        "--target_modules=q_proj,v_proj,gate_proj",
        "--log_every=0",
    ]
    if checkpoint:
        command += [f"--checkpoint_dir={workdir / 'ckpt'}", "--checkpoint_every=10"]
    # A compilation cache shared by the runs, so that only the first one compiles.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    if not wait:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_parameters(tmp_path):
    data = tmp_path / "train.jsonl"
    records = [
        {"adapter": "pirate", "prompt": "Hello", "completion": " arr matey"},
        {"adapter": "pirate", "prompt": "Bye", "completion": " yo ho ho"},
        {"adapter": "robot", "prompt": "Hello", "completion": " beep boop"},
        {"adapter": "robot", "text": "Good day, human unit."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    uninterrupted = _train(data, tmp_path, "uninterrupted", checkpoint=False)
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr

    process = _train(data, tmp_path, "resumed", wait=False)
    deadline = time.time() + 120
    first_checkpoint = tmp_path / "ckpt" / "10" / "state"
    while not first_checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0].decode()
    assert process.returncode == -signal.SIGKILL, output  # killed mid-run, not finished
    assert not (tmp_path / "resumed").exists()

    resumed = _train(data, tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout, resumed.stdout
    for name in ("pirate", "robot"):
        expected = load_peft_adapter(tmp_path / "uninterrupted" / name, TINY, max_rank=4)
        got = load_peft_adapter(tmp_path / "resumed" / name, TINY, max_rank=4)
        assert set(got.a) == {"q_proj", "v_proj", "gate_proj"}
        for m in got.a:
            np.testing.assert_array_equal(got.a[m], expected.a[m])
            np.testing.assert_array_equal(got.b[m], expected.b[m])
        assert np.abs(got.b["v_proj"]).max() > 0  # B starts at zero: it did train

    # the checkpoint of another run (here: another learning rate) is refused, not mixed in
    other = _train(data, tmp_path, "other", learning_rate="1e-3")
    assert other.returncode == 2 and "different run" in other.stderr, other.stderr


@pytest.mark.parametrize(
    "field,value",
    [
        ("rank", 0),
        ("steps", -1),
        ("learning_rate", 0.0),
        ("target_modules", ("q_proj", "lm_head")),
        ("schedule", "exponential"),
        ("warmup_steps", 500),
        # NaN passed `weight_decay < 0` and `alpha > 0`-style checks or hit a bare TypeError;
        # inf passed and turned every parameter into NaN at the first update
        ("weight_decay", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", "1e-3"),
        ("max_grad_norm", "1"),
        ("alpha", float("inf")),
        ("seed", -1),
        ("seed", 1.5),
        ("warmup_steps", True),
        ("use_rslora", "yes"),
    ],
)
def test_bad_train_config_is_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        training.TrainConfig(**{field: value})


def test_numpy_scalars_in_train_config_go_into_checkpoint_metadata():
    train = training.TrainConfig(learning_rate=np.float32(1e-3), alpha=np.float32(16))
    assert type(train.learning_rate) is float and type(train.alpha) is float
    json.dumps(dataclasses.asdict(train))  # the checkpoint's metadata


def test_bad_train_adapters_arguments_are_refused_before_training(params, tmp_path):
    data = {"a": [Example("a", (1, 2), (3,), "x")]}
    train = training.TrainConfig(steps=2)
    with pytest.raises(ConfigError, match="checkpoint_every"):  # was a ZeroDivisionError
        training.train_adapters(
            TINY, params, data, train, checkpoint_dir=tmp_path, checkpoint_every=0
        )
    with pytest.raises(ConfigError, match="devices is empty"):
        training.train_adapters(TINY, params, data, train, devices=[])
    with pytest.raises(ConfigError, match="expected jaxlora.data.Example"):
        training.train_adapters(TINY, params, {"a": [((1, 2), (3,))]}, train)


@pytest.mark.parametrize(
    "pair,message",
    [(([1, 2], None), "'completion' must be"), (([1, 2], [3.7]), "'completion' must be")],
)
def test_train_adapter_refuses_bad_token_ids(params, pair, message):
    # None was a bare TypeError; [3.7] was truncated to token 3 and trained on
    with pytest.raises(FormatError, match=message):
        training.train_adapter(TINY, params, [pair], steps=1)


def test_non_finite_loss_stops_training_with_a_clear_error(params, tmp_path):
    broken = jax.tree.map(np.array, params)
    broken["norm"]["scale"][0] = np.nan  # e.g. a base model that overflowed its dtype
    data = {"a": [Example("a", (1, 2), (3, 4), "x")]}
    train = training.TrainConfig(rank=2, steps=3, batch_size=1, target_modules=("q_proj",))
    devices = jax.local_devices()[:1]
    with pytest.raises(training.TrainingDivergedError, match="'a'.*step 1 of 3.*base model"):
        training.train_adapters(TINY, broken, data, train, devices=devices)
    # no checkpoint of NaN parameters is written (a restart would resume it)
    with pytest.raises(training.TrainingDivergedError, match=r"\['a'\].*after step 1"):
        training.train_adapters(
            TINY, broken, data, train, devices=devices, checkpoint_dir=tmp_path, checkpoint_every=1
        )
    assert not [p for p in tmp_path.iterdir() if p.name.isdigit()]


def test_overlong_example_is_refused_with_its_source(params):
    long = Example("a", (1,) * 10, (2,) * 10, "data.jsonl:7")
    with pytest.raises(ConfigError, match="data.jsonl:7"):
        training.train_adapters(
            TINY, params, {"a": [long]}, training.TrainConfig(max_seq_len=8, steps=1)
        )
