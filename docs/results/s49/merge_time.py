"""Forty-ninth session: the host time of LoRAX's per-request merge (merge_lora_parameters) of two
llama-2-7b-shaped rank-16 adapters on all 7 modules, once per strategy (density 0.5 for the
pruning ones). Run: PYTHONPATH=. python docs/results/s49/merge_time.py"""

import time

from configs.models import LLAMA2_7B
from jaxlora.lora import merge_lora_parameters, random_lora_weights

parts = [(random_lora_weights(LLAMA2_7B, f"p{i}", 16, seed=i), w) for i, w in enumerate((0.6, 0.4))]
for strategy, density in (("linear", 1.0), ("ties", 0.5), ("dare_linear", 0.5), ("dare_ties", 0.5)):
    start = time.perf_counter()
    merge_lora_parameters(parts, "m", strategy=strategy, density=density)
    print(f"{strategy}: {time.perf_counter() - start:.2f} s")
