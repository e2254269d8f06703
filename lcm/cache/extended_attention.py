"""One decode query against a cache of un-rotated keys, under Self-Extend / ReRoPE / leaky ReRoPE.

The forward pass (`lcm.positions.position_attention`) scores a query-key pair at distance
d = query position - key position with the normal RoPE pair (q1, k1) when d < window and with
the method's far pair (q2, k2) when d >= window, then takes one softmax over both. A decode step
does the same for its one query, reading the rotations from `_rotated_pairs`' definitions:

- near: q1 = rope(q, p), k1 = rope(k, n), for the keys n in (p - window, p] only: at most
  `window` keys, gathered from the cache, the new token's own key last.
- far: every cache slot with d >= window, scored by
  - self_extend: q2 = rope(q, floor(p / g) + window - window / g), k2 = rope(k, floor(n / g));
  - rerope: q2 = rope(q, window), k2 = rope(k, 0), which is k itself with its rotated features
    times the attention factor: that factor moves onto q2, so far keys are never rotated;
  - leaky_rerope: q2 = rope(q, p / leak + window - window / leak), k2 = rope(k, n / leak).

Both key sets share one running max and one denominator (a single softmax, float32), so the
result equals the forward pass's merged softmax. Memory and work are O(cache) per step: the
far pass touches each slot once, the near pass `window` slots; nothing is [T, S].
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from lcm.config import PositionConfig
from lcm.positions import apply_rope, self_extend_positions

f32 = jnp.float32
SUPPORTED = ("self_extend", "rerope", "leaky_rerope")


def scale_queries(q, q_pos, position: PositionConfig):
    """ReRoPE's log-length query scaling, max(1, log(p + 1) / log(L)), as the forward pass.

    q [B, 1, H, D]; q_pos [B] int32. Identity when log_scale_length is None."""
    if position.log_scale_length is None:
        return q
    factor = jnp.log(q_pos.astype(f32) + 1.0) / math.log(position.log_scale_length)
    return (q.astype(f32) * jnp.maximum(factor, 1.0)[:, None, None, None]).astype(q.dtype)


def far_pair(q, keys, key_pos, q_pos, *, inv_freq, factor, position: PositionConfig):
    """The far rotations: (q2 [B, 1, H, D], k2 [B, C, K, D]) for keys [B, C, K, D] at key_pos
    [B, C] (-1: empty slot) and the query at q_pos [B]."""
    w = position.window
    rope = lambda x, pos, af=factor: apply_rope(x, pos, inv_freq, af)  # noqa: E731
    key_pos = jnp.maximum(key_pos, 0)
    if position.type == "self_extend":
        q_grouped, _ = self_extend_positions(q_pos[:, None], w, position.group_size)
        _, k_grouped = self_extend_positions(key_pos, w, position.group_size)
        return rope(q, q_grouped), rope(keys, k_grouped)
    if position.type == "rerope":
        # rope(k, 0) scales k's rotated features by the attention factor; scaling q2's instead
        # (cos and sin times factor ** 2) leaves the cached keys untouched.
        return rope(q, jnp.full_like(q_pos[:, None], w), factor * factor), keys
    leak = position.leak
    q_leaky = q_pos[:, None].astype(f32) / leak + (w - w / leak)
    return rope(q, q_leaky), rope(keys, key_pos.astype(f32) / leak)


def decode_attention(q, k_new, v_new, k_cache, v_cache, key_pos, q_pos, *, inv_freq, factor,
                     position: PositionConfig, sliding_window=None):
    """Attention of one new token per row over the cache and itself.

    q [B, 1, H, D], k_new and v_new [B, 1, K, D]: the new token's un-rotated projections at
    position q_pos [B] int32. k_cache, v_cache [B, C, K, D]: un-rotated keys and values, slot n
    holding position n (key_pos [B, C], -1 for empty slots; slot q_pos is not read).
    sliding_window: the model's window (None: causal). Returns [B, 1, H, D] in q's dtype.
    """
    if position.type not in SUPPORTED:
        raise ValueError(f"position.type={position.type!r}; expected one of {list(SUPPORTED)}")
    B, _, H, D = q.shape
    C = k_cache.shape[1]
    w = position.window
    scale = 1.0 / math.sqrt(D)
    q = scale_queries(q, q_pos, position)

    # Near: the window - 1 slots before the query (fewer when the cache is smaller), then itself.
    n_prev = min(w - 1, C)
    idx = q_pos[:, None] - n_prev + jnp.arange(n_prev, dtype=jnp.int32)[None]  # [B, n_prev]
    take = jnp.clip(idx, 0, C - 1)[:, :, None, None]
    prev_pos = jnp.where(idx >= 0, jnp.take_along_axis(key_pos, jnp.clip(idx, 0, C - 1), 1), -1)
    near_pos = jnp.concatenate([prev_pos, q_pos[:, None]], axis=1)  # [B, n_prev + 1]
    near_k = jnp.concatenate([jnp.take_along_axis(k_cache, take, 1), k_new.astype(k_cache.dtype)],
                             axis=1)
    near_v = jnp.concatenate([jnp.take_along_axis(v_cache, take, 1), v_new.astype(v_cache.dtype)],
                             axis=1)
    near_d = q_pos[:, None] - near_pos
    near_vis = (near_pos >= 0) & (near_d < w) & (near_d >= 0)
    q1 = apply_rope(q, q_pos[:, None], inv_freq, factor)
    k1 = apply_rope(near_k, jnp.maximum(near_pos, 0), inv_freq, factor)

    # Far: every slot at distance >= window.
    far_d = q_pos[:, None] - key_pos
    far_vis = (key_pos >= 0) & (far_d >= w)
    if sliding_window is not None:
        near_vis = near_vis & (near_d < sliding_window)
        far_vis = far_vis & (far_d < sliding_window)
    q2, k2 = far_pair(q, k_cache, key_pos, q_pos, inv_freq=inv_freq, factor=factor,
                      position=position)

    s1 = _scores(q1, k1, near_vis, scale)  # [B, K, G, S1]
    s2 = _scores(q2, k2, far_vis, scale)  # [B, K, G, C]
    m = jnp.maximum(s1.max(-1, keepdims=True), s2.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p1, p2 = jnp.exp(s1 - m), jnp.exp(s2 - m)
    denom = p1.sum(-1, keepdims=True) + p2.sum(-1, keepdims=True)
    out = _weighted(p1, near_v) + _weighted(p2, v_cache)  # [B, K, G, D]
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(B, 1, H, D).astype(q.dtype)


def _scores(q, k, vis, scale):
    """q [B, 1, H, D]; k [B, S, K, D]; vis [B, S] -> float32 [B, K, G, S], -inf where hidden."""
    B, _, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, K, H // K, D)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=f32) * scale
    return jnp.where(vis[:, None, None, :], s, -jnp.inf)


def _weighted(p, v):
    """p [B, K, G, S] float32 (unnormalised); v [B, S, K, D] -> float32 [B, K, G, D]."""
    return jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=f32)
