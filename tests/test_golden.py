"""Fidelity against transformers + peft: golden logits from scripts/make_golden.py.

The fixtures hold a tiny HF model of each family (Llama: tests/fixtures/golden; Qwen2 with q/k/v
biases and tied embeddings: golden_qwen2; Qwen3 with per-head q/k norms and a head_dim of its
own: golden_qwen3; Phi-3 with fused qkv_proj / gate_up_proj, which its adapters target:
golden_phi3; Mistral with a sliding window of 3 keys, shorter than the rows: golden_mistral;
Qwen2 with YaRN RoPE scaling: golden_qwen2_yarn; Qwen3 whose second layer slides over 3 keys
(use_sliding_window, max_window_layers 1): golden_qwen3_sliding; Gemma with scaled
embeddings, norm weights stored minus 1, GELU gating and one KV head: golden_gemma) and PEFT
adapters in their native formats, plus the fp32 logits transformers + peft compute for every
(variant, row): variant 0 is the base model, variant k the k-th adapter. jaxlora loads the files
with its own loaders and runs ONE batch in which the rows use different adapters and one row uses
none; every row must reproduce its reference logits.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import LoraPoolConfig
from jaxlora.formats import load_hf_checkpoint, load_peft_adapter
from jaxlora.lora import pack_adapters
from jaxlora.model import Llama
from pallas_kernels.layout import NO_ADAPTER

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# scripts/make_golden.py's --family -> (fixture directory, model_type).
FAMILIES = {
    "llama": ("golden", "llama"),
    "qwen2": ("golden_qwen2", "qwen2"),
    "qwen3": ("golden_qwen3", "qwen3"),
    # Qwen3 with use_sliding_window: its second layer sees its last 3 keys only.
    "qwen3_sliding": ("golden_qwen3_sliding", "qwen3"),
    "phi3": ("golden_phi3", "phi3"),
    "mistral": ("golden_mistral", "mistral"),
    # Qwen2 with YaRN RoPE scaling (factor 4; frequencies kept, ramped and interpolated, cos /
    # sin scaled by 1.139).
    "qwen2_yarn": ("golden_qwen2_yarn", "qwen2"),
    # Gemma (1): scaled embeddings, norm weights stored minus 1, GELU gating, one KV head.
    "gemma": ("golden_gemma", "gemma"),
    # Gemma 2: sandwich norms, soft-capped scores and logits, query_pre_attn_scalar.
    "gemma2": ("golden_gemma2", "gemma2"),
    # Gemma 3 (text): q / k norms, sliding layers with a RoPE base of their own.
    "gemma3": ("golden_gemma3", "gemma3_text"),
}
MAX_RANK = 64
TOLERANCE = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (over the whole array compared)."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def golden(request):
    directory_name, model_type = FAMILIES[request.param]
    directory = os.path.join(FIXTURES, directory_name)
    with open(os.path.join(directory, "golden.json")) as f:
        manifest = json.load(f)
    arrays = np.load(os.path.join(directory, "golden.npz"))
    config, params = load_hf_checkpoint(os.path.join(directory, "base"))
    assert config.model_type == model_type
    adapters = [
        load_peft_adapter(os.path.join(directory, "adapters", name), config, max_rank=MAX_RANK)
        for name in manifest["variants"][1:]
    ]
    pool = LoraPoolConfig(
        max_rank=MAX_RANK, rows_per_page=16, pages_per_pool=64, max_slots=len(adapters)
    )
    lora = pack_adapters(config, adapters, pool)
    return dict(
        config=config,
        params=params,
        lora=lora,
        variants=manifest["variants"],
        directory=directory,
        input_ids=arrays["input_ids"],
        logits=arrays["logits"],
    )


def run_batch(golden, row_variant: list[int]) -> np.ndarray:
    """Logits of one batch where row i uses variant row_variant[i] (0 = base, k = adapter k)."""
    input_ids = jnp.asarray(golden["input_ids"])
    rows, seq = input_ids.shape
    slots = np.array([v - 1 if v > 0 else NO_ADAPTER for v in row_variant], np.int32)
    token_slot = jnp.asarray(np.repeat(slots[:, None], seq, axis=1))
    model = Llama(golden["config"])
    logits = model.apply(
        {"params": golden["params"]}, input_ids, lora=golden["lora"].with_tokens(token_slot)
    )
    return np.asarray(logits)


def expected_logits(golden, row_variant: list[int]) -> np.ndarray:
    return np.stack([golden["logits"][v, row] for row, v in enumerate(row_variant)])


def test_fixtures_cover_the_required_cases(golden):
    ranks = {
        name: weights
        for name, weights in zip(golden["variants"][1:], golden["lora"].ranks.tolist(), strict=True)
    }
    all_ranks = {r for slot in ranks.values() for r in slot}
    assert {1, 64} <= all_ranks
    assert len(golden["variants"]) - 1 >= 3
    assert golden["config"].num_layers >= 2
    assert golden["config"].num_kv_heads < golden["config"].num_heads
    total = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(golden["directory"])
        for f in files
    )
    assert total < 2_000_000


def test_mixed_batch_reproduces_every_row(golden):
    n_rows = golden["input_ids"].shape[0]
    # Row 1 uses no adapter; every adapter appears once.
    row_variant = [1, 0, 2, 3, 4][:n_rows]
    assert sorted(row_variant) == list(range(n_rows))
    actual = run_batch(golden, row_variant)
    expected = expected_logits(golden, row_variant)
    errors = {
        golden["variants"][v]: relative_error(actual[row], expected[row])
        for row, v in enumerate(row_variant)
    }
    print("relative error per row (max|diff| / max|expected|):", errors)
    for name, err in errors.items():
        assert err <= TOLERANCE, f"{name}: relative error {err:.2e} > {TOLERANCE}"


def test_permuted_assignment_breaks_the_match(golden):
    row_variant = [1, 0, 2, 3, 4]
    permuted = [2, 0, 3, 4, 1]  # every adapter row moves to another adapter; the base row stays
    actual = run_batch(golden, permuted)
    against_original = expected_logits(golden, row_variant)
    errors = [
        relative_error(actual[row], against_original[row])
        for row in range(len(row_variant))
        if row_variant[row] != permuted[row]
    ]
    print("relative error of permuted rows vs the original assignment:", errors)
    assert min(errors) > 100 * TOLERANCE
    # The same batch is right for the assignment it really used: the mismatch is the permutation.
    assert relative_error(actual, expected_logits(golden, permuted)) <= TOLERANCE


def test_the_yarn_fixture_needs_its_scaling():
    """Read without its YaRN scaling, the golden_qwen2_yarn base model misses transformers'
    logits by far more than the tolerance: the fixture shows the scaling, not only the rest."""
    import dataclasses

    directory = os.path.join(FIXTURES, "golden_qwen2_yarn")
    config, params = load_hf_checkpoint(os.path.join(directory, "base"))
    assert config.rope_scaling.rope_type == "yarn" and config.rope_scaling.factor == 4.0
    arrays = np.load(os.path.join(directory, "golden.npz"))
    input_ids = jnp.asarray(arrays["input_ids"])
    expected = arrays["logits"][0]
    scaled = np.asarray(Llama(config).apply({"params": params}, input_ids))
    assert relative_error(scaled, expected) <= TOLERANCE
    # The frequencies alone (cos / sin unscaled) and no scaling at all both miss.
    frequencies_only = dataclasses.replace(
        config,
        rope_scaling=dataclasses.replace(config.rope_scaling, attention_factor=1.0),
    )
    unscaled = dataclasses.replace(config, rope_scaling=None)
    for other in (frequencies_only, unscaled):
        logits = np.asarray(Llama(other).apply({"params": params}, input_ids))
        assert relative_error(logits, expected) > 100 * TOLERANCE


def test_the_sliding_qwen_fixture_needs_its_window_on_its_sliding_layer_only():
    """golden_qwen3_sliding's second layer slides over 3 keys (rows of 8): read without its
    window, or with the window on both layers, the base model misses transformers' logits by far
    more than the tolerance."""
    import dataclasses

    directory = os.path.join(FIXTURES, "golden_qwen3_sliding")
    config, params = load_hf_checkpoint(os.path.join(directory, "base"))
    assert (config.local_window, config.max_window_layers) == (3, 1)
    arrays = np.load(os.path.join(directory, "golden.npz"))
    input_ids = jnp.asarray(arrays["input_ids"])
    expected = arrays["logits"][0]
    windowed = np.asarray(Llama(config).apply({"params": params}, input_ids))
    assert relative_error(windowed, expected) <= TOLERANCE
    unwindowed = dataclasses.replace(config, local_window=None, max_window_layers=None)
    both_layers = dataclasses.replace(config, max_window_layers=0)
    for other in (unwindowed, both_layers):
        logits = np.asarray(Llama(other).apply({"params": params}, input_ids))
        assert relative_error(logits, expected) > 100 * TOLERANCE
