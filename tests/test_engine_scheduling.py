"""Engine scheduling as seen from outside: the fairness bound under a skewed load, the async
streaming API on the background engine thread, and cold adapters that load without blocking
the requests of warm ones."""

import asyncio
import dataclasses
import threading
import time

import pytest

import jaxlora
from configs.models import TINY
from jaxlora.engine import FinishReason, Status
from jaxlora.errors import RequestError
from jaxlora.formats import load_peft_adapter
from jaxlora.memory.store import AdapterStore
from jaxlora.model import init_params
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES
from tests.peft_util import write_random_peft_adapter
from tests.test_engine import greedy_reference
from tests.test_engine import small_engine_config as engine_test_config
from tests.test_model import merged_params, random_lora

MAX_RANK = 16


def small_engine_config(*, max_slots=8, max_skips=8, **kv):
    """test_engine's small engine with the fairness knobs set."""
    config = engine_test_config(**kv)
    return dataclasses.replace(
        config,
        lora_pool=dataclasses.replace(config.lora_pool, max_slots=max_slots),
        max_skips=max_skips,
    )


def greedy(max_tokens):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def base():
    return init_params(TINY, 0)


def test_async_streams_on_the_engine_thread_match_generate(base):
    """Three concurrent LLM.stream consumers on different adapters, served by the background
    engine thread: the streamed token ids are the ones generate() returns, the last delta says
    why the request ended, and stop() leaves nothing running."""
    loras = {
        "a": random_lora(TINY, "a", 4, MODULES, 31),
        "b": random_lora(TINY, "b", 16, ("k_proj", "o_proj", "up_proj"), 32),
        "c": random_lora(TINY, "c", 1, ("q_proj", "v_proj"), 33, scale=2.0),
    }
    llm = jaxlora.LLM(
        TINY, params=base, adapters=loras, engine_config=small_engine_config(), load_workers=0
    )
    engine = llm.engine
    free_kv = engine.kv.free_pages
    prompts = [[5, 6, 7, 8, 9], list(range(40, 52)), [300]]
    names = ["a", "b", "c"]
    sampling = greedy(6)

    async def consume(prompt, name):
        deltas = []
        async for delta in llm.stream(prompt, adapter=name, sampling=sampling):
            deltas.append(delta)
        return deltas

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(consume(p, n) for p, n in zip(prompts, names, strict=True))),
            timeout=120,
        )

    llm.start()
    try:
        streamed = asyncio.run(main())
        generated = llm.generate(prompts, adapter=names, sampling=sampling)
    finally:
        llm.stop()
    assert engine._thread is None
    assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.has_work()
    assert engine.kv.free_pages == free_kv
    assert llm.adapters.stats().referenced == 0

    for deltas, completion, name in zip(streamed, generated, names, strict=True):
        assert completion.finish_reason == "length" and len(completion.token_ids) == 6, name
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == completion.token_ids, name
        # Token by token, then one closing delta with the reason (and nothing after it).
        assert all(len(d.token_ids) == 1 and d.finish_reason is None for d in deltas[:-1]), name
        assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].error is None
        assert len(deltas) == 7, name
    # Different adapters really were applied (the streams are not all the base model's).
    assert len({tuple(c.token_ids) for c in generated}) == 3


