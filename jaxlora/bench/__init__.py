"""End-to-end benchmarks of the serving engine (scripts/benchmark.py, scripts/bench_peft.py).

``workloads`` (numpy only: the PEFT baseline imports it next to torch) makes the requests:
offline batches, per-request adapter assignments, S-LoRA's synthetic online trace.
``roofline`` counts the bytes a decode step must read. ``harness`` runs the engine in-process
on them and times it; ``peft_baseline`` runs HF transformers + PEFT on the same requests;
``report`` turns the JSON results into tables and a figure.
"""
