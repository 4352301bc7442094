"""Benchmark results: the issue's targets judged, markdown tables, and the figure.

Results are the JSON documents scripts/benchmark.py and scripts/bench_peft.py write: each has a
"meta" dict and any of "offline" ({"rows": [...]}), "online" ({"rows": [...]}) and "peft"
({"rows": [...]}); ``load`` merges several (rows of one set-up measured in separate runs).
"""

from __future__ import annotations

import json
import math
import os

from jaxlora.bench.workloads import WORKLOADS
from jaxlora.errors import ConfigError

ROOFLINE_TARGET = 1.25  # decode step <= 1.25x its roofline, batch >= 32, every workload
ROOFLINE_MIN_BATCH = 32
LORA_COST_TARGET = 1.1  # LoRA step cost <= 1.1x what the adapter bytes explain
PEFT_SPEEDUP_TARGET = 30.0  # output tokens/s >= 30x HF PEFT at batch 8, distinct adapters
PEFT_BATCH = 8
ONLINE_RETENTION_TARGET = 0.95  # throughput at 2,000 adapters >= 95% of that at 5
ONLINE_FEW, ONLINE_MANY = 5, 2000
# The online traces are judged at capacity: requests still waiting after at least this share of
# the engine's steps.
ONLINE_SATURATED_SHARE = 0.5


# How a section's rows are told apart, and the config fields that only choose which rows ran:
# files that agree on everything else (and on the meta's set-up) have their rows merged.
_ROW_KEYS = {
    "offline": ("batch", "workload"),
    "online": ("num_adapters", "prefix_len", "prefix_caching"),
    "peft": ("batch", "workload"),
    "serving": ("num_adapters",),
}
_ROW_SELECTORS = {
    "offline": ("batch_sizes", "workloads", "free_running", "profile_steps"),
    "online": ("adapter_counts", "time_steps", "prefix_caching"),
    "peft": ("batch_sizes", "workloads", "max_time_s"),
    "serving": ("adapter_counts", "time_steps"),
}
_SETUP = ("device", "model", "dtype", "rank")


def load(paths) -> dict:
    """Merges result files. A section found in one file is taken whole; a section found in
    several has its rows merged (a later file's row replaces an earlier one with the same key)
    when the files measured the same set-up: meta fields ``_SETUP`` and the section's config
    apart from the fields that only choose rows. Otherwise ``ConfigError`` names both files."""
    merged = {"meta": {}}
    for path in paths:
        path = str(path)
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: benchmark result file not found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or "meta" not in doc:
            raise ConfigError(f"{path}: expected a benchmark result object with a 'meta' field")
        for section in _ROW_KEYS:
            if section in doc:
                _merge_section(merged, section, doc, path)
    return merged


def _merge_section(merged: dict, section: str, doc: dict, path: str) -> None:
    part = doc[section]
    if section not in merged:
        merged[section] = {
            **part,
            "rows": list(part.get("rows", [])),
            "config": dict(part.get("config", {})),
        }
        merged["meta"][section] = {**doc["meta"], "sources": [path]}
        return
    meta = merged["meta"][section]
    first = meta["sources"][0]
    for field in _SETUP:
        ours, theirs = doc["meta"].get(field), meta.get(field)
        if ours != theirs:
            if isinstance(ours, dict) and isinstance(theirs, dict):
                field, ours, theirs = next(
                    (f"{field}.{k}", ours.get(k), theirs.get(k))
                    for k in sorted(set(ours) | set(theirs))
                    if ours.get(k) != theirs.get(k)
                )
            raise ConfigError(
                f"{path}: its {section} results were measured with meta field {field!r} = "
                f"{ours!r}, those of {first} with {theirs!r}; results of different set-ups "
                "are not merged"
            )
    config, new_config = merged[section].get("config", {}), part.get("config", {})
    selectors = _ROW_SELECTORS[section]
    for field in sorted((set(config) | set(new_config)) - set(selectors)):
        if config.get(field) != new_config.get(field):
            raise ConfigError(
                f"{path}: its {section} config field {field!r} is {new_config.get(field)!r}, "
                f"{first} has {config.get(field)!r}; results of different set-ups are not merged"
            )
    key_fields = _ROW_KEYS[section]
    rows = {tuple(r.get(k) for k in key_fields): r for r in merged[section]["rows"]}
    for row in part.get("rows", []):
        rows[tuple(row.get(k) for k in key_fields)] = row
    merged[section]["rows"] = list(rows.values())
    for field in selectors:
        if isinstance(config.get(field), list) and isinstance(new_config.get(field), list):
            config[field] = config[field] + [v for v in new_config[field] if v not in config[field]]
    meta["sources"].append(path)


