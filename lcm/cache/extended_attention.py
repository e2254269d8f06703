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
far pass touches each slot once, the near pass `window` slots; nothing is [T, S]. Positions,
visibilities and cos/sin tables are the same in every layer: `step_tables` builds them once per
decode step (`apply_rope`'s arithmetic, split into a table and a rotation so that the table
serves the cache's [B, K, C, D] layout, which the score and value contractions read without a
transpose).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from lcm.config import PositionConfig
from lcm.positions import self_extend_positions

f32 = jnp.float32
SUPPORTED = ("self_extend", "rerope", "leaky_rerope")


def step_tables(key_pos, q_pos, *, inv_freq, factor, position: PositionConfig,
                sliding_window=None):
    """What every layer of one decode step shares: the slots each pass reads and sees, and the
    cos/sin tables of the four rotations ([B, S, R/2] float32 pairs; k2 None for rerope).

    key_pos [B, C] int32 (-1: empty slot; slot n holds position n); q_pos [B] int32, the new
    token's position (its own slot is not read). sliding_window: the model's window or None.
    """
    if position.type not in SUPPORTED:
        raise ValueError(f"position.type={position.type!r}; expected one of {list(SUPPORTED)}")
    C = key_pos.shape[1]
    w = position.window
    qp = q_pos[:, None]
    # Near: the window - 1 slots before the query (fewer when the cache is smaller), then itself.
    n_prev = min(w - 1, C)
    idx = qp - n_prev + jnp.arange(n_prev, dtype=jnp.int32)[None]  # [B, n_prev]
    near_idx = jnp.clip(idx, 0, C - 1)
    prev_pos = jnp.where(idx >= 0, jnp.take_along_axis(key_pos, near_idx, 1), -1)
    near_pos = jnp.concatenate([prev_pos, qp], axis=1)  # [B, n_prev + 1]
    near_d, far_d = qp - near_pos, qp - key_pos
    near_vis = (near_pos >= 0) & (near_d >= 0) & (near_d < w)
    far_vis = (key_pos >= 0) & (far_d >= w)
    if sliding_window is not None:
        near_vis, far_vis = near_vis & (near_d < sliding_window), far_vis & (far_d < sliding_window)
    table = lambda pos, af=factor: _table(pos, inv_freq, af)  # noqa: E731
    key_pos = jnp.maximum(key_pos, 0)
    if position.type == "self_extend":
        q_far, _ = self_extend_positions(qp, w, position.group_size)
        _, k_far = self_extend_positions(key_pos, w, position.group_size)
        q2, k2 = table(q_far), table(k_far)
    elif position.type == "rerope":
        # rope(k, 0) scales k's rotated features by the attention factor; scaling q2's instead
        # (cos and sin times factor ** 2) leaves the cached keys un-rotated: k2 is k.
        q2, k2 = table(jnp.full_like(qp, w), factor * factor), None
    else:  # leaky_rerope
        leak = position.leak
        q2 = table(qp.astype(f32) / leak + (w - w / leak))
        k2 = table(key_pos.astype(f32) / leak)
    return {"q_pos": q_pos, "near_idx": near_idx, "near_vis": near_vis, "far_vis": far_vis,
            "q1": table(qp), "k1": table(jnp.maximum(near_pos, 0)), "q2": q2, "k2": k2}


def scale_queries(q, q_pos, position: PositionConfig):
    """ReRoPE's log-length query scaling, max(1, log(p + 1) / log(L)), as the forward pass.

    q [B, 1, H, D]; q_pos [B] int32. Identity when log_scale_length is None."""
    if position.log_scale_length is None:
        return q
    factor = jnp.log(q_pos.astype(f32) + 1.0) / math.log(position.log_scale_length)
    return (q.astype(f32) * jnp.maximum(factor, 1.0)[:, None, None, None]).astype(q.dtype)


def decode_attention(q, k_new, v_new, k_cache, v_cache, tables, *, position: PositionConfig):
    """Attention of one new token per row over the cache and itself.

    q [B, 1, H, D], k_new and v_new [B, K, D]: the new token's un-rotated projections.
    k_cache, v_cache [B, K, C, D]: un-rotated keys and values, slot n holding position n.
    tables: this step's `step_tables`. Returns [B, 1, H, D] in q's dtype.
    """
    B, _, H, D = q.shape
    q = scale_queries(q, tables["q_pos"], position)
    take = tables["near_idx"][:, None, :, None]  # [B, 1, n_prev, 1]
    near_k = jnp.concatenate([jnp.take_along_axis(k_cache, take, 2),
                              k_new[:, :, None].astype(k_cache.dtype)], axis=2)
    near_v = jnp.concatenate([jnp.take_along_axis(v_cache, take, 2),
                              v_new[:, :, None].astype(v_cache.dtype)], axis=2)
    far_k = k_cache if tables["k2"] is None else _rotate(k_cache, tables["k2"], 1)
    scale = 1.0 / math.sqrt(D)
    s1 = _scores(_rotate(q, tables["q1"], 2), _rotate(near_k, tables["k1"], 1),
                 tables["near_vis"], scale)  # [B, K, G, window]
    s2 = _scores(_rotate(q, tables["q2"], 2), far_k, tables["far_vis"], scale)  # [B, K, G, C]
    m = jnp.maximum(s1.max(-1, keepdims=True), s2.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p1, p2 = jnp.exp(s1 - m), jnp.exp(s2 - m)
    denom = p1.sum(-1, keepdims=True) + p2.sum(-1, keepdims=True)
    out = _weighted(p1, near_v) + _weighted(p2, v_cache)  # [B, K, G, D]
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(B, 1, H, D).astype(q.dtype)


def _table(pos, inv_freq, attention_factor):
    """(cos, sin) [B, S, R/2] float32 of positions pos [B, S], times the attention factor, as
    `apply_rope` computes them (float32 angles whatever the activation dtype)."""
    angles = pos.astype(f32)[..., None] * inv_freq.astype(f32)[None, None]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def _rotate(x, table, heads_axis):
    """`apply_rope` (rotate-half, partial rotary) from a table: x [B, 1, H, D] (heads_axis 2)
    or [B, K, S, D] (heads_axis 1), the table broadcast over the heads axis."""
    cos, sin = (jnp.expand_dims(t, heads_axis) for t in table)
    rotary = 2 * cos.shape[-1]
    xf = x[..., :rotary].astype(f32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)


def _scores(q, k, vis, scale):
    """q [B, 1, H, D]; k [B, K, S, D]; vis [B, S] -> float32 [B, K, G, S], -inf where hidden."""
    B, _, H, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, D)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=f32) * scale
    return jnp.where(vis[:, None, None, :], s, -jnp.inf)


def _weighted(p, v):
    """p [B, K, G, S] float32 (unnormalised); v [B, K, S, D] -> float32 [B, K, G, D]."""
    return jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), v, preferred_element_type=f32)
