"""Batched sampling: greedy and filtered limits, the sampled distribution, batch invariance,
logprobs, parameter validation and stop strings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.errors import RequestError
from jaxlora.sampling import (
    MIN_PROCESSING_ENTRIES,
    RowHistory,
    SamplingBatch,
    SamplingParams,
    StopStringDetector,
    logit_processing,
    process_logits,
    sample,
    split_seed,
    truncate_at_stop,
    unique_tokens,
    uses_filters,
)


def run(logits, params, token_indices=None, **kwargs):
    token_indices = [0] * len(params) if token_indices is None else token_indices
    batch = SamplingBatch.from_params(params, token_indices)
    return sample(jnp.asarray(logits, jnp.float32), batch, **kwargs)


def random_logits(seed, rows, vocab=50):
    return np.random.default_rng(seed).standard_normal((rows, vocab)).astype(np.float32) * 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=2),
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=2.0, top_p=1e-6, seed=4),
        SamplingParams(temperature=0.7, top_k=1, top_p=0.3, seed=5),
    ],
    ids=["greedy", "greedy-ignores-filters", "top_k=1", "tiny-top_p", "both"],
)
def test_deterministic_limits_equal_argmax(params):
    logits = random_logits(0, 16)
    out = run(logits, [params] * 16, token_indices=list(range(16)))
    np.testing.assert_array_equal(out.tokens, logits.argmax(axis=1))


def empirical_distribution(logits_row, params, draws=6000):
    """Samples one row `draws` times: rows differ only in their token index (their key)."""
    logits = np.broadcast_to(logits_row, (draws, logits_row.shape[0]))
    out = run(logits, [params] * draws, token_indices=list(range(draws)))
    return np.bincount(np.asarray(out.tokens), minlength=logits_row.shape[0]) / draws


def chi_square(freq, probs, draws):
    support = probs > 0
    assert (freq[~support] == 0).all(), "a token outside the allowed set was sampled"
    return float(np.sum((freq[support] - probs[support]) ** 2 / probs[support]) * draws)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS_ROW = np.log(np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], np.float64)).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distribution_matches_softmax(temperature):
    """With a fixed seed this cannot flake; the bound (5 degrees of freedom, ~1e-6 tail) is
    loose enough for any correct sampler and far below what a wrong distribution gives."""
    draws = 6000
    freq = empirical_distribution(
        LOGITS_ROW, SamplingParams(temperature=temperature, seed=11), draws
    )
    probs = softmax(LOGITS_ROW.astype(np.float64) / temperature)
    assert chi_square(freq, probs, draws) < 40
    # The same test rejects the untempered distribution: the check has teeth.
    if temperature != 1.0:
        assert chi_square(freq, softmax(LOGITS_ROW.astype(np.float64)), draws) > 200


@pytest.mark.parametrize(
    "top_k, top_p, allowed",
    [
        (3, 1.0, 3),  # top-k keeps 3 tokens
        (0, 0.6, 3),  # 0.3 + 0.25 < 0.6 <= 0.3 + 0.25 + 0.2: the nucleus has 3 tokens
        (4, 0.5, 2),  # top-p on the top-4-renormalised distribution: 0.3/0.87 + 0.25/0.87 >= 0.5
    ],
)
def test_filtered_distribution_is_renormalised_softmax(top_k, top_p, allowed):
    draws = 6000
    freq = empirical_distribution(
        LOGITS_ROW, SamplingParams(top_k=top_k, top_p=top_p, seed=3), draws
    )
    probs = np.exp(LOGITS_ROW.astype(np.float64))
    probs[allowed:] = 0
    probs /= probs.sum()
    assert chi_square(freq, probs, draws) < 40


def test_same_seed_same_sample_whatever_the_batch():
    rng = np.random.default_rng(4)
    vocab = 64
    mine = rng.standard_normal(vocab).astype(np.float32)
    params = SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=2024)
    alone = [int(run(mine[None], [params], token_indices=[t]).tokens[0]) for t in range(8)]
    assert len(set(alone)) > 1, "the token index must change the random stream"
    others = [
        SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
        for t, k, p, s in [
            (0.0, 0, 1.0, 1),
            (1.0, 0, 1.0, 2),
            (0.5, 3, 0.5, 3),
            (2.0, 0, 0.2, 4),
            (1.0, 10, 1.0, 2024),
        ]
    ]
    for batch_size in (2, 5, 9):
        for position in (0, batch_size // 2, batch_size - 1):
            logits = rng.standard_normal((batch_size, vocab)).astype(np.float32)
            logits[position] = mine
            rows = [others[i % len(others)] for i in range(batch_size)]
            rows[position] = params
            for t in (0, 5):
                indices = list(rng.integers(0, 100, batch_size))
                indices[position] = t
                out = run(logits, rows, token_indices=indices)
                assert int(out.tokens[position]) == alone[t], (batch_size, position, t)


def test_top_k_past_int32_keeps_every_token():
    """A top_k too large for the batch's int32 array samples as top_k = 0 (no filter) does,
    instead of failing the whole step."""
    logits = random_logits(7, 3)
    huge = [SamplingParams(temperature=1.0, top_k=2**40, seed=s) for s in (1, 2, 3)]
    off = [SamplingParams(temperature=1.0, top_k=0, seed=s) for s in (1, 2, 3)]
    for t in range(4):
        indices = [t] * 3
        np.testing.assert_array_equal(
            run(logits, huge, token_indices=indices).tokens,
            run(logits, off, token_indices=indices).tokens,
        )


def test_skipping_the_filter_changes_nothing_for_unfiltered_rows():
    logits = random_logits(5, 12)
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(12)]
    assert not uses_filters(params)
    assert uses_filters(params + [SamplingParams(top_p=0.9)])
    assert not uses_filters([SamplingParams(temperature=0, top_k=3)])
    full = run(logits, params, apply_filters=True)
    skipped = run(logits, params, apply_filters=False)
    np.testing.assert_array_equal(full.tokens, skipped.tokens)


def test_logprobs_of_chosen_and_top_tokens():
    logits = random_logits(6, 4, vocab=30)
    params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate((0.0, 1.0, 0.3, 2.0))]
    out = run(logits, params, num_top_logprobs=5)
    expected = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    rows = np.arange(4)
    np.testing.assert_allclose(out.logprobs, expected[rows, np.asarray(out.tokens)], rtol=1e-6)
    order = np.argsort(-expected, axis=1)[:, :5]
    np.testing.assert_array_equal(out.top_token_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(expected, order, 1), rtol=1e-6)
    assert run(logits, params).top_logprobs.shape == (4, 0)


def test_vllm_s_spellings_and_bounds():
    """top_k -1 is off (vLLM's and older clients'); temperatures in (0, 0.01) are raised to
    0.01 as vLLM raises them (at 1.2e-38 every logit divided by it was infinite and the first
    token won); logit_bias values are clamped to [-100, 100] as vLLM's server clamps them."""
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=1.2e-38).temperature == 0.01
    assert SamplingParams(temperature=0.0).temperature == 0.0
    assert SamplingParams(temperature=0.5).temperature == 0.5
    assert SamplingParams(logit_bias={5: 150, 6: -1e9}).logit_bias == ((5, 100.0), (6, -100.0))
    logits = jnp.asarray([[38.0, 45.0, 12.0, -5.0]])
    picked = {
        int(run(logits, [SamplingParams(temperature=1.2e-38, seed=seed)]).tokens[0])
        for seed in range(8)
    }
    assert picked == {1}


