"""Stretches a small model's window with RoPE scaling + PoSE fine-tuning on short chunks
(experiments/finetune_longctx.py).

Default: a 2-layer model pretrained on passkey retrieval at 64 tokens, then none / PI / YaRN
(×4) as is and after PoSE fine-tuning on 64-token chunks covering 256 positions, scored at
64-256 tokens; a few minutes on a laptop CPU. Overrides:

    --config.length=64 --config.factor=4      original window and stretch factor
    --config.eval_lengths=64,128,256          evaluation lengths
    --config.methods=none,pi,yarn             RoPE variants
    --config.pretrain_steps=400 --config.finetune_steps=150 --config.batch_size=32
    --config.learning_rate=3e-3 --config.finetune_learning_rate=1e-3
    --config.eval_samples=128 --config.num_values=16 --config.num_digits=2
    --config.model.num_layers=2 --config.model.hidden_size=64 ...

    python -m experiments.run --config=configs/finetune_longctx.py --workdir=/tmp/finetune
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "finetune_longctx"
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, attention_impl="xla", block=64))
    config.length = 64
    config.factor = 4.0
    config.eval_lengths = (64, 128, 256)
    config.methods = ("none", "pi", "yarn")
    config.pretrain_steps = 400
    config.finetune_steps = 150
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.finetune_learning_rate = 1e-3
    config.eval_samples = 128
    config.eval_batch_size = 64
    config.num_values = 16
    config.num_digits = 2
    return config