def _offline_order(row) -> tuple:
    workload = row["workload"]
    rank = WORKLOADS.index(workload) if workload in WORKLOADS else len(WORKLOADS)
    return (row["batch"], rank, workload)


def slora_rows(rows: list[dict]) -> list[dict]:
    """The online rows of S-LoRA's trace as the issue defines it: no system prompts, no prefix
    caching (rows written before either existed have neither field)."""
    return [r for r in rows if not r.get("prefix_len") and not r.get("prefix_caching")]


def prefix_rows(rows: list[dict]) -> list[dict]:
    """The online rows that are not S-LoRA's (``slora_rows``): traces with system prompts or
    prefix caching, by adapters and caching mode."""
    slora = {id(r) for r in slora_rows(rows)}
    return sorted(
        (r for r in rows if id(r) not in slora),
        key=lambda r: (r["num_adapters"], bool(r.get("prefix_caching"))),
    )


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _copy_gbps(results: dict, section: str):
    """The copy rate measured with a section's rows: ``load`` keeps each section's meta apart;
    the one file scripts/benchmark.py reports on has one meta for all."""
    meta = results.get("meta") or {}
    section_meta = meta.get(section)
    return (section_meta if isinstance(section_meta, dict) else meta).get("copy_GBps")


def adapter_bytes_retention_bound(few: dict, many: dict, copy_gbps) -> float | None:
    """The most throughput the many-adapter trace can keep of the few-adapter one, at capacity.

    Both traces serve the same requests (same prompts, lengths and arrivals; only the adapters
    differ), and every step reads each distinct adapter it uses once (``adapter_GB_read``).
    The many-adapter trace must move the extra adapter bytes through the same device memory,
    so, the rest of its work being the few-adapter trace's, it takes at least that many bytes
    at the copy rate longer. None when a row predates ``adapter_GB_read`` or the copy rate is
    unknown."""
    extra_gb = many.get("adapter_GB_read", math.nan) - few.get("adapter_GB_read", math.nan)
    elapsed = few.get("elapsed_s", math.nan)
    if not (copy_gbps and _finite(extra_gb) and _finite(elapsed)) or elapsed <= 0:
        return None
    return elapsed / (elapsed + max(0.0, extra_gb) / copy_gbps)


