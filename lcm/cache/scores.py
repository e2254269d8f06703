"""Scores of cache entries, one function per policy: float32 [B, K, S], higher is kept.

Inputs are one layer's entries (`keys` [B, K, S, D] rotated at their original positions, `v`,
`pos` [B, K, S], `valid` [B, K, S], `n` [B, K] entries per head) and the observations the policy
asked for (`lcm.cache.compress.observe_layer`). Empty slots score -inf (never kept), protected
entries (windows, sinks) +inf. Pooling runs along the slot axis, which holds entries in position
order after prefill and after every compression.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.policies import (H2O, TOVA, ExpectedAttention, Knorm, ObservedAttention, SnapKV,
                                StreamingLLM)

f32 = jnp.float32
INF = jnp.inf


def _finish(scores, valid, protect):
    return jnp.where(valid, jnp.where(protect, INF, scores), -INF)


def _group(x, gqa):
    """[B, K, G, S] -> [B, K, S] by the policy's GQA vote."""
    return x.max(2) if gqa == "max" else x.mean(2)


def knorm(policy: Knorm, keys, valid, **_):
    scores = -jnp.sqrt(jnp.sum(jnp.square(keys.astype(f32)), axis=-1))
    return _finish(scores, valid, False)


def streaming(policy: StreamingLLM, pos, valid, **_):
    return _finish(pos.astype(f32), valid, pos < policy.n_sink)


def window_attention(q_win, q_pos, keys, pos, valid, window, sliding_window=None):
    """Softmax weights [B, K, G, w, S] of the last `window` observed queries over the entries."""
    q, qp = q_win[:, -window:], q_pos[:, -window:]
    vis = cattn.visible(qp, pos, valid, sliding_window=sliding_window)
    return cattn.attention_probs(q, keys, vis)


def _pool(x, kernel, kind):
    """1-D pooling along the last axis, 'same' length, zero padding counted (torch's
    avg_pool1d(padding=k//2) default)."""
    if kernel == 1:
        return x
    dims, strides = (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim
    pad = ((0, 0),) * (x.ndim - 1) + ((kernel // 2, kernel // 2),)
    if kind == "max":
        return jax.lax.reduce_window(x, -INF, jax.lax.max, dims, strides, pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad) / kernel


def snapkv(policy: SnapKV, keys, pos, valid, obs, sliding_window=None, **_):
    w = policy.window_size
    probs = window_attention(obs["q_win"], obs["q_pos"], keys, pos, valid, w, sliding_window)
    # Keys before the first window query are scored; the window itself is kept. (-1: the
    # prompt is shorter than the window, so every key is in it.)
    first = obs["q_pos"][:, -min(w, obs["q_pos"].shape[1])]
    prefix = valid & (pos < first[:, None, None])
    scores = jnp.where(prefix[:, :, None], probs.mean(3), 0.0)  # [B, K, G, S]
    scores = _group(_pool(scores, policy.kernel_size, policy.pooling), policy.gqa)
    return _finish(scores, valid, ~prefix)


def tova(policy: TOVA, keys, pos, valid, obs, sliding_window=None, **_):
    probs = window_attention(obs["q_win"], obs["q_pos"], keys, pos, valid, 1, sliding_window)
    B, K = valid.shape[:2]
    scores = jnp.broadcast_to(probs[:, :, :, 0].mean((1, 2))[:, None], valid.shape)
    return _finish(scores, valid, pos >= obs["q_pos"][:, -1][:, None, None])


def observed(policy: ObservedAttention, pos, valid, n, obs, **_):
    B, K, S = valid.shape
    colsum = obs["colsum"].reshape(B, K, -1, S)
    # Queries that saw each key: all later prompt tokens, or (decoding) the buffered ones.
    seen_by = obs.get("seen_by", jnp.maximum(n[..., None] - pos, 1).astype(f32))
    seen_by = jnp.maximum(seen_by, 1.0)
    return _finish(_group(colsum / seen_by[:, :, None], policy.gqa), valid, False)


def h2o(policy: H2O, pos, valid, n, obs, **_):
    """(selection scores with the recent window protected, accumulated attention)."""
    B, K, S = valid.shape
    acc = _group(obs["colsum"].reshape(B, K, -1, S), policy.gqa)
    recent = pos >= (n - policy.recent_size)[..., None]
    return _finish(acc, valid, recent), jnp.where(valid, acc, 0.0)


def average_rotation(positions, n_future, inv_freq, factor, head_dim):
    """Mean RoPE matrix over positions p .. p + n_future - 1: [B, D, D] for p [B].

    As kvpress: R = cos * I + sin * P with P the rotate-half matrix, averaged (R is linear in
    cos and sin, so the mean of the matrices is the matrix of the means).
    """
    t = positions[:, None].astype(f32) + jnp.arange(n_future, dtype=f32)[None]
    angles = t[..., None] * inv_freq.astype(f32)[None, None]
    cos = jnp.cos(angles).mean(1) * factor
    sin = jnp.sin(angles).mean(1) * factor  # [B, R/2]
    R2, D = inv_freq.shape[0], head_dim
    cos = jnp.concatenate([cos, cos, jnp.ones((cos.shape[0], D - 2 * R2), f32)], -1)
    sin = jnp.concatenate([sin, sin, jnp.zeros((sin.shape[0], D - 2 * R2), f32)], -1)
    eye = jnp.eye(R2, dtype=f32)
    P = jnp.zeros((D, D), f32)
    P = P.at[R2:2 * R2, :R2].set(eye).at[:R2, R2:2 * R2].set(-eye)
    return cos[:, None, :] * jnp.eye(D, dtype=f32)[None] + sin[:, None, :] * P[None]


def expected(policy: ExpectedAttention, keys, v, pos, valid, obs, inv_freq, factor, next_pos,
             **_):
    B, K, S, D = keys.shape
    mu, cov = obs["q_mean"], obs["q_cov"]  # [B, H, D], [B, H, D, D], un-rotated queries
    R = average_rotation(next_pos, policy.n_future_positions, inv_freq, factor, D)
    mu = jnp.einsum("bhj,bij->bhi", mu, R)
    kf = keys.astype(f32)
    H = mu.shape[1]
    logits = jnp.einsum("bkgd,bksd->bkgs", mu.reshape(B, K, H // K, D), kf) / math.sqrt(D)
    if policy.use_covariance:
        cov = jnp.einsum("bij,bhjl,bml->bhim", R, cov, R)
        quad = jnp.einsum("bksi,bkgij,bksj->bkgs", kf, cov.reshape(B, K, H // K, D, D), kf)
        logits = logits + quad / D / 2
    scored = valid & (pos >= policy.n_sink)
    logits = jnp.where(scored[:, :, None], logits, -INF)
    m = jnp.max(logits, -1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    scores = _group(p, policy.gqa)
    if policy.use_vnorm:
        scores = (scores + policy.epsilon) * jnp.sqrt(jnp.sum(jnp.square(v.astype(f32)), -1))
    return _finish(scores, valid, ~scored)


SCORERS = {Knorm: knorm, StreamingLLM: streaming, SnapKV: snapkv, TOVA: tova,
           ObservedAttention: observed, ExpectedAttention: expected}


def score(policy, **inputs):
    """Scores [B, K, S] of the entries for a scoring policy (PyramidKV scores as SnapKV)."""
    for cls in type(policy).__mro__:
        if cls in SCORERS:
            return SCORERS[cls](policy, **inputs)
    raise ValueError(f"policy={policy!r} has no scorer; expected one of "
                     f"{[c.__name__ for c in SCORERS]}")
