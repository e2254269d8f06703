"""Dense attention in float32: obviously correct, the ground truth for every other backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.attention.alibi import alibi_bias
from lcm.attention.masks import Mask, group_heads


def reference_attention(q, k, v, mask: Mask | None = None, *, scale: float, softcap=None,
                        alibi_slopes: tuple[float, ...] | None = None, sinks=None):
    """Softmax(q k^T * scale) v with a dense [T, S] score matrix per head.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K (query heads of a group share a KV
    head; K/V are not repeated). Returns [B, T, H, D] in q's dtype. Rows with no visible key
    give zeros (even when v holds NaN). `alibi_slopes` (H floats) adds -slope_h * (query pos -
    key pos) after the cap. `sinks` (None or [H] float logits, differentiable) adds to every
    row's softmax one more logit sinks[h] whose value vector is zero: out = sum_j exp(s_j) v_j /
    (exp(sinks[h]) + sum_j exp(s_j)).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    f32 = jnp.float32
    qg = q.astype(f32).reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(f32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, f32).reshape(1, K, G, 1, 1)
        s = s + alibi_bias(slopes, jnp.arange(T)[:, None] + S - T, jnp.arange(S)[None, :])
    if mask is not None:
        vis = mask.prepare(T, S, batch=B, num_heads=H).visible(jnp.arange(T), jnp.arange(S),
                                                               S - T)
        s = jnp.where(group_heads(vis, K), s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    # A row that sees no key keeps max -inf (NaN logits give NaN, not -inf): its output is
    # zero even when v holds NaN or inf (0 * NaN would be NaN), as on the blockwise backends.
    unseen = jnp.isneginf(m)
    if sinks is not None:
        sink = jnp.asarray(sinks).astype(f32).reshape(1, K, G, 1, 1)
        m = jnp.maximum(m, jax.lax.stop_gradient(sink))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    w = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->bkgtd", w, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(unseen, 0.0, out).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, D]
    return out.reshape(B, T, H, D).astype(q.dtype)
