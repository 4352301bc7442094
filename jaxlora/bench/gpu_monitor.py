"""The GPU's clocks, power and temperature while a benchmark runs, sampled with ``nvidia-smi``.

A traced iteration and an untraced one can run the same kernels at different speeds: under
sustained load a GPU may lower its clocks (power or temperature), while the profiler's slower
host leaves it gaps. A row that reports the clocks it ran at tells the two apart (the
forty-seventh session's batch-128 steps ran 1 ms longer untraced than their traced busy time).

``GpuMonitor`` runs ``nvidia-smi --loop-ms`` in the background and keeps each line it prints
with the host's monotonic time; ``summary(start, end)`` gives the medians of the samples taken
in that window. Without ``nvidia-smi`` (a CPU machine, another vendor's GPU) it takes no samples
and every summary is None: the benchmarks run the same.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

# nvidia-smi's query fields and the names a summary gives them.
FIELDS = (
    ("clocks.sm", "sm_mhz"),
    ("clocks.mem", "mem_mhz"),
    ("power.draw", "power_w"),
    ("temperature.gpu", "temp_c"),
    ("utilization.gpu", "util_pct"),
)


def parse_sample(line: str) -> dict[str, float | None] | None:
    """One ``--format=csv,noheader,nounits`` line as {name: value} (None where nvidia-smi
    reports none, e.g. "[N/A]"); None for a line that is not a sample."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) != len(FIELDS):
        return None
    values = {}
    for (_, name), text in zip(FIELDS, parts, strict=True):
        try:
            values[name] = float(text)
        except ValueError:
            values[name] = None
    return values if any(v is not None for v in values.values()) else None


class GpuMonitor:
    """Samples one GPU every ``interval_ms`` while open (a context manager)."""

    def __init__(self, *, interval_ms: int = 50, gpu_index: int = 0, command: str = "nvidia-smi"):
        self.interval_ms = interval_ms
        self.gpu_index = gpu_index
        self.command = command
        self._samples: list[tuple[float, dict]] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        """Whether the sampler is running (nvidia-smi was found and started)."""
        return self._proc is not None

    def start(self) -> GpuMonitor:
        exe = shutil.which(self.command)
        if exe is None:
            return self
        query = ",".join(field for field, _ in FIELDS)
        try:
            self._proc = subprocess.Popen(
                [
                    exe,
                    f"--id={self.gpu_index}",
                    f"--query-gpu={query}",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={self.interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                with self._lock:
                    self._samples.append((time.monotonic(), sample))

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self, start: float, end: float) -> dict | None:
        """The samples taken between two ``time.monotonic()`` readings: the median of each field,
        the SM clock's lowest and the highest temperature, and their count; None without any."""
        with self._lock:
            picked = [s for t, s in self._samples if start <= t <= end]
        if not picked:
            return None
        out: dict[str, float | int | None] = {"samples": len(picked)}
        for _, name in FIELDS:
            values = [s[name] for s in picked if s[name] is not None]
            out[name] = statistics.median(values) if values else None
        sm = [s["sm_mhz"] for s in picked if s["sm_mhz"] is not None]
        temps = [s["temp_c"] for s in picked if s["temp_c"] is not None]
        out["sm_mhz_min"] = min(sm) if sm else None
        out["temp_c_max"] = max(temps) if temps else None
        return out


def describe(summary: dict | None) -> str:
    """A log fragment, e.g. "gpu: SM 1755 MHz (min 1650), memory 2619 MHz, 640 W, 71 C" ("" for
    None)."""
    if not summary:
        return ""
    parts = []
    if summary.get("sm_mhz") is not None:
        parts.append(f"SM {summary['sm_mhz']:.0f} MHz (min {summary['sm_mhz_min']:.0f})")
    if summary.get("mem_mhz") is not None:
        parts.append(f"memory {summary['mem_mhz']:.0f} MHz")
    if summary.get("power_w") is not None:
        parts.append(f"{summary['power_w']:.0f} W")
    if summary.get("temp_c_max") is not None:
        parts.append(f"{summary['temp_c_max']:.0f} C")
    return "gpu: " + ", ".join(parts) if parts else ""
