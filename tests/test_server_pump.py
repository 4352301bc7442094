"""The server's delta pump (jaxlora.server.generation.DeltaPump): every delta delivered once,
in order, to the HTTP call that owns its request; only requests given deltas are drained."""

import asyncio
import sys

import pytest

from jaxlora.engine import Delta, FinishReason, Request
from jaxlora.sampling import SamplingParams
from jaxlora.server.generation import DeltaPump


def _request(request_id: str) -> tuple[Request, list[int]]:
    """A request whose take_deltas calls are counted (the list's one element)."""
    request = Request(request_id, [1, 2], SamplingParams())
    calls = [0]
    take = request.take_deltas

    def counted():
        calls[0] += 1
        return take()

    request.take_deltas = counted
    return request, calls


def test_the_pump_delivers_each_delta_once_and_drains_only_requests_with_news():
    async def scenario():
        finished = []
        pump = DeltaPump(0.001, finished.append)
        a, a_calls = _request("a")
        b, b_calls = _request("b")
        a.push(Delta([5], "x"))  # (before the pump watches it: not lost)
        to_a, to_b = asyncio.Queue(), asyncio.Queue()
        pump.watch(a, to_a, 0)
        pump.watch(b, to_b, 3)
        await asyncio.sleep(0.02)
        assert to_a.get_nowait() == (0, Delta([5], "x")) and to_a.empty() and to_b.empty()
        # Twenty passes later b, given nothing, was drained once (when watched), not each pass.
        assert b_calls == [1] and a_calls == [1]
        a.push(Delta([6], "y"))
        a.push(Delta([7], "z"))
        b.push(Delta([8], "w"))
        a.push(Delta([], "", finish_reason=FinishReason.STOP))
        await asyncio.sleep(0.02)
        got = [to_a.get_nowait() for _ in range(to_a.qsize())]
        assert got == [
            (0, Delta([6], "y")),
            (0, Delta([7], "z")),
            (0, Delta([], "", finish_reason=FinishReason.STOP)),
        ]
        assert to_b.get_nowait() == (3, Delta([8], "w"))
        assert finished == [a] and a.on_push is None and pump.open_requests == 1
        # An abandoned request is still drained to its end (its finish counted), delivered to
        # nobody.
        pump.abandon(b)
        b.push(Delta([], "", finish_reason=FinishReason.LENGTH))
        await asyncio.sleep(0.02)
        assert to_b.empty() and finished == [a, b] and pump.open_requests == 0
        await pump.close()

    asyncio.run(scenario())


def test_a_request_s_deltas_are_taken_without_blocking_up_to_its_end():
    request = Request("r", [1], SamplingParams())
    assert request.take_deltas() == []
    request.push(Delta([1], "a"))
    request.push(Delta([], "", finish_reason=FinishReason.STOP))
    assert [d.text for d in request.take_deltas()] == ["a", ""]
    assert request.take_deltas() == [] and request.wait(0)
    # Without streaming only the end is queued, and only it names the request.
    named = []
    quiet = Request("q", [1], SamplingParams(), stream_deltas=False)
    quiet.on_push = named.append
    quiet.push(Delta([1], "a"))
    assert named == [] and quiet.take_deltas() == []
    quiet.push(Delta([], "", finish_reason=FinishReason.STOP))
    assert named == [quiet] and len(quiet.take_deltas()) == 1


def test_merged_deltas_keep_tokens_text_logprobs_and_the_end_in_order():
    from jaxlora.server.generation import merge_deltas

    first = Delta([1], "a", logprobs=[-0.1], top_logprobs=[{1: -0.1}], prompt_logprobs=[None])
    second = Delta([2, 3], "bc", logprobs=[-0.2, -0.3], top_logprobs=[{2: -0.2}, {3: -0.3}])
    last = Delta([4], "d", logprobs=[-0.4], top_logprobs=[{4: -0.4}], last=True)
    end = Delta([], "", finish_reason=FinishReason.LENGTH)
    merged = merge_deltas([first, second, last, end])
    assert merged == Delta(
        [1, 2, 3, 4],
        "abcd",
        logprobs=[-0.1, -0.2, -0.3, -0.4],
        top_logprobs=[{1: -0.1}, {2: -0.2}, {3: -0.3}, {4: -0.4}],
        finish_reason=FinishReason.LENGTH,
        last=True,
        prompt_logprobs=[None],
    )
    assert merge_deltas([second]) is second
    plain = merge_deltas([Delta([1], "x"), Delta([2], "y")])
    assert plain.logprobs is None and plain.top_logprobs is None and not plain.last


