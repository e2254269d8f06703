"""Self-Extend decoding on SmolLM2-135M: KV-cache path vs forward-only loop vs plain-RoPE cache
(experiments/bench_extended_cache.py).

The default (context 1024, window 256) runs in a few minutes here; the README figures are

    python -m experiments.run --config=configs/bench_extended_cache.py \\
        --config.contexts=4096,16384 --config.forward_contexts=4096 --config.window=2048 \\
        --workdir=/tmp/bench_extended_cache

Overrides:

    --config.contexts=4096,16384     prompt lengths timed with the extended and plain caches
    --config.forward_contexts=4096   prompt lengths timed with the forward-only greedy loop
                                     (each token is a full forward: keep these short)
    --config.window=2048 --config.group_size=4   Self-Extend's neighbour window and group
    --config.decode_steps=16         greedy decode steps per timed run
    --config.forward_steps=2         tokens per forward-only timed run
    --config.repeats=2               timed runs after one warm-up run (the fastest is kept)
    --config.block=512               prefill attention block (block_q = block_k)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_extended_cache"
    config.contexts = (1024,)
    config.forward_contexts = (1024,)
    config.window = 256
    config.group_size = 4
    config.decode_steps = 16
    config.forward_steps = 2
    config.repeats = 2
    config.block = 512
    return config