def verdicts(results: dict) -> list[dict]:
    """One entry per target: name, met (True / False / None when not measured), detail."""
    out = []
    offline = results.get("offline", {}).get("rows", [])
    big = [r for r in offline if r["batch"] >= ROOFLINE_MIN_BATCH and _finite(r["roofline_ratio"])]
    if big:
        worst = max(big, key=lambda r: r["roofline_ratio"])
        met = all(r["roofline_ratio"] <= ROOFLINE_TARGET for r in big)
        detail = (
            f"{sum(r['roofline_ratio'] <= ROOFLINE_TARGET for r in big)}/{len(big)} rows "
            f"within {ROOFLINE_TARGET}x; worst {worst['roofline_ratio']:.2f}x "
            f"(batch {worst['batch']}, {worst['workload']})"
        )
        # With async scheduling the free-running iteration is the device's decode step (the
        # timed step includes packing, transfer and dispatch): shown beside it, not judged.
        device = [
            r["free_running"]["async"]["iteration_ms_median"] / r["roofline_ms"]
            for r in big
            if "async" in r.get("free_running", {})
        ]
        if device:
            detail += (
                f"; async-scheduled iteration (device step) {min(device):.2f}-"
                f"{max(device):.2f}x the roofline, "
                f"{sum(d <= ROOFLINE_TARGET for d in device)}/{len(device)} within "
                f"{ROOFLINE_TARGET}x"
            )
    else:
        met, detail = None, "no offline row at batch >= 32"
    out.append(
        {
            "target": f"decode step <= {ROOFLINE_TARGET}x roofline at batch >= "
            f"{ROOFLINE_MIN_BATCH}",
            "met": met,
            "detail": detail,
        }
    )

    lora = [r for r in offline if _finite(r.get("lora_cost_ratio"))]
    if lora:
        worst = max(lora, key=lambda r: r["lora_cost_ratio"])
        met = all(r["lora_cost_ratio"] <= LORA_COST_TARGET for r in lora)
        detail = (
            f"{sum(r['lora_cost_ratio'] <= LORA_COST_TARGET for r in lora)}/{len(lora)} "
            f"rows within {LORA_COST_TARGET}x; worst {worst['lora_cost_ratio']:.2f}x "
            f"(batch {worst['batch']}, {worst['workload']}: +{worst['lora_extra_ms']:.3f} "
            f"ms for {worst['lora_explained_ms']:.3f} ms of adapter bytes)"
        )
    else:
        met, detail = None, "no LoRA row with a no-LoRA row of the same batch size"
    out.append(
        {
            "target": f"LoRA step cost <= {LORA_COST_TARGET}x the adapter bytes' time",
            "met": met,
            "detail": detail,
        }
    )

    peft = {(r["batch"], r["workload"]): r for r in results.get("peft", {}).get("rows", [])}
    ours = {(r["batch"], r["workload"]): r for r in offline}
    key = (PEFT_BATCH, "distinct")
    if key in peft and key in ours and peft[key].get("output_tokens_per_s"):
        speedup = ours[key]["output_tokens_per_s"] / peft[key]["output_tokens_per_s"]
        met = speedup >= PEFT_SPEEDUP_TARGET
        detail = (
            f"{speedup:.1f}x ({ours[key]['output_tokens_per_s']:.0f} vs "
            f"{peft[key]['output_tokens_per_s']:.1f} output tokens/s)"
        )
    else:
        met, detail = None, "batch 8 distinct not measured for both"
    out.append(
        {
            "target": f">= {PEFT_SPEEDUP_TARGET:.0f}x HF PEFT output tokens/s at batch "
            f"{PEFT_BATCH}, distinct",
            "met": met,
            "detail": detail,
        }
    )

    online = {r["num_adapters"]: r for r in slora_rows(results.get("online", {}).get("rows", []))}
    if ONLINE_FEW in online and ONLINE_MANY in online:
        few, many = online[ONLINE_FEW]["throughput_rps"], online[ONLINE_MANY]["throughput_rps"]
        retention = many / few if few else float("nan")
        met = retention >= ONLINE_RETENTION_TARGET
        detail = f"{100 * retention:.1f}% ({many:.2f} vs {few:.2f} req/s)"
        few_tps = online[ONLINE_FEW].get("output_tokens_per_s")
        many_tps = online[ONLINE_MANY].get("output_tokens_per_s")
        if few_tps and many_tps is not None:  # judged by requests/s; tokens/s shown beside it
            detail += f"; output tokens/s {100 * many_tps / few_tps:.1f}%"
        bound = adapter_bytes_retention_bound(
            online[ONLINE_FEW], online[ONLINE_MANY], _copy_gbps(results, "online")
        )
        if bound is not None:
            detail += (
                f"; at most {100 * bound:.1f}% if the extra adapter bytes cost their copy time"
            )
        shares = [online[n].get("queued_step_share") for n in (ONLINE_FEW, ONLINE_MANY)]
        if None not in shares and min(shares) < ONLINE_SATURATED_SHARE:
            # Below capacity both rates follow the offered one: the ratio says nothing about
            # the cost of many adapters (older results without the field are judged as before).
            met = None
            offered = online[ONLINE_FEW].get("offered_rps", float("nan"))
            detail += (
                f"; below capacity: requests waited after {100 * shares[0]:.0f}% / "
                f"{100 * shares[1]:.0f}% of the steps ({ONLINE_FEW} / {ONLINE_MANY} adapters), "
                f"the served rates follow the offered {offered:.2f} req/s: raise --online_rate"
            )
    else:
        met, detail = None, f"traces of {ONLINE_FEW} and {ONLINE_MANY} adapters not both run"
    out.append(
        {
            "target": f"online throughput at {ONLINE_MANY} adapters >= "
            f"{100 * ONLINE_RETENTION_TARGET:.0f}% of {ONLINE_FEW}",
            "met": met,
            "detail": detail,
        }
    )
    return out


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return "-" if not math.isfinite(x) else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _async(row) -> dict:
    """The async free-running pass of an offline row (empty where it did not run)."""
    return row.get("free_running", {}).get("async", {})


