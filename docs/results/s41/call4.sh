# Forty-first session, call 4: golden fixtures of the Qwen2 and Qwen3 families from
# transformers + peft (CPU, fp32; the GPU machine has torch), written into tests/fixtures and
# copied to $OUT; then tests/test_golden.py on them with JAX on the CPU there, and the
# peft interop tests.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> $S 2>&1
for f in qwen2 qwen3; do timeout 120 python3 scripts/make_golden.py --family $f > $R/make_golden_$f.log 2>&1; echo "make_golden $f rc=$?" >> $S; tail -6 $R/make_golden_$f.log >> $S; cp -r tests/fixtures/golden_$f $OUT/; done
JAX_PLATFORMS=cpu timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_golden.py > $R/test_golden.log 2>&1; echo "test_golden rc=$?" >> $S; tail -15 $R/test_golden.log >> $S
JAX_PLATFORMS=cpu timeout 150 python3 -m pytest -q -p no:cacheprovider -m peft tests/test_peft_interop.py > $R/test_peft.log 2>&1; echo "test_peft rc=$?" >> $S; tail -3 $R/test_peft.log >> $S
date >> $R/times.txt; cat $S $R/times.txt
