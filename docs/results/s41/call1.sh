# Forty-first session, call 1 (H100, at 19b0f76): the fortieth session's prepared script, as it
# was: --gpu_memory_utilization=0.9 on llama-2-7b after its start-up fix, then the in-scan
# attention case. Carry _exp (the server's wheels).
bash docs/results/s40/next_gpu.sh
