"""Structured outputs: the specs' checks, the sampler's token masks, and the engine's
constrained requests (async and synchronous, with preemptions) against a recompute that masks
with its own matcher."""

import dataclasses
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.errors import RequestError
from jaxlora.sampling import (
    SamplingBatch,
    SamplingParams,
    constrain,
    sample,
    unpack_token_mask,
)
from jaxlora.structured_output import StructuredOutput, TokenMasks, allowed_tokens, mask_words
from tests.test_engine import _full_forward, small_engine_config

# Compact JSON (no free whitespace): a random tiny model would otherwise pad with blanks
# until max_tokens, and never close the object.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
DIGITS = r"[a-z]{2,5}-[0-9]{1,3}"
DEEP = {"type": "integer"}
for _ in range(3000):
    DEEP = {"type": "array", "items": DEEP}
CHOICES = ("yes", "no", "maybe not")
ARITHMETIC = 'start: "(" expr ")"\nexpr: DIGIT ("+" DIGIT)*\n%import common.DIGIT'


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "kind, spec, message",
    [
        ("xml", "<a/>", "expected a kind among"),
        ("json", "{not json", "the schema is not valid JSON"),
        ("json", "[1, 2]", "expected a JSON schema"),
        ("json", {"type": "nonsense"}, "does not compile"),
        ("json", "  ", "a non-empty string"),
        ("regex", "[a-", "does not compile"),
        ("regex", 5, "a non-empty string"),
        ("choice", [], "a list of 1..1024 non-empty strings"),
        ("choice", ["a", ""], "a list of 1..1024 non-empty strings"),
        ("choice", "yes", "a list of 1..1024 non-empty strings"),
        ("grammar", "start: (", "not a Lark or GBNF grammar|does not compile"),
        # (a string inside a request body nests as deep as it likes: a 400, not a 500)
        ("json", '{"items":' * 5000 + "{}" + "}" * 5000, "nested too deeply"),
        ("json", DEEP, "nested too deeply"),
        ("json", {"enum": [{1, 2}]}, "the schema is not JSON"),
    ],
)
def test_a_bad_spec_is_refused_naming_its_field(kind, spec, message):
    with pytest.raises(RequestError, match=rf"^response_format: .*({message})"):
        StructuredOutput(kind, spec, field="response_format")


def test_the_schema_true_is_any_json_value_compact_or_not(tokenizer):
    """(llguidance applies options such as compact JSON to an object schema only)"""
    masks = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids)
    for compact in (False, True):
        matcher = masks.matcher(StructuredOutput("json", "true", compact=compact))
        ids = tokenizer.encode('[1,{"a":null}, "x"]', add_bos=False)
        spaced = ids.index(tokenizer.encode(' "x', add_bos=False)[0])
        assert matcher.validate_tokens(ids) == (spaced if compact else len(ids))


def test_specs_compile_once_and_sampling_params_check_the_type():
    spec = StructuredOutput("json", PERSON)
    assert json.loads(spec.spec) == PERSON
    assert spec.grammar and spec == StructuredOutput("json", json.dumps(PERSON))
    assert StructuredOutput("choice", ["a", "b"]).spec == ("a", "b")
    with pytest.raises(RequestError, match="'structured_output'"):
        SamplingParams(structured_output={"type": "json_object"})


