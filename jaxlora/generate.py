"""Offline batched generation behind scripts/generate.py."""

from __future__ import annotations

import itertools
import time

from jaxlora import demo
from jaxlora.engine import EngineConfig
from jaxlora.errors import ConfigError
from jaxlora.llm import LLM
from jaxlora.sampling import SamplingParams


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


def run_generate(
    *, model: str, adapters, prompts, max_tokens: int, temperature: float, seed: int, out=print
) -> list:
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
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
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
