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
    if llm.tokenizer is None and not all(p.strip().isdigit() for p in prompts or ["x"]):
        raise ConfigError(f"model {model!r} has no tokenizer.json: pass prompts as token ids")
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
        out(f"[{name or 'base'}] {prompt!r} -> {result.text!r} ({result.finish_reason})")
    tokens = sum(len(r.token_ids) for r in results)
    out(
        f"{len(jobs)} requests, {len(names)} adapters (incl. base) in one batch: {tokens} tokens "
        f"in {elapsed:.2f} s (compiling its {len(llm.engine.runner.compiled_shapes)} step shapes "
        f"included), {llm.engine.stats.steps} engine steps"
    )
    return results