def test_a_grammar_compiles_against_the_vocabulary_once(tokenizer, monkeypatch):
    """A request's matcher is a copy of its grammar's compiled one (a large schema compiles in
    seconds, a copy in microseconds): the n choices of a request, or the requests of one
    schema, compile it once; each copy goes its own way; the last few grammars are kept."""
    import llguidance

    from jaxlora import structured_output

    specs = [StructuredOutput("choice", CHOICES), StructuredOutput("choice", list(CHOICES))]
    others = [StructuredOutput("regex", DIGITS), StructuredOutput("grammar", ARITHMETIC)]
    compiled = []

    def compile_matcher(*args, **kwargs):
        compiled.append(args[1])
        return llguidance.LLMatcher(*args, **kwargs)

    fake = types.SimpleNamespace(
        LLTokenizer=llguidance.LLTokenizer,
        LLExecutor=llguidance.LLExecutor,
        LLMatcher=compile_matcher,
    )
    monkeypatch.setattr(structured_output, "_llguidance", lambda: fake)
    masks = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids)
    first, second = (masks.matcher(spec) for spec in specs)
    assert len(compiled) == 1
    yes, no = (tokenizer.encode(word, add_bos=False) for word in ("yes", "no"))
    assert first.try_consume_tokens(yes) == len(yes)
    assert second.try_consume_tokens(no) == len(no)
    assert masks.matcher(specs[0]).try_consume_tokens(no) == len(no)
    monkeypatch.setattr(TokenMasks, "KEPT_GRAMMARS", 2)
    for spec in others:
        masks.prepare(spec)
    masks.matcher(others[1])
    assert len(compiled) == 3
    masks.matcher(specs[0])  # (the oldest: dropped)
    assert compiled == [specs[0].grammar, *(spec.grammar for spec in others), specs[0].grammar]
    # Fewer where the grammars are large together (the last one is kept).
    monkeypatch.setattr(TokenMasks, "KEPT_GRAMMARS", 32)
    monkeypatch.setattr(TokenMasks, "KEPT_GRAMMAR_CHARS", 1)
    masks.prepare(others[0])
    masks.matcher(specs[0])
    masks.matcher(specs[0])
    assert compiled[4:] == [others[0].grammar, specs[0].grammar]


# ---------------------------------------------------------------------------- the sampler


def test_token_masks_unpack_bit_t_of_word_t_over_32():
    rng = np.random.default_rng(0)
    for vocab in (1, 31, 32, 33, 100, 512):
        words = rng.integers(-(2**31), 2**31, (3, mask_words(vocab)), dtype=np.int64)
        words = words.astype(np.int32)
        expected = np.array(
            [[(int(words[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(3)],
            bool,
        )
        np.testing.assert_array_equal(allowed_tokens(words, vocab), expected)
        np.testing.assert_array_equal(
            np.asarray(unpack_token_mask(jnp.asarray(words), vocab)), expected
        )


def _words(allowed: np.ndarray) -> np.ndarray:
    padded = np.zeros((allowed.shape[0], mask_words(allowed.shape[1]) * 32), np.uint8)
    padded[:, : allowed.shape[1]] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view(np.int32)


def test_the_sampler_only_samples_allowed_tokens():
    rng = np.random.default_rng(1)
    rows, vocab = 6, 300
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    allowed = rng.random((rows, vocab)) < 0.05
    allowed[0] = True  # an unconstrained row
    allowed[1] = False
    allowed[1, 7] = True  # one choice: taken whatever its logit
    logits[1, 7] = -50
    params = [
        SamplingParams(temperature=t, top_k=k, seed=s)
        for t, k, s in [
            (1.0, 0, 1),
            (0.0, 0, 2),
            (0.0, 0, 3),
            (1.5, 5, 4),
            (0.7, 0, 5),
            (1.0, 0, 6),
        ]
    ]
    for step in range(20):
        batch = SamplingBatch.from_params(
            params, [step] * rows, batch_size=rows, allowed=_words(allowed)
        )
        out = sample(jnp.asarray(logits), batch, num_top_logprobs=3)
        tokens = np.asarray(out.tokens)
        assert all(allowed[r, tokens[r]] for r in range(rows)), tokens
        assert tokens[1] == 7
        assert tokens[2] == np.flatnonzero(allowed[2])[np.argmax(logits[2, allowed[2]])]
        # Logprobs stay the model's own distribution.
        expected = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)[np.arange(rows), tokens]
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected), rtol=1e-5)


def test_a_row_whose_processing_bans_every_allowed_token_keeps_the_grammar():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    processed = logits.at[0, 1].set(-jnp.inf).at[1, 1].set(-jnp.inf)
    allowed = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], bool)
    out = np.asarray(constrain(logits, processed, jnp.asarray(_words(allowed))))
    np.testing.assert_array_equal(out[0], [-np.inf, -np.inf, 2.0, -np.inf])
    np.testing.assert_array_equal(out[1], [-np.inf, 1.0, -np.inf, -np.inf])


def test_a_batch_with_a_structured_row_needs_its_masks():
    params = [SamplingParams(structured_output=StructuredOutput("choice", ["a"]), seed=0)]
    with pytest.raises(ValueError, match="masks its tokens"):
        SamplingBatch.from_params(params, [0])


