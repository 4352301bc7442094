"""What a flooding customer does to the others' waits, by scheduling policy (engine policy 9).

One tenant ("flood") queues many requests at once; a few light tenants each queue a few
requests just after. The engine steps synchronously, and time is counted in engine steps (an
iteration each), so the figures do not depend on the machine: a request's wait is the steps
from its submission to its admission (its first prefill), its latency the steps to its end.
Every policy runs the same requests; the tokens are checked to be the same under each.

    PYTHONPATH=. python scripts/bench_fairness.py
"""

from __future__ import annotations

import dataclasses

import numpy as np

import jaxlora
from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig, Status
from jaxlora.lora import random_lora_weights
from jaxlora.model import init_params
from jaxlora.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class FairnessScenario:
    flood_requests: int = 48
    light_tenants: int = 3
    light_requests: int = 4  # each
    prompt_len: int = 12
    output_len: int = 16
    max_batch: int = 4  # decode rows: the contended resource
    rank: int = 8
    seed: int = 0
    # (policy name, EngineConfig.scheduling_policy, fair_share_weights)
    policies: tuple[tuple[str, str, tuple], ...] = (
        ("fcfs", "fcfs", ()),
        ("fair", "fair", ()),
        ("fair, light x4", "fair", (("light0", 4.0),)),
    )


def _engine_config(scenario: FairnessScenario, policy: str, weights: tuple) -> EngineConfig:
    tokens = scenario.prompt_len + scenario.output_len
    return EngineConfig(
        kv=KVCacheConfig(page_size=4, num_pages=256, max_model_len=max(64, tokens)),
        runner=RunnerConfig(
            max_batch=scenario.max_batch,
            prefill_chunk=16,
            max_prefill_rows=2,
            decode_buckets=(scenario.max_batch,),
            prefill_buckets=(2,),
        ),
        lora_pool=LoraPoolConfig(
            max_rank=scenario.rank, rows_per_page=4, pages_per_pool=256, max_slots=8
        ),
        max_num_tokens=64,
        max_waiting=4096,
        warmup=False,
        async_scheduling=False,
        scheduling_policy=policy,
        fair_share_weights=weights,
    )


def _requests(scenario: FairnessScenario) -> list[tuple[str, list[int]]]:
    """(tenant, prompt) in submission order: the flood first, then the light tenants' in turn."""
    rng = np.random.default_rng(scenario.seed)
    tenants = ["flood"] * scenario.flood_requests + [
        f"light{t}" for _ in range(scenario.light_requests) for t in range(scenario.light_tenants)
    ]
    return [
        (tenant, [int(x) for x in rng.integers(3, TINY.vocab_size, scenario.prompt_len)])
        for tenant in tenants
    ]


def run_policy(
    scenario: FairnessScenario, name: str, policy: str, weights: tuple, params, adapters
) -> tuple[dict, dict]:
    """One policy's run: its per-tenant summary and each request's tokens."""
    llm = jaxlora.LLM(
        TINY,
        params=params,
        adapters=adapters,
        engine_config=_engine_config(scenario, policy, weights),
        load_workers=0,
    )
    engine = llm.engine
    sampling = SamplingParams(temperature=0.0, max_tokens=scenario.output_len, ignore_eos=True)
    submitted = [
        engine.submit(prompt, sampling, adapter=tenant, request_id=f"{tenant}-{i}")
        for i, (tenant, prompt) in enumerate(_requests(scenario))
    ]
    admitted: dict[str, int] = {}
    finished: dict[str, int] = {}
    step = 0
    while engine.has_work():
        engine.step()
        step += 1
        for request in submitted:
            rid = request.request_id
            if rid not in admitted and request.status is not Status.WAITING:
                admitted[rid] = step
            if rid not in finished and request.finish_reason is not None:
                finished[rid] = step
    tenants: dict[str, dict] = {}
    for request in submitted:
        tenant = request.adapter
        entry = tenants.setdefault(tenant, {"waits": [], "latencies": []})
        entry["waits"].append(admitted[request.request_id])
        entry["latencies"].append(finished[request.request_id])
    summary = {
        tenant: {
            "requests": len(entry["waits"]),
            "wait_steps_median": float(np.median(entry["waits"])),
            "wait_steps_max": int(max(entry["waits"])),
            "latency_steps_median": float(np.median(entry["latencies"])),
            "latency_steps_max": int(max(entry["latencies"])),
        }
        for tenant, entry in sorted(tenants.items())
    }
    tokens = {r.request_id: list(r.output_ids) for r in submitted}
    return {"policy": name, "steps": step, "tenants": summary}, tokens


def fairness(scenario: FairnessScenario = FairnessScenario()) -> dict:
    """Each policy's per-tenant waits and latencies (engine steps) for the scenario."""
    params = init_params(TINY, scenario.seed)
    names = ["flood", *(f"light{t}" for t in range(scenario.light_tenants))]
    adapters = {
        name: random_lora_weights(TINY, name, scenario.rank, seed=scenario.seed + 1 + i)
        for i, name in enumerate(names)
    }
    runs, reference = [], None
    for name, policy, weights in scenario.policies:
        run, tokens = run_policy(scenario, name, policy, weights, params, adapters)
        if reference is None:
            reference = tokens
        run["same_tokens_as_first_policy"] = tokens == reference
        runs.append(run)
    return {"scenario": dataclasses.asdict(scenario), "runs": runs}


def format_table(result: dict) -> str:
    lines = [
        f"{'policy':<16} {'tenant':<8} {'requests':>8} {'wait med':>9} {'wait max':>9} "
        f"{'latency med':>12} {'latency max':>12}  (engine steps)"
    ]
    for run in result["runs"]:
        for tenant, row in run["tenants"].items():
            lines.append(
                f"{run['policy']:<16} {tenant:<8} {row['requests']:>8} "
                f"{row['wait_steps_median']:>9.1f} {row['wait_steps_max']:>9} "
                f"{row['latency_steps_median']:>12.1f} {row['latency_steps_max']:>12}"
            )
        same = "same tokens" if run["same_tokens_as_first_policy"] else "OTHER TOKENS"
        lines.append(f"{run['policy']:<16} all: {run['steps']} steps, {same}")
    return "\n".join(lines)


__all__ = ["FairnessScenario", "fairness", "format_table"]
