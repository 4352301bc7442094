# Forty-seventh session, call 6 (H100): the GPU's clocks (the offline benchmark's new GpuMonitor)
# in the untraced and traced iterations of batch 128 without LoRA: does the device run slower
# back to back (call 4: untraced 12.86 ms, traced busy 11.86 ms)?
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $R/smi_before.txt 2>&1
timeout 150 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --profile_steps=3 --json_out=$R/clocks.json > $R/clocks.log 2>&1; echo "clocks rc=$?" >> $S
grep "async: iteration\|tok/s\|profile batch\|rror" $R/clocks.log | cut -c40-420 >> $S
python3 -c "
import json
r = json.load(open('$R/clocks.json'))['offline']['rows'][0]
print('timed pass', r.get('gpu')); print('timed traced', r.get('profile', {}).get('gpu'))
print('async pass', r['free_running']['async'].get('gpu')); print('async traced', r.get('profile_async', {}).get('gpu'))
print('busy', r.get('profile_async', {}).get('busy_ms'), 'async iteration', r['free_running']['async']['iteration_ms_median'])
" >> $S 2>&1
nvidia-smi -q -d PERFORMANCE > $R/smi_after.txt 2>&1
date >> $R/times.txt; cat $S $R/times.txt
