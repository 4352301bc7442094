"""AdapterStore: header-only registration, lazy/eager host copies, host budget, bad input."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from memory_testing import CONFIG, POOL, TARGET_SETS, file_rows, write_adapter

from configs.models import TINY
from jaxlora import formats
from jaxlora.config import ModelConfig
from jaxlora.errors import AdapterError, FormatError, JaxloraError, UnknownAdapterError
from jaxlora.lora import LoraWeights, merge_lora_parameters, merge_lora_weights
from jaxlora.memory import AdapterFootprint, AdapterStore, AdapterStoreConfig, pack_weights
from jaxlora.memory.packing import page_bucket, unpack_weights
from pallas_kernels.layout import MODULES


def unpack(packed, footprint, rows_per_page=POOL.rows_per_page):
    """module -> (A rows, B rows) cut back out of a PackedAdapter's blocks."""
    from pallas_kernels.layout import MODULE_POOLS, pages_for_rank

    cursor = dict.fromkeys(packed.blocks, 0)
    rows = {}
    for m, r in zip(MODULES, footprint.ranks, strict=True):
        if not r:
            continue
        n = pages_for_rank(r, rows_per_page)
        got = []
        for axis in MODULE_POOLS[m]:
            block = np.asarray(packed.blocks[axis])[:, cursor[axis] : cursor[axis] + n]
            cursor[axis] += n
            flat = block.reshape(block.shape[0], n * rows_per_page, -1)
            assert not flat[:, r:].any(), "rows past the rank must be zero in the host copy"
            got.append(flat[:, :r])
        rows[m] = tuple(got)
    return rows


@pytest.fixture
def adapters(tmp_path):
    paths = {}
    for i, targets in enumerate(TARGET_SETS):
        paths[f"ad{i}"] = write_adapter(
            tmp_path / "root", f"ad{i}", rank=i + 1, seed=i, targets=targets
        )
    return tmp_path / "root", paths


def test_register_root_reads_headers_only(adapters, monkeypatch):
    root, paths = adapters

    def no_weights(*args, **kwargs):
        raise AssertionError("registration must not read weights")

    monkeypatch.setattr(formats, "load_peft_adapter", no_weights)
    store = AdapterStore(CONFIG, POOL)
    report = store.register_root(root)
    assert report.registered == tuple(sorted(paths)) and not report.failed
    assert store.names() == sorted(paths) and len(store) == 4
    entry = store.get("ad1")
    assert entry.source == paths["ad1"]
    assert entry.footprint.ranks == (2, 0, 2, 0, 0, 0, 0)  # q and v, rank 2
    assert entry.footprint.scales[0] == pytest.approx(2.0)  # alpha = 2r
    stats = store.stats()
    assert (stats.loads, stats.cached, stats.host_bytes) == (0, 0, 0)


def test_lazy_load_packs_file_rows_into_pages(adapters):
    _, paths = adapters
    store = AdapterStore(CONFIG, POOL)
    for name, path in paths.items():
        entry = store.register(name, path)
        packed = store.load(entry)
        assert packed.nbytes == entry.nbytes
        assert packed.footprint == entry.footprint
        expected = file_rows(path)
        got = unpack(packed, entry.footprint)
        assert sorted(got) == sorted(expected)
        for m in expected:
            np.testing.assert_array_equal(got[m][0], expected[m][0])
            np.testing.assert_array_equal(got[m][1], expected[m][1])
    assert store.stats().loads == 4
    assert store.load(store.get("ad0")) is store.cached_weights(store.get("ad0"))
    assert store.stats().loads == 4  # served from RAM


def test_eager_registration_loads_at_once(adapters):
    root, _ = adapters
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(eager=True))
    store.register_root(root)
    stats = store.stats()
    assert stats.loads == 4 and stats.cached == 4
    assert stats.host_bytes == sum(store.get(n).nbytes for n in store.names())
    assert set(stats.load_seconds) == set(store.names())