def test_a_stream_interval_holds_tokens_until_it_has_that_many_or_ends():
    async def scenario():
        pump = DeltaPump(0.001, lambda request: None, stream_interval=3)
        request, _ = _request("r")
        out = asyncio.Queue()
        pump.watch(request, out, 0)

        async def given(*deltas):
            for delta in deltas:
                request.push(delta)
            await asyncio.sleep(0.01)
            return [out.get_nowait()[1] for _ in range(out.qsize())]

        assert await given(Delta([1], "a")) == [Delta([1], "a")]  # the first goes out at once
        assert await given(Delta([2], "b")) == []
        assert await given(Delta([3], "c")) == []
        assert await given(Delta([4], "d")) == [Delta([2, 3, 4], "bcd")]
        assert await given(Delta([5], "e", last=True)) == []
        end = Delta([], "", finish_reason=FinishReason.STOP)
        merged = Delta([5], "e", finish_reason=FinishReason.STOP, last=True)
        assert await given(end) == [merged]  # (the end with the tokens held)
        assert pump.open_requests == 0
        await pump.close()

    asyncio.run(scenario())


def test_a_server_with_a_stream_interval_streams_the_same_answers_in_fewer_chunks():
    import json

    import httpx

    from jaxlora import demo
    from jaxlora.errors import ConfigError
    from jaxlora.server import ServerConfig
    from tests.test_server_helpers import API_KEY, start_demo_server

    for bad in (0, True, 2.0):
        try:
            ServerConfig(model_name="m", stream_interval=bad)
        except ConfigError as e:
            assert "'stream_interval'" in str(e) and "expected an int >= 1" in str(e)
        else:
            raise AssertionError(f"stream_interval={bad!r} taken")
    interpreter_interval = sys.getswitchinterval()
    server, state = start_demo_server(stream_interval=3, switch_interval_s=0.002)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "model": next(iter(demo.DEMO_SIGNATURES)),
        "prompt": demo.DEMO_PROMPTS[0],
        "max_tokens": 11,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    try:
        whole = httpx.post(f"{server.base_url}/completions", json=body, headers=headers).json()
        streamed = httpx.post(
            f"{server.base_url}/completions", json={**body, "stream": True}, headers=headers
        )
        chunks = [
            json.loads(line[len("data: ") :])
            for line in streamed.text.split("\n")
            if line.startswith("data: {")
        ]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        sizes = [len(c["token_ids"]) for c in choices]
        # 11 tokens: the first chunk as soon as there is a token (with the others the engine
        # made before the pump's pass: the tiny model on the CPU makes several in 2 ms), then
        # at least 3 a chunk, the rest with the finish.
        assert sum(sizes) == 11 and min(sizes[1:-1], default=3) >= 3
        assert len(sizes) <= 1 + 10 // 3 + 1 and choices[-1]["finish_reason"] == "length"
        assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
        assert [t for c in choices for t in c["token_ids"]] == whole["choices"][0]["token_ids"]
        # LoRAX's stream still sends one event a token, the last with the details.
        lorax = httpx.post(
            server.base_url.removesuffix("/v1") + "/generate_stream",
            json={"inputs": demo.DEMO_PROMPTS[0], "parameters": {"max_new_tokens": 7}},
            headers=headers,
        )
        events = [json.loads(x[len("data: ") :]) for x in lorax.text.split("\n") if x]
        assert len(events) == events[-1]["details"]["generated_tokens"]
        assert all(e["details"] is None for e in events[:-1])
        # The app's switch interval holds while it runs; its shutdown gives the old one back.
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        server.stop()
    assert sys.getswitchinterval() == interpreter_interval


def test_the_switch_interval_is_checked_and_its_flag_is_in_ms():
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.errors import ConfigError
    from jaxlora.server import ServerConfig
    from tests.test_server_helpers import launch_configs_of

    assert ServerConfig(model_name="m").switch_interval_s is None  # (the interpreter's own)
    for bad in (0, -0.001, float("inf"), float("nan"), 2.0, True, "1"):
        with pytest.raises(ConfigError, match=r"'switch_interval_s' \(--switch_interval_ms"):
            ServerConfig(model_name="m", switch_interval_s=bad)
    launches = launch_configs_of("switch_interval_ms", (None, "0.5"))
    assert launches[None].switch_interval_ms == 0.0
    assert launches["0.5"].switch_interval_ms == 0.5
    with pytest.raises(SystemExit):  # (absl's one-line error: below its lower bound)
        try:
            launch_flags.parse_flags(["serve.py", "tiny", "--switch_interval_ms=-1"])
        finally:
            flags.FLAGS.unparse_flags()


def test_the_stream_interval_flag_reaches_the_launch_config():
    from absl import flags

    from jaxlora import launch_flags

    try:
        launch_flags.parse_flags(["serve.py", "tiny", "--stream-interval=4"])
        assert launch_flags.launch_config().stream_interval == 4
    finally:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit):  # (absl's one-line error: not a positive integer)
        try:
            launch_flags.parse_flags(["serve.py", "tiny", "--stream_interval=0"])
        finally:
            flags.FLAGS.unparse_flags()
