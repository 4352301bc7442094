# Fifty-third session: s52/next_gpu.sh with shorter limits (the session had ~650 s of device time left):
# the HTTP server at max_model_len 32,768 and --gpu_memory_utilization=0.9 (the KV cache sized
# with the new step estimate, which counts the prefill attention's gathered K and V), four
# concurrent 30,000-token prompts through cuDNN's one pass past 4,096 keys; /metrics' peak
# against the allocator's limit. The device lacks fastapi: first, here (carry [".whl"]):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 uvicorn==0.55.0 \
#     opentelemetry-api==1.45.3 llguidance==1.9.1 typing_extensions==4.16.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name --format=csv,noheader >> $S
PYTHONPATH=.:/tmp/site timeout 430 python3 scripts/serve.py --model=mistral-7b --dtype=bfloat16 --max_model_len=32768 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 420 python3 docs/results/s52/serve_long_check.py 8123 4 30000 > $R/check.log 2>&1; echo "check rc=$? at ${SECONDS}s" >> $S
kill %1 2>/dev/null; sleep 2; cat $R/check.log >> $S; grep -E "gpu_memory_utilization|warm|device memory|Error|Traceback" $R/serve.log | cut -c1-500 | head -20 >> $S
date >> $S; cat $S
