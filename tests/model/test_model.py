"""The functional decoder: properties (causality, packing, depth-independent compile), backends."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params, param_axes, segment_positions

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
fwd = jax.jit(forward, static_argnames=("cfg", "shard"))


def tokens_of(key, batch, seq, vocab=CFG.vocab_size):
    return jax.random.randint(key, (batch, seq), 0, vocab, dtype=jnp.int32)


def test_init_params_and_axes_are_parallel():
    params, axes = init_params(CFG, jax.random.key(0))
    flat_p = jax.tree.leaves_with_path(params)
    flat_a = jax.tree.leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert [p for p, _ in flat_p] == [p for p, _ in flat_a]
    for (_, p), (_, a) in zip(flat_p, flat_a):
        assert p.ndim == len(a)
    assert params["layers"]["wq"].shape == (2, 32, 4, 8)
    assert params["layers"]["wk"].shape == (2, 32, 2, 8)  # KV heads are not repeated
    assert axes == param_axes(CFG)


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 5}, {"qkv_bias": True},
                                     {"tie_embeddings": True}])
def test_future_tokens_do_not_change_past_logits(variant):
    cfg = dataclasses.replace(CFG, **variant)
    params, _ = init_params(cfg, jax.random.key(1))
    if cfg.qkv_bias:
        params["layers"]["bk"] = jnp.ones_like(params["layers"]["bk"])
    tokens = tokens_of(jax.random.key(2), 2, 21)
    changed = tokens.at[:, 13:].set((tokens[:, 13:] + 1) % cfg.vocab_size)
    a, b = fwd(params, tokens, cfg), fwd(params, changed, cfg)
    np.testing.assert_allclose(a[:, :13], b[:, :13], atol=1e-6)
    assert np.abs(np.asarray(a[:, 13:] - b[:, 13:])).max() > 1e-3


def test_no_gradient_from_future_embeddings():
    params, _ = init_params(CFG, jax.random.key(3))
    tokens = tokens_of(jax.random.key(4), 1, 16)

    def logit_at_5(embed):
        return fwd(dict(params, embed=embed), tokens, CFG)[0, 5].sum()

    grad = jax.grad(logit_at_5)(params["embed"])
    future = set(np.asarray(tokens[0, 6:]).tolist()) - set(np.asarray(tokens[0, :6]).tolist())
    past = set(np.asarray(tokens[0, :6]).tolist())
    assert all(np.all(np.asarray(grad[t]) == 0) for t in future)
    assert all(np.abs(np.asarray(grad[t])).sum() > 0 for t in past)


def test_packed_segments_equal_separate_sequences():
    params, _ = init_params(CFG, jax.random.key(5))
    a, b = tokens_of(jax.random.key(6), 1, 11), tokens_of(jax.random.key(7), 1, 19)
    packed = jnp.concatenate([a, b], axis=1)
    segs = jnp.concatenate([jnp.zeros((1, 11), jnp.int32), jnp.ones((1, 19), jnp.int32)], 1)
    got = fwd(params, packed, CFG, segment_ids=segs)
    np.testing.assert_allclose(got[:, :11], fwd(params, a, CFG), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[:, 11:], fwd(params, b, CFG), atol=2e-5, rtol=2e-5)


def test_segment_positions_restart_per_segment():
    segs = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(segment_positions(segs),
                                  [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])


def test_backends_agree_in_the_model():
    params, _ = init_params(CFG, jax.random.key(8))
    tokens = tokens_of(jax.random.key(9), 2, 30)
    ref = dataclasses.replace(CFG, attention=AttentionConfig(impl="reference"))
    np.testing.assert_allclose(fwd(params, tokens, CFG), fwd(params, tokens, ref),
                               atol=2e-5, rtol=2e-5)


def test_bfloat16_activations_stay_close_to_float32():
    params, _ = init_params(CFG, jax.random.key(10))
    tokens = tokens_of(jax.random.key(11), 2, 40)
    want = fwd(params, tokens, CFG)
    got = fwd(params, tokens, dataclasses.replace(CFG, dtype="bfloat16"))
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got - want)).max() / np.abs(np.asarray(want)).max()
    assert err < 5e-2, err


def test_remat_policies_give_the_same_gradients():
    params, _ = init_params(CFG, jax.random.key(12))
    tokens = tokens_of(jax.random.key(13), 2, 17)

    def grads(cfg):
        loss = lambda p: jnp.mean(jax.nn.logsumexp(forward(p, tokens, cfg), -1))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    want = grads(CFG)
    for policy in ("full", "dots"):
        got = grads(dataclasses.replace(CFG, remat=policy))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_compiled_program_does_not_grow_with_depth():
    tokens = jnp.zeros((1, 8), jnp.int32)

    def hlo_lines(num_layers):
        cfg = dataclasses.replace(CFG, num_layers=num_layers)
        params, _ = init_params(cfg, jax.random.key(0))
        return len(jax.jit(forward, static_argnums=2).lower(params, tokens, cfg).as_text()
                   .splitlines())

    assert hlo_lines(2) == hlo_lines(12)


def test_bad_inputs_raise():
    params, _ = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="tokens"):
        forward(params, jnp.zeros((2, 3)), CFG)
    with pytest.raises(ValueError, match="tokens"):
        forward(params, jnp.zeros((6,), jnp.int32), CFG)
    with pytest.raises(ValueError, match="positions"):
        forward(params, jnp.zeros((2, 3), jnp.int32), CFG, positions=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        forward(params, jnp.zeros((2, 3), jnp.int32), CFG, segment_ids=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="ModelConfig"):
        forward(params, jnp.zeros((2, 3), jnp.int32), {"vocab_size": 3})
