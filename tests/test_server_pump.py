"""The server's delta pump (jaxlora.server.generation.DeltaPump): every delta delivered once,
in order, to the HTTP call that owns its request; only requests given deltas are drained."""

import asyncio

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
