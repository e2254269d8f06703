"""Train-step memory per remat policy and the longest length under a memory budget
(experiments/bench_remat.py): compile-only, so it runs on any machine.

Default: SmolLM2-135M's shapes at 1k-4k tokens, 16 GiB budget (a TPU v5e chip); about two
minutes here. Overrides:

    --config.lengths=1024,2048,4096    lengths to compile (batch 1)
    --config.policies=none,full,dots,offload
    --config.budget_gib=16             device memory budget
    --config.max_search_length=262144  doubling search cap past the largest length that fits
    --config.model.num_layers=30 ...   model shape
    --config.topology=v5e:1x1          compile for this TPU topology instead (deviceless AOT
                                       through libtpu: pip install -e '.[tpu]'; no TPU needed)

    python -m experiments.run --config=configs/bench_remat.py --workdir=/tmp/bench_remat
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_remat"
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, intermediate_size=1536, block=512))
    config.lengths = (1024, 2048, 4096)
    config.policies = ("none", "full", "dots", "offload")
    config.budget_gib = 16.0
    config.max_search_length = 262144
    config.topology = ""
    return config