def test_the_last_token_s_delta_says_it_is_the_last(base):
    """Delta.last: set on the delta of a request's last token (its finish follows in a delta of
    its own), so that a stream that must put the end on a token (LoRAX's) holds only that one:
    by length, by a stop token, and never on the others."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    engine = llm.engine
    by_length = engine.submit([5, 6, 7], greedy(6))
    engine.run_until_idle()
    third = by_length.output_ids[2]
    first_stop = by_length.output_ids.index(third)
    stop = dataclasses.replace(greedy(6), stop_token_ids=[third])
    by_stop = engine.submit([5, 6, 7], stop)
    engine.run_until_idle()
    for request, reason, tokens in (
        (by_length, FinishReason.LENGTH, 6),
        (by_stop, FinishReason.STOP, first_stop + 1),
    ):
        deltas = list(request.stream(timeout=0))
        assert request.finish_reason is reason and len(request.output_ids) == tokens
        assert [d.last for d in deltas] == [False] * (tokens - 1) + [True, False]
        assert deltas[-1].finish_reason is reason and deltas[-1].token_ids == []


def test_a_request_not_streamed_queues_only_its_end(base, monkeypatch):
    """submit(stream=False), which LLM.generate and the benchmarks use: the same tokens, but
    only the closing delta is queued, so a waited-on request keeps no object a token alive for
    the garbage collector to scan."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    engine = llm.engine
    streamed = engine.submit([5, 6, 7], greedy(6))
    waited = engine.submit([5, 6, 7], greedy(6), stream=False)
    engine.run_until_idle()
    assert waited.wait(timeout=0) and streamed.wait(timeout=0)
    assert waited.output_ids == streamed.output_ids and len(waited.output_ids) == 6
    assert waited._queue.qsize() == 2  # the closing delta and the end marker
    deltas = list(waited.stream(timeout=0))
    assert len(deltas) == 1 and deltas[0].token_ids == []
    assert deltas[0].finish_reason is FinishReason.LENGTH
    assert len(list(streamed.stream(timeout=0))) == 7
    # LLM.generate only waits: its requests are not streamed.
    seen = []
    submit = engine.submit
    monkeypatch.setattr(
        engine, "submit", lambda *a, **k: seen.append(k.get("stream", True)) or submit(*a, **k)
    )
    completion = llm.generate([[5, 6, 7]], sampling=greedy(6))[0]
    assert seen == [False] and completion.token_ids == waited.output_ids


def test_cold_adapter_loading_does_not_block_warm_requests(base, tmp_path, monkeypatch):
    """A request whose adapter is still being read from disk (a background loader thread) holds
    its place but does not hold up the others: a warm-adapter request and a base-model request
    produce all their tokens while it has none; once the read completes it finishes with the
    tokens the adapter's merged weights give, and every KV page and adapter reference is back."""
    cold_dir = write_random_peft_adapter(
        tmp_path / "cold", TINY, rank=4, seed=41, target_modules=("q_proj", "v_proj", "down_proj")
    )
    warm = random_lora(TINY, "warm", 8, MODULES, 42)
    release, entered = threading.Event(), threading.Event()
    read_and_pack = AdapterStore._read_and_pack

    def slow_read_and_pack(self, entry):
        if entry.name == "cold":
            entered.set()
            assert release.wait(timeout=120), "the test never released the cold adapter load"
        return read_and_pack(self, entry)

    monkeypatch.setattr(AdapterStore, "_read_and_pack", slow_read_and_pack)
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters={"warm": warm, "cold": cold_dir},
        engine_config=small_engine_config(),
        load_workers=1,
    )
    engine = llm.engine
    free_kv = engine.kv.free_pages
    n_tokens = 6
    try:
        cold = llm.submit([11, 12, 13, 14], adapter="cold", sampling=greedy(n_tokens))
        hot = llm.submit([21, 22, 23], adapter="warm", sampling=greedy(n_tokens))
        plain = llm.submit([31, 32, 33, 34, 35], adapter=None, sampling=greedy(n_tokens))
        for _ in range(60):
            engine.step()
            if hot.finished and plain.finished:
                break
        assert hot.finish_reason is FinishReason.LENGTH and len(hot.output_ids) == n_tokens
        assert plain.finish_reason is FinishReason.LENGTH and len(plain.output_ids) == n_tokens
        assert entered.is_set()  # the cold adapter's read started (on the loader thread) ...
        assert not cold.finished and cold.output_ids == []  # ... and nothing ran for it yet
        assert cold.status is Status.RUNNING and not cold.adapter_handle.ready
        release.set()
        deadline = time.monotonic() + 60
        while engine.has_work():
            engine.step()
            assert time.monotonic() < deadline, "the cold request never finished"
    finally:
        release.set()
        llm.adapters.close()

    assert cold.finish_reason is FinishReason.LENGTH, (cold.finish_reason, cold.error)
    cold_weights = load_peft_adapter(cold_dir, TINY, max_rank=MAX_RANK)
    assert cold.output_ids == greedy_reference(
        merged_params(base, cold_weights), cold.prompt_ids, n_tokens
    )
    assert hot.output_ids == greedy_reference(merged_params(base, warm), hot.prompt_ids, n_tokens)
    assert plain.output_ids == greedy_reference(base, plain.prompt_ids, n_tokens)
    assert engine.kv.free_pages == free_kv
    stats = llm.adapters.stats()
    assert stats.referenced == 0 and stats.load_failures == 0
    assert {r.name: r.refs for r in llm.adapters.residents()} == {"warm": 0, "cold": 0}


