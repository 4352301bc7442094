"""Offline evaluation: exact metrics whatever the device count, against a direct computation, on
trained adapters, through the script; and the JSONL dataset reader."""

import collections
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags_of_users
from peft_util import random_params, write_random_peft_adapter

from configs.models import TINY
from jaxlora import evaluation, training
from jaxlora.data import Example, load_examples, make_example
from jaxlora.errors import ConfigError, FormatError, UnknownAdapterError
from jaxlora.formats import save_peft_adapter
from jaxlora.model import Llama
from jaxlora.tokenizer import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, 0)


@pytest.fixture(scope="module")
def random_setup():
    """Five random adapters and 23 examples (base model rows included), all of one bucket."""
    source = evaluation.RandomAdapters(
        TINY,
        5,
        rank=4,
        scale=0.5,
        seed=7,
        target_modules=("q_proj", "o_proj", "up_proj", "down_proj"),
    )
    rng = np.random.default_rng(0)
    examples = []
    for i in range(23):
        adapter = None if i % 6 == 0 else source.names[i % 5]
        prompt = rng.integers(0, TINY.vocab_size, rng.integers(1, 8)).tolist()
        completion = rng.integers(0, TINY.vocab_size, rng.integers(1, 9)).tolist()
        examples.append(Example(adapter, tuple(prompt), tuple(completion), f"row{i}"))
    return source, examples


