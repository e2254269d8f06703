"""Retrieved block memory (InfLLM style): exact with enough blocks, and the blocks it picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.memory import RetrievedBlocks, run_segments
from lcm.memory.base import SegmentContext
from lcm.model import forward, init_params
from lcm.positions import rope_frequencies

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=4, block_k=4))
run = jax.jit(run_segments, static_argnames=("cfg", "memory", "segment_len"))


@pytest.mark.slow
def test_retrieved_blocks_with_room_for_every_block_equal_full_attention():
    params, _ = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 22), 0, CFG.vocab_size, dtype=jnp.int32)
    want = forward(params, tokens, CFG)
    # Absolute positions and top_k covering the past, or a local window covering it (where
    # clipped positions are the true ones): both are full causal attention.
    for memory in (RetrievedBlocks(capacity=32, block_size=4, local_blocks=0, top_k=8,
                                   clip_positions=False),
                   RetrievedBlocks(capacity=32, block_size=4, local_blocks=8, top_k=1)):
        got, _ = run(params, tokens, CFG, memory=memory, segment_len=8)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=str(memory))
    # Few blocks: not full attention any more.
    few = RetrievedBlocks(capacity=32, block_size=4, init_blocks=1, local_blocks=1, top_k=1)
    got, _ = run(params, tokens, CFG, memory=few, segment_len=8)
    assert np.abs(np.asarray(got[:, 16:] - want[:, 16:])).max() > 1e-3


def test_selection_keeps_sinks_and_local_window_and_picks_the_best_matching_block():
    memory = RetrievedBlocks(capacity=24, block_size=2, init_blocks=1, local_blocks=1, top_k=1)
    B, T, K, H, D = 1, 4, 1, 2, 4
    keys = jnp.zeros((B, 24, K, D)).at[:, 6:8, :, 0].set(1.0)  # block 3 points along e0
    keys = keys.at[:, 10:12, :, 1].set(1.0)  # block 5 along e1
    state = {"k": keys, "v": jnp.zeros_like(keys),
             "valid": (jnp.arange(24) < 16)[None]}  # blocks 0-7 filled; segment at 16
    q = jnp.zeros((B, T, H, D)).at[:, :2, :, 0].set(1.0).at[:, 2:, :, 1].set(1.0)
    inv_freq, factor = rope_frequencies(CFG.rope, D)
    ctx = SegmentContext(cfg=CFG, positions=16 + jnp.arange(T)[None], valid=jnp.ones((B, T), bool),
                         inv_freq=inv_freq, attention_factor=factor, shard=lambda x, a: x)
    grid = np.asarray(memory.selection(state, q, ctx))[0, 0]  # [nq=2, nk=12 + 2]
    past = grid[:, :12]
    np.testing.assert_array_equal(np.flatnonzero(past[0]), [0, 3, 7])  # sink, e0 match, local
    np.testing.assert_array_equal(np.flatnonzero(past[1]), [0, 5, 7])  # sink, e1 match, local
    assert grid[:, 12:].all()
