"""KV cache of a Gemma-3-shaped model: bytes and decode speed, lcm vs transformers'
Gemma3ForCausalLM with its own cache (experiments/bench_window_cache.py).

lcm's sliding layers keep a ring buffer of their window, the global layers every token. The
default (prompts of 4k and 16k tokens, 16 decode steps) takes several minutes on a 2-core CPU.
Overrides:

    --config.lengths=4096,16384            prompt lengths (random token ids, same on both sides)
    --config.decode_tokens=16              greedy decode steps timed after each prefill
    --config.repeats=2                     timed runs per cell, after one warm-up run
    --config.peer_python=.side/torch-venv/bin/python   a Python with torch + transformers
                                           ('' skips the peer; a missing file is an error)
    --config.peer_threads=0                torch threads in the peer (0: torch's default)

    python -m experiments.run --config=configs/bench_window_cache.py --workdir=/tmp/bench_wc
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_window_cache"
    config.lengths = (4096, 16384)
    config.decode_tokens = 16
    config.repeats = 2
    config.block = 512
    config.peer_python = ".side/torch-venv/bin/python"
    config.peer_threads = 0
    # The small model both sides run (random weights, written once as a transformers
    # checkpoint): Gemma 3's shape at a small size, 5 sliding layers per global one.
    config.vocab_size = 4096
    config.hidden_size = 256
    config.num_layers = 12
    config.num_heads = 4
    config.num_kv_heads = 1
    config.head_dim = 64
    config.intermediate_size = 512
    config.sliding_window = 512
    return config
