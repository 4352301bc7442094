# Thirty-ninth session, call 1 (H100): the kernel grid of issue 3 and the SGMV kernels' GPU tests,
# both for the first time on an H100 (earlier runs: an H200).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > $R/gpu.txt 2>&1
timeout 390 python3 scripts/bench_kernels.py --calls=3 --impls=sgmv,gather_einsum,ragged_dot --out_json=$R/grid.json > $R/grid.txt 2>&1; echo "grid rc=$?" >> $S; tail -2 $R/grid.txt >> $S; date >> $R/times.txt
timeout 170 python3 -m pytest -m gpu tests/test_sgmv.py -q -p no:cacheprovider > $R/sgmv_tests.log 2>&1; echo "sgmv_tests rc=$?" >> $S; tail -3 $R/sgmv_tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt
