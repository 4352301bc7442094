R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt
python3 -m pip install --no-index --no-deps _exp/wheels/llguidance-*.whl > $R/pip.log 2>&1
timeout 60 python3 -m pytest tests/test_structured_output.py -q -k "not mask_benchmark" > $R/structured.log 2>&1
timeout 30 python3 scripts/bench_structured.py --vocab_size=32000 > $R/bench_structured.log 2>&1
timeout 30 python3 scripts/bench_structured.py --vocab_size=128256 >> $R/bench_structured.log 2>&1
run() { name=$1; shift
  timeout 115 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=8,32 --offline_workloads=uniform,skewed,distinct --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)" $R/$name.log | cut -c40-170 >> $S; }
run base1
run all3 --norm_shrink --swiglu_shrink --attention_shrink
run ns_sw --norm_shrink --swiglu_shrink
run attn --attention_shrink
cd $OUT && tar czf all.tgz r && rm -rf r
