"""Dense float32 attention with the kernels' mask protocol: the truth kernels are tested against.

Mask protocol shared by every kernel in this package (kernels import nothing from lcm):

    mask_fn(q_idx, k_idx, q_seg, k_seg) -> bool

q_idx int32 [bq, 1] are query row indices (0..q_len-1, plus padding rows past q_len); k_idx int32
[1, bk] are key indices. q_seg [bq, 1] / k_seg [1, bk] are the matching slices of the segment ids
when the caller passes segment ids, else None. The result broadcasts to [bq, bk]; True means the
pair may attend. Keys past kv_len are hidden by the kernels themselves. `mask_fn=None` means every
(real) pair is visible. Query/key alignment (e.g. decoding offsets) is the mask_fn's business.

Head-aware masks (per-head index lists such as MInference's vertical-slash pattern, or a per-head
block grid) pass `mask_tables`, a tuple of 1-D int32 arrays the kernels keep in SMEM (scalar
prefetch) on TPU. mask_fn is then called as

    mask_fn(q_idx, k_idx, q_seg, k_seg, head, tables, q_start, k_start) -> bool

with `head` the query head (int32 scalar), `tables` the tables (refs in a kernel, arrays here: read
them by scalar index, tables[n][pos]), and q_start / k_start the first query row / key index of the
block (scalars), so the function can bound scalar loops over its tables to what the block covers.

ALiBi (`alibi_slopes`, H floats) adds -slope_h * (i + kv_len - q_len - j) to the logits of query
row i and key j after soft-capping: for the bias, queries are aligned to the end of the keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import alibi_bias


def dense_mask(mask_fn, q_len, kv_len, q_segment_ids=None, kv_segment_ids=None, *,
               mask_tables=None, num_heads=1):
    """The [B or 1, T, S] bool mask that `mask_fn` describes over whole sequences; with
    mask_tables (a head-aware mask_fn), [B or 1, num_heads, T, S]."""
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    if mask_fn is None:
        return jnp.ones((1, q_len, kv_len), bool)
    if mask_tables is not None:
        tables = tuple(jnp.asarray(t, jnp.int32) for t in mask_tables)
        zero = jnp.int32(0)

        def per_head(qs, ks):
            return jax.vmap(lambda h: jnp.broadcast_to(
                mask_fn(q_idx, k_idx, qs, ks, h, tables, zero, zero), (q_len, kv_len)))(
                jnp.arange(num_heads, dtype=jnp.int32))
        if q_segment_ids is None:
            return per_head(None, None)[None]
        return jax.vmap(lambda qs, ks: per_head(qs[:, None], ks[None, :]))(q_segment_ids,
                                                                         kv_segment_ids)
    if q_segment_ids is None:
        return jnp.broadcast_to(mask_fn(q_idx, k_idx, None, None), (q_len, kv_len))[None]
    per_example = jax.vmap(lambda qs, ks: mask_fn(q_idx, k_idx, qs[:, None], ks[None, :]))
    return jnp.broadcast_to(per_example(q_segment_ids, kv_segment_ids),
                            (q_segment_ids.shape[0], q_len, kv_len))


def attention_reference(q, k, v, *, mask_fn=None, q_segment_ids=None, kv_segment_ids=None,
                        scale, softcap=None, alibi_slopes=None, mask_tables=None):
    """softmax(q k^T * scale) v, dense, float32. q [B, T, H, D]; k, v [B, S, K, D]; H % K == 0.

    Returns [B, T, H, D] in q's dtype; rows with no visible key are zeros.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, H // K, 1, 1)
        s = s + alibi_bias(slopes, jnp.arange(T)[:, None] + S - T, jnp.arange(S)[None, :])
    vis = dense_mask(mask_fn, T, S, q_segment_ids, kv_segment_ids, mask_tables=mask_tables,
                     num_heads=H)
    if mask_tables is None:
        vis = vis[:, None, None]
    else:
        vis = vis.reshape(vis.shape[0], K, H // K, T, S)
    s = jnp.where(vis, s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(denom > 0, denom, 1.0),
                     v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, T, H, D).astype(q.dtype)