def test_eager_registration_of_weights_that_cannot_be_packed_registers_nothing(tmp_path):
    """With eager=True the weights are read at registration: a file whose headers pass but
    whose weights cannot be packed (past float16's largest here) fails the register, the
    replace and its directory of register_root, leaving the store as it was."""
    from safetensors.numpy import load_file, save_file

    good = write_adapter(tmp_path / "root", "good", rank=2, seed=1)
    bad = write_adapter(tmp_path / "root", "bad", rank=2, seed=2)
    file = os.path.join(bad, "adapter_model.safetensors")
    tensors = load_file(file)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].copy()
    tensors[first].flat[0] = 7e4
    save_file(tensors, file)
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(eager=True, dtype="float16"))
    with pytest.raises(AdapterError, match="past the largest float16 value"):
        store.register("x", bad)
    assert "x" not in store and store.stats().cached == 0
    store.register("x", good)
    with pytest.raises(AdapterError, match="past the largest float16 value"):
        store.replace("x", bad)
    assert store.get("x").source == good and store.is_cached(store.get("x"))
    store.unregister("x")
    report = store.register_root(tmp_path / "root", skip_invalid=True)
    assert report.registered == ("good",) and list(report.failed) == ["bad"]
    assert store.names() == ["good"] and store.is_cached(store.get("good"))


def test_host_budget_drops_least_recently_used(adapters):
    _, paths = adapters
    store = AdapterStore(CONFIG, POOL)
    sizes = {}
    for name, path in paths.items():
        sizes[name] = store.register(name, path).nbytes
    budget = sizes["ad1"] + sizes["ad2"] + sizes["ad3"]
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(host_budget_bytes=budget))
    for name, path in paths.items():
        store.register(name, path)
    for name in ("ad1", "ad2", "ad3"):
        store.load(store.get(name))
    store.load(store.get("ad1"))  # ad2 is now the least recently used
    assert store.stats().host_bytes == budget
    store.load(store.get("ad0"))  # the largest: needs room
    assert not store.is_cached(store.get("ad2"))
    assert store.is_cached(store.get("ad0"))
    stats = store.stats()
    assert stats.host_bytes <= budget and stats.drops >= 1
    loads = stats.loads
    packed = store.load(store.get("ad2"))  # dropped: read from disk again, same rows
    assert store.stats().loads == loads + 1
    np.testing.assert_array_equal(
        unpack(packed, packed.footprint)["o_proj"][0], file_rows(paths["ad2"])["o_proj"][0]
    )


def test_memory_only_adapters_are_never_dropped():
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(host_budget_bytes=0))
    weights = random_weights("mem", rank=3)
    entry = store.register_weights("mem", weights)
    assert store.is_cached(entry) and store.stats().host_bytes == entry.nbytes
    packed = store.load(entry)
    np.testing.assert_array_equal(unpack(packed, entry.footprint)["k_proj"][1], weights.b["k_proj"])


def random_weights(name, *, rank, modules=("q_proj", "k_proj"), config=CONFIG, seed=0):
    rng = np.random.default_rng(seed)
    shapes = config.module_shapes()
    return LoraWeights(
        name=name,
        a={
            m: rng.standard_normal((config.num_layers, rank, shapes[m][0]), np.float32)
            for m in modules
        },
        b={
            m: rng.standard_normal((config.num_layers, rank, shapes[m][1]), np.float32)
            for m in modules
        },
        scales=dict.fromkeys(modules, 0.5),
    )


def test_bfloat16_store_casts_once():
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(dtype="bfloat16"))
    weights = random_weights("w", rank=2)
    packed = store.load(store.register_weights("w", weights))
    assert all(b.dtype == jnp.bfloat16 for b in packed.blocks.values())
    got = unpack(packed, packed.footprint)["q_proj"][0].astype(np.float32)
    np.testing.assert_array_equal(got, weights.a["q_proj"].astype(jnp.bfloat16).astype(np.float32))


def test_a_float16_store_refuses_weights_past_float16():
    """Finite float32 weights past float16's largest (65504) would be inf in a float16 pool:
    refused by name; a bfloat16 store takes them."""
    weights = random_weights("w", rank=2)
    weights.b["k_proj"][0, 1, 3] = -7e4
    store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(dtype="float16"))
    with pytest.raises(
        AdapterError,
        match=r"adapter 'w' \(in memory\): tensor b\['k_proj'\] holds 7e\+04, past the largest "
        r"float16 value of the adapter pools \(65504\); serve it in bfloat16 or float32",
    ):
        store.register_weights("w", weights)
    assert len(store) == 0
    bf16 = AdapterStore(CONFIG, POOL, AdapterStoreConfig(dtype="bfloat16"))
    packed = bf16.load(bf16.register_weights("w", weights))
    assert all(np.isfinite(b.astype(np.float32)).all() for b in packed.blocks.values())