# ---------------------------------------------------------------------------- the engine


def constrained_greedy_reference(params, tokenizer, prompt, sampling, width=48):
    """Greedy decoding by recomputing the whole sequence for every token, with a matcher of
    its own masking the logits; ends on EOS or where the grammar can take nothing more."""
    masks = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids)
    matcher = masks.matcher(sampling.structured_output)
    out = []
    for _ in range(sampling.max_tokens):
        seq = prompt + out
        logits = _full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        row = np.asarray(logits[0, len(seq) - 1])
        allowed = allowed_tokens(masks.bitmask([(matcher, 0)], 1), TINY.vocab_size)[0]
        token = int(np.flatnonzero(allowed)[np.argmax(row[allowed])])
        out.append(token)
        assert matcher.consume_token(token)
        if token in tokenizer.eos_token_ids or matcher.is_stopped():
            break
    return out


def _valid(kind: str, text: str) -> bool:
    if kind == "json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return set(value) == {"name", "age"} and 0 <= value["age"] <= 99
    if kind == "regex":
        return re.fullmatch(DIGITS, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"\(\d(\+\d)*\)", text) is not None


SPECS = [
    StructuredOutput("json", PERSON),
    StructuredOutput("regex", DIGITS),
    StructuredOutput("choice", CHOICES),
    StructuredOutput("grammar", ARITHMETIC),
    None,
    StructuredOutput("json", PERSON),
]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_constrained_requests_give_the_masked_recompute_tokens(base, tokenizer, async_scheduling):
    """Greedy constrained requests of four kinds beside an unconstrained one, async (a
    constrained row waits for its previous token on the host) and synchronous, with
    preemptions: each gets the tokens of a recompute masked by its own matcher, and its text
    matches its spec (ended by EOS or by the grammar, within max_tokens)."""
    prompts = [tokenizer.encode(t) for t in ("The cat", "Hi", "is it", "sum", "The dog", "x")]
    samplings = [SamplingParams(temperature=0, max_tokens=24, structured_output=s) for s in SPECS]
    config = dataclasses.replace(
        small_engine_config(num_pages=14, max_model_len=48), async_scheduling=async_scheduling
    )
    llm = jaxlora.LLM(TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0)
    outs = llm.generate(prompts, sampling=samplings)
    assert llm.engine.stats.preemptions > 0
    assert llm.engine.kv.free_pages == config.kv.num_pages
    unconstrained = llm.generate(
        prompts, sampling=[dataclasses.replace(s, structured_output=None) for s in samplings]
    )
    for prompt, sampling, out, free in zip(prompts, samplings, outs, unconstrained, strict=True):
        spec = sampling.structured_output
        if spec is None:
            assert out.token_ids == free.token_ids
            continue
        assert out.token_ids == constrained_greedy_reference(base, tokenizer, prompt, sampling)
        assert out.finish_reason == "stop", (spec.kind, out.text)
        assert _valid(spec.kind, out.text), (spec.kind, out.text)
        assert out.token_ids != free.token_ids  # the mask bites


def test_sampled_constrained_requests_always_match(base, tokenizer):
    """Sampling at temperature 1.5 (seeds 0..11; room for a name of 5 four-byte characters):
    every output matches its spec, and the outputs are not all the same."""
    config = small_engine_config(num_pages=96, max_model_len=48)
    llm = jaxlora.LLM(TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0)
    prompt = tokenizer.encode("pick")
    for spec in SPECS[:4]:
        samplings = [
            SamplingParams(temperature=1.5, max_tokens=44, seed=seed, structured_output=spec)
            for seed in range(12)
        ]
        outs = llm.generate([prompt] * 12, sampling=samplings)
        for out in outs:
            assert out.finish_reason == "stop" and _valid(spec.kind, out.text), out.text
        assert len({out.text for out in outs}) > 1, spec.kind


def test_structured_outputs_need_a_tokenizer(base):
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    sampling = SamplingParams(structured_output=StructuredOutput("choice", ["a"], field="guided"))
    with pytest.raises(RequestError, match="^guided: .*no tokenizer"):
        llm.engine.submit([1, 2], sampling)