def test_stop_is_vllm_s_name_for_stop_strings():
    """SamplingParams(stop=...) as vLLM's: one string or a list, the same params as
    stop_strings (equal, hashed alike; a replace keeps them), never beside stop_strings."""
    import dataclasses

    assert SamplingParams(stop="\n").stop_strings == ("\n",)
    assert SamplingParams(stop=["a", "b"]) == SamplingParams(stop_strings=("a", "b"))
    assert hash(SamplingParams(stop="a")) == hash(SamplingParams(stop_strings=["a"]))
    replaced = dataclasses.replace(SamplingParams(stop="a"), max_tokens=3)
    assert replaced.stop_strings == ("a",) and replaced.max_tokens == 3
    assert dataclasses.replace(replaced, stop_strings=("b",)).stop_strings == ("b",)
    with pytest.raises(RequestError, match="'stop': given beside stop_strings"):
        SamplingParams(stop="a", stop_strings=["b"])


def test_padding_rows_and_seed_words():
    batch = SamplingBatch.from_params([SamplingParams(seed=-1)], [3], batch_size=4)
    assert batch.temperature.shape == (4,) and (batch.temperature[1:] == 0).all()
    assert tuple(batch.seed[0]) == (2**32 - 1, 2**32 - 1)
    assert split_seed(2**64 + 5) == (5, 0) and split_seed(2**32 + 7) == (7, 1)
    with pytest.raises(ValueError, match="row 0 has no seed"):
        SamplingBatch.from_params([SamplingParams()], [0])
    with_override = SamplingBatch.from_params([SamplingParams()], [0], seeds=[9])
    assert tuple(with_override.seed[0]) == (9, 0)
    # Every row's fields where it is, the padding after them (greedy, top_p 1, seed 0).
    seeds = [2**32 + 7, -1, 2**64 + 5]
    rows = [
        SamplingParams(temperature=0.5 + i, top_p=0.9, top_k=2**40 if i else 7, min_p=0.1 * i)
        for i in range(3)
    ]
    batch = SamplingBatch.from_params(rows, [4, 5, 6], seeds=seeds, batch_size=5)
    assert [tuple(map(int, w)) for w in batch.seed] == [
        *map(split_seed, seeds),
        (0, 0),
        (0, 0),
    ]
    np.testing.assert_allclose(batch.temperature, [0.5, 1.5, 2.5, 0, 0])
    np.testing.assert_allclose(batch.top_p, [0.9, 0.9, 0.9, 1, 1], rtol=1e-6)
    assert batch.top_k.tolist() == [7, 2**31 - 1, 2**31 - 1, 0, 0]
    np.testing.assert_allclose(batch.min_p, [0, 0.1, 0.2, 0, 0], rtol=1e-6)
    assert batch.token_index.tolist() == [4, 5, 6, 0, 0]
    assert batch.seed.dtype == np.uint32 and batch.top_k.dtype == np.int32
    with pytest.raises(ValueError, match="row 1 has no seed"):
        SamplingBatch.from_params([SamplingParams(seed=1), SamplingParams()], [0, 0])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), "finite"),
        ("temperature", 1e300, "3.4e38"),
        ("top_p", 0.0, r"\(0, 1\]"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("top_k", -2, ">= 0"),
        ("top_k", 2.5, "int"),
        ("max_tokens", 0, ">= 1"),
        ("logprobs", 21, "0..20"),
        ("logprobs", -1, "0..20"),
        ("seed", "7", "int"),
        ("stop_strings", ["ok", ""], "non-empty"),
        ("stop_token_ids", [3, -2], ">= 0"),
        ("ignore_eos", "yes", "bool"),
        ("include_stop_str_in_output", 1, "bool"),
        ("presence_penalty", 2.5, r"\[-2, 2\]"),
        ("frequency_penalty", float("inf"), r"\[-2, 2\]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("min_p", 1.5, r"\[0, 1\]"),
        ("min_tokens", 17, r"0..max_tokens \(16\)"),
        ("min_tokens", -1, "0..max_tokens"),
        ("logit_bias", {5: float("inf")}, "finite biases"),
        ("logit_bias", {-1: 1}, ">= 0"),
        ("logit_bias", {"5": 1}, ">= 0"),
        ("logit_bias", [(5, 1), (5, 2)], "token 5 twice"),
        ("logit_bias", {i: 1 for i in range(1025)}, "at most 1024"),
        ("logit_bias", 5, "mapping"),
        ("n", 0, ">= 1"),
        ("truncate_prompt_tokens", 0, "an int >= 1, or -1"),
        ("truncate_prompt_tokens", -2, "an int >= 1, or -1"),
        ("n", 1.5, "int"),
        ("stop", 5, "a non-empty string or a list"),
        ("stop", ["\n", ""], "a non-empty string or a list"),
    ],
)
def test_invalid_params_raise_request_error(field, value, message):
    with pytest.raises(RequestError, match=f"'{field}'.*{message}"):
        SamplingParams(**{field: value})