def test_pack_weights_page_order_matches_footprint():
    weights = random_weights("w", rank=5, modules=MODULES)
    packed = pack_weights(weights, CONFIG, POOL.rows_per_page, np.float32)
    assert packed.footprint == AdapterFootprint.of_weights(weights)
    need = packed.footprint.pages_needed(POOL.rows_per_page)
    assert need == weights.pages_needed(POOL.rows_per_page)
    assert {a: b.shape[1] for a, b in packed.blocks.items()} == {
        a: page_bucket(n) for a, n in need.items() if n
    }


def test_unpacked_weights_are_the_packed_ones():
    """unpack_weights is pack_weights' inverse: every module's rows at its own rank and width,
    and its scale."""
    parts = [
        random_weights("a", rank=3, modules=MODULES, seed=1),
        random_weights("b", rank=8, modules=("v_proj", "down_proj"), seed=2),
    ]
    for weights in parts:
        weights.scales = {m: 0.25 * (i + 1) for i, m in enumerate(weights.a)}
        packed = pack_weights(weights, CONFIG, POOL.rows_per_page, np.float32)
        back = unpack_weights(packed, CONFIG, POOL.rows_per_page, weights.name)
        assert back.scales == weights.scales and set(back.b) == set(weights.b)
        for m in weights.a:
            np.testing.assert_array_equal(back.a[m], weights.a[m])
            np.testing.assert_array_equal(back.b[m], weights.b[m])


def test_a_merge_sums_the_weighted_updates():
    """merge_lora_weights: each module's update (x @ A^T @ B times the scale, every layer) is the
    weighted sum of the parts' (modules one part lacks count as zero); the merge's bad inputs."""
    rng = np.random.default_rng(3)
    one = random_weights("one", rank=3, modules=MODULES, seed=1)
    two = random_weights("two", rank=2, modules=("q_proj", "down_proj"), seed=2)
    one.scales = dict.fromkeys(one.a, 0.5)
    two.scales = {"q_proj": 2.0, "down_proj": 0.0}
    merged = merge_lora_weights([(one, 0.3), (two, -1.5)], "m", max_rank=8)
    xs = {
        m: rng.standard_normal((4, fan_in), np.float32)
        for m, (fan_in, _) in CONFIG.module_shapes().items()
    }

    def update(w, m):
        if m not in w.a:
            return 0.0
        return w.scales[m] * np.einsum("ti,lri,lro->lto", xs[m], w.a[m], w.b[m])

    for m in MODULES:
        expected = 0.3 * update(one, m) - 1.5 * update(two, m)
        np.testing.assert_allclose(update(merged, m), expected, rtol=1e-4, atol=1e-4)
    assert merged.ranks["q_proj"] == 5 and merged.ranks["k_proj"] == 3
    assert merged.scales["down_proj"] == 0.5  # (the first non-zero)
    for parts, message in (
        ([], "expected at least one"),
        ([(one, float("nan"))], "weight of adapter 'one' is nan"),
        ([(one, True)], "expected a finite number"),
        ([(one, -1e39)], "is -1e.39; expected a finite number of at most 3.403e.38 in"),
        ([(one, 1.0), (one, 1.0), (one, 1.0)], "'q_proj' would have rank 9 .3 . 3 . 3."),
    ):
        with pytest.raises(AdapterError, match=message):
            merge_lora_weights(parts, "m", max_rank=8)


def _rows(name, a, b, scale=0.5, module="q_proj"):
    """An adapter of one module, one layer: A and B rows as given."""
    a = np.asarray(a, np.float32)[None]
    b = np.asarray(b, np.float32)[None]
    return LoraWeights(name=name, a={module: a}, b={module: b}, scales={module: scale})


