# Forty-sixth session, call 4 (H100), carry .whl (the server's wheels): (1) the blocked prefill
# attention against the one pass, the CPU test run on the GPU backend; (2) the long-context
# prefill of llama-3-8b (max_model_len 32,768) blocked against one pass in float32 (the
# forty-fifth session's bf16 modes differed by up to 0.09 in logprobs); (3) serve.py on a
# llama-2-7b-shaped HF checkpoint written by transformers, with a PEFT adapter written by peft,
# at --gpu-memory-utilization=0.9 (vLLM's spelling): both models answer over HTTP.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 90 python3 -m pytest -q tests/test_model.py -k blocked_prefill > $R/blocked_test.log 2>&1; echo "blocked prefill test on the GPU backend rc=$?" >> $S; tail -1 $R/blocked_test.log >> $S
python3 -c "import jax; print(jax.devices())" >> $S 2>&1
for M in blocked one_pass; do
timeout 120 python3 docs/results/s45/long_context_prefill.py $M float32 > $R/long_${M}_f32.log 2>&1; echo "long $M f32 rc=$?" >> $S; grep "max_model_len\|row\|Error" $R/long_${M}_f32.log | cut -c1-200 >> $S; date >> $R/times.txt
done
timeout 150 python3 docs/results/s46/make_hf_llama_and_peft.py /tmp/llama7b /tmp/adapter16 > $R/make_ckpt.log 2>&1; echo "checkpoint rc=$?" >> $S; tail -1 $R/make_ckpt.log >> $S; date >> $R/times.txt
PYTHONPATH=.:/tmp/site timeout 300 python3 scripts/serve.py /tmp/llama7b --dtype=bfloat16 --gpu-memory-utilization=0.9 --port=8123 --lora-modules a16=/tmp/adapter16 --max-lora-rank=16 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 295 python3 docs/results/s46/serve_hf_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_hf_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; cat $R/serve_check.log >> $S; grep "gpu_memory_utilization\|warm\|device memory\|Error\|adapter" $R/serve.log | cut -c1-400 | head -20 >> $S
date >> $R/times.txt; cat $S $R/times.txt
