"""Offline batched generation behind scripts/generate.py."""

from __future__ import annotations

import itertools
import time

from jaxlora import demo
from jaxlora.engine import EngineConfig
from jaxlora.errors import ConfigError
from jaxlora.llm import LLM
from jaxlora.sampling import SamplingParams
from jaxlora.structured_output import StructuredOutput


def parse_adapter_flags(pairs) -> dict[str, str]:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair!r}: expected name=path")
        if name in adapters:
            raise ConfigError(
                f"--adapter {pair!r}: adapter name {name!r} given twice (also "
                f"{adapters[name]!r}); expected one path a name"
            )
        adapters[name] = path
    return adapters


def default_adapters(llm_model: str) -> dict:
    """The demo adapters shipped with the tiny model, or none for other models."""
    return demo.adapter_dirs() if llm_model == "tiny" else {}


def structured_output_flags(
    json_schema: str | None = None, regex: str | None = None, choices=()
) -> StructuredOutput | None:
    """The constraint of --json_schema (the schema's JSON, or @path of a file holding it),
    --regex or --choice (repeatable); at most one of them."""
    given = [
        (flag, kind, spec)
        for flag, kind, spec in (
            ("--json_schema", "json", json_schema),
            ("--regex", "regex", regex),
            ("--choice", "choice", list(choices) or None),
        )
        if spec is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"{', '.join(f for f, _, _ in given)}: expected at most one of them")
    if not given:
        return None
    flag, kind, spec = given[0]
    if kind == "json" and spec.startswith("@"):
        try:
            with open(spec[1:], encoding="utf-8") as f:
                spec = f.read()
        except OSError as e:
            raise ConfigError(f"{flag}: cannot read {spec[1:]!r} ({e.strerror})") from None
    return StructuredOutput(kind, spec, field=flag)


def token_ids_prompt(text: str, model: str) -> list[int]:
    """A prompt of a model without a tokenizer: token ids separated by spaces or commas
    ("1 450 4996", "[1, 450, 4996]"); ConfigError naming the prompt otherwise."""
    words = text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    if not words or not all(w.isdigit() for w in words):
        raise ConfigError(
            f"--prompt {text!r}: model {model!r} has no tokenizer.json, so prompts are token "
            'ids separated by spaces or commas (e.g. --prompt="1 450 4996")'
        )
    return [int(w) for w in words]


def run_generate(
    *,
    model: str,
    adapters,
    prompts,
    max_tokens: int,
    temperature: float,
    seed: int,
    structured_output: StructuredOutput | None = None,
    out=print,
) -> list:
    """structured_output: every answer matches it (``structured_output_flags``)."""
    named = parse_adapter_flags(adapters) or default_adapters(model)
    llm_model = model
    if model == "tiny" and named and not adapters:
        llm_model = demo.model_dir()
    # One batch: compile the step shapes it uses on first use rather than warm up every bucket
    # (on a CPU the demo takes 14 s instead of 77 s).
    llm = LLM(llm_model, adapters=named, engine_config=EngineConfig(warmup=False))
    if llm.tokenizer is None:
        if not prompts:
            raise ConfigError(
                f"model {model!r} has no tokenizer.json: give --prompt as token ids "
                '(e.g. --prompt="1 450 4996")'
            )
        prompts = [token_ids_prompt(p, model) for p in prompts]
    prompts = list(prompts) or list(demo.DEMO_PROMPTS)
    # Every prompt with every adapter and with none: all in one batch.
    names = [None, *named]
    jobs = list(itertools.product(prompts, names))
    sampling = SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        structured_output=structured_output,
    )
    start = time.perf_counter()
    results = llm.generate([p for p, _ in jobs], adapter=[a for _, a in jobs], sampling=sampling)
    elapsed = time.perf_counter() - start
    for (prompt, name), result in zip(jobs, results, strict=True):
        # (without a tokenizer the answer is its token ids)
        answer = repr(result.text) if llm.tokenizer is not None else result.token_ids
        out(f"[{name or 'base'}] {prompt!r} -> {answer} ({result.finish_reason})")
    tokens = sum(len(r.token_ids) for r in results)
    out(
        f"{len(jobs)} requests, {len(names)} adapters (incl. base) in one batch: {tokens} tokens "
        f"in {elapsed:.2f} s (compiling its {len(llm.engine.runner.compiled_shapes)} step shapes "
        f"included), {llm.engine.stats.steps} engine steps"
    )
    return results
