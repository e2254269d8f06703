"""KV cache policies: cache bytes and decode tokens/s vs context (experiments/bench_cache.py).

The default (contexts 1k, 2k, 4k) runs in a few minutes here; the README table is
--config.contexts=1024,2048,4096,8192,16384,32768. Overrides:

    --config.contexts=1024,4096          prompt lengths (batch 1)
    --config.policies=full,snapkv,kivi2  from full, full_mapped, streaming_llm, snapkv,
                                         pyramidkv, adakv, duo, quest, quest_gather, kivi2,
                                         kivi4, kivi2_snapkv (full is always run: the
                                         ratios' base)
    --config.budget=256                  tokens kept (Quest: read) per kv head
    --config.decode_steps=32             greedy decode steps timed per cell
    --config.repeats=3                   timed runs per cell, after one warm-up run
    --config.duo_ratio=0.75              DuoAttention's fraction of streaming heads
    --config.model_layers=4 ...          model_vocab, model_hidden, model_layers, model_heads,
                                         model_kv_heads, model_head_dim

    python -m experiments.run --config=configs/bench_cache.py --workdir=/tmp/bench_cache
    .side/kvpress-venv/bin/python experiments/bench_cache_peer.py --contexts 1024,2048,4096
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "bench_cache"
    config.contexts = (1024, 2048, 4096)
    config.policies = ("full", "full_mapped", "streaming_llm", "snapkv", "pyramidkv", "adakv",
                       "duo", "quest", "quest_gather", "kivi2", "kivi4", "kivi2_snapkv")
    config.budget = 256
    config.decode_steps = 32
    config.repeats = 3
    config.duo_ratio = 0.75
    config.model_vocab = 2048
    config.model_hidden = 256
    config.model_layers = 4
    config.model_heads = 8
    config.model_kv_heads = 4
    config.model_head_dim = 64
    return config
