"""Block-sparse attention time vs mask density (experiments/bench_block_sparse.py).

The default (length 2048, the reference at 1024, layouts at 2048) runs in a few minutes here;
the README tables are --config.lengths=16384,32768 --config.small_length=4096
--config.layout_length=16384. Overrides:

    --config.lengths=16384,32768   lengths of table 1 (queries = keys); () runs only the others
    --config.small_length=4096     length where the dense reference is timed and checked; 0 skips
    --config.layout_length=16384   length of the runtime-layout cost table (>= 1024); 0 skips it
    --config.repeats=3             timed runs per cell, after one warm-up run
    --config.mem_limit_gib=16      cells whose compiled memory exceeds this are OOM, not run

    python -m experiments.run --config=configs/bench_block_sparse.py --workdir=/tmp/bench_bs
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_block_sparse"
    config.lengths = (2048,)
    config.small_length = 1024
    config.layout_length = 2048
    config.repeats = 3
    config.mem_limit_gib = 16.0
    return config
