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
    --config.longest_budget_mib=3072        also search (compile only) the longest causal length
                                            ring (8 devices) and xla (1 device) fit in this budget
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
    # None: no search. A number of MiB per device: compile-only search for the longest length.
    config.longest_budget_mib = ml_collections.config_dict.placeholder(float)
    config.block = 512
    config.backward = False
    return config
