"""Configs validate themselves: a bad value names the field, the value and what is allowed."""

import dataclasses

import jax.numpy as jnp
import pytest

from lcm.config import AttentionConfig, ModelConfig, RopeConfig

BASE = dict(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
            intermediate_size=16)


def test_valid_config_is_hashable_and_normalises_dtypes():
    cfg = ModelConfig(**BASE, dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.compute_dtype == jnp.bfloat16
    assert cfg.group_size == 2
    assert hash(cfg) == hash(dataclasses.replace(cfg))


@pytest.mark.parametrize("field,value,match", [
    ("vocab_size", 0, "vocab_size=0"),
    ("num_layers", 1.5, "num_layers=1.5"),
    ("num_kv_heads", 3, "num_heads=2 must be a multiple of num_kv_heads=3"),
    ("head_dim", 5, "head_dim=5"),
    ("norm_eps", 0.0, "norm_eps=0.0"),
    ("sliding_window", 0, "sliding_window=0"),
    ("dtype", "int8", "dtype='int8'"),
    ("param_dtype", "float64", "param_dtype='float64'"),
    ("remat", "some", "remat='some'"),
    ("architecture", "gpt2", "architecture='gpt2'"),
    ("rope", {"theta": 1e4}, "ModelConfig.rope="),
])
def test_model_config_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, field: value})


def test_attention_config_impls_are_attends():
    """AttentionConfig offers exactly attend's backends, so the decoder reaches every one."""
    from lcm.attention.attend import CONTEXT_PARALLEL_IMPLS, IMPLS
    from lcm.config import ATTENTION_IMPLS
    from lcm.config import CONTEXT_PARALLEL_IMPLS as CONFIG_CONTEXT_PARALLEL

    assert ATTENTION_IMPLS == IMPLS and CONFIG_CONTEXT_PARALLEL == CONTEXT_PARALLEL_IMPLS
    assert all(AttentionConfig(impl=impl).context_parallel == (impl in CONTEXT_PARALLEL_IMPLS)
               for impl in IMPLS)
    assert AttentionConfig(impl="ring_pallas", load_balance="none").load_balance == "none"


def test_attention_and_rope_configs_reject():
    with pytest.raises(ValueError, match="impl='flash'"):
        AttentionConfig(impl="flash")
    with pytest.raises(ValueError, match="block_q=0"):
        AttentionConfig(block_q=0)
    with pytest.raises(ValueError, match="theta=0.5"):
        RopeConfig(theta=0.5)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        RopeConfig(rope_type="yarn")
