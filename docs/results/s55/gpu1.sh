# Fifty-fifth session's first GPU call (no carry needed):
#  1. issue 7's offline grid at the current defaults (decode unchanged since the forty-eighth
#     session; the last whole grid at batch 64 / 128 was the forty-third's, before the dot
#     epilogue's LoRA terms moved before the K loop and before the fifty-first session's prefill
#     defaults): llama-2-7b, batch 32 / 64 / 128, the five workloads, one process;
#  2. the compiled engine against its reference engine at HEAD (the fifty-fourth session's
#     engine-side changes: stop_reason recorded by the engine, the scheduler's preemption
#     choices), then every family's.
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
timeout 300 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,64,128 --json_out=$R/grid.json > $R/grid.log 2>&1; echo "grid rc=$? at ${SECONDS}s" >> $S
grep -E "offline batch=|copy bandwidth|decode step <=|LoRA cost" $R/grid.log | cut -c1-300 >> $S
left=$((585 - SECONDS)); [ $left -gt 60 ] && { timeout $left python3 -m pytest -q -x -m gpu tests/test_engine_gpu.py -k "matches_reference_engine or each_family" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -5 $R/tests.log >> $S; }
date >> $S; cat $S
