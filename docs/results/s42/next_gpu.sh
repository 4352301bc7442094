# Prepared in the forty-second session, NOT run (no machine was lent after call 1): the next
# device time's first call (about 9 minutes). Then, in order: docs/results/s41/next_gpu.sh
# (carry _exp: a 7B HF checkpoint served at 0.9, the Qwen rows at batch 64 / 128; two calls'
# worth), docs/results/s42/next_gpu_qwen_profile.sh, and docs/results/s42/call1.sh with
# kind=nvidia-h100-x1 (the SGMV knob sweep on an H100; it ran on an H200 this session).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
# 1. Sliding-window attention compiled: the kernel against float64 / the reference (20 cases),
#    then the Mistral engine (window 24) against its reference engine.
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_paged_attention.py -k "window" > $R/window_tests.log 2>&1; echo "window kernel tests rc=$?" >> $S; tail -2 $R/window_tests.log >> $S
#    Qwen3's head norms in the RoPE kernel (4 cases) and Qwen2's bias in lora_matmul (4)
#    compiled, then the Qwen2 / Qwen3 / Mistral engines against their reference engines.
timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_paged_attention.py tests/test_lora_matmul.py -k "normalizes_heads or bias" > $R/headnorm_bias_tests.log 2>&1; echo "head-norm / bias kernel tests rc=$?" >> $S; tail -2 $R/headnorm_bias_tests.log >> $S
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k "each_family" > $R/family_engines.log 2>&1; echo "qwen2 / qwen3 / mistral engines rc=$?" >> $S; tail -2 $R/family_engines.log >> $S; date >> $R/times.txt
# 2. RunnerConfig.lora_update: in_place (opt-in) against delta (default), llama-2-7b bf16 rank
#    16, batch 32 (prefill on XLA's GEMMs + SGMV) and 128 (decode on cuBLAS + SGMV too).
for U in in_place delta; do
timeout 150 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,identical,distinct --lora_update=$U --json_out=$R/ab_$U.json > $R/ab_$U.log 2>&1; echo "ab $U rc=$?" >> $S; grep "tok/s" $R/ab_$U.log | cut -c1-250 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt
