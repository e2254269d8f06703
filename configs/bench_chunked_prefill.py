"""Compiled memory of prefill, one-shot against chunked (experiments/bench_chunked_prefill.py).

Compile-only (nothing runs), SmolLM2-135M's shapes with random weights, batch 1, float32. The
default (32k and 128k, chunks of 2048) compiles in a few minutes on a 2-core CPU. Overrides:

    --config.lengths=32768,131072       prompt lengths
    --config.chunks=2048                prefill_chunk values (0: one-shot)
    --config.model.num_layers=30 ...    model shape

    python -m experiments.run --config=configs/bench_chunked_prefill.py \\
        --workdir=/tmp/bench_chunked_prefill
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_chunked_prefill"
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, intermediate_size=1536, block=512))
    config.lengths = (32768, 131072)
    config.chunks = (0, 2048)
    return config