@dataclasses.dataclass
class SkewedRun:
    names: list  # adapter of each request, in submission order
    requests: list
    admitted_at: dict  # request_id -> index of the step that admitted it
    head_overtaken: dict  # request_id -> later requests admitted while it was the blocked head
    overtaken: dict  # request_id -> later requests admitted before it, in all
    preemptions: int
    kv_pages_back: bool
    adapter_refs: int


MAX_SKIPS = 2
SKEWED_TOKENS = 4
SKEWED_LORAS = {
    "hot": (4, MODULES, 21, 0.5),
    "rare_a": (8, ("q_proj", "v_proj"), 22, 2.0),
    "rare_b": (2, ("gate_proj", "down_proj"), 23, 0.5),
}


@pytest.fixture(scope="module")
def skewed_run(base):
    """One hot adapter floods the queue and requests for rare adapters arrive in between, with
    one adapter slot per step: a rare request cannot run next to the hot ones. The engine is
    stepped by hand, and every admission pass (the waiting queue before a step, the requests
    the step admitted) is recorded."""
    loras = {
        name: random_lora(TINY, name, rank, modules, seed, scale=scale)
        for name, (rank, modules, seed, scale) in SKEWED_LORAS.items()
    }
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=loras,
        load_workers=0,
        engine_config=small_engine_config(max_slots=1, max_skips=MAX_SKIPS),
    )
    engine = llm.engine
    free_kv = engine.kv.free_pages
    names = (
        ["hot"] * 3 + ["rare_a"] + ["hot"] * 6 + ["rare_b"] + ["hot"] * 6 + ["rare_a"] + ["hot"] * 4
    )
    requests = [
        llm.submit(
            [3 + (7 * i + 5 * k) % 500 for k in range(3 + i % 4)],
            adapter=name,
            sampling=greedy(SKEWED_TOKENS),
        )
        for i, name in enumerate(names)
    ]
    position = {r.request_id: i for i, r in enumerate(requests)}
    admitted_at, head_overtaken = {}, dict.fromkeys(position, 0)
    steps = 0
    while engine.has_work():
        queue = [r for r in requests if r.status is Status.WAITING]
        engine.step()
        steps += 1
        admitted = {r.request_id for r in queue if r.status is not Status.WAITING}
        for rid in admitted:
            admitted_at[rid] = steps
        # The pass's blocked head: the first queued request it did not admit; every request
        # behind it that the pass admitted overtook it.
        blocked = [r for r in queue if r.request_id not in admitted]
        if blocked:
            head = blocked[0]
            head_overtaken[head.request_id] += sum(
                1 for rid in admitted if position[rid] > position[head.request_id]
            )
        assert steps < 400, "the engine did not drain the queue"
    overtaken = {
        r.request_id: sum(
            1
            for later in requests[i + 1 :]
            if admitted_at[later.request_id] < admitted_at[r.request_id]
        )
        for i, r in enumerate(requests)
    }
    return SkewedRun(
        names=names,
        requests=requests,
        admitted_at=admitted_at,
        head_overtaken=head_overtaken,
        overtaken=overtaken,
        preemptions=engine.stats.preemptions,
        kv_pages_back=engine.kv.free_pages == free_kv,
        adapter_refs=llm.adapters.stats().referenced,
    )


def describe(run: SkewedRun, request_ids) -> dict:
    """Who overtook each listed request (for failure messages)."""
    out = {}
    for rid in request_ids:
        i = next(k for k, r in enumerate(run.requests) if r.request_id == rid)
        out[rid] = {
            "adapter": run.names[i],
            "skipped": run.requests[i].skipped,
            "admitted_at_step": run.admitted_at[rid],
            "overtaken_by": [
                r.request_id
                for r in run.requests[i + 1 :]
                if run.admitted_at[r.request_id] < run.admitted_at[rid]
            ],
        }
    return out


def test_skewed_load_every_request_finishes_with_its_solo_output(base, skewed_run):
    run = skewed_run
    assert run.preemptions == 0  # admission order alone decides who went first
    assert all(r.finish_reason is FinishReason.LENGTH for r in run.requests), [
        (r.request_id, r.finish_reason, r.error) for r in run.requests
    ]
    merged = {
        name: merged_params(base, random_lora(TINY, name, rank, modules, seed, scale=scale))
        for name, (rank, modules, seed, scale) in SKEWED_LORAS.items()
    }
    for request, name in zip(run.requests, run.names, strict=True):
        expected = greedy_reference(merged[name], request.prompt_ids, SKEWED_TOKENS)
        assert request.output_ids == expected, (request.request_id, name)
    assert run.kv_pages_back and run.adapter_refs == 0


