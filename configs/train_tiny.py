"""Trains a small random decoder on synthetic copy documents (experiments/train.py).

The default (2 layers, width 64, 128-token packed rows, 200 steps) runs in about a minute on a
laptop CPU; its loss falls from ~4.0 to ~3.3 as the model learns to copy the repeated parts
(the random first copy of each prefix cannot be predicted). Overrides:

    --config.num_steps=200 --config.log_every=10 --config.checkpoint_every=50
    --config.model.num_layers=4 --config.model.hidden_size=128 ...   (ModelConfig fields)
    --config.model.remat=full          none, full, dots, offload (layer inputs to host memory)
    --config.data.seq_len=128 --config.data.batch_size=8
    --config.data.source=/path/docs.jsonl --config.data.tokenizer=bytes   (a local file)
    --config.init=smollm2 --config.data.tokenizer=model   (fine-tune SmolLM2-135M; set
                                       model fields to None except remat/dtype/attention)
    --config.init=/path/to/checkpoint  (fine-tune a Hugging Face directory or .gguf file:
                                       lcm.io.load_pretrained)
    --config.optimizer.learning_rate=1e-2 --config.optimizer.accumulation_steps=2
    --config.mesh='(2,2,1,1)'          data, fsdp, tensor, context (default: all on data)
    --config.tensorboard=True          also write TensorBoard events

    python -m experiments.run --config=configs/train_tiny.py --workdir=/tmp/train_tiny
Rerunning the same command resumes from the last checkpoint (kill it any time).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "train"
    config.seed = 0
    config.init = "random"
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=1024, dtype="float32",
        param_dtype="float32", remat="none", attention_impl="xla", block_q=128, block_k=128))
    config.data = ml_collections.ConfigDict(dict(
        source="synthetic", tokenizer="bytes", field="text", min_length=16, max_length=96,
        seq_len=128, batch_size=8, num_packing_bins=8))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, warmup_steps=10, end_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
        accumulation_steps=1))
    config.num_steps = 200
    config.log_every = 1
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    config.tensorboard = False
    config.mesh = ()
    return config
