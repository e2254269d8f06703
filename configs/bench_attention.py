"""lcm attention backends vs jax.nn and tokamax (experiments/bench_attention.py).

The default (lengths 1k and 2k) runs in about a minute here; the README table is
--config.lengths=1024,2048,4096,8192,16384,32768,65536 (about 30 minutes). Overrides:

    --config.lengths=1024,4096          sequence lengths (queries = keys)
    --config.masks=causal,local1024     masks: causal, local<window>
    --config.impls=xla,jax_nn           from xla, reference, jax_nn, tokamax_xla,
                                        tokamax_xla_chunked
    --config.backward=True              time value_and_grad w.r.t. q, k, v
    --config.repeats=3                  timed runs per cell, after one warm-up run
    --config.mem_limit_gib=16           cells whose compiled memory exceeds this are OOM
    --config.max_seconds=200            skip a cell whose extrapolated time exceeds this
    --config.block_q=512 --config.block_k=512   lcm xla blocks

    python -m experiments.run --config=configs/bench_attention.py --workdir=/tmp/bench_attention
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_attention"
    config.lengths = (1024, 2048)
    config.masks = ("causal", "local1024")
    config.impls = ("xla", "reference", "jax_nn", "tokamax_xla", "tokamax_xla_chunked")
    config.backward = False
    config.repeats = 3
    config.mem_limit_gib = 16.0
    config.max_seconds = 200.0
    config.block_q = 512
    config.block_k = 512
    return config
