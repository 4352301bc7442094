"""Bad words (vLLM's ``bad_words``): their token forms, the bans after an output's tail, the
bitmask they clear, and the engine's requests against a greedy recompute that bans the same
tokens (async and synchronous, with preemptions, beside a structured output)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.bad_words import BadWords, apply_bans, bad_word_token_ids, clear_tokens
from jaxlora.errors import RequestError
from jaxlora.sampling import MAX_BAD_WORDS, SamplingParams
from jaxlora.structured_output import (
    StructuredOutput,
    TokenMasks,
    allowed_tokens,
    mask_words,
    token_mask,
)
from tests.test_engine import _full_forward, small_engine_config
from tests.test_structured_output import constrained_greedy_reference


def test_a_word_is_banned_as_written_and_after_a_space(tokenizer):
    def encode(text):
        return tuple(tokenizer.encode(text, add_bos=False))

    # " the" is one token where "the" is two: both spellings are banned.
    assert len(encode(" the")) == 1 and len(encode("the")) == 2
    assert bad_word_token_ids(tokenizer, ["the"]) == (encode("the"), encode(" the"))
    # " cat" is a space token before "cat"'s tokens, which the first form's ban catches.
    assert encode(" cat")[1:] == encode("cat")
    assert bad_word_token_ids(tokenizer, ["cat"]) == (encode("cat"),)
    # Leading whitespace is the spaced form's job; a repeat adds nothing.
    assert bad_word_token_ids(tokenizer, ["  the", "the", "cat"]) == (
        encode("the"),
        encode(" the"),
        encode("cat"),
    )
    with pytest.raises(RequestError, match=r"^bad_words\[1\]: expected a word"):
        bad_word_token_ids(tokenizer, ["cat", "   "])


def test_bans_follow_the_tail_of_the_output():
    words = BadWords([[5], [7, 8], [1, 2, 3], [2, 3, 9], [7, 4]], vocab_size=16)
    assert words.banned([]) == [5]
    assert words.banned([0, 7]) == [4, 5, 8]
    assert words.banned([1, 2]) == [3, 5]
    assert words.banned([2]) == [5]  # (only [1, 2] bans 3)
    assert words.banned([1, 2, 3]) == [5, 9]
    assert words.banned([7, 0]) == [5]
    assert not words.static and BadWords([[5], [9]], vocab_size=16).static
    with pytest.raises(RequestError, match="^bad_words: token id 16 is outside"):
        BadWords([[3, 16]], vocab_size=16)


def test_sampling_params_check_their_bad_words():
    assert SamplingParams(bad_words=["a", "b c"]).bad_words == ("a", "b c")
    for bad in ("word", ["ok", ""], ["ok", " \t"], [3], ["w"] * (MAX_BAD_WORDS + 1)):
        with pytest.raises(RequestError, match="'bad_words'"):
            SamplingParams(bad_words=bad)


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 500, 1000])
def test_cleared_bits_are_exactly_the_banned_tokens(vocab_size):
    rng = np.random.default_rng(vocab_size)
    words = mask_words(vocab_size)
    mask = rng.integers(-(2**31), 2**31, size=words, dtype=np.int64).astype(np.int32)
    before = allowed_tokens(mask[None], vocab_size)[0]
    banned = rng.choice(vocab_size, size=min(vocab_size, 7), replace=False)
    banned = [*banned.tolist(), vocab_size - 1, 0]  # the last and the sign bit of a word
    if vocab_size > 31:
        banned.append(31)
    clear_tokens(mask, banned)
    expected = before.copy()
    expected[banned] = False
    np.testing.assert_array_equal(allowed_tokens(mask[None], vocab_size)[0], expected)


def test_a_ban_that_would_leave_no_token_is_not_applied():
    mask = np.zeros(mask_words(40), np.int32)
    clear_tokens(mask, [])  # (nothing to clear)
    mask[1] = 1 << 3  # token 35 alone
    assert not apply_bans(mask, [35], 40)
    assert allowed_tokens(mask[None], 40)[0].nonzero()[0].tolist() == [35]
    mask[0] = 1 << 2
    assert apply_bans(mask, [35], 40)
    assert allowed_tokens(mask[None], 40)[0].nonzero()[0].tolist() == [2]


def banned_greedy_reference(params, tokenizer, prompt, sampling, width=48):
    """Greedy decoding by recomputing the whole sequence for every token, the bad words'
    tokens after the output so far at -inf; ends on EOS or at max_tokens."""
    words = BadWords(bad_word_token_ids(tokenizer, sampling.bad_words), TINY.vocab_size)
    out = []
    for _ in range(sampling.max_tokens):
        seq = prompt + out
        logits = _full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        row = np.array(logits[0, len(seq) - 1])
        row[words.banned(out)] = -np.inf
        out.append(int(np.argmax(row)))
        if out[-1] in tokenizer.eos_token_ids:
            break
    return out


def _contains(ids, sequence) -> bool:
    n = len(sequence)
    return any(tuple(ids[i : i + n]) == tuple(sequence) for i in range(len(ids) - n + 1))


def _word_in(tokenizer, ids, length):
    """A word of the text of ``ids`` whose token form (one of) is ``length`` tokens that the
    ids contain: banning it must change them. A one-token word's every form is one token."""
    for start in range(len(ids) - length + 1):
        word = tokenizer.decode(ids[start : start + length]).strip()
        forms = bad_word_token_ids(tokenizer, [word]) if word else ()
        if length == 1 and any(len(s) > 1 for s in forms):
            continue
        if any(len(s) == length and _contains(ids, s) for s in forms):
            return word
    raise AssertionError(f"no {length}-token word in {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("two_token_word", [True, False])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_bad_words_give_the_banned_recompute_tokens(
    base, tokenizer, async_scheduling, two_token_word
):
    """Greedy requests with bad words of one and of two tokens taken from their own free
    outputs, beside free requests, async (a row with a word of several tokens waits for its
    previous token on the host; with one-token words only, nothing waits) and synchronous,
    with preemptions: each gets the tokens of a recompute that bans the same tokens, none of
    its words' token forms, and not its free output."""
    texts = ("The cat", "Hi", "is it", "The dog")
    prompts = [tokenizer.encode(t) for t in texts]
    config = dataclasses.replace(
        small_engine_config(num_pages=14, max_model_len=48), async_scheduling=async_scheduling
    )
    llm = jaxlora.LLM(TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0)
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    frees = llm.generate(prompts, sampling=free)
    samplings = [
        dataclasses.replace(free, bad_words=(_word_in(tokenizer, frees[0].token_ids, 1),)),
        free,
        dataclasses.replace(
            free, bad_words=(_word_in(tokenizer, frees[2].token_ids, 2 if two_token_word else 1),)
        ),
        dataclasses.replace(
            free,
            bad_words=("zzz",) * two_token_word + (_word_in(tokenizer, frees[3].token_ids, 1),),
        ),
    ]
    requests = [
        llm.engine.submit(p, s, stream=False) for p, s in zip(prompts, samplings, strict=True)
    ]
    waits = [r.masks_after_previous_token for r in requests]
    assert waits == [False, False, two_token_word, two_token_word]
    llm.engine.run_until_idle()
    assert llm.engine.stats.preemptions > 0
    assert llm.engine.kv.free_pages == config.kv.num_pages
    for prompt, sampling, out, unbanned in zip(prompts, samplings, requests, frees, strict=True):
        if not sampling.bad_words:
            assert out.output_ids == unbanned.token_ids
            continue
        assert out.output_ids == banned_greedy_reference(base, tokenizer, prompt, sampling)
        for sequence in bad_word_token_ids(tokenizer, sampling.bad_words):
            assert not _contains(out.output_ids, sequence), (sampling.bad_words, out.text)
        assert out.output_ids != unbanned.token_ids  # the ban bites


