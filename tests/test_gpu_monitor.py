"""jaxlora.bench.gpu_monitor: the GPU's clocks while a benchmark runs, from nvidia-smi (here a
stand-in script that prints what nvidia-smi would), and nothing at all without it."""

from __future__ import annotations

import os
import stat
import time

from jaxlora.bench.gpu_monitor import GpuMonitor, describe, parse_sample


def _fake_nvidia_smi(tmp_path, lines):
    """An executable that checks nvidia-smi's arguments, then prints ``lines`` over and over."""
    script = tmp_path / "nvidia-smi"
    body = "\n".join(f"echo '{line}'" for line in lines)
    script.write_text(
        "#!/bin/bash\n"
        'case "$*" in *--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,'
        "utilization.gpu*--format=csv,noheader,nounits*--loop-ms=*) ;; *) exit 2 ;; esac\n"
        f"while true; do\n{body}\nsleep 0.01\ndone\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_parse_sample_reads_a_csv_line_and_not_available_fields():
    assert parse_sample("1980, 2619, 512.34, 61, 97\n") == {
        "sm_mhz": 1980.0,
        "mem_mhz": 2619.0,
        "power_w": 512.34,
        "temp_c": 61.0,
        "util_pct": 97.0,
    }
    assert parse_sample("1755, 2619, [N/A], 70, 100")["power_w"] is None
    assert parse_sample("No devices were found") is None
    assert parse_sample("[N/A], [N/A], [N/A], [N/A], [N/A]") is None


def test_monitor_summarizes_the_samples_of_a_window(tmp_path):
    command = _fake_nvidia_smi(tmp_path, ["1980, 2619, 500, 60, 90", "1700, 2619, 700, 66, 100"])
    with GpuMonitor(interval_ms=10, command=command) as monitor:
        assert monitor.available
        start = time.monotonic()
        time.sleep(0.3)
        end = time.monotonic()
    summary = monitor.summary(start, end)
    assert summary is not None and summary["samples"] >= 4
    assert summary["sm_mhz_min"] == 1700 and summary["temp_c_max"] == 66
    assert 1700 <= summary["sm_mhz"] <= 1980 and summary["mem_mhz"] == 2619
    assert 500 <= summary["power_w"] <= 700
    assert describe(summary).startswith("gpu: SM ") and "memory 2619 MHz" in describe(summary)
    assert monitor.summary(end + 10, end + 20) is None  # a window without samples


def test_without_nvidia_smi_it_samples_nothing_and_raises_nothing(tmp_path):
    with GpuMonitor(command=os.fspath(tmp_path / "no-such-nvidia-smi")) as monitor:
        assert not monitor.available
    assert monitor.summary(0.0, time.monotonic()) is None
    assert describe(None) == ""