def markdown(results: dict) -> str:
    parts = []
    offline = results.get("offline", {}).get("rows", [])
    if offline:
        # Merged files keep their own order: show batch sizes ascending, workloads as listed.
        offline = sorted(offline, key=_offline_order)
        parts.append(
            "### Offline throughput\n\n"
            + _table(
                [
                    "batch",
                    "workload",
                    "adapters",
                    "tokens/s",
                    "sync tokens/s",
                    "timed tokens/s",
                    "async iteration ms",
                    "host wait ms",
                    "step ms",
                    "roofline ms",
                    "ratio",
                    "weights MB",
                    "KV MB",
                    "adapters MB",
                    "LoRA extra ms",
                    "explained ms",
                    "LoRA cost ratio",
                    "prefill ms",
                ],
                [
                    [
                        r["batch"],
                        r["workload"],
                        r["distinct_adapters"],
                        r["output_tokens_per_s"],
                        r.get("free_running", {})
                        .get("sync", {})
                        .get("output_tokens_per_s", float("nan")),
                        r.get("output_tokens_per_s_timed", float("nan")),
                        _async(r).get("iteration_ms_median", float("nan")),
                        _async(r).get("host_ms_decode_median", {}).get("wait", float("nan")),
                        r["decode_step_ms"],
                        r["roofline_ms"],
                        r["roofline_ratio"],
                        r["bytes_weights_MB"],
                        r["bytes_kv_MB"],
                        r["bytes_adapters_MB"],
                        r.get("lora_extra_ms", float("nan")),
                        r.get("lora_explained_ms", float("nan")),
                        r.get("lora_cost_ratio", float("nan")),
                        r.get("prefill_step_ms", float("nan")),
                    ]
                    for r in offline
                ],
            )
        )
        not_run = results["offline"].get("not_run", [])
        if not_run:
            parts.append(
                "Not run (time budget): "
                + ", ".join(f"batch {r['batch']} {r['workload']}" for r in not_run)
            )
    peft = results.get("peft", {}).get("rows", [])
    if peft:
        parts.append(
            "### HF transformers + PEFT baseline\n\n"
            + _table(
                ["batch", "workload", "adapters", "output tokens", "seconds", "tokens/s"],
                [
                    [
                        r["batch"],
                        r["workload"],
                        r["distinct_adapters"],
                        r["output_tokens"],
                        r["wall_s"],
                        r["output_tokens_per_s"],
                    ]
                    for r in peft
                ],
            )
        )
    all_online = results.get("online", {}).get("rows", [])
    online = slora_rows(all_online)
    if online:
        parts.append(
            "### Online (S-LoRA synthetic trace)\n\n"
            + _table(
                [
                    "adapters",
                    "requests",
                    "finished",
                    "offered req/s",
                    "req/s",
                    "tokens/s",
                    "queued steps",
                    "TTFT p50 s",
                    "TTFT p90 s",
                    "TTFT p99 s",
                    "TPOT ms",
                    "SLO met",
                    "misses",
                    "GB copied",
                    "adapter GB read",
                    "adapters/step",
                ],
                [
                    [
                        r["num_adapters"],
                        r["requests"],
                        r["finished"],
                        r.get("offered_rps", float("nan")),
                        r["throughput_rps"],
                        r["output_tokens_per_s"],
                        f"{100 * r['queued_step_share']:.0f}%" if "queued_step_share" in r else "-",
                        r["ttft_p50_s"],
                        r["ttft_p90_s"],
                        r["ttft_p99_s"],
                        r["tpot_ms_median"],
                        f"{100 * r['slo_attainment']:.1f}%",
                        r["adapter_misses"],
                        r["adapter_GB_copied"],
                        r.get("adapter_GB_read", float("nan")),
                        r["adapters_per_decode_step_mean"],
                    ]
                    for r in online
                ],
            )
        )
    with_prefix = prefix_rows(all_online)
    if with_prefix:
        parts.append(_prefix_tables(with_prefix))
    serving = results.get("serving", {}).get("rows", [])
    if serving:
        parts.append(_serving_table(serving))
    verdict_rows = [
        [v["target"], {True: "met", False: "MISSED", None: "not measured"}[v["met"]], v["detail"]]
        for v in verdicts(results)
    ]
    parts.append("### Targets\n\n" + _table(["target", "verdict", "measured"], verdict_rows))
    return "\n\n".join(parts) + "\n"


