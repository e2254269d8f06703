"""Dense attention of a few queries over cache entries that carry validity and positions.

The selection and quantization policies (KIVI, Quest, DuoAttention) read their caches through
this one function: entries are stored in whatever slot order a policy likes, each with its
original position and a validity flag, so a query sees an entry iff it is valid and not in the
query's future. Grouped-query heads read their KV head without repeating K/V.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

f32 = jnp.float32


def masked_attention(q, k, v, visible, *, scale: float | None = None):
    """q [B, T, H, D]; k, v [B, S, K, D]; visible bool [B, K or 1, T, S] -> [B, T, H, D].

    Softmax statistics are float32; rows that see no entry give zeros, never NaN.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=f32) * scale
    vis = visible[:, :, None]
    s = jnp.where(vis, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def causal_visibility(key_positions, valid, query_positions):
    """key_positions, valid [B, K, S]; query_positions [B, T] -> visible bool [B, K, T, S]."""
    return valid[:, :, None, :] & (key_positions[:, :, None, :]
                                   <= query_positions[:, None, :, None])