def test_skewed_load_blocked_head_is_overtaken_at_most_max_skips_times(skewed_run):
    """The module docstring of jaxlora.engine.engine: a request that cannot be admitted may be
    overtaken by later requests, but at most max_skips times; then nothing behind it is
    admitted until it is. Checked here for the head of the queue (the request the engine
    counts skips for, Request.skipped), by that count and by the observed admissions."""
    run = skewed_run
    # The load is skewed enough that the policy's overtaking actually happens ...
    assert max(run.head_overtaken.values()) >= 1, run.head_overtaken
    # ... and never beyond the bound.
    over = [
        r.request_id
        for r in run.requests
        if r.skipped > MAX_SKIPS or run.head_overtaken[r.request_id] > MAX_SKIPS
    ]
    assert not over, (f"max_skips={MAX_SKIPS}", describe(run, over))


def test_skewed_load_no_request_is_overtaken_more_than_max_skips_times(skewed_run):
    """The same bound for every request, not only the current head of the queue: the docstring
    states it for any request that cannot be admitted (one queued behind a blocked head is
    overtaken too when a later request is admitted)."""
    run = skewed_run
    over = [rid for rid, n in run.overtaken.items() if n > MAX_SKIPS]
    assert not over, (f"max_skips={MAX_SKIPS}", describe(run, over))


def priority_config(*, max_batch=8, **kv):
    config = small_engine_config(**kv)
    runner = dataclasses.replace(config.runner, max_batch=max_batch, decode_buckets=(max_batch,))
    return dataclasses.replace(config, runner=runner, scheduling_policy="priority")


def test_priorities_need_the_priority_policy(base):
    from jaxlora.errors import ConfigError, RequestError

    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    with pytest.raises(RequestError, match="^priority: 1 needs the 'priority' scheduling"):
        llm.engine.submit([1, 2], greedy(2), priority=1)
    llm.engine.submit([1, 2], greedy(2), priority=0)  # (the neutral value is fine)
    with pytest.raises(ConfigError, match="'scheduling_policy' is 'lifo'"):
        dataclasses.replace(small_engine_config(), scheduling_policy="lifo")
    ranked = jaxlora.LLM(TINY, params=base, engine_config=priority_config(), load_workers=0)
    with pytest.raises(RequestError, match="^priority: expected an int"):
        ranked.engine.submit([1, 2], greedy(2), priority="1")
    fair = dataclasses.replace(small_engine_config(), scheduling_policy="fair")
    shared = jaxlora.LLM(TINY, params=base, engine_config=fair, load_workers=0)
    with pytest.raises(RequestError, match="schedules by 'fair' .expected 0."):
        shared.engine.submit([1, 2], greedy(2), priority=2)


def _run_recording_admissions(engine, requests):
    """Steps the engine to the end; returns the requests in the order they left the queue
    (those admitted in one iteration as a set)."""
    order, seen = [], set()
    while engine.has_work():
        engine.step()
        new = {r.request_id for r in requests if r.status is not Status.WAITING} - seen
        if new:
            order.append(new)
            seen |= new
    return order


