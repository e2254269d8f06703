"""The model boundary: params that do not fit cfg and token ids outside the vocabulary raise a
ValueError naming them, in forward, the cache and run_segments (they used to run silently)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import extended, generate, prefill
from lcm.config import AttentionConfig, ModelConfig, PositionConfig
from lcm.memory import RecurrentMemory, init_memory_params, run_segments
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)


@pytest.mark.parametrize("bad", [64, 10**6, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad):
    tokens = TOKENS.at[1, 3].set(bad)
    with pytest.raises(ValueError, match=rf"tokens holds id {bad}; expected ids in \[0, 64\)"):
        forward(PARAMS, tokens, CFG)
    with pytest.raises(ValueError, match=f"holds id {bad}"):
        prefill(PARAMS, tokens, CFG)
    with pytest.raises(ValueError, match=f"holds id {bad}"):
        generate(PARAMS, CFG, tokens, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"holds id {bad}"):
        run_segments(PARAMS, tokens, CFG, memory=None, segment_len=3)
    with pytest.raises(ValueError, match=f"targets holds id {bad}"):
        run_segments(PARAMS, TOKENS, CFG, memory=None, segment_len=3, targets=tokens)
    wide = dataclasses.replace(CFG, positions=PositionConfig(type="self_extend", window=4,
                                                             group_size=2))
    with pytest.raises(ValueError, match=f"holds id {bad}"):
        extended.prefill(PARAMS, tokens, wide)


def test_right_padding_may_hold_any_id():
    tokens = TOKENS.at[1, 4:].set(-1)  # padding past the row's length 4
    logits, _ = prefill(PARAMS, tokens, CFG, lengths=jnp.asarray([6, 4]))
    want, _ = prefill(PARAMS, TOKENS[1:, :4], CFG)
    np.testing.assert_allclose(logits[1], want[0], atol=2e-5, rtol=2e-5)


def test_traced_ids_are_not_checked_inside_jit():
    out = jax.jit(lambda t: forward(PARAMS, t, CFG))(TOKENS)
    assert out.shape == (2, 6, 64)


def test_params_that_do_not_fit_cfg_are_refused():
    other = dataclasses.replace(CFG, num_heads=8, num_kv_heads=4, head_dim=4)
    for call in (lambda: forward(PARAMS, TOKENS, other), lambda: prefill(PARAMS, TOKENS, other),
                 lambda: run_segments(PARAMS, TOKENS, other, memory=None, segment_len=3)):
        with pytest.raises(ValueError, match=r"params\['layers/w[qkvo]'\] has shape .* needs"):
            call()
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    with pytest.raises(ValueError, match="'lm_head' but cfg.tie_embeddings=True"):
        forward(PARAMS, TOKENS, tied)
    with pytest.raises(ValueError, match="params lack 'embed'"):
        forward({k: v for k, v in PARAMS.items() if k != "embed"}, TOKENS, CFG)


def test_empty_tokens_and_a_params_axes_pair_are_named():
    with pytest.raises(ValueError, match=r"tokens has shape \(1, 0\)"):
        forward(PARAMS, jnp.zeros((1, 0), jnp.int32), CFG)
    memory = RecurrentMemory(num_mem_tokens=2)
    pair = init_memory_params(memory, CFG, jax.random.key(1))
    with pytest.raises(ValueError, match=r"memory_params is a tuple of 2.*\(params, axes\)"):
        run_segments(PARAMS, TOKENS, CFG, memory=memory, segment_len=3, memory_params=pair)