def test_a_constrained_row_decodes_every_async_iteration(base, tokenizer):
    """Under async scheduling a constrained request (beside an unconstrained one for its first
    tokens) takes a token every iteration (its sampler waits for the previous token, not its
    whole step): one iteration a token, plus one to read the last, and the synchronous
    engine's tokens."""
    prompt = tokenizer.encode("The cat")
    spec = StructuredOutput("regex", "[a-z]{30}")
    samplings = [
        SamplingParams(temperature=0, max_tokens=30, structured_output=spec),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    ]
    outs = {}
    for async_scheduling in (True, False):
        config = dataclasses.replace(
            small_engine_config(num_pages=96, max_model_len=48), async_scheduling=async_scheduling
        )
        llm = jaxlora.LLM(
            TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0
        )
        requests = [llm.engine.submit(prompt, s, stream=False) for s in samplings]
        iterations = 0
        while llm.engine.has_work():
            llm.engine.step()
            iterations += 1
        outs[async_scheduling] = [r.output_ids for r in requests]
        assert re.fullmatch("[a-z]{30}", requests[0].text)
        tokens = len(requests[0].output_ids)
        assert tokens > 10 and len(requests[1].output_ids) == 5
        # 1 prefill iteration, a decode one a further token, and (async) 1 to read the last.
        assert iterations == tokens + async_scheduling, (iterations, tokens)
    assert outs[True] == outs[False]


def test_the_mask_benchmark_walks_its_schema_at_a_small_vocabulary():
    """scripts/bench_structured.py's library side: every step of its answer is allowed by the
    schema (the matchers never refuse), and it reports each row count."""
    from jaxlora.bench.structured import mask_times

    result = mask_times(2000, (1, 3))
    assert result["vocab_size"] == 2000 and result["build_ms"] > 0
    for rows in (1, 3):
        row = result[f"rows_{rows}"]
        assert row["steps"] == 59 and 0 < row["median_us"] <= row["max_us"]
        assert row["allowed_last_step"] >= 1  # the closing brace


# ---------------------------------------------------------------------------- after reasoning


