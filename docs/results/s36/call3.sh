R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
python3 -m pip install --no-index --no-deps _exp/wheels/llguidance-*.whl > $R/pip.log 2>&1
timeout 280 python3 -m pytest -m gpu tests/test_engine_gpu.py -k matches_reference -q > $R/engine_gpu.log 2>&1; echo "engine_gpu rc=$?" >> $S; tail -2 $R/engine_gpu.log >> $S; date >> $R/times.txt
cd $OUT && tar czf all.tgz r && rm -rf r
