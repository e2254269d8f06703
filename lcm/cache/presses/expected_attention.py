"""ExpectedAttention (Devoto et al. 2025, kvpress): expected attention of future queries."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from lcm.cache.presses.base import INF, Needs, ScorerPress, f32, finish, group, register
from lcm.checks import check_int, check_number


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


@register
@dataclasses.dataclass(frozen=True)
class ExpectedAttention(ScorerPress):
    """Expected attention of future queries: query mean and covariance (from `n_sink` on),
    averaged RoPE over `n_future_positions`, times ||v||; sinks kept."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_int("ExpectedAttention", "n_future_positions", self.n_future_positions, 1)
        check_int("ExpectedAttention", "n_sink", self.n_sink, 0)
        check_number("ExpectedAttention", "epsilon", self.epsilon, 0.0, math.inf, hi_open=True)

    def observes(self):
        return Needs(moments_from=self.n_sink)

    def score(self, *, keys, v, pos, valid, obs, inv_freq, factor, next_pos, **_):
        B, K, S, D = keys.shape
        mu, cov = obs["q_mean"], obs["q_cov"]  # [B, H, D], [B, H, D, D], un-rotated queries
        R = average_rotation(next_pos, self.n_future_positions, inv_freq, factor, D)
        mu = jnp.einsum("bhj,bij->bhi", mu, R)
        kf = keys.astype(f32)
        H = mu.shape[1]
        logits = jnp.einsum("bkgd,bksd->bkgs", mu.reshape(B, K, H // K, D), kf) / math.sqrt(D)
        if self.use_covariance:
            cov = jnp.einsum("bij,bhjl,bml->bhim", R, cov, R)
            quad = jnp.einsum("bksi,bkgij,bksj->bkgs", kf, cov.reshape(B, K, H // K, D, D), kf)
            logits = logits + quad / D / 2
        scored = valid & (pos >= self.n_sink)
        logits = jnp.where(scored[:, :, None], logits, -INF)
        m = jnp.max(logits, -1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
        scores = group(p, self.gqa)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * jnp.sqrt(jnp.sum(jnp.square(v.astype(f32)), -1))
        return finish(scores, valid, ~scored)

    @classmethod
    def example(cls):
        return cls(0.5, n_future_positions=8, n_sink=1)
