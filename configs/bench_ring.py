"""Ring / all-gather context parallelism vs one device and peers (experiments/bench_ring.py).

The default (1k and 2k tokens) runs in a couple of minutes here. Needs 8 CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.run \
        --config=configs/bench_ring.py --workdir=/tmp/bench_ring

Overrides:

    --config.lengths=2048,8192,16384        causal sequence lengths
    --config.impls=ring,allgather,xla       from ring, allgather, xla, ringattention, tokamax_ring
    --config.backward=True                  time and size forward + backward (grads of q, k, v)
    --config.repeats=3                      timed runs per cell, after one warm-up run
    --config.max_seconds=120                an implementation slower than this stops growing
    --config.tokamax_max_length=4096        tokamax's interpreted kernel only up to this length
    --config.device_memory_gib=3            per-device budget for the longest-length estimate
    --config.block=512                      block / chunk size of every implementation
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_ring"
    config.num_devices = 8
    config.lengths = (1024, 2048)
    config.impls = ("ring", "allgather", "xla", "ringattention", "tokamax_ring")
    config.repeats = 3
    config.max_seconds = 120.0
    config.tokamax_max_length = 4096
    config.device_memory_gib = 3.0
    config.block = 512
    config.backward = False
    return config