def test_metrics_are_identical_on_1_and_4_devices_and_one_adapter_at_a_time(params, random_setup):
    source, examples = random_setup
    devices = jax.local_devices()
    one = evaluation.evaluate(
        TINY, params, examples, source, evaluation.EvalConfig(batch_size=3), devices=devices[:1]
    )
    # one adapter resident at a time, but batches that still mix in the base-model rows
    four = evaluation.evaluate(
        TINY,
        params,
        examples,
        source,
        evaluation.EvalConfig(batch_size=3, max_resident_adapters=1),
        devices=devices[:4],
    )
    single = evaluation.evaluate(
        TINY,
        params,
        examples,
        source,
        evaluation.EvalConfig(batch_size=3, one_adapter_at_a_time=True),
        devices=devices[:4],
    )
    assert one.adapters == four.adapters == single.adapters  # exact, not approximately
    assert (one.devices, four.devices) == (1, 4)
    assert one.steps == 8 and four.steps == 5 and single.steps == 6
    assert one.rows == 23 and four.padded_rows == 5 * 12 - 23
    # the baseline pads each adapter's batch only to a power of two rows per device
    sizes = collections.Counter(e.adapter for e in examples).values()
    widths = [4 * (1 << (-(-n // 4) - 1).bit_length()) for n in sizes]
    assert single.padded_rows == sum(widths) - 23 < 6 * 12 - 23
    assert [m.adapter for m in one.adapters] == [None] + [source.names[i] for i in (1, 2, 3, 4, 0)]
    assert sum(m.examples for m in one.adapters) == 23
    assert one.tokens_forwarded == sum(e.length for e in examples)


def test_metrics_match_a_direct_computation(params, random_setup):
    source, examples = random_setup
    report = evaluation.evaluate(
        TINY,
        params,
        examples,
        source,
        evaluation.EvalConfig(batch_size=3),
        devices=jax.local_devices()[:1],
    )
    # every example in one batch, through the model directly, metrics in numpy
    lora = source.lora_inputs(source.names, 5, dtype=jnp.float32, impl="reference")
    tokens = np.zeros((len(examples), 16), np.int32)
    slots = np.full((len(examples), 16), -1, np.int32)
    for i, e in enumerate(examples):
        ids = e.prompt + e.completion
        tokens[i, : len(ids)] = ids
        slots[i] = -1 if e.adapter is None else source.names.index(e.adapter)
    logits = np.asarray(
        Llama(TINY).apply(
            {"params": params}, jnp.asarray(tokens), lora=lora.with_tokens(jnp.asarray(slots))
        ),
        np.float64,
    )
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    for metrics in report.adapters:
        nll, correct, tokens_scored, exact = 0.0, 0, 0, 0
        rows = [i for i, e in enumerate(examples) if e.adapter == metrics.adapter]
        for i in rows:
            e = examples[i]
            positions = range(len(e.prompt) - 1, len(e.prompt) + len(e.completion) - 1)
            targets = e.completion
            nll -= sum(log_probs[i, p, t] for p, t in zip(positions, targets, strict=True))
            hits = [
                int(np.argmax(logits[i, p]) == t) for p, t in zip(positions, targets, strict=True)
            ]
            correct += sum(hits)
            tokens_scored += len(targets)
            exact += all(hits)
        assert metrics.examples == len(rows) and metrics.tokens == tokens_scored
        assert metrics.loss == pytest.approx(nll / tokens_scored, rel=1e-5)
        assert metrics.perplexity == pytest.approx(np.exp(nll / tokens_scored), rel=1e-4)
        assert metrics.accuracy == correct / tokens_scored
        assert metrics.exact_match == exact / len(rows)


def test_trained_adapter_beats_the_base_model_and_another_adapter(params, tmp_path):
    tok = tiny_tokenizer()
    data = {
        "weather": [
            ("What is the weather?", " Sunny and warm."),
            ("Will it rain?", " No rain today."),
            ("Forecast please.", " Clear skies ahead."),
        ],
        "cooking": [
            ("How to boil an egg?", " Boil it ten minutes."),
            ("Best pasta sauce?", " Tomato and basil."),
        ],
    }
    datasets = {
        name: [
            make_example(p, c, tokenizer=tok, adapter=name, source=f"{name}[{i}]")
            for i, (p, c) in enumerate(pairs)
        ]
        for name, pairs in data.items()
    }
    train = training.TrainConfig(
        rank=8, steps=80, learning_rate=1e-2, schedule="constant", batch_size=3
    )
    trained = training.train_adapters(
        TINY, params, datasets, train, devices=jax.local_devices()[:1]
    )
    paths = {
        name: save_peft_adapter(tmp_path / name, weights, TINY, alpha=train.lora_alpha)
        for name, weights in trained.adapters.items()
    }
    adapters = evaluation.PeftAdapters(TINY, paths, max_rank=8)
    # the weather set scored with its own adapter, with no adapter, and with the cooking one
    held_out = [
        Example(adapter, e.prompt, e.completion, e.source)
        for adapter in ("weather", None, "cooking")
        for e in datasets["weather"]
    ]
    report = evaluation.evaluate(
        TINY,
        params,
        held_out,
        adapters,
        evaluation.EvalConfig(batch_size=4),
        devices=jax.local_devices()[:1],
    ).by_adapter()
    own, base, other = report["weather"], report[None], report["cooking"]
    assert own.loss < 0.5 * base.loss and own.loss < 0.5 * other.loss
    assert own.perplexity < base.perplexity and own.perplexity < other.perplexity
    assert own.accuracy == 1.0 and own.exact_match == 1.0
    assert base.accuracy < 0.5 and other.exact_match == 0.0


@pytest.mark.slow
def test_evaluate_script_writes_table_json_and_csv(tmp_path):
    adapters = tmp_path / "adapters"
    for seed, name in enumerate(("sql", "chat")):
        write_random_peft_adapter(
            adapters / name,
            TINY,
            rank=4 + 4 * seed,
            seed=seed,
            target_modules=("q_proj", "v_proj", "down_proj"),
        )
    data = tmp_path / "heldout.jsonl"
    records = [
        {"adapter": "sql", "prompt": "SELECT", "completion": " * FROM t;"},
        {"adapter": "chat", "text": "Hello there, how are you?"},
        {"adapter": None, "prompt": [1, 20, 30], "completion": [40, 50]},
        {"adapter": "sql", "prompt": "Count rows", "completion": " SELECT count(*)"},
        {"adapter": "chat", "prompt": "Hi", "completion": " Hello!"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [
        sys.executable,
        os.path.join(REPO, "scripts", "evaluate.py"),
        "--model=tiny",
        f"--adapters_dir={adapters}",
        f"--data={data}",
        "--batch_size=2",
        "--num_devices=1",
        "--compare",
        f"--output_json={tmp_path / 'report.json'}",
        f"--output_csv={tmp_path / 'report.csv'}",
    ]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        # At the default LLVM level, as users compile: the mixed batch's losses equal the one
        # adapter's to the bit there; at tests/conftest.py's level 0 they differ in the 7th digit.
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_of_users()},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(base model)" in done.stdout and "sql" in done.stdout and "tokens/s" in done.stdout
    assert "speed-up" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    mixed, single = report["mixed"], report["one_adapter_at_a_time"]
    assert mixed["adapters"] == single["adapters"]
    assert [a["adapter"] for a in mixed["adapters"]] == ["sql", "chat", None]
    assert [a["examples"] for a in mixed["adapters"]] == [2, 2, 1]
    assert mixed["devices"] == 1 and mixed["lora_impl"] == "reference"
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["adapter"] for r in rows] == ["sql", "chat", ""]
    assert float(rows[0]["loss"]) == pytest.approx(mixed["adapters"][0]["loss"])

    bad = subprocess.run(
        command[:-4] + ["--adapter=nope=/does/not/exist"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert bad.returncode == 2 and "/does/not/exist" in bad.stderr, bad.stderr


def test_unknown_adapter_and_overlong_example_name_their_source(params):
    source = evaluation.RandomAdapters(TINY, 2, rank=2)
    with pytest.raises(UnknownAdapterError, match="data.jsonl:3.*'missing'"):
        evaluation.evaluate(TINY, params, [Example("missing", (1,), (2,), "data.jsonl:3")], source)
    with pytest.raises(ConfigError, match="data.jsonl:9"):
        evaluation.evaluate(
            TINY,
            params,
            [Example(None, (1,) * 20, (2,) * 20, "data.jsonl:9")],
            source,
            evaluation.EvalConfig(max_seq_len=16),
        )


def test_synthetic_examples_interleave_adapters():
    examples = evaluation.synthetic_examples(
        ["a", "b", None], 2, prompt_len=3, completion_len=5, vocab_size=100, seed=1
    )
    assert [e.adapter for e in examples] == ["a", "b", None, "a", "b", None]
    assert all(len(e.prompt) == 3 and len(e.completion) == 5 for e in examples)
    assert all(0 <= t < 100 for e in examples for t in e.prompt + e.completion)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"adapter": "a", "prompt": "x"', "not valid JSON"),
        ('["adapter"]', "expected a JSON object"),
        ('{"adapter": "a", "prompt": [1, 2]}', "missing field 'completion'"),
        ('{"adapter": "a", "prompt": [1], "completion": [600]}', "token id 600.*vocab_size"),
        ('{"adapter": 3, "text": [1, 2, 3]}', "field 'adapter' must be a string or null"),
        ('{"prompt": [1], "completion": [2]}', "missing field 'adapter'"),
        ('{"adapter": "a", "text": [1]}', "at least 2"),
        ('{"adapter": "a", "prompt": [], "completion": [5]}', "'prompt' has no tokens"),
        ('{"adapter": "a", "prompt": [1.5], "completion": [5]}', "list of token ids"),
    ],
)
def test_bad_jsonl_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "set.jsonl"
    path.write_text('{"adapter": "a", "prompt": [1], "completion": [2]}\n\n' + line + "\n")
    with pytest.raises(FormatError, match=f"set.jsonl:3: .*{message}"):
        load_examples(path, vocab_size=512, require_adapter=True)


def test_jsonl_text_is_tokenized_prompt_with_bos_completion_without(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "set.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "completion": " there"})
        + "\n"
        + json.dumps({"adapter": None, "text": "Hello world"})
        + "\n"
    )
    first, second = load_examples(path, tokenizer=tok, default_adapter="x")
    assert first.adapter == "x" and first.source.endswith("set.jsonl:1")
    assert first.prompt == tuple(tok.encode("Hi")) and first.prompt[0] == tok.encode("")[0]
    assert first.completion == tuple(tok.encode(" there", add_bos=False))
    ids = tok.encode("Hello world")
    assert second.adapter is None and second.prompt + second.completion == tuple(ids)
    assert len(second.prompt) == 1
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_examples(path, default_adapter="x")


def test_jsonl_with_a_byte_order_mark_or_bad_utf8_or_a_directory(tmp_path):
    record = '{"adapter": "a", "prompt": [1], "completion": [2]}\n'
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(("\ufeff" + record).encode("utf-8"))  # as Windows editors save it
    (example,) = load_examples(bom, require_adapter=True)
    assert example.prompt == (1,) and example.completion == (2,)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes((record + '{"adapter": "a", "text": "caf\xe9 au lait"}\n').encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_examples(latin1, tokenizer=tiny_tokenizer())
    with pytest.raises(FormatError, match="cannot read"):
        load_examples(tmp_path)


def test_example_token_ids_are_checked_and_stored_as_tuples():
    # no prompt: arrays() masked all but the last completion token, silently
    with pytest.raises(FormatError, match="row7: field 'prompt' has no tokens"):
        Example("a", (), (5, 6, 7), "row7")
    with pytest.raises(FormatError, match="'completion' has no tokens"):
        Example("a", (1,), (), "row8")
    with pytest.raises(FormatError, match="'completion' must be a sequence of token ids"):
        Example("a", (1,), (2, -1), "row9")  # a negative id indexed the embedding from the end
    with pytest.raises(FormatError, match="'prompt' must be a sequence of token ids"):
        Example("a", (1.0, 2.0), (3,), "row10")
    example = Example("a", [1, np.int64(2)], [3], "lists")  # lists did not concatenate
    assert example.prompt == (1, 2) and example.completion == (3,)
    inputs, targets, mask = example.arrays()
    assert inputs.tolist() == [1, 2] and targets.tolist() == [2, 3] and mask.tolist() == [0, 1]


def test_evaluate_refuses_wrong_argument_types(params):
    weights = evaluation.HostAdapters(TINY, {})
    example = Example("a", (1,), (2,), "x")
    with pytest.raises(ConfigError, match="AdapterSource.*got dict"):  # was an AttributeError
        evaluation.evaluate(TINY, params, [example], {"a": weights})
    with pytest.raises(ConfigError, match="expected jaxlora.data.Example"):
        evaluation.evaluate(TINY, params, [((1,), (2,))])
    with pytest.raises(ConfigError, match="devices is empty"):
        evaluation.evaluate(TINY, params, [Example(None, (1,), (2,), "x")], devices=[])