def test_params_normalise_lists_and_check_vocab():
    params = SamplingParams(stop_strings="###", stop_token_ids=[5, 7], temperature=1)
    assert params.stop_strings == ("###",) and params.stop_token_ids == (5, 7)
    assert isinstance(params.temperature, float)
    hash(params)  # frozen and hashable
    params.check_vocab(8)
    with pytest.raises(RequestError, match="'stop_token_ids'.*0..6"):
        params.check_vocab(7)
    biased = SamplingParams(logit_bias={9: 1, 2: -3.5})
    assert biased.logit_bias == ((2, -3.5), (9, 1.0)) and biased.processes_logits
    hash(biased)
    with pytest.raises(RequestError, match="'logit_bias'.*token id 9.*0..8"):
        biased.check_vocab(9)
    assert not SamplingParams(min_p=0.2, presence_penalty=0).processes_logits
    for field, value in (
        ("presence_penalty", -0.5),
        ("frequency_penalty", 0.1),
        ("repetition_penalty", 1.2),
        ("min_tokens", 2),
    ):
        assert SamplingParams(**{field: value}).processes_logits, field


def reference_processing(logits, params, prompts, outputs, token_indices, eos_ids):
    """Dense numpy: each row's bias, min_tokens ban, repetition penalty over prompt and the
    whole output, then frequency and presence over the whole output (vLLM's order)."""
    out = np.array(logits, np.float64)
    for row, p in enumerate(params):
        x = out[row]
        for token, bias in p.logit_bias:
            x[token] += bias
        if token_indices[row] < p.min_tokens:
            banned = list(p.stop_token_ids) + list(eos_ids)  # (ignore_eos too, as vLLM)
            x[banned] = -np.inf
        seen = set(prompts[row]) | set(outputs[row])
        for token in seen:
            if p.repetition_penalty != 1:
                x[token] = (
                    x[token] / p.repetition_penalty
                    if x[token] > 0
                    else (x[token] * p.repetition_penalty)
                )
        counts = np.bincount(np.asarray(outputs[row], int), minlength=x.size)
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def processed_run(logits, params, prompts, outputs, pending, token_indices, eos_ids=(1,)):
    """``sample`` with logit processing; ``pending[row]``: the row's last output token is
    still on the device (read from a register), not in the host's history."""
    register = np.full(11, 7, np.int32)
    histories = []
    for row, tokens in enumerate(outputs):
        src = -1
        known = list(tokens)
        if pending[row]:
            src = 2 + row
            register[src] = known.pop()
        histories.append(RowHistory(unique_tokens(prompts[row]), known, src))
    processing = logit_processing(
        params, histories, token_indices, eos_ids=eos_ids, batch_size=len(params) + 1
    )
    batch = SamplingBatch.from_params(
        params + [SamplingParams()],
        list(token_indices) + [0],
        seeds=[0] * (len(params) + 1),
        processing=processing,
    )
    padded = np.concatenate([logits, np.zeros((1, logits.shape[1]), np.float32)])
    processed = process_logits(jnp.asarray(padded), batch.processing, jnp.asarray(register))
    out = sample(jnp.asarray(padded), batch, jnp.asarray(register), apply_filters=False)
    return np.asarray(processed)[:-1], np.asarray(out.tokens)[:-1], out