def test_waiting_requests_are_admitted_in_priority_order(base):
    """Five requests queued at once for two rows: admitted by priority (lower first), by
    arrival within a priority; each gets its solo tokens."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=priority_config(max_batch=2), load_workers=0)
    prompts = [[3 + i, 40 + i, 7] for i in range(5)]
    priorities = [3, 1, 2, 0, 1]
    requests = [
        llm.engine.submit(p, greedy(4), request_id=f"r{i}", priority=priority)
        for i, (p, priority) in enumerate(zip(prompts, priorities, strict=True))
    ]
    order = _run_recording_admissions(llm.engine, requests)
    assert order == [{"r3", "r1"}, {"r4", "r2"}, {"r0"}]
    assert llm.engine.stats.preemptions == 0
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_ids == greedy_reference(base, prompt, 4)


def test_a_higher_priority_request_takes_a_row_from_the_lowest(base):
    """Rows full of priority-5 requests: a priority-0 one preempts the newest of them at once
    (under "fcfs" it would wait); the preempted one recomputes and every request gets its solo
    tokens."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=priority_config(max_batch=2), load_workers=0)
    engine = llm.engine
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    low = [engine.submit(p, greedy(12), priority=5) for p in prompts[:2]]
    for _ in range(3):
        engine.step()
    assert all(r.status is Status.RUNNING for r in low)
    high = engine.submit(prompts[2], greedy(12), priority=0)
    engine.step()
    assert high.status is Status.RUNNING
    assert low[0].status is Status.RUNNING and low[1].status is Status.WAITING
    assert low[1].preemptions == 1 and low[0].preemptions == 0
    engine.run_until_idle()
    for prompt, request in zip(prompts, [*low, high], strict=True):
        assert request.output_ids == greedy_reference(base, prompt, 12)
    assert engine.kv.free_pages == engine.engine_config.kv.num_pages


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_kv_pressure_preempts_the_lowest_priority_first(base, policy):
    """KV pages for two of three requests: "priority" preempts the priority-5 request although
    a newer one (priority 1) runs; "fcfs" preempts the newest. The highest never is."""
    config = dataclasses.replace(
        priority_config(num_pages=18, max_model_len=48), scheduling_policy=policy
    )
    llm = jaxlora.LLM(TINY, params=base, engine_config=config, load_workers=0)
    prompts = [[3 + i, 20 + i, 9, 4 + i, 30, 2, 8, 1 + i] for i in range(3)]
    priorities = [0, 5, 1] if policy == "priority" else [0, 0, 0]
    requests = [
        llm.engine.submit(p, greedy(24), priority=priority)
        for p, priority in zip(prompts, priorities, strict=True)
    ]
    llm.engine.run_until_idle()
    oldest, middle, newest = requests
    assert oldest.preemptions == 0
    if policy == "priority":
        assert middle.preemptions >= 1 and newest.preemptions == 0
    else:
        assert newest.preemptions >= 1 and middle.preemptions == 0
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_ids == greedy_reference(base, prompt, 24, width=40)


# ---------------------------------------------------------------------------- fair shares


def _tenants_llm(base, policy):
    config = dataclasses.replace(priority_config(max_batch=2), scheduling_policy=policy)
    adapters = {name: random_lora(TINY, name, 4, MODULES, seed) for seed, name in enumerate("ab")}
    llm = jaxlora.LLM(TINY, params=base, adapters=adapters, engine_config=config, load_workers=0)
    return llm, adapters


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_fair_shares_interleave_a_flooding_tenant_with_a_small_one(base, policy):
    """Policy 9 (VTC): six requests of adapter a queued before two of adapter b, two rows.
    "fair" admits b's beside a's from the first pass on; "fcfs" makes b wait for all of a's.
    Every request gets the tokens of the base model with its adapter folded in."""
    llm, adapters = _tenants_llm(base, policy)
    prompts = [[3 + i, 40 + i, 7] for i in range(8)]
    tenants = ["a"] * 6 + ["b"] * 2
    names = [f"a{i}" for i in range(6)] + ["b0", "b1"]
    requests = [
        llm.engine.submit(p, greedy(4), adapter=t, request_id=n)
        for p, t, n in zip(prompts, tenants, names, strict=True)
    ]
    order = _run_recording_admissions(llm.engine, requests)
    if policy == "fair":
        assert order == [{"a0", "b0"}, {"a1", "b1"}, {"a2", "a3"}, {"a4", "a5"}]
    else:
        assert order == [{"a0", "a1"}, {"a2", "a3"}, {"a4", "a5"}, {"b0", "b1"}]
    for prompt, tenant, request in zip(prompts, tenants, requests, strict=True):
        expected = greedy_reference(merged_params(base, adapters[tenant]), prompt, 4)
        assert request.output_ids == expected


def test_fair_shares_by_a_tenant_the_caller_names(base):
    """Engine.submit(tenant=...): customer acme floods the queue through adapters a and b,
    customer beta sends two requests through a. The shares are acme's and beta's (not the
    adapters'), so beta's go beside acme's first ones."""
    llm, adapters = _tenants_llm(base, "fair")
    prompts = [[3 + i, 40 + i, 7] for i in range(8)]
    spec = [(f"acme{i}", "ab"[i % 2], "acme") for i in range(6)]
    spec += [("beta0", "a", "beta"), ("beta1", "a", "beta")]
    requests = [
        llm.engine.submit(p, greedy(4), adapter=a, request_id=n, tenant=t)
        for p, (n, a, t) in zip(prompts, spec, strict=True)
    ]
    assert set(llm.engine.queue_snapshot().waiting) == {"a", "b"}  # (still by adapter)
    order = _run_recording_admissions(llm.engine, requests)
    assert order[:2] == [{"acme0", "beta0"}, {"acme1", "beta1"}], order
    assert set().union(*order[2:]) == {f"acme{i}" for i in range(2, 6)}
    assert set(llm.engine.queue_snapshot().fair_service) == {"acme", "beta"}
    for prompt, (_, adapter, _), request in zip(prompts, spec, requests, strict=True):
        expected = greedy_reference(merged_params(base, adapters[adapter]), prompt, 4)
        assert request.output_ids == expected
    with pytest.raises(RequestError, match="tenant: expected a string"):
        llm.engine.submit([3, 4], greedy(2), tenant=5)


