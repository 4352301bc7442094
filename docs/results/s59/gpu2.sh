# Fifty-ninth session, call 2 (H100; carry [".whl"]): (1) the compiled engine against its
# reference engine and every family's, first since the fifty-sixth session (the fifty-seventh
# and fifty-eighth changed the host path: the packed host array passed to jit as numpy, the
# sampler batch, the host-phase accounting); (2) call 1's serving trace with 2,000 adapters
# (16 req/s offered, the online section's power law), in-process then over HTTP.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=.:/tmp/site
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
git log -1 --format=%H >> $S 2>/dev/null
timeout 360 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -k "matches_reference_engine or each_family" > $R/tests.log 2>&1
echo "tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/tests.log >> $S
left=$((585 - SECONDS)); [ $left -gt 150 ] && {
timeout $left python3 scripts/benchmark.py --section=serving --online_adapters=2000 --online_rate=16 \
  --online_duration_s=30 --online_drain_s=30 --json_out=$R/serving2000.json > $R/serving2000.log 2>&1
echo "serving rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|matmul rate|online n=|serving n=|Error|error" $R/serving2000.log | grep -v "^W" >> $S
sed -n '/### Serving over HTTP/,/### Targets/p' $R/serving2000.log >> $S; }
cat $S