def _floor_s(row: dict) -> float:
    """A trace row's floor in seconds: its decode part plus its prefill part (NaN without)."""
    parts = (row.get("decode_floor_s"), row.get("prefill_floor_s"))
    return sum(parts) if all(_finite(x) for x in parts) else float("nan")


def _floor_share(row: dict) -> str:
    """A trace row's floor as a share of its elapsed time ("-" without one)."""
    floor = _floor_s(row)
    if not _finite(floor) or not _finite(row.get("elapsed_s")):
        return "-"
    return f"{100 * floor / row['elapsed_s']:.1f}%"


def _prefix_tables(rows: list[dict]) -> str:
    """The traces with system prompts: each row, then prefix caching on against off."""
    text = "### Shared system prompts (prefix caching)\n\n" + _table(
        [
            "adapters",
            "system prompt",
            "caching",
            "req/s",
            "tokens/s",
            "queued steps",
            "TTFT p50 s",
            "TTFT p90 s",
            "TTFT p99 s",
            "SLO met",
            "prompt tokens computed",
            "cached",
            "floor s (decode + prefill)",
            "elapsed s",
            "floor / elapsed",
        ],
        [
            [
                r["num_adapters"],
                r["prefix_len"],
                "on" if r.get("prefix_caching") else "off",
                r["throughput_rps"],
                r["output_tokens_per_s"],
                f"{100 * r['queued_step_share']:.0f}%",
                r["ttft_p50_s"],
                r["ttft_p90_s"],
                r["ttft_p99_s"],
                f"{100 * r['slo_attainment']:.1f}%",
                f"{r['prompt_tokens_computed']} / {r['prompt_tokens']}",
                f"{100 * r['cached_share']:.1f}%",
                f"{_floor_s(r):.3g} ({r.get('decode_floor_s', float('nan')):.3g} + "
                f"{r.get('prefill_floor_s', float('nan')):.3g})",
                r["elapsed_s"],
                _floor_share(r),
            ]
            for r in rows
        ],
    )
    pairs = {}
    for r in rows:
        pairs.setdefault(r["num_adapters"], {})[bool(r.get("prefix_caching"))] = r
    compared = [
        [
            count,
            f"{pair[True]['throughput_rps'] / pair[False]['throughput_rps']:.2f}x",
            f"{pair[False]['ttft_p50_s'] / pair[True]['ttft_p50_s']:.2f}x",
            f"{pair[False]['ttft_p90_s'] / pair[True]['ttft_p90_s']:.2f}x",
            f"{pair[True]['prompt_tokens_computed'] / pair[False]['prompt_tokens_computed']:.3f}",
        ]
        for count, pair in sorted(pairs.items())
        if len(pair) == 2
        and pair[False]["throughput_rps"]
        and pair[True]["ttft_p50_s"]
        and pair[True]["ttft_p90_s"]
        and pair[False]["prompt_tokens_computed"]
    ]
    if compared:
        text += "\n\nPrefix caching on against off (the same trace):\n\n" + _table(
            [
                "adapters",
                "req/s on / off",
                "TTFT p50 off / on",
                "TTFT p90 off / on",
                "prompt tokens computed on / off",
            ],
            compared,
        )
    return text


def _http_passes(row: dict) -> list[dict]:
    """A serving row's HTTP passes (one a server variant; files before the fifty-eighth
    session hold one pass, not a list)."""
    http = row["http"]
    return http if isinstance(http, list) else [http]


def _host_ms(r: dict) -> str:
    """An engine's host ms an iteration outside "wait", wall (its thread's CPU)."""
    wall = r.get("host_ms_per_step")
    if not wall:
        return "-"
    own = sum(ms for phase, ms in wall.items() if phase != "wait")
    cpu = r.get("host_cpu_ms_per_step")
    if not cpu:
        return f"{own:.2f}"
    return f"{own:.2f} ({sum(ms for phase, ms in cpu.items() if phase != 'wait'):.2f})"


