"""KV merging: evicted values folded into their most similar kept neighbour (kvpress's
MergingPress).

For each evicted entry e, the kept entry t with the highest key cosine similarity s receives it
with weight w = max(s, 0) * |v_e| / (|v_e| + |v_t| + 1e-6) when s >= similarity_threshold (and,
with merge_fraction < 1, s is in the top merge_fraction of the head's similarities); each kept
value becomes (v_t + sum w v_e) / (1 + sum w). Keys are unchanged. Evicted entries are visited
in blocks, so memory is O(block * capacity), not O(prompt * capacity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32
_EPS = 1e-6
_BLOCK = 512


def _unit(x):
    x = x.astype(f32)
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), _EPS)


def merge_values(policy, keys, v, valid, idx, keep):
    """New values [B, K, S, D] for slots `idx` [B, K, C] (`keep` marks real picks); keys and
    values [B, K, S, D]; valid [B, K, S]. Only kept slots change."""
    B, K, Sn, D = v.shape
    C = idx.shape[-1]
    kept_k = _unit(jnp.take_along_axis(keys, idx[..., None], axis=2))  # [B, K, C, D]
    kept_v = jnp.take_along_axis(v, idx[..., None], axis=2).astype(f32)
    kept_slot = jnp.zeros((B, K, Sn), bool).at[
        jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None], idx].max(keep)
    evicted = valid & ~kept_slot

    block = min(_BLOCK, Sn)
    n = -(-Sn // block)
    pad = n * block - Sn

    def blocks(x, fill):
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
        x = x.reshape(x.shape[:2] + (n, block) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    def similarity(xs):
        k_blk, ev_blk = xs
        sims = jnp.einsum("bksd,bkcd->bksc", _unit(k_blk), kept_k)
        sims = jnp.where(keep[:, :, None], sims, -jnp.inf)
        return jnp.max(sims, -1), jnp.argmax(sims, -1).astype(jnp.int32)

    max_sim, target = jax.lax.map(similarity, (blocks(keys, 0), blocks(evicted, False)))
    max_sim = jnp.moveaxis(max_sim, 0, 2).reshape(B, K, n * block)[:, :, :Sn]
    target = jnp.moveaxis(target, 0, 2).reshape(B, K, n * block)[:, :, :Sn]
    ok = evicted & (max_sim >= policy.similarity_threshold)
    if policy.merge_fraction < 1.0:
        cut = jnp.nanquantile(jnp.where(ok, max_sim, jnp.nan), 1.0 - policy.merge_fraction,
                              axis=-1, keepdims=True)
        ok = ok & (max_sim >= cut)
    ev_norm = jnp.sqrt(jnp.sum(jnp.square(v.astype(f32)), -1))
    target_norm = jnp.take_along_axis(jnp.sqrt(jnp.sum(kept_v * kept_v, -1)), target, -1)
    weight = jnp.where(ok, jnp.maximum(max_sim, 0.0), 0.0) * ev_norm / (
        ev_norm + target_norm + _EPS)
    b, h = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
    value_sum = jnp.zeros((B, K, C, D), f32).at[b, h, target].add(
        weight[..., None] * v.astype(f32))
    weight_sum = jnp.zeros((B, K, C), f32).at[b, h, target].add(weight)
    merged = jnp.where((weight_sum > 0)[..., None],
                       (kept_v + value_sum) / (1.0 + weight_sum)[..., None], kept_v)
    return v.at[b, h, idx].set(jnp.where(keep[..., None], merged, kept_v).astype(v.dtype))