def test_weighted_fair_shares_serve_a_heavier_tenant_more(base):
    """fair_share_weights: adapters a (weight 3) and b (weight 1) both flood the queue, one
    row: a's counter grows a third as fast, so while both wait a is admitted about three times
    as often as b (unweighted: alternately). Outputs stay each adapter's own."""
    orders = {}
    for weights in ((), (("a", 3.0),)):
        llm, adapters = _tenants_llm(base, "fair")
        config = dataclasses.replace(llm.engine.engine_config, fair_share_weights=weights)
        runner = dataclasses.replace(config.runner, max_batch=1, decode_buckets=(1,))
        config = dataclasses.replace(config, runner=runner)
        llm = jaxlora.LLM(
            TINY, params=base, adapters=adapters, engine_config=config, load_workers=0
        )
        prompts = [[3 + i, 40 + i, 7] for i in range(16)]
        tenants = ["a", "b"] * 8
        requests = [
            llm.engine.submit(p, greedy(2), adapter=t, request_id=f"{t}{i}")
            for i, (p, t) in enumerate(zip(prompts, tenants, strict=True))
        ]
        order = [
            name
            for admitted in _run_recording_admissions(llm.engine, requests)
            for name in admitted
        ]
        orders[weights] = "".join(name[0] for name in order)
        for prompt, tenant, request in zip(prompts, tenants, requests, strict=True):
            expected = greedy_reference(merged_params(base, adapters[tenant]), prompt, 2)
            assert request.output_ids == expected
    assert orders[()] == "ab" * 8
    # Weighted: up to a's last admission (while both wait), about three a's to a b (the
    # counters lag the admissions by the tokens of the request still running).
    weighted = orders[(("a", 3.0),)]
    both_waiting = weighted[: weighted.rindex("a") + 1]
    assert both_waiting.count("a") == 8 and both_waiting.count("b") <= 3, weighted


def test_fair_share_weights_are_checked():
    from jaxlora.errors import ConfigError

    fair = dataclasses.replace(small_engine_config(), scheduling_policy="fair")
    for weights, needle in (
        ((("a", 0.0),), "finite number > 0"),
        ((("a", float("inf")),), "finite number > 0"),
        ((("a", "2"),), "not a number"),
        ((("a", 1.0), ("a", 2.0)), "weighted twice"),
        ((("a",),), "expected .tenant, weight."),
    ):
        with pytest.raises(ConfigError, match=needle):
            dataclasses.replace(fair, fair_share_weights=weights)
    with pytest.raises(ConfigError, match="needs scheduling_policy 'fair'"):
        dataclasses.replace(small_engine_config(), fair_share_weights=(("a", 2.0),))


def test_a_tenant_back_from_idle_banks_no_credit(base):
    """Adapter b arrives after a has been served for a while: it starts from a's counter (the
    lowest of the busy tenants), not from zero. While b waits, a's running requests are served
    on, so b's first two requests go first; then a's two are as far behind as b's third, and
    go before it. Starting from zero, b would take all three rows first."""
    llm, _ = _tenants_llm(base, "fair")
    engine = llm.engine
    early = [
        engine.submit([3 + i, 40 + i, 7], greedy(4), adapter="a", request_id=f"a{i}")
        for i in range(6)
    ]
    while early[2].status is Status.WAITING or early[3].status is Status.WAITING:
        engine.step()  # (a0 and a1 served, a2 and a3 running)
    late = [
        engine.submit([9 + i, 50 + i, 7], greedy(4), adapter="b", request_id=f"b{i}")
        for i in range(3)
    ]
    # (what /metrics shows: each tenant's queue and, lifted, b's counter at a's)
    snapshot = engine.queue_snapshot()
    assert snapshot.waiting == {"a": 2, "b": 3} and snapshot.running == {"a": 2}
    assert snapshot.waiting_by_priority == {0: 5}
    assert snapshot.fair_service["b"] == snapshot.fair_service["a"] > 0
    waiting = [r for r in early if r.status is Status.WAITING]
    order = _run_recording_admissions(engine, waiting + late)
    assert order == [{"b0", "b1"}, {"a4", "a5"}, {"b2"}], order


