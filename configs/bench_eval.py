"""Evaluation overheads (experiments/bench_eval.py): the input pipeline's throughput for bucketed
eval batches, and the eval loop's share of time spent outside the model step.

    python -m experiments.run --config=configs/bench_eval.py --workdir=/tmp/bench_eval

Part 1 (pipeline): passkey + NIAH records at `pipeline_lengths` in SmolLM2's tokens, generated
once, then length index -> bucket plan (constant tokens per batch) -> batch dataset, read
in-process and with `workers` Grain worker processes: records/s and prompt tokens/s of padded
batches. Part 2 (loop): `lcm.eval.evaluate` on SmolLM2-135M over `eval_samples` passkey records
of `eval_length` tokens, with lcm.cache.generate; the share of wall time outside generate_fn.
Overrides:

    --config.pipeline_lengths='(1024,4096,8192)' --config.pipeline_samples=8
    --config.tokens_per_batch=8192 --config.workers=2 --config.pipeline_passes=3
    --config.eval_length=8192 --config.eval_samples=2 --config.eval_max_new_tokens=16
    --config.skip_loop=True                   pipeline only (no model)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_eval"
    config.seed = 0
    config.pipeline_lengths = (1024, 4096, 8192)
    config.pipeline_samples = 8
    config.tokens_per_batch = 8192
    config.workers = 2
    config.pipeline_passes = 3
    config.eval_length = 8192
    config.eval_samples = 2
    config.eval_max_new_tokens = 16
    config.skip_loop = False
    return config