def _serving_table(rows: list[dict]) -> str:
    """The trace in-process against the same trace through the OpenAI server over HTTP, once a
    server variant."""
    from .serving import variant_label

    table = []

    def line(adapters, label, r):
        server_us = r.get("server_cpu_us_per_token")
        table.append(
            [
                adapters,
                label,
                f"{r['finished']} / {r['requests']}",
                r["throughput_rps"],
                r["output_tokens_per_s"],
                r["ttft_p50_s"],
                r["ttft_p90_s"],
                r["ttft_p99_s"],
                r["tpot_ms_median"],
                r.get("itl_ms_p50", float("nan")),
                r.get("itl_ms_p99", float("nan")),
                f"{100 * r['slo_attainment']:.1f}%",
                _floor_share(r),
                _host_ms(r),
                "-" if server_us is None else f"{server_us:.1f}",
            ]
        )

    for row in sorted(rows, key=lambda r: r["num_adapters"]):
        adapters, engine = row["num_adapters"], row["in_process"]
        if engine is not None:  # (None: the HTTP passes alone, --noserving_in_process)
            line(adapters, "in-process", engine)
        for http in _http_passes(row):
            options = variant_label(
                http.get("stream_interval", 1), http.get("switch_interval_ms", 0.0)
            )
            label = f"HTTP ({options})" if options else "HTTP"
            line(adapters, label, http)
            if engine is not None and engine["throughput_rps"]:
                table.append(
                    [
                        adapters,
                        f"{label} / in-process",
                        "",
                        f"{http['throughput_rps'] / engine['throughput_rps']:.3f}x",
                        "",
                        f"{1e3 * (http['ttft_p50_s'] - engine['ttft_p50_s']):+.1f} ms",
                        f"{1e3 * (http['ttft_p90_s'] - engine['ttft_p90_s']):+.1f} ms",
                        f"{1e3 * (http['ttft_p99_s'] - engine['ttft_p99_s']):+.1f} ms",
                        f"{http['tpot_ms_median'] - engine['tpot_ms_median']:+.2f} ms",
                        *[""] * 6,
                    ]
                )
    return "### Serving over HTTP (the OpenAI server against the engine in-process)\n\n" + (
        _table(
            [
                "adapters",
                "pass",
                "finished",
                "req/s",
                "tokens/s",
                "TTFT p50 s",
                "TTFT p90 s",
                "TTFT p99 s",
                "TPOT ms",
                "ITL p50 ms",
                "ITL p99 ms",
                "SLO met",
                "floor / elapsed",
                "engine host ms / iteration, wall (CPU)",
                "server CPU us / token",
            ],
            table,
        )
    )


def plot(results: dict, path: str | os.PathLike) -> bool:
    """Writes the figure (PNG); False when matplotlib (the `bench` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    offline = results.get("offline", {}).get("rows", [])
    online = slora_rows(results.get("online", {}).get("rows", []))
    peft = results.get("peft", {}).get("rows", [])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for workload in dict.fromkeys(r["workload"] for r in offline):
        rows = sorted((r for r in offline if r["workload"] == workload), key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in rows],
            [r["output_tokens_per_s"] for r in rows],
            "o-",
            label=workload,
        )
    for workload in dict.fromkeys(r["workload"] for r in peft):
        rows = sorted((r for r in peft if r["workload"] == workload), key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in rows],
            [r["output_tokens_per_s"] for r in rows],
            "x--",
            label=f"HF PEFT {workload}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="output tokens/s",
        title="Offline throughput",
    )
    ax.legend(fontsize=7)
    rows = sorted(online, key=lambda r: r["num_adapters"])
    counts = [r["num_adapters"] for r in rows]
    ax = axes[1]
    ax.plot(counts, [r["throughput_rps"] for r in rows], "o-")
    ax.set(xscale="log", xlabel="adapters", ylabel="requests/s", title="Online throughput")
    ax.set_ylim(bottom=0)
    ax = axes[2]
    for key, label in (
        ("ttft_p50_s", "TTFT p50"),
        ("ttft_p90_s", "TTFT p90"),
        ("ttft_p99_s", "TTFT p99"),
    ):
        ax.plot(counts, [r.get(key, float("nan")) for r in rows], "o-", label=label)
    ax.set(xscale="log", xlabel="adapters", ylabel="seconds", title="Online first-token latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