def test_lorax_s_linear_merge_sums_a_and_b_apart():
    """merge_lora_parameters, "linear" (LoRAX's default): A = sum w_i A_i and B = sum w_i B_i,
    each module from the parts that target it (their weights only); the first part's scale
    (its first module's where it lacks the module); not the sum of the updates."""
    one = random_weights("one", rank=2, modules=MODULES, seed=1)
    two = random_weights("two", rank=2, modules=("q_proj", "down_proj"), seed=2)
    one.scales = dict.fromkeys(one.a, 0.5)
    two.scales = {"q_proj": 2.0, "down_proj": 2.0}
    merged = merge_lora_parameters([(two, -1.5), (one, 0.3)], "m")
    for m in MODULES:
        if m in two.a:
            want_a = -1.5 * two.a[m] + 0.3 * one.a[m]
            want_b = -1.5 * two.b[m] + 0.3 * one.b[m]
        else:
            want_a, want_b = 0.3 * one.a[m], 0.3 * one.b[m]
        np.testing.assert_allclose(merged.a[m], want_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(merged.b[m], want_b, rtol=1e-6, atol=1e-6)
        assert merged.scales[m] == 2.0, m  # the first part's, q_proj's where it has none
    sum_of_updates = -1.5 * np.einsum("lri,lro->lio", two.a["q_proj"], two.b["q_proj"])
    sum_of_updates += 0.3 * np.einsum("lri,lro->lio", one.a["q_proj"], one.b["q_proj"])
    product = np.einsum("lri,lro->lio", merged.a["q_proj"], merged.b["q_proj"])
    assert np.abs(product - sum_of_updates).max() > 1e-3
    assert merged.source.startswith("linear merge of -1.5 x two, 0.3 x one")


def test_lorax_s_ties_merge_by_hand():
    """TIES (density 0.5): each tensor keeps its int(0.5 * 4) = 2 largest magnitudes, each value
    takes the sign of the kept values' sum ("total") or of their signs' count ("frequency"),
    and is the mean of the weighted values of that sign (0 where none is kept)."""
    first = _rows("first", [[3, -1, 0.5, -4]], [[1, 2]])
    second = _rows("second", [[-2, 2, 1, -1]], [[-1, 4]])
    merged = merge_lora_parameters([(first, 1.0), (second, 0.5)], "m", strategy="ties", density=0.5)
    # kept: first [3, 0, 0, -4], second [-2, 2, 0, 0]; sums [1, 2, 0, -4]: signs + + + -;
    # weighted: first [3, 0, 0, -4], second [-1, 1, 0, 0]
    np.testing.assert_allclose(merged.a["q_proj"][0], [[3, 1, 0, -4]])
    # B: int(0.5 * 2) = 1 value each: first [0, 2], second [0, 4] (weighted [0, 2]); the
    # first column has no kept value
    np.testing.assert_allclose(merged.b["q_proj"][0], [[0, 2]])
    # By sign count, one large value loses to two small ones.
    big, small, other = (_rows(n, [[v]], [[1.0]]) for n, v in (("b", 5), ("s", -1), ("o", -1)))
    parts = [(big, 1.0), (small, 2.0), (other, 4.0)]
    total = merge_lora_parameters(parts, "t", strategy="ties")
    frequency = merge_lora_parameters(parts, "f", strategy="ties", majority_sign_method="frequency")
    np.testing.assert_allclose(total.a["q_proj"][0], [[5.0]])  # 5 - 1 - 1 > 0: the 5 alone
    np.testing.assert_allclose(frequency.a["q_proj"][0], [[-3.0]])  # (-2 - 4) / 2
    np.testing.assert_allclose(total.b["q_proj"][0], [[7.0 / 3]])  # all +: (1 + 2 + 4) / 3


def test_lorax_s_dare_merges_drop_and_rescale_reproducibly():
    """DARE (density 0.25): each value kept with probability 0.25 and divided by it; the draws
    follow the seed (one merge, one adapter); dare_ties elects signs among the kept values."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((64, 512)).astype(np.float32) + 3.0  # (all positive)
    one = _rows("one", values, values[:, :8])
    two = _rows("two", values * 2, values[:, :8])
    dare = merge_lora_parameters(
        [(one, 1.0), (two, 1.0)], "d", strategy="dare_linear", density=0.25, seed=7
    )
    again = merge_lora_parameters(
        [(one, 1.0), (two, 1.0)], "d", strategy="dare_linear", density=0.25, seed=7
    )
    other = merge_lora_parameters(
        [(one, 1.0), (two, 1.0)], "d", strategy="dare_linear", density=0.25, seed=8
    )
    got = dare.a["q_proj"][0]
    np.testing.assert_array_equal(got, again.a["q_proj"][0])
    assert not np.array_equal(got, other.a["q_proj"][0])
    # each value: 0, 4 v (one kept), 8 v (two kept) or 12 v (both)
    ratio = got / values
    assert np.all(np.isclose(ratio[:, :, None], [0.0, 4.0, 8.0, 12.0], atol=1e-4).any(-1))
    assert abs((ratio == 0).mean() - 0.75**2) < 0.01  # both dropped
    for strategy in ("ties", "dare_linear", "dare_ties"):  # density 0 keeps nothing
        nothing = merge_lora_parameters([(one, 1.0)], "z", strategy=strategy, density=0.0)
        assert not nothing.a["q_proj"].any() and not nothing.b["q_proj"].any()
    linear = merge_lora_parameters([(one, 1.0)], "z", density=0.0)  # (linear ignores it)
    np.testing.assert_array_equal(linear.a["q_proj"], one.a["q_proj"])
    ties = merge_lora_parameters(
        [(one, 1.0), (two, 1.0)], "t", strategy="dare_ties", density=0.25, seed=7
    ).a["q_proj"][0]
    # all positive: the mean of the kept weighted values (4 v, 8 v, or 6 v with both)
    ratio = ties / values
    assert np.all(np.isclose(ratio[:, :, None], [0.0, 4.0, 8.0, 6.0], atol=1e-4).any(-1))


def test_lorax_s_merge_refuses_what_it_cannot_merge():
    one = _rows("one", [[1.0, 2.0]], [[1.0]])
    wide = _rows("wide", [[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0]])
    for parts, fields, message in (
        ([], {}, "expected at least one"),
        ([(one, 1.0), (wide, 1.0)], {}, r"module 'q_proj' has ranks \[1, 2\]"),
        ([(one, float("inf"))], {}, "weight of adapter 'one' is inf"),
        ([(one, 1.0)], {"strategy": "mean"}, "merge_strategy 'mean'; expected one of linear"),
        ([(one, 1.0)], {"density": -0.5}, r"density -0.5; expected a number in \[0, 1\]"),
        ([(one, 1.0)], {"density": 1.5}, "density 1.5"),
        ([(one, 1.0)], {"majority_sign_method": "max"}, "majority_sign_method 'max'"),
    ):
        with pytest.raises(AdapterError, match=message):
            merge_lora_parameters(parts, "m", **fields)


# ---------------------------------------------------------------------------- bad input


def assert_store_still_serves(store, names):
    assert store.names() == sorted(names)
    for name in names:
        store.load(store.get(name))


@pytest.fixture
def store_with_one(tmp_path):
    store = AdapterStore(CONFIG, POOL)
    store.register("good", write_adapter(tmp_path, "good", rank=2, seed=1))
    return store


def test_missing_directory(store_with_one, tmp_path):
    with pytest.raises(FormatError, match="nowhere"):
        store_with_one.register("x", tmp_path / "nowhere")
    assert_store_still_serves(store_with_one, ["good"])


def test_missing_weights_file(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=2, seed=2)
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        store_with_one.register("x", path)
    assert_store_still_serves(store_with_one, ["good"])


def test_truncated_file(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=2, seed=2)
    file = os.path.join(path, "adapter_model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    with pytest.raises(FormatError, match="truncated"):
        store_with_one.register("x", path)
    assert_store_still_serves(store_with_one, ["good"])


def test_shape_of_another_model(store_with_one, tmp_path):
    other = ModelConfig(**{**TINY.__dict__, "hidden_size": 32, "head_dim": 8})
    path = write_adapter(tmp_path, "x", rank=2, seed=2, config=other)
    with pytest.raises(FormatError, match=r"has shape \[2, 32\]; expected \[2, 64\]"):
        store_with_one.register("x", path)
    assert_store_still_serves(store_with_one, ["good"])


def test_rank_above_maximum(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=POOL.max_rank + 1, seed=2)
    with pytest.raises(AdapterError, match=f"rank {POOL.max_rank + 1}.*max_rank={POOL.max_rank}"):
        store_with_one.register("x", path)
    with pytest.raises(AdapterError, match="rank 9; expected 1..8"):
        store_with_one.register_weights("y", random_weights("y", rank=9))
    assert_store_still_serves(store_with_one, ["good"])


def test_pickle_file_is_refused(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=2, seed=2)
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    with pytest.raises(FormatError, match="never unpickles"):
        store_with_one.register("x", path)
    assert_store_still_serves(store_with_one, ["good"])


def test_name_taken_and_unknown_names(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=2, seed=2)
    with pytest.raises(AdapterError, match="'good' .* is already registered"):
        store_with_one.register("good", path)
    for call in (store_with_one.get, store_with_one.unregister):
        with pytest.raises(UnknownAdapterError, match="'nope' is not registered"):
            call("nope")
    with pytest.raises(UnknownAdapterError, match="'nope' is not registered"):
        store_with_one.replace("nope", path)
    for bad in ("", " padded ", "a\nb", 3):
        with pytest.raises(AdapterError, match="adapter name"):
            store_with_one.register(bad, path)
    assert_store_still_serves(store_with_one, ["good"])


def test_bad_in_memory_weights(store_with_one):
    weights = random_weights("w", rank=2)
    weights.b["q_proj"] = weights.b["q_proj"][:, :, :3]
    with pytest.raises(
        AdapterError,
        match=r"tensor b\['q_proj'\] has shape \(2, 2, 3\); "
        r"expected \(2, 2, 64\)",
    ):
        store_with_one.register_weights("w", weights)
    weights = random_weights("w", rank=2)
    weights.a["lm_head"] = weights.a.pop("q_proj")
    with pytest.raises(AdapterError, match="not LoRA targets"):
        store_with_one.register_weights("w", weights)
    # NaN or inf anywhere (here in the second layer): refused, never paged in beside others.
    for value in (np.nan, -np.inf):
        weights = random_weights("w", rank=2)
        weights.a["k_proj"][1, 0, 5] = value
        with pytest.raises(
            AdapterError,
            match=r"tensor a\['k_proj'\] holds 1 NaN or infinite values \(the first at layer "
            r"1\); expected finite weights",
        ):
            store_with_one.register_weights("w", weights)
    assert_store_still_serves(store_with_one, ["good"])


def test_register_root_is_atomic_unless_skipping(tmp_path):
    root = tmp_path / "root"
    for i in range(3):
        write_adapter(root, f"ok{i}", rank=1, seed=i)
    bad = write_adapter(root, "bad", rank=POOL.max_rank + 4, seed=9)
    (root / "not_an_adapter").mkdir()
    store = AdapterStore(CONFIG, POOL)
    with pytest.raises(
        AdapterError,
        match="2 of 5 adapter directories refused, none registered: bad: .*not_an_adapter: ",
    ):
        store.register_root(root)
    assert len(store) == 0
    report = store.register_root(root, skip_invalid=True)
    assert report.registered == ("ok0", "ok1", "ok2")
    assert set(report.failed) == {"bad", "not_an_adapter"}
    assert all(isinstance(e, JaxloraError) for e in report.failed.values())
    shutil.rmtree(bad)
    report = store.register_root(root, skip_invalid=True)  # the others are taken now
    assert report.registered == () and set(report.failed) >= {"ok0", "ok1", "ok2"}
    with pytest.raises(FormatError, match="cannot list"):
        store.register_root(tmp_path / "missing")


def test_file_changed_after_registration(store_with_one, tmp_path):
    path = write_adapter(tmp_path, "x", rank=2, seed=2)
    entry = store_with_one.register("x", path)
    write_adapter(tmp_path, "x", rank=4, seed=3)  # rewritten in place with another rank
    with pytest.raises(FormatError, match="changed on disk since it was registered"):
        store_with_one.load(entry)
    shutil.rmtree(path)
    with pytest.raises(FormatError):
        store_with_one.load(entry)
    assert store_with_one.names() == ["good", "x"]
    store_with_one.load(store_with_one.get("good"))


def test_replace_and_unregister_keep_versions_apart(store_with_one, tmp_path):
    old = store_with_one.get("good")
    store_with_one.load(old)
    new_path = write_adapter(tmp_path, "good_v2", rank=3, seed=5)
    new = store_with_one.replace("good", new_path)
    assert new.version > old.version and store_with_one.get("good") is new
    assert not store_with_one.is_cached(old)  # the old version's RAM is given back
    # A holder of the old entry (an in-flight request) can still read its rows from disk.
    np.testing.assert_array_equal(
        unpack(store_with_one.load(old), old.footprint)["q_proj"][0],
        file_rows(old.source)["q_proj"][0],
    )
    assert not store_with_one.is_cached(old)  # ... without putting it back in the cache
    with pytest.raises(FormatError):
        store_with_one.replace("good", tmp_path / "missing")
    assert store_with_one.get("good") is new  # a failed replace changes nothing
    assert store_with_one.unregister("good") is new
    assert len(store_with_one) == 0 and store_with_one.stats().host_bytes == 0


def test_bad_store_config():
    with pytest.raises(AdapterError, match="'dtype'"):
        AdapterStoreConfig(dtype="float33")
    with pytest.raises(AdapterError, match="'host_budget_bytes'"):
        AdapterStoreConfig(host_budget_bytes=-1)
    with pytest.raises(AdapterError, match="'host_memory_kind'"):
        AdapterStoreConfig(host_memory_kind="device")
