# Thirty-ninth session, call 1 (H100): the kernel grid of issue 3 (first time on an H100), then
# HF transformers + PEFT at batch 8 (issue 7's baseline, first time on an H100).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> $R/gpu.txt 2>&1
timeout 400 python3 scripts/bench_kernels.py --calls=3 --impls=sgmv,gather_einsum,ragged_dot --out_json=$R/grid.json > $R/grid.txt 2>&1; echo "grid rc=$?" >> $S; tail -2 $R/grid.txt >> $S; date >> $R/times.txt
timeout 150 python3 scripts/bench_peft.py --batch_sizes=8 --max_time_s=8 --json_out=$R/peft.json > $R/peft.log 2>&1; echo "peft rc=$?" >> $S; grep -i "tok" $R/peft.log | tail -4 >> $S; date >> $R/times.txt
cat $S $R/times.txt
