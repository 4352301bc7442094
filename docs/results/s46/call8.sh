# Forty-sixth session, call 8 (H100): tests/conftest.py's LLVM -O0 for CPU test processes must
# stay off where a CUDA plugin is installed: which plugin module the machine has, the XLA_FLAGS
# a test process sees, and the compiled sandwich residual-norm cases again under the new
# conftest (their times against call 1's 11.85 s).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; nvidia-smi -L > $S 2>&1
python3 -c "import importlib.util as u; print({n: u.find_spec(n) is not None for n in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')})" >> $S 2>&1
timeout 120 python3 -m pytest -m gpu -q tests/test_residual_norm.py -k sandwich -p no:cacheprovider > $R/sandwich.log 2>&1; echo "sandwich rc=$?" >> $S; tail -1 $R/sandwich.log >> $S
cat > /tmp/flags_test.py <<'PY'
import os
import jax
def test_flags():
    print("XLA_FLAGS in a test:", os.environ.get("XLA_FLAGS"), jax.default_backend())
PY
cp /tmp/flags_test.py tests/test_zz_flags_probe.py
timeout 60 python3 -m pytest -q -s tests/test_zz_flags_probe.py -p no:cacheprovider 2>&1 | grep "XLA_FLAGS in a test" >> $S; rm tests/test_zz_flags_probe.py
cat $S
