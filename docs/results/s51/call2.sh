# Fifty-first session's second GPU call (run inline on the warm machine right after gpu.sh; this
# file records the command): context_buckets.py on llama-2-7b (MHA), gemma-2b (heads of 256,
# one KV head) and mistral-7b (max_model_len 32,768).
export PYTHONPATH=.; mkdir -p $OUT/r; B="python3 docs/results/s51/context_buckets.py"
(timeout 200 $B llama-2-7b 4096 whole-xla 512_1024_2048-xla 512_1024_2048-cudnn whole-cudnn 2>&1 | tee $OUT/r/l2.log | grep -E "max_model_len|Error")
(timeout 200 $B gemma-2b 4096 whole-xla 512_1024_2048-xla 512_1024_2048-cudnn whole-cudnn 2>&1 | tee $OUT/r/g2b.log | grep -E "max_model_len|Error")
(timeout 150 $B mistral-7b 32768 whole-xla 4096-xla 512_1024_2048_4096-xla 512_1024_2048_4096-cudnn 2>&1 | tee $OUT/r/m7.log | grep -E "max_model_len|Error")
echo done $SECONDS
