"""Attention sinks in the cache's dense attention (attention_probs, pooled_attention) against
lcm.attention's reference_attention with the same sinks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.attention import BlockMask
from lcm.attention.reference import reference_attention
from lcm.cache.attention import attend_cache, attention_probs, visible
from lcm.cache.layouts import pooled_attention

B, H, K, D = 2, 4, 2, 8
G = H // K


def reference_rows(q, keys, values, vis, sinks, softcap):
    """reference_attention per batch row: keys, values [B, S, K, D]; vis [B, K, T, S] as a
    per-head element mask (BlockMask of 1-token cells)."""
    outs = []
    for b in range(q.shape[0]):
        grid = np.repeat(np.asarray(vis[b]), G, axis=0)  # [H, T, S]: a group shares its KV head
        outs.append(reference_attention(q[b:b + 1], keys[b:b + 1], values[b:b + 1],
                                        BlockMask(grid, 1), scale=D ** -0.5, softcap=softcap,
                                        sinks=sinks))
    return jnp.concatenate(outs)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_attention_probs_sinks_match_reference(softcap):
    """Cache entries per KV head (different valid lengths, a sliding window, a query row that
    sees nothing); with sinks, the weights of a row sum to 1 - p_sink."""
    T, C = 5, 24
    rng = np.random.default_rng(0)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, K, C, D))
    v = jax.random.normal(ks[2], (B, K, C, D))
    k_pos = jnp.asarray(rng.permutation(C)[None, None].repeat(B, 0).repeat(K, 1), jnp.int32)
    k_valid = jnp.arange(C)[None, None] < jnp.asarray([[18, 24], [9, 13]])[..., None]
    q_pos = jnp.asarray([[-1, 19, 20, 21, 22], [12, 13, 14, 15, 16]], jnp.int32)
    vis = visible(q_pos, k_pos, k_valid, sliding_window=10)
    sinks = jnp.asarray(rng.standard_normal(H) * 2, jnp.float32)

    probs = attention_probs(q, k, vis, softcap=softcap, sinks=sinks)
    got = attend_cache(probs, v, jnp.float32)
    want = reference_rows(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), vis, sinks,
                          softcap)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
    assert np.all(np.asarray(got[0, 0]) == 0)  # query at -1 sees nothing
    total = np.asarray(probs.sum(-1))
    assert np.all(total[np.asarray(vis.any(-1))[:, :, None].repeat(G, 2)] < 1.0)
    plain = attention_probs(q, k, vis, softcap=softcap)
    np.testing.assert_array_equal(plain, attention_probs(q, k, vis, softcap=softcap,
                                                         sinks=jnp.full((H,), -jnp.inf)))


def test_pooled_attention_sinks_match_reference():
    """One decoding query against a pool whose entries each belong to one KV head."""
    P = 20
    rng = np.random.default_rng(1)
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, 1, H, D))
    k = jax.random.normal(ks[1], (B, P, D))
    v = jax.random.normal(ks[2], (B, P, D))
    vis = jnp.asarray(rng.random((B, K, P)) < 0.4).at[1, 0].set(False)  # a head sees nothing
    sinks = jnp.asarray(rng.standard_normal(H) * 2, jnp.float32)

    got = pooled_attention(q, k, v, vis, softcap=3.0, sinks=sinks)
    keys, values = (jnp.broadcast_to(x[:, :, None], (B, P, K, D)) for x in (k, v))
    want = reference_rows(q, keys, values, vis[:, :, None], sinks, 3.0)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
    assert np.all(np.asarray(got[1, 0, :G]) == 0)
    np.testing.assert_array_equal(pooled_attention(q, k, v, vis, softcap=3.0),
                                  pooled_attention(q, k, v, vis, softcap=3.0,
                                                   sinks=jnp.full((H,), -jnp.inf)))
