R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
run() { name=$1; t=$2; shift; shift
  timeout $t python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)" $R/$name.log | cut -c40-250 >> $S; date >> $R/times.txt; }
timeout 230 python3 -m pytest -m gpu tests/test_engine_gpu.py -k matches_reference -q > $R/engine_gpu.log 2>&1; echo "engine_gpu rc=$?" >> $S; tail -2 $R/engine_gpu.log >> $S; date >> $R/times.txt
run mp384 100 --offline_workloads=no_lora,distinct --matmul_config='{"min_programs": 384}'
cd $OUT && tar czf all.tgz r && rm -rf r
