"""Input pipeline throughput of lcm.data's bucketed evaluation batches (experiments/bench_data.py).

The default (RULER niah_single_2, vt and passkey at 2k/4k/8k byte tokens, 32 samples each, each
path read twice) runs in a few minutes here. Overrides:

    --config.tasks=niah_single_2,vt        any lcm.data.GENERATORS task (qa_* need a path)
    --config.lengths=2048,4096,8192        record lengths (tokens of the tokenizer)
    --config.num_samples=32                records per task and length
    --config.buckets=2048,4096,8192        padded prompt lengths
    --config.tokens_per_batch=32768        rows per batch = tokens_per_batch // bucket
    --config.workers=2                     mp_prefetch worker processes
    --config.passes=2                      fresh reads per path (the fastest is reported)
    --config.tokenizer=smollm2             'bytes' or 'smollm2' (the embedded model's)

    python -m experiments.run --config=configs/bench_data.py --workdir=/tmp/bench_data
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_data"
    config.tasks = ("niah_single_2", "vt", "passkey")
    config.lengths = (2048, 4096, 8192)
    config.num_samples = 32
    config.buckets = (2048, 4096, 8192)
    config.tokens_per_batch = 32768
    config.workers = 2
    config.passes = 2
    config.tokenizer = "bytes"
    config.seed = 0
    return config
