"""Self-speculative decoding on SmolLM2-135M: acceptance and decode tokens/s against plain
greedy decoding from the same prefill, per context (experiments/bench_speculative.py).

The default (contexts 4k, 16k, 32k; two draft presses x two gammas) takes about half an hour
on a 2-core CPU, most of it the 32k prefill and compilation. Overrides:

    --config.contexts=4096,16384           prompt lengths (batch 1, an English-like essay)
    --config.drafts=streaming_llm,snapkv   draft presses at `budget` entries per kv head
    --config.gammas=2,4                    tokens drafted per round
    --config.budget=256                    draft cache entries per kv head
    --config.new_tokens=32                 greedy tokens generated per run
    --config.repeats=2                     timed runs per cell, after one warm-up run
    --config.model=tiny                    a random 2-layer model instead of SmolLM2 (tests)

    python -m experiments.run --config=configs/bench_speculative.py --workdir=/tmp/bench_spec
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_speculative"
    config.contexts = (4096, 16384, 32768)
    config.drafts = ("streaming_llm", "snapkv")
    config.gammas = (2, 4)
    config.budget = 256
    config.new_tokens = 32
    config.repeats = 2
    config.model = "smollm2"
    return config
