R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
run() { name=$1; t=$2; shift; shift
  timeout $t python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)|profile batch.*async" $R/$name.log | cut -c40-330 >> $S
  grep -E "shrink|residual_rms|loop_convert" $R/$name.log | tail -8 >> $S; date >> $R/times.txt; }
run r4 110 --offline_workloads=distinct --profile_steps=3 --norm_shrink --swiglu_shrink --fused_shrink_rows=4
run r2 110 --offline_workloads=distinct --profile_steps=3 --norm_shrink --swiglu_shrink --fused_shrink_rows=2
run r1 110 --offline_workloads=distinct --profile_steps=3 --norm_shrink --swiglu_shrink --fused_shrink_rows=1
run base 110 --offline_workloads=distinct --profile_steps=3
cd $OUT && tar czf all.tgz r && rm -rf r
