"""Passkey recall across segments with each memory kind (experiments/memory_recall.py).

The default trains six small decoders (2 layers, width 64) for 300 steps each on 6 segments of
16 tokens and evaluates them at passkey distances 0-5 segments; it takes about ten minutes on two
CPU cores. Overrides:

    --config.memories=none,xl,rmt,infini,knn,linear   which kinds (and their order)
    --config.num_segments=6 --config.segment_len=16   sequence = segments x length
    --config.steps=300 --config.batch_size=32 --config.learning_rate=3e-3
    --config.hidden_size=64 --config.num_layers=2 --config.num_heads=4
    --config.xl_mem_len=0          0: one segment; --config.rmt_mem_tokens=4; --config.knn_k=8
    --config.bptt_segments=0       0: full backpropagation through the segments
    --config.eval_examples=256     per distance

    python -m experiments.run --config=configs/memory_recall.py --workdir=/tmp/memory_recall
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "memory_recall"
    config.seed = 0
    config.memories = "none,xl,rmt,infini,knn,linear"
    config.num_segments = 6
    config.segment_len = 16
    config.num_fillers = 32
    config.num_passkeys = 16
    config.hidden_size = 64
    config.num_layers = 2
    config.num_heads = 4
    config.steps = 300
    config.warmup_steps = 20
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.xl_mem_len = 0
    config.rmt_mem_tokens = 4
    config.knn_k = 8
    config.bptt_segments = 0
    config.eval_examples = 256
    return config