def test_logit_processing_matches_a_dense_reference():
    """Bias, min_tokens, repetition, frequency and presence penalties, each row its own, with
    the pending output token read from the register, against a dense numpy reference; greedy
    rows take the processed argmax, logprobs stay the model's own."""
    rng = np.random.default_rng(0)
    vocab = 40
    params = [
        SamplingParams(temperature=0, logit_bias={3: 5.0, 17: -100}, frequency_penalty=0.7),
        SamplingParams(temperature=0, presence_penalty=1.5, repetition_penalty=1.3),
        SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[5, 6], max_tokens=8),
        SamplingParams(temperature=0, min_tokens=4, ignore_eos=True, repetition_penalty=0.8),
        SamplingParams(temperature=0),  # processes nothing, shares the step
        SamplingParams(temperature=0, frequency_penalty=-2, presence_penalty=2, min_tokens=1),
    ]
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 3, 12, 4, 1)]
    outputs = [rng.integers(0, vocab, n).tolist() for n in (6, 4, 3, 7, 2, 1)]
    outputs[0] += [outputs[0][0]] * 3  # a token three more times
    pending = [True, True, False, True, False, True]
    token_indices = [len(o) for o in outputs]
    token_indices[2] = 3  # still below min_tokens: 5, 6 and EOS banned
    token_indices[3] = 2  # below min_tokens too: EOS banned with ignore_eos too (vLLM's)
    logits = rng.standard_normal((len(params), vocab)).astype(np.float32) * 4
    logits[2, [1, 5, 6]] += 30  # the banned tokens would win
    processed, tokens, out = processed_run(logits, params, prompts, outputs, pending, token_indices)
    expected = reference_processing(logits, params, prompts, outputs, token_indices, (1,))
    np.testing.assert_allclose(processed, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(tokens, expected.argmax(axis=1))
    assert tokens[2] not in (1, 5, 6)
    assert np.isneginf(processed[2, [1, 5, 6]]).all() and np.isneginf(processed[3, 1])
    np.testing.assert_array_equal(processed[4], logits[4])
    model = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(
        np.asarray(out.logprobs)[:-1], model[np.arange(len(params)), tokens], rtol=1e-5
    )
    # The pending token counts: without it in the register, row 0's count differs.
    dropped = [o[:-1] if p else o for o, p in zip(outputs, pending, strict=True)]
    no_pending = reference_processing(logits, params, prompts, dropped, token_indices, (1,))
    assert not np.allclose(no_pending[0], expected[0])


def test_a_row_that_processes_its_logits_needs_them_packed():
    with pytest.raises(ValueError, match="processes its logits"):
        SamplingBatch.from_params([SamplingParams(presence_penalty=1)], [0])
    batch = SamplingBatch.from_params(
        [SamplingParams(logit_bias={2: 100}, seed=0)],
        [0],
        processing=logit_processing(
            [SamplingParams(logit_bias={2: 100})],
            [RowHistory(unique_tokens([1]), [])],
            [0],
            eos_ids=(),
            batch_size=1,
        ),
    )
    with pytest.raises(ValueError, match="register"):
        sample(jnp.zeros((1, 8)), batch)
    assert batch.processing.token_ids.shape == (1, MIN_PROCESSING_ENTRIES)


def test_logit_bias_steers_sampled_rows_too():
    logits = np.zeros((1, 30), np.float32)
    params = [SamplingParams(temperature=1.0, seed=4, logit_bias={11: 100})]
    for index in range(5):
        _, tokens, _ = processed_run(logits, params, [[0]], [[]], [False], [index])
        assert tokens[0] == 11


def test_min_p_keeps_the_tokens_near_the_most_likely():
    """min_p 0.5 keeps the tokens at least half as likely as the best (0.3, 0.25, 0.2 of
    LOGITS_ROW's 0.3 / 0.25 / 0.2 / 0.12 / ...), and runs before top-k and top-p."""
    draws = 6000
    freq = empirical_distribution(LOGITS_ROW, SamplingParams(min_p=0.5, seed=5), draws)
    probs = np.exp(LOGITS_ROW.astype(np.float64))
    probs[3:] = 0
    probs /= probs.sum()
    assert chi_square(freq, probs, draws) < 40
    # top-p after min-p: 0.3 / 0.75 < 0.5 <= (0.3 + 0.25) / 0.75 keeps two.
    freq = empirical_distribution(LOGITS_ROW, SamplingParams(min_p=0.5, top_p=0.5, seed=6), draws)
    probs[2:] = 0
    probs /= probs.sum()
    assert chi_square(freq, probs, draws) < 40
    assert uses_filters([SamplingParams(min_p=0.1)])
    assert not uses_filters([SamplingParams(min_p=0.1, temperature=0)])


def test_truncate_at_stop():
    assert truncate_at_stop("hello world. bye", ["."]) == ("hello world", True)
    assert truncate_at_stop("a STOP b END", ["END", "STOP"]) == ("a ", True)
    assert truncate_at_stop("no stop here", ["###"]) == ("no stop here", False)
    assert truncate_at_stop("x##y##", ["##"], search_from=3) == ("x##y", True)
    assert truncate_at_stop("a STOP b", ["STOP"], include_stop=True) == ("a STOP", True)
    # Two stops found at the same place: the longer one ends the text.
    assert truncate_at_stop("a <end> b", ["<e", "<end>"], include_stop=True) == ("a <end>", True)
    assert truncate_at_stop("a <end> b", ["<end>", "<e"]) == ("a ", True)


@pytest.mark.parametrize(
    "pieces",
    [
        ["Hello", " wor", "ld", "<e", "nd>", " more"],
        ["Hello world<", "end", "> more"],
        ["Hello world<end> more"],
        list("Hello world<end> more"),
    ],
)
def test_stop_detector_on_streamed_text(pieces):
    detector = StopStringDetector(["<end>", "STOP"])
    streamed = []
    for piece in pieces:
        out, stopped = detector.push(piece)
        streamed.append(out)
        # Never hand out text that might start a stop string.
        assert not "".join(streamed).endswith("<")
        if stopped:
            break
    assert stopped and "".join(streamed) == "Hello world" == detector.text
    assert detector.matched == "<end>"  # (the engine's Request.stop_reason)
    assert detector.push("again") == ("", True)


def test_stop_detector_holds_back_then_flushes():
    detector = StopStringDetector(["STOP"])
    assert detector.push("the ST") == ("the ", False)
    assert detector.push("ORY") == ("STORY", False)
    assert detector.push(" S") == (" ", False)
    assert detector.flush() == "S"
    assert detector.text == "the STORY S" and detector.matched is None
    assert StopStringDetector([]).push("anything") == ("anything", False)


@pytest.mark.parametrize(
    "pieces", [["Hello", " wor", "ld", "<e", "nd>", " more"], list("Hello world<end> more")]
)
def test_stop_detector_keeps_the_stop_when_asked(pieces):
    detector = StopStringDetector(["<end>", "STOP"], include_stop=True)
    streamed = []
    for piece in pieces:
        out, stopped = detector.push(piece)
        streamed.append(out)
        if stopped:
            break
    assert stopped and "".join(streamed) == "Hello world<end>" == detector.text


def test_stop_detector_skips_detection_when_told():
    """min_tokens: text pushed with detect=False is not searched for stops; text pushed after
    it is (with the few characters before it that could start a match)."""
    detector = StopStringDetector(["END"])
    assert detector.push("an END", detect=False) == ("an END", False)
    assert detector.push(" E", detect=False) == (" ", False)
    assert detector.push("ND here") == ("", True)
    assert detector.text == "an END "


def test_none_is_vllm_s_default_of_the_list_fields():
    """vLLM's SamplingParams default stop, stop_token_ids, bad_words and logit_bias to None:
    a vLLM caller's explicit None means none here too."""
    params = SamplingParams(stop_strings=None, stop_token_ids=None, bad_words=None, logit_bias=None)
    assert params == SamplingParams()
    assert not params.processes_logits and not params.masks_tokens
