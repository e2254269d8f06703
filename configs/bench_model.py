"""SmolLM2-135M prefill/decode tokens/s on CPU, lcm vs transformers (experiments/bench_model.py).

The default (prompts of 1k and 2k tokens, 16 decode steps) takes a few minutes here; the
README table is --config.lengths=1024,2048,4096,8192. Overrides:

    --config.lengths=1024,2048,4096,8192   prompt lengths (random token ids, same on both sides)
    --config.decode_tokens=16              greedy decode steps timed after each prefill
    --config.repeats=2                     timed runs per cell, after one warm-up run
    --config.block=512                     lcm's attention block (xla backend)
    --config.peer_python=.side/torch-venv/bin/python   a Python with torch + transformers
                                           ('' skips the peer)
    --config.llama_cpp=True                also time llama-cpp-python in the peer environment
    --config.peer_threads=0                torch threads in the peer (0: torch's default)

    python -m experiments.run --config=configs/bench_model.py --workdir=/tmp/bench_model
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_model"
    config.lengths = (1024, 2048)
    config.decode_tokens = 16
    config.repeats = 2
    config.block = 512
    config.peer_python = ".side/torch-venv/bin/python"
    config.llama_cpp = False
    config.peer_threads = 0
    return config