def grammar_and_bans_reference(params, tokenizer, prompt, sampling, width=48):
    """Greedy recompute under the grammar's mask less the bad words' bans (unless they would
    leave no token); ends on EOS or where the grammar can take nothing more."""
    masks = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids)
    matcher = masks.matcher(sampling.structured_output)
    words = BadWords(bad_word_token_ids(tokenizer, sampling.bad_words), TINY.vocab_size)
    out, kept = [], 0
    for _ in range(sampling.max_tokens):
        seq = prompt + out
        logits = _full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        row = np.asarray(logits[0, len(seq) - 1])
        mask = masks.bitmask([(matcher, 0)], 1)
        kept += not apply_bans(mask[0], words.banned(out), TINY.vocab_size)
        allowed = allowed_tokens(mask, TINY.vocab_size)[0]
        out.append(int(np.flatnonzero(allowed)[np.argmax(row[allowed])]))
        assert matcher.consume_token(out[-1])
        if out[-1] in tokenizer.eos_token_ids or matcher.is_stopped():
            break
    return out, kept


def test_bad_words_narrow_a_structured_output(base, tokenizer):
    """Under a grammar the bans narrow its mask: greedy requests get the tokens of a recompute
    whose mask is the grammar's less the bans, where a ban that would leave the grammar no
    token is not applied (the grammar may also spell a banned text with other tokens); sampled
    ones always match the grammar."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        tokenizer=tokenizer,
        engine_config=small_engine_config(num_pages=96, max_model_len=48),
        load_workers=0,
    )
    choices = ("yes", "no", "maybe not")
    spec = StructuredOutput("choice", choices)
    prompt = tokenizer.encode("pick")
    greedy = SamplingParams(temperature=0, max_tokens=12, structured_output=spec)
    [free] = llm.generate([prompt], sampling=greedy)
    assert free.text in choices
    first = tokenizer.decode(free.token_ids[:1])
    assert bad_word_token_ids(tokenizer, [first])[0] == tuple(free.token_ids[:1])
    only_x = dataclasses.replace(greedy, structured_output=StructuredOutput("choice", ["x"]))
    greedy_cases = [
        dataclasses.replace(greedy, bad_words=(first,)),
        dataclasses.replace(greedy, bad_words=(first, "no", "maybe")),
        dataclasses.replace(only_x, bad_words=("x",)),  # the only first token banned
    ]
    sampled = [
        dataclasses.replace(greedy, temperature=2.0, seed=seed, bad_words=(first, "no"))
        for seed in range(8)
    ]
    outs = llm.generate([prompt] * 11, sampling=greedy_cases + sampled)
    assert outs[0].token_ids[0] != free.token_ids[0]
    kept = []
    for sampling, out in zip(greedy_cases, outs, strict=False):
        expected, k = grammar_and_bans_reference(base, tokenizer, prompt, sampling)
        assert out.token_ids == expected
        kept.append(k)
    assert kept[2] >= 1 and outs[2].text == "x"
    for out in outs:
        assert out.text in (*choices, "x") and out.finish_reason == "stop", out.text


def test_bad_words_need_a_tokenizer(base):
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    with pytest.raises(RequestError, match="^bad_words: .*no tokenizer"):
        llm.engine.submit([1, 2], SamplingParams(bad_words=["x"]))


# ---------------------------------------------------------------------------- allowed tokens


def test_sampling_params_check_their_allowed_tokens():
    assert SamplingParams(allowed_token_ids=[5, 3, 5]).allowed_token_ids == (3, 5)
    for bad in ([], [-1], ["a"], 3):
        with pytest.raises(RequestError, match="'allowed_token_ids'"):
            SamplingParams(allowed_token_ids=bad)
    with pytest.raises(RequestError, match="'allowed_token_ids': token id 600"):
        SamplingParams(allowed_token_ids=[1, 600]).check_vocab(512)
    np.testing.assert_array_equal(
        allowed_tokens(token_mask([0, 31, 32, 511], 512)[None], 512)[0],
        np.isin(np.arange(512), [0, 31, 32, 511]),
    )


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_allowed_tokens_give_the_restricted_recompute_tokens(base, tokenizer, async_scheduling):
    """allowed_token_ids (vLLM's): greedy requests get the argmax over their allowed tokens at
    every step of a recompute (none of the free output's tokens, nor EOS, is allowed, so they
    run to max_tokens), beside a free request; under a grammar that allows none of them the
    grammar decides, and beside one that allows some they narrow it. The rows wait for no
    previous token (the masks are the same every step)."""
    config = dataclasses.replace(
        small_engine_config(num_pages=96, max_model_len=48), async_scheduling=async_scheduling
    )
    llm = jaxlora.LLM(TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0)
    prompts = [tokenizer.encode(t) for t in ("The cat", "Hi", "pick", "pick")]
    greedy = SamplingParams(temperature=0, max_tokens=10)
    free = llm.generate(prompts[:2], sampling=greedy)
    seen = {t for out in free for t in out.token_ids} | set(tokenizer.eos_token_ids)
    allowed = [t for t in range(3, 300, 7) if t not in seen]
    yes = tokenizer.encode("yes", add_bos=False)
    choice = StructuredOutput("choice", ("yes", "no"))
    samplings = [
        dataclasses.replace(greedy, allowed_token_ids=allowed),
        greedy,
        dataclasses.replace(greedy, allowed_token_ids=allowed, structured_output=choice),
        dataclasses.replace(greedy, allowed_token_ids=[yes[0], 5], structured_output=choice),
    ]
    requests = [
        llm.engine.submit(p, s, stream=False) for p, s in zip(prompts, samplings, strict=True)
    ]
    assert not any(r.masks_after_previous_token for r in requests[:2])
    while llm.engine.has_work():
        llm.engine.step()
    first, plain, grammar, narrowed = requests
    assert plain.output_ids == free[1].token_ids
    assert first.output_ids != free[0].token_ids and len(first.output_ids) == 10
    out = []
    for _ in range(10):
        seq = prompts[0] + out
        logits = _full_forward(base, jnp.array([seq + [0] * (48 - len(seq))], jnp.int32))
        row = np.asarray(logits[0, len(seq) - 1])
        out.append(allowed[int(np.argmax(row[allowed]))])
    assert first.output_ids == out
    assert grammar.text in ("yes", "no")
    assert grammar.output_ids == constrained_greedy_reference(
        base, tokenizer, prompts[2], dataclasses.replace(samplings[2], allowed_token_ids=None)
    )
    assert narrowed.text == "yes"


def test_special_tokens_are_written_when_asked(base, tokenizer):
    """skip_special_tokens=False (vLLM's): an EOS that ignore_eos went past is in the text; a
    stop token's text is not, unless include_stop_str_in_output."""
    llm = jaxlora.LLM(
        TINY, params=base, tokenizer=tokenizer, engine_config=small_engine_config(), load_workers=0
    )
    eos = tokenizer.eos_token_ids[0]
    eos_text = tokenizer.decode([eos], skip_special_tokens=False)
    sampling = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})
    skipped, written = llm.generate(
        [[1, 5]] * 2,
        sampling=[sampling, dataclasses.replace(sampling, skip_special_tokens=False)],
    )
    assert skipped.token_ids == written.token_ids == [eos] * 3
    assert skipped.text == "" and written.text == eos_text * 3 and eos_text
    # A stop token's text is not the output's (vLLM's), unless include_stop_str_in_output;
    # its id is in the output's ids either way.
    free = llm.generate([[1, 5]], sampling=SamplingParams(temperature=0, max_tokens=6))[0]
    at = next(i for i, t in enumerate(free.token_ids) if i and t not in free.token_ids[:i])
    stop = free.token_ids[at]
    stopped = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop])
    at_eos = dataclasses.replace(sampling, ignore_eos=False, skip_special_tokens=False)
    cases = [
        stopped,
        dataclasses.replace(stopped, include_stop_str_in_output=True),
        at_eos,
        dataclasses.replace(at_eos, include_stop_str_in_output=True),
    ]
    without, with_stop, eos_only, eos_kept = llm.generate([[1, 5]] * 4, sampling=cases)
    assert without.token_ids == with_stop.token_ids == free.token_ids[: at + 1]
    assert without.text == tokenizer.decode(free.token_ids[:at])
    assert with_stop.text == tokenizer.decode(free.token_ids[: at + 1])
    assert eos_only.token_ids == eos_kept.token_ids == [eos]
    assert eos_only.text == "" and eos_kept.text == eos_text
