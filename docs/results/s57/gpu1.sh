# Fifty-seventh session, call 1 (H100): the large-tile halves of the forty-second session's SGMV
# knob sweep (P1: T = 1,024, identical / uniform, ranks 16 / 64; P2: the 16-token-tile rows,
# T = 256 / 1,024, uniform / skewed, ranks 8 / 64), never run on an H100 (the forty-second
# session's ran on an H200; the forty-fifth ran the decode half, D and Ddown, on an H100).
# Variants a-g change shrink and expand knobs at once; the profiler's per-kernel times
# (kernel_us in the JSON) attribute each kernel's time to its own knobs.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
eval "$(sed -n '/^PV=/,/^PI=/p' docs/results/s42/call1.sh)"
B="timeout 200 python3 scripts/bench_kernels.py --calls=3"
$B --tokens=1024 --ranks=16,64 --outs=4096,3x4096,11008 --workloads=identical,uniform --impls=$PI --variants="$PV" --out_json=$R/p1.json > $R/p1.txt 2>&1; echo "P1 rc=$?" >> $S; date >> $R/times.txt
$B --tokens=256,1024 --ranks=8,64 --outs=4096,3x4096,11008 --workloads=uniform,skewed --impls=$PI --variants="$PV" --out_json=$R/p2.json > $R/p2.txt 2>&1; echo "P2 rc=$?" >> $S
date >> $R/times.txt; cat $S $R/times.txt