def reasoning_greedy_reference(params, tokenizer, prompt, sampling, width=48):
    """Greedy decoding by recompute under ReasoningTokens' rules, written out here: while the
    answer may still be opening its reasoning (start tags only), the grammar's tokens (after
    the tag tokens so far, where it takes them) and the tag's next token; inside the
    reasoning, any token until the tail spells the closing tag; then the grammar's."""
    masks = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids)
    spec, tags = sampling.structured_output, sampling.reasoning_tokens
    matcher = masks.matcher(spec)
    phase, reasoning_from, out, phases = ("opening" if tags.start else "reasoning"), 0, [], []
    for _ in range(sampling.max_tokens):
        seq = prompt + out
        logits = _full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        row = np.asarray(logits[0, len(seq) - 1])
        if phase == "reasoning":
            allowed = np.ones(TINY.vocab_size, bool)
        elif phase == "grammar":
            allowed = allowed_tokens(masks.bitmask([(matcher, 0)], 1), TINY.vocab_size)[0]
        else:
            opening = masks.matcher(spec)
            allowed = np.zeros(TINY.vocab_size, bool)
            if opening.try_consume_tokens(out) == len(out):
                allowed = allowed_tokens(masks.bitmask([(opening, 0)], 1), TINY.vocab_size)[0]
            allowed[tags.start[len(out)]] = True
        token = int(np.flatnonzero(allowed)[np.argmax(row[allowed])])
        out.append(token)
        phases.append(phase)
        if phase == "opening":
            if token != tags.start[len(out) - 1]:
                phase = "grammar"
                assert matcher.try_consume_tokens(out) == len(out)
            elif len(out) == len(tags.start):
                phase, reasoning_from = "reasoning", len(out)
        elif phase == "reasoning":
            thought = out[reasoning_from:]
            if tuple(thought[-len(tags.end) :]) == tags.end:
                phase = "grammar"
        else:
            assert matcher.consume_token(token)
        if token in tokenizer.eos_token_ids or (phase == "grammar" and matcher.is_stopped()):
            break
    return out, phases


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_grammar_after_reasoning_constrains_only_the_answer(base, tokenizer, async_scheduling):
    """ReasoningTokens (vLLM's structured outputs beside a reasoning parser), async and
    synchronous, with preemptions. Tags are taken from each prompt's free greedy output, so
    every path is taken: the answer starts inside the reasoning (deepseek_r1) and closes it;
    it opens a block (qwen3) and closes it; it does not open one (an opening tag the model
    never picks) and follows the grammar from its first token; it begins a tag that the
    grammar refuses, so it must finish it. Each request gets the tokens of a recompute under
    the rules, each path is seen, and the text after the closing tag matches the spec."""
    from jaxlora.structured_output import ReasoningTokens

    prompts = [tokenizer.encode(t) for t in ("The cat", "Hi", "is it", "sum", "x")]
    config = dataclasses.replace(
        small_engine_config(num_pages=8, max_model_len=48), async_scheduling=async_scheduling
    )
    llm = jaxlora.LLM(TINY, params=base, tokenizer=tokenizer, engine_config=config, load_workers=0)
    free = [
        out.token_ids
        for out in llm.generate(prompts, sampling=SamplingParams(temperature=0, max_tokens=8))
    ]
    assert all(len(f) == 8 for f in free)
    never = [t for t in range(TINY.vocab_size) if all(t not in f for f in free)][-1]
    # The fourth answer opens with its first free token and is forced to finish the tag with
    # `never`: its reasoning goes on as the prompt with those two tokens would.
    forced = [free[3][0], never]
    (after_forced,) = llm.generate(
        [prompts[3] + forced], sampling=SamplingParams(temperature=0, max_tokens=4)
    )
    choices = StructuredOutput("choice", CHOICES)
    refuses = TokenMasks(tokenizer, TINY.vocab_size, tokenizer.eos_token_ids).matcher(choices)
    assert refuses.try_consume_tokens(forced[:1]) == 0  # (the grammar cannot take the tag)
    cases = [  # (tags, grammar, the phases the answer goes through)
        (ReasoningTokens(end=free[0][2:4]), StructuredOutput("regex", DIGITS), "rg"),
        (ReasoningTokens(end=free[1][3:5], start=free[1][:2]), choices, "org"),
        (ReasoningTokens(end=free[2][3:5], start=(never, never)), choices, "og"),
        (ReasoningTokens(end=after_forced.token_ids[1:3], start=forced), choices, "org"),
        (None, choices, "g"),
    ]
    samplings = [
        SamplingParams(temperature=0, max_tokens=24, structured_output=spec, reasoning_tokens=t)
        for t, spec, _ in cases
    ]
    outs = llm.generate(prompts, sampling=samplings)
    assert llm.engine.stats.preemptions > 0
    for prompt, sampling, out, (tags, spec, path) in zip(
        prompts, samplings, outs, cases, strict=True
    ):
        if tags is None:
            expected = constrained_greedy_reference(base, tokenizer, prompt, sampling)
            phases = ["grammar"] * len(expected)
        else:
            expected, phases = reasoning_greedy_reference(base, tokenizer, prompt, sampling)
        assert out.token_ids == expected, path
        assert "".join(dict.fromkeys(p[0] for p in phases)) == path, phases
        assert out.finish_reason == "stop", (path, out.text)
        # (an answer that does not open a reasoning block is the grammar's from its start)
        reasoned = [i for i, p in enumerate(phases) if p != "grammar"] if "r" in path else []
        answer = out.token_ids[reasoned[-1] + 1 if reasoned else 0 :]
        assert _valid(spec.kind, tokenizer.decode(answer)), (path, out.text)
    # The grammar bites after the reasoning only.
    assert outs[0].token_ids[:4] == free[0][:4] and outs[0].token_ids[4:8] != free[0][4:8]


def test_reasoning_tokens_are_checked():
    from jaxlora.structured_output import ReasoningTokens

    for kwargs, message in (
        ({"end": ()}, "reasoning_tokens.end: expected at least one"),
        ({"end": (1, -2)}, "reasoning_tokens.end: expected a list of token ids"),
        ({"end": (1,), "start": "x"}, "reasoning_tokens.start: expected a list"),
    ):
        with pytest.raises(RequestError, match=message):
            ReasoningTokens(**kwargs)
    with pytest.raises(RequestError, match="'reasoning_tokens'"):
        SamplingParams(reasoning_tokens=(1, 2))
    with pytest.raises(RequestError, match="reasoning_tokens.start: token id 9999"):
        ReasoningTokens(end=(1,), start=(9999,)).check_vocab(512)
