"""The tiny model and jitted `run_segments` shared by the memory tests."""

import jax
import jax.numpy as jnp

from lcm.config import AttentionConfig, ModelConfig
from lcm.memory import run_segments
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
run = jax.jit(run_segments, static_argnames=("cfg", "memory", "segment_len", "bptt_segments",
                                             "remat", "shard"))


def tokens_of(key, batch, seq):
    return jax.random.randint(key, (batch, seq), 0, CFG.vocab_size, dtype=jnp.int32)


def tiny_params():
    return init_params(CFG, jax.random.key(0))[0]
