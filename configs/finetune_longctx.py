"""Stretches a small model's window with RoPE scaling, Self-Extend or ReRoPE, with and without
PoSE fine-tuning on short chunks (experiments/finetune_longctx.py).

Default: a 2-layer model pretrained on passkey retrieval at 64 tokens, then no scaling / PI /
NTK dynamic / YaRN (×8) / Self-Extend / ReRoPE, as is and after PoSE fine-tuning on 64-token
chunks covering 512 positions, scored (passkey accuracy, perplexity) at 64-512 tokens (L..8L).
Overrides:

    --config.length=64 --config.factor=8      original window and stretch factor
    --config.eval_lengths=64,128,256,512      evaluation lengths
    --config.methods=none,pi,dynamic,yarn,self_extend,rerope
    --config.self_extend_window=0 --config.self_extend_group=0 --config.rerope_window=0
                                              (0: automatic, see the experiment's docstring)
    --config.filler_loss_weight=0.1           training weight of the non-answer predictions
    --config.pretrain_steps=400 --config.finetune_steps=150 --config.batch_size=32
    --config.learning_rate=3e-3 --config.finetune_learning_rate=1e-3
    --config.eval_samples=256 --config.num_values=16 --config.num_digits=2
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
    config.factor = 8.0
    config.eval_lengths = (64, 128, 256, 512)
    config.methods = ("none", "pi", "dynamic", "yarn", "self_extend", "rerope")
    config.self_extend_window = 0  # 0: length // 2
    config.self_extend_group = 0  # 0: smallest group keeping 8L's grouped positions below L
    config.rerope_window = 0  # 0: length // 2
    config.pretrain_steps = 400
    config.finetune_steps = 150
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.finetune_learning_rate = 1e-3
    config.eval_samples = 256
    config.eval_batch_size = 64
    config.num_values = 16
    config.num_digits = 2
    config.filler_loss_weight = 0.1  # answer tokens weigh 1 (perplexity needs a filler model)
    return config
