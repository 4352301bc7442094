"""Fifty-eighth session: the interpreter lock between the engine's host work and the server's,
modelled on the CPU machine (real CPython threads; the device and the work are stand-ins).

A "device" thread runs the steps it is given back to back, each ``step_ms`` of sleep (the lock
released, as a step on the GPU). An "engine" thread keeps one step queued ahead (async
scheduling): it schedules and builds the next step (``host_ms`` of pure-Python work, in
``calls`` + 1 parts with a call of ``call_ms`` that releases the lock between two parts: XLA's
launches of a step's kernels and the sampler's, a transfer), hands it to the device, waits for
the previous one's tokens (the lock released), then appends them (``append_ms``) and names them
to the "server" thread, which spends ``server_ms`` of pure-Python work on them (the SSE chunks
of every stream), as uvicorn's event loop does. The figures are the device's busy share and
the steps a second, at the interpreter's switch interval (5 ms) and at shorter ones; with the
server idle for the baseline. A thread that gets the lock back after a call waits until the
holder lets it go: at most a switch interval while the holder runs Python.

    python docs/results/s58/gil_model.py [step_ms host_ms append_ms server_ms seconds calls call_ms]
"""

import queue
import sys
import threading
import time


def spin(ms: float) -> None:
    """Pure-Python work for ms of this thread's CPU time (it holds the lock throughout, but
    for the interpreter's forced switches)."""
    end = time.thread_time() + ms / 1e3
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i


def run(
    step_ms,
    host_ms,
    append_ms,
    server_ms,
    seconds,
    switch_s,
    with_server=True,
    calls=0,
    call_ms=0.0,
):
    sys.setswitchinterval(switch_s)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: dict[int, threading.Event] = {}
    busy = [0.0]
    stop = threading.Event()

    def device():
        while True:
            step = todo.get()
            if step is None:
                return
            start = time.perf_counter()
            time.sleep(step_ms / 1e3)
            busy[0] += time.perf_counter() - start
            done[step].set()

    news: queue.SimpleQueue = queue.SimpleQueue()

    def server():
        while True:
            item = news.get()
            if item is None:
                return
            spin(server_ms)

    def engine():
        step = 0
        done[0] = threading.Event()
        todo.put(0)
        while not stop.is_set():
            for part in range(calls + 1):  # schedule, build and launch the next step
                if part:
                    time.sleep(call_ms / 1e3)  # (a call that releases the lock)
                spin(host_ms / (calls + 1))
            step += 1
            done[step] = threading.Event()
            todo.put(step)
            done[step - 1].wait()  # the previous step's tokens (the lock released)
            spin(append_ms)
            if with_server:
                news.put(step - 1)
        done[step].wait()

    threads = [threading.Thread(target=f) for f in (device, server, engine)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    threads[2].join()
    elapsed = time.perf_counter() - start
    todo.put(None)
    news.put(None)
    for t in threads[:2]:
        t.join()
    steps = len(done)
    sys.setswitchinterval(0.005)
    return busy[0] / elapsed, steps / elapsed


def main(argv):
    values = [float(a) for a in argv[1:8]] if len(argv) > 7 else [14, 4, 1, 3, 8, 0, 0]
    step_ms, host_ms, append_ms, server_ms, seconds, calls, call_ms = values
    calls = int(calls)
    print(
        f"step {step_ms} ms, engine host {host_ms} + {append_ms} ms ({calls} calls of {call_ms} "
        f"ms releasing the lock), server {server_ms} ms a step, {seconds} s each"
    )
    busy, rate = run(step_ms, host_ms, append_ms, server_ms, seconds, 0.005, False, calls, call_ms)
    print(f"no server         : device busy {100 * busy:5.1f}%, {rate:6.1f} steps/s")
    for switch_ms in (5.0, 2.0, 1.0, 0.5, 0.2):
        busy, rate = run(
            step_ms, host_ms, append_ms, server_ms, seconds, switch_ms / 1e3, True, calls, call_ms
        )
        print(
            f"switch {switch_ms:4.1f} ms    : device busy {100 * busy:5.1f}%, {rate:6.1f} steps/s"
        )


if __name__ == "__main__":
    main(sys.argv)