def test_the_fairness_benchmark_shows_what_a_flood_does_to_the_others():
    """jaxlora.bench.fairness (scripts/bench_fairness.py), a small scenario: under fcfs the
    light tenants wait behind the whole flood; under fair shares they wait a fraction of that,
    with the same tokens and the same number of steps in all; a weight of 4 shortens its
    tenant's waits further."""
    from jaxlora.bench.fairness import FairnessScenario, fairness, format_table

    scenario = FairnessScenario(
        flood_requests=12, light_tenants=2, light_requests=2, output_len=4, max_batch=2
    )
    result = fairness(scenario)
    runs = {run["policy"]: run for run in result["runs"]}
    assert all(run["same_tokens_as_first_policy"] for run in runs.values())
    fcfs, fair, weighted = (runs[p]["tenants"] for p in ("fcfs", "fair", "fair, light x4"))
    for light in ("light0", "light1"):
        assert fair[light]["wait_steps_median"] < fcfs[light]["wait_steps_median"] / 2, light
        assert fcfs[light]["wait_steps_median"] > fcfs["flood"]["wait_steps_max"] - 1
    assert weighted["light0"]["wait_steps_max"] <= fair["light0"]["wait_steps_max"]
    steps = [run["steps"] for run in runs.values()]
    assert max(steps) - min(steps) <= 2, steps
    table = format_table(result)
    assert "fair, light x4   light0" in table and "OTHER TOKENS" not in table


def pool_of_one_adapter_config(**engine):
    """An adapter pool that holds one of two same-shaped rank-4 q|v adapters at a time."""
    config = small_engine_config(**engine.pop("kv", {}))
    return dataclasses.replace(
        config, lora_pool=dataclasses.replace(config.lora_pool, pages_per_pool=3), **engine
    )


def two_adapters():
    return {
        "x": random_lora(TINY, "x", 4, ("q_proj", "v_proj"), 1),
        "y": random_lora(TINY, "y", 4, ("q_proj", "v_proj"), 2),
    }


def test_the_request_at_the_fairness_bound_gets_the_adapter_pages_a_waiting_request_holds(
    base,
):
    """The pool holds one adapter. y's request waits for x's pages; x's second request took x
    (a reference) but no KV pages (a 3-page cache); a third x request overtakes y, which
    reaches the bound (max_skips 1). The x request that holds x still goes past the bound: its
    running gives x's pages back, and y then runs (it waited forever, x held by a request
    nobody tried again)."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=two_adapters(),
        engine_config=pool_of_one_adapter_config(
            kv={"num_pages": 3, "max_model_len": 12}, max_skips=1
        ),
        load_workers=0,
    )
    engine = llm.engine
    first = engine.submit(list(range(10, 18)), greedy(2), adapter="x")  # 2 of the 3 KV pages
    head = engine.submit([5, 6, 7], greedy(2), adapter="y")
    holder = engine.submit(list(range(20, 28)), greedy(2), adapter="x")
    later = engine.submit([8, 9, 10], greedy(2), adapter="x")
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 100, [(r.request_id, r.status, r.skipped) for r in engine._waiting]
    requests = (first, head, holder, later)
    assert all(r.finish_reason is FinishReason.LENGTH for r in requests)
    assert head.skipped >= 1 and engine.kv.free_pages == 3
    assert llm.adapters.stats().referenced == 0


def test_an_adapter_that_cannot_fit_beside_the_pinned_ones_is_an_error_not_a_wait(base):
    """Pinned x fills the pool: y's request would wait forever, and past the fairness bound
    (max_skips 2) nothing behind it would run, base-model requests included. It finishes with
    an error naming the pinned pages; the others run."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=two_adapters(),
        engine_config=pool_of_one_adapter_config(max_skips=2),
        load_workers=0,
    )
    llm.adapters.pin("x", wait=True)
    engine = llm.engine
    refused = engine.submit([5, 6, 7], greedy(2), adapter="y")
    others = [engine.submit([9, 9, i], greedy(2)) for i in range(5)]
    others.append(engine.submit([4, 4], greedy(2), adapter="x"))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 100
    assert refused.finish_reason is FinishReason.ERROR
    assert "cannot fit in the adapter page pool beside the pinned adapters" in refused.error
    assert all(r.finish_reason is FinishReason.LENGTH for r in others)
    llm.adapters.unpin("x")
    assert llm.generate([[5, 6, 7]], adapter=["y"], sampling=greedy(2))[0].token_ids


