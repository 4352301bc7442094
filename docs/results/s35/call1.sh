R=$OUT/r; mkdir -p $R; nvidia-smi > $R/gpu.txt
pip install --no-index --no-deps _exp/wheels/llguidance-*.whl > $R/pip.log 2>&1
python3 -c "import llguidance; print(llguidance.__version__)" >> $R/pip.log 2>&1
date > $R/times.txt
PYTHONPATH=. timeout 150 python3 -m pytest -m gpu tests/test_residual_norm.py tests/test_swiglu.py tests/test_paged_attention.py -k "norm or swiglu or shrink" -q > $R/k.log 2>&1; date >> $R/times.txt
PYTHONPATH=. timeout 90 python3 -m pytest -m gpu tests/test_sgmv.py -k "decode or prefill" -q > $R/sgmv.log 2>&1; date >> $R/times.txt
PYTHONPATH=. timeout 200 python3 -m pytest -m gpu tests/test_engine_gpu.py -k matches_reference -q > $R/engine.log 2>&1; date >> $R/times.txt
PYTHONPATH=. timeout 70 python3 -m pytest tests/test_structured_output.py -q -k "not mask_benchmark" > $R/structured.log 2>&1; date >> $R/times.txt
PYTHONPATH=. timeout 30 python3 scripts/bench_structured.py --vocab_size=32000 > $R/bench_structured.log 2>&1
PYTHONPATH=. timeout 30 python3 scripts/bench_structured.py --vocab_size=128256 >> $R/bench_structured.log 2>&1; date >> $R/times.txt
cd $OUT && tar czf all.tgz r && rm -rf r
