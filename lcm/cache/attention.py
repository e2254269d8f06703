"""Attention against a KV cache whose heads hold different entries, and the statistics that
eviction policies score with (window attention, attention column sums, query moments).

Cache entries are laid out per kv head, [B, K, C, D], with an original position per entry, so
visibility comes from positions (causal, sliding window) and from each head's length, not from
the slot order. Softmax statistics are float32; a query that sees no entry gets zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

f32 = jnp.float32


def visible(q_pos, k_pos, k_valid, *, sliding_window=None):
    """Bool [B, K, T, C]: which cache entries each query sees.

    q_pos [B, T] or [B, K, T] int; k_pos, k_valid [B, K, C]. A query at p sees valid entries at
    positions <= p (and > p - sliding_window when set).
    """
    if q_pos.ndim == 2:
        q_pos = q_pos[:, None]
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    vis = k_valid[..., None, :] & (kp <= qp) & (qp >= 0)
    if sliding_window is not None:
        vis = vis & (kp > qp - sliding_window)
    return vis


def attention_probs(q, k, vis, *, scale=None, softcap=None, sinks=None):
    """Softmax weights of queries over cache entries.

    q [B, T, H, D]; k [B, K, C, D]; vis [B, K, T, C] -> probs float32 [B, K, G, T, C] (G query
    heads per kv head); rows with nothing visible are zeros. softcap: the logits become
    softcap * tanh(logits / softcap) (Gemma 2), as the model's attention. sinks: None or [H]
    float sink logits (as `lcm.attention.attend`'s): each row's normaliser also counts
    exp(sinks[h]), a key whose value is zero, so a row's weights sum to less than one.
    """
    B, T, H, D = q.shape
    K = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bkcd->bkgtc", qg, k, preferred_element_type=f32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(vis[:, :, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sink = jnp.asarray(sinks).astype(f32).reshape(1, K, H // K, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    return p / jnp.where(denom > 0, denom, 1.0)


def attend_cache(probs, v, dtype):
    """probs [B, K, G, T, C] float32; v [B, K, C, D] -> out [B, T, H, D] in `dtype`."""
    B, K, G, T, _ = probs.shape
    out = jnp.einsum("bkgtc,bkcd->btkgd", probs.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(B, T, K * G, v.shape[-1]).astype(dtype)


def column_sums(q, k, q_valid, *, chunk: int, sliding_window=None):
    """Attention weights summed over queries, per query head: float32 [B, H, S].

    q [B, T, H, D] and k [B, S, K, D] are one prompt's rotated queries and keys (positions
    0..T-1, S == T); q_valid [B, T] marks real queries. Causal. Queries are visited `chunk` at a
    time, so memory is O(chunk * S), never [T, S] (ObservedAttention, H2O's prefill scores).
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    n = -(-T // chunk)
    pad = n * chunk - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, chunk, H, D)
    validp = jnp.pad(q_valid, ((0, 0), (0, pad))).reshape(B, n, chunk)
    kk = k.transpose(0, 2, 1, 3)
    k_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, K, T))
    k_valid = jnp.ones((B, K, T), bool)

    def one(carry, xs):
        i, q_c, valid_c = xs
        q_pos = jnp.where(valid_c, i * chunk + jnp.arange(chunk, dtype=jnp.int32)[None], -1)
        vis = visible(q_pos, k_pos, k_valid, sliding_window=sliding_window)
        p = attention_probs(q_c, kk, vis)  # [B, K, G, c, S]
        return carry + p.sum(3).reshape(B, H, T), None

    xs = (jnp.arange(n), qp.transpose(1, 0, 2, 3, 4), validp.transpose(1, 0, 2))
    total, _ = jax.lax.scan(one, jnp.zeros((B, H, T), f32), xs)
    return total


def last_queries(q, lengths, window: int):
    """The rotated queries of each row's last `window` real tokens and their positions.

    q [B, T, H, D]; lengths [B] -> (q_win [B, W, H, D], q_pos [B, W] int32, -1 where the row is
    shorter than the window).
    """
    T = q.shape[1]
    q_pos = lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None]
    idx = jnp.clip(q_pos, 0, T - 1)
    q_win = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
    return q_win, jnp.where(q_pos >= 0, q_pos, -1).astype(jnp.int32)


def query_moments(q, q_valid):
    """Sums over real queries for mean and covariance: (count [B], sum [B, H, D], outer
    [B, H, D, D]) in float32. q [B, T, H, D] un-rotated; q_valid [B, T]."""
    qf = jnp.where(q_valid[:, :, None, None], q.astype(f32), 0.0)
    count = q_valid.sum(-1).astype(f32)
    return count, qf.sum(1), jnp.einsum("bthi,bthj->bhij", qf, qf)


def cache_attention(qr, k_cache, v_cache, see_cache, parts, *, softcap, sinks, block: int):
    """Softmax attention of queries qr [B, n, H, D] over a layer's cache slots (k_cache,
    v_cache [B, K, C, D], visibility see_cache(lo, width) -> [B, K, n, width]) and over
    `parts`, each (k, v [B, K, m, D], vis [B, K, n, m]) -> [B, n, H, D]. The cache is read
    `block` slots at a time with an online softmax (float32), so the weights are never
    [n, C]; soft-cap and sinks as `lcm.cache.attention.attention_probs`; a query that sees
    nothing gets zeros."""
    B, n, H, D = qr.shape
    K, C = k_cache.shape[1], k_cache.shape[2]
    G = H // K
    qg = qr.reshape(B, n, K, G, D)
    scale = 1.0 / math.sqrt(D)

    def update(state, k, v, vis):
        m, l, acc = state
        s = jnp.einsum("btkgd,bkcd->bkgtc", qg, k.astype(qr.dtype),
                       preferred_element_type=f32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(vis[:, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        pv = jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(v.dtype), v, preferred_element_type=f32)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    state = (jnp.full((B, K, G, n), -jnp.inf, f32), jnp.zeros((B, K, G, n), f32),
             jnp.zeros((B, K, G, n, D), f32))
    size = min(block, C)
    blocks = -(-C // size)

    def one(i, state):
        lo = jnp.minimum(i * size, C - size)  # the last block ends at C, overlapping
        fresh = (lo + jnp.arange(size, dtype=jnp.int32)) >= i * size  # not read before
        vis = see_cache(lo, size) & fresh[None, None, None]
        return update(state, jax.lax.dynamic_slice_in_dim(k_cache, lo, size, axis=2),
                      jax.lax.dynamic_slice_in_dim(v_cache, lo, size, axis=2), vis)

    state = one(0, state) if blocks == 1 else jax.lax.fori_loop(0, blocks, one, state)
    for k, v, vis in parts:
        state = update(state, k, v, vis)
    m, l, acc = state
    if sinks is not None:  # a key whose value is zero, with logit sinks[h]
        sink = jnp.asarray(sinks).astype(f32).reshape(1, K, G, 1)
        m_new = jnp.maximum(m, sink)
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        l, acc = l * alpha + jnp.exp(sink - m_safe), acc * alpha[..., None]
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, n, H, D).astype(qr.dtype)
