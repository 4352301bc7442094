# Fifty-sixth session's fourth GPU call (no carry): the compiled engine against its reference
# engine and every family's at HEAD (this session's engine changes: the samplers compiled on the
# warm-up threads, the cached-token count at admission, the bounded model configs).
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
timeout 540 python3 -m pytest -q -x -m gpu tests/test_engine_gpu.py -k "matches_reference_engine or each_family" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/tests.log >> $S
date >> $S; cat $S