def test_a_request_longer_than_the_kv_pool_is_refused_at_submit(base):
    """Alone in the engine it would preempt itself at the pool's end and recompute forever."""
    llm = jaxlora.LLM(
        TINY, params=base, engine_config=small_engine_config(num_pages=3), load_workers=0
    )
    with pytest.raises(RequestError, match="^max_tokens: 20 plus the prompt's 5 tokens need 7 KV"):
        llm.engine.submit([5, 6, 7, 8, 9], greedy(20))
    assert llm.generate([[5, 6, 7, 8, 9]], sampling=greedy(7))[0].token_ids


def test_async_scheduling_switched_off_mid_run_keeps_every_token(base):
    """EngineConfig.async_scheduling may be switched between iterations: switched off while a
    step is pending, that step's tokens are still read (one was lost, and the request never
    finished)."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    expected = llm.generate([[5, 6, 7]], sampling=greedy(6))[0].token_ids
    engine = llm.engine
    assert engine.async_scheduling
    request = engine.submit([5, 6, 7], greedy(6))
    for _ in range(3):
        engine.step()
    engine.async_scheduling = False
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 20
    assert request.output_ids == expected and request.inflight == 0


@pytest.mark.parametrize("max_batch", [2, 8])
def test_a_higher_priority_request_preempts_nobody_when_that_would_not_admit_it(base, max_batch):
    """A 4-page pool: priority-0 r0 holds 3 pages, priority-5 low the last one (and, with two
    rows, the last row). Priority-1 high needs 2 pages for its first chunk: preempting low
    frees only one, and r0 ranks before it. So low is not preempted (it was, for nothing, and
    then came straight back while high still waited, every iteration); high runs once r0 is
    done."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        engine_config=priority_config(max_batch=max_batch, num_pages=4, max_model_len=16),
        load_workers=0,
    )
    engine = llm.engine
    r0 = engine.submit(list(range(10, 19)), greedy(3), priority=0)  # 9 + 2 fed: 3 pages
    low = engine.submit([5, 6], greedy(3), priority=5)  # 2 + 2 fed: 1 page
    for _ in range(2):
        engine.step()
    assert engine.kv.free_pages == 0 and low.status is Status.RUNNING
    high = engine.submit([7, 8, 9, 11, 12], greedy(3), priority=1)  # 2 pages
    engine.step()
    assert high.status is Status.WAITING
    assert low.status is Status.RUNNING and low.preemptions == 0
    engine.run_until_idle()
    assert engine.stats.preemptions == 0
    for request in (r0, low, high):
        assert request.finish_reason is FinishReason.LENGTH
        assert request.output_ids == greedy_reference(base, request.prompt_ids, 3)
    assert engine.kv.free_pages == 4


def test_a_request_short_of_pages_preempts_nobody_whose_pages_would_not_do(base):
    """A 7-page pool: old holds 2 pages, mid 4 and needs 2 more for its last prompt chunk,
    new (the newest) the last page. Preempting new frees one page, not enough: mid preempts
    itself (policy 4's last resort) and new keeps its work (it was preempted too, for
    nothing)."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        engine_config=small_engine_config(num_pages=7, max_model_len=28),
        load_workers=0,
    )
    engine = llm.engine
    old = engine.submit([3, 4, 5, 6, 7], greedy(3))  # 5 + 2 fed: 2 pages
    mid = engine.submit(list(range(100, 124)), greedy(2))  # 24 + 1 fed: 7 pages in the end
    new = engine.submit([8, 9], greedy(2))  # 2 + 1 fed: 1 page
    for _ in range(3):
        engine.step()
    assert mid.preemptions == 1 and new.preemptions == 0
    engine.run_until_idle()
    for request in (old, mid, new):
        assert request.finish_reason is FinishReason.LENGTH
        want = greedy_reference(base, request.prompt_ids, request.sampling.max_tokens)
        assert request.output_ids == want
    assert new.preemptions == 0 and engine.kv.free_pages == 7
