"""The eval loop's share of time spent outside the model step (experiments/bench_eval.py).

    python -m experiments.run --config=configs/bench_eval.py --workdir=/tmp/bench_eval

`lcm.eval.evaluate` on SmolLM2-135M over `eval_samples` passkey records of `eval_length` tokens,
with lcm.cache.generate; the share of wall time outside generate_fn. The input pipeline's
throughput is configs/bench_data.py. Overrides:

    --config.eval_length=8192 --config.eval_samples=2 --config.eval_max_new_tokens=16
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_eval"
    config.seed = 0
    config.eval_length = 8192
    config.eval_samples = 2
    config.eval_max_new_tokens = 16
    return config
