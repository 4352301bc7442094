# Forty-second session, call 1: the SGMV kernels' knobs on the H100 (their defaults come from
# H200 sweeps). Each variant changes shrink and expand knobs at once; the profiler's per-kernel
# times (kernel_us in the JSON) attribute each kernel's time to its own knobs.
# D: the engine's decode shapes (issue 7: T = 32 / 64 / 128, rank 16, the four groups of a
# llama-2-7b layer); P1: the large-tile rows at T = 1,024; P2: the 16-token-tile rows that miss.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
DV='{"p1":{"per_token_shrink_rows":8,"per_token_expand_block_n":512,"decode_block_k":1024},
"p2":{"per_token_shrink_rows":2,"per_token_expand_tokens":1,"decode_shrink_num_warps":4},
"p3":{"per_token_block_k":1024,"per_token_expand_num_warps":8,"decode_block_k":4096},
"p4":{"per_token_block_k":256,"per_token_expand_block_n":2048,"decode_shrink_num_stages":3},
"p5":{"per_token_shrink_num_warps":8,"per_token_expand_num_stages":2,"decode_shrink_num_warps":16},
"p6":{"per_token_shrink_num_stages":2,"per_token_expand_tokens":4,"decode_shrink_num_stages":1},
"p7":{"per_token_shrink_num_warps":2,"per_token_shrink_num_stages":3,"per_token_expand_num_warps":2}}'
DI=sgmv,sgmv:p1,sgmv:p2,sgmv:p3,sgmv:p4,sgmv:p5,sgmv:p6,sgmv:p7
PV='{"a":{"expand_prefetch_y":true,"shrink_block_k":128,"large_shrink_block_k":256},
"b":{"expand_num_warps":8,"shrink_num_warps":8},
"c":{"expand_block_n":256,"shrink_waves":2},
"d":{"expand_num_stages":2,"shrink_waves":8,"shrink_num_stages":4},
"e":{"expand_waves":8,"shrink_block_k":64,"large_shrink_block_k":64},
"f":{"large_expand_block_tokens":128,"large_shrink_block_tokens":128,"expand_num_stages":4},
"g":{"expand_num_warps":8,"expand_block_n":256,"expand_prefetch_y":true,"shrink_num_warps":8,"shrink_num_stages":2}}'
PI=sgmv,sgmv:a,sgmv:b,sgmv:c,sgmv:d,sgmv:e,sgmv:f,sgmv:g
B="timeout 170 python3 scripts/bench_kernels.py --calls=3"
$B --tokens=32,64,128 --ranks=16 --outs=3x4096,4096,2x11008 --workloads=identical,uniform,distinct --impls=$DI --variants="$DV" --out_json=$R/d.json > $R/d.txt 2>&1; echo "D rc=$?" >> $S
$B --hidden=11008 --tokens=32,64,128 --ranks=16 --outs=4096 --workloads=identical,uniform,distinct --impls=$DI --variants="$DV" --out_json=$R/dd.json > $R/dd.txt 2>&1; echo "Ddown rc=$?" >> $S
$B --tokens=1024 --ranks=16,64 --outs=4096,3x4096,11008 --workloads=identical,uniform --impls=$PI --variants="$PV" --out_json=$R/p1.json > $R/p1.txt 2>&1; echo "P1 rc=$?" >> $S
$B --tokens=256,1024 --ranks=8,64 --outs=4096,3x4096,11008 --workloads=uniform,skewed --impls=$PI --variants="$PV" --out_json=$R/p2.json > $R/p2.txt 2>&1; echo "P2 rc=$?" >> $S
date >> $R/times.txt; cat $S $R/times.txt
