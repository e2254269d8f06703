"""The pre-blocked entry of the `xla` backend: attend the same queries to many key ranges.

Ring attention's steps (lcm.attention.ring) block q, k, v once and carry float32 online-softmax
statistics across calls, so no step re-lays out its inputs or allocates a partial output to
merge. Queries and outputs are blocked by a reshape ([B, T, H, D] -> [B, nq, bq, K, G, D], no
copy); keys and values once into the layout the block matmuls read ([B, S, K, D] ->
[B, nk, K, bk, D]). Loops update the carried arrays in place, one query block at a time; block
math, masks and numerics are those of lcm.attention.blockwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcm.attention.blockwise import apply_mask, block_grads
from lcm.attention.layout import FULL, BlockLayout
from lcm.attention.masks import Mask
from lcm.kernels.block_sparse.common import row_seen, sink_stats

f32 = jnp.float32


def _on_visible(fn, kind, mask, i, j, geom, num_kv_heads):
    """fn(masked) where masked(s) sets a PARTIAL block's invisible logits to -inf (FULL blocks:
    identity). fn computes the logits inside the branch: a block-sized cond operand would be
    copied into the branch, a third block-sized buffer next to the logits and probabilities."""
    return lax.cond(kind == FULL, lambda: fn(lambda s: s),
                    lambda: fn(lambda s: apply_mask(s, mask, i, j, geom, None, num_kv_heads)))


def to_blocks(x, block: int, num_kv_heads: int | None = None):
    """Queries (with `num_kv_heads`): [B, T, H, D] -> [B, T // block, block, K, H // K, D], a
    reshape. Keys / values (without): [B, S, K, D] -> [B, S // block, K, block, D], one copy.
    The length must be a multiple of block (no padding here)."""
    B, T, N, D = x.shape
    if T % block:
        raise ValueError(f"length {T} is not a multiple of block={block}: pad before to_blocks")
    if num_kv_heads is None:
        return x.reshape(B, T // block, block, N, D).transpose(0, 1, 3, 2, 4)
    return x.reshape(B, T // block, block, num_kv_heads, N // num_kv_heads, D)


def from_blocks(x):
    """Inverse of `to_blocks`: query blocks [B, n, block, K, G, D] or key blocks
    [B, n, K, block, D] -> [B, n * block, heads, D]."""
    if x.ndim == 5:
        x = x.transpose(0, 1, 3, 2, 4)
    B, n, b = x.shape[:3]
    return x.reshape(B, n * b, -1, x.shape[-1])


def blocked_init(q_blocks, sinks=None):
    """Empty online-softmax statistics for q_blocks [B, nq, bq, K, G, D]: (m, l, acc) float32,
    m and l [B, nq, bq, K, G] (m = -inf: nothing seen), acc (unnormalised output) like q.
    sinks: None, or [K, G] sink logits, counted here as the first key of every row (m = sink,
    l = 1), so steps that carry these statistics over many key ranges count them once."""
    m, l = sink_stats(sinks, q_blocks.shape[:-1])
    return m, l, jnp.zeros(q_blocks.shape, f32)


def blocked_finish(carry, dtype):
    """(m, l, acc) -> (out [B, nq, bq, K, G, D] in dtype, zeros where nothing was seen;
    lse [B, nq, bq, K, G] float32, +inf where nothing was seen, as `attention_backward` wants)."""
    m, l, acc = carry
    seen = row_seen(m)  # not l > 0: NaN logits must give NaN rows, not zeros
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out.astype(dtype), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _rows_last(x):
    """[B, bq, K, G, ...] -> [B, K, G, bq, ...] (one query block, the scores' layout)."""
    return jnp.moveaxis(x, 1, 3)


def _rows_back(x):
    return jnp.moveaxis(x, 3, 1)


def _scores_blocked(q_blk, k_blk, scale, softcap):
    """q_blk [B, K, G, bq, D], k_blk [B, K, bk, D] -> float32 logits [B, K, G, bq, bk]."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=f32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def blocked_forward_step(q, k, v, mask: Mask | None, layout: BlockLayout, carry, *,
                         scale: float, softcap: float | None = None):
    """Adds the keys k, v [B, nk, K, bk, D] to the statistics `carry` (from `blocked_init`) of
    queries q [B, nq, bq, K, G, D]: the blockwise forward over `layout` (its union over heads;
    geom of these blocks; `mask` evaluated at local indices for PARTIAL blocks). A query block
    with no visits is left as it was, so a fully masked layout costs no block compute."""
    layout = jax.tree.map(jnp.asarray, layout.shared())
    geom, K = layout.geom, k.shape[2]

    def row(i, carry):
        m_all, l_all, acc_all = carry
        q_blk = _rows_last(lax.dynamic_index_in_dim(q, i, 1, keepdims=False))

        def visit(t, c):
            m, l, acc = c
            j = layout.kv_blocks[0, i, t]
            k_blk = lax.dynamic_index_in_dim(k, j, 1, False)

            def probs(masked):
                s = masked(_scores_blocked(q_blk, k_blk, scale, softcap)[0])
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # no inf - inf, empty rows
                return m_new, m_safe, jnp.exp(s - m_safe[..., None])

            m_new, m_safe, p = _on_visible(probs, layout.visit_kinds[0, i, t], mask, i, j, geom,
                                           K)
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype),
                            lax.dynamic_index_in_dim(v, j, 1, False), preferred_element_type=f32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = tuple(_rows_last(lax.dynamic_index_in_dim(x, i, 1, False))
                     for x in (m_all, l_all, acc_all))
        m, l, acc = lax.fori_loop(0, layout.counts[0, i], visit, init)
        return tuple(lax.dynamic_update_index_in_dim(x, _rows_back(y), i, 1)
                     for x, y in ((m_all, m), (l_all, l), (acc_all, acc)))

    return lax.fori_loop(0, geom.num_q_blocks, row, carry)


def blocked_delta(out, d_out):
    """rowsum(dO * O), float32 [B, nq, bq, K, G]: the softmax backward's per-row constant."""
    return jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)


def blocked_backward_step(q, k, v, d_out, lse, delta, mask: Mask | None, layout: BlockLayout,
                          carry, *, scale: float, softcap: float | None = None):
    """Adds this key range's share of the gradient to carry = (dq [B, nq, bq, K, G, D],
    dk, dv [B, nk, K, bk, D]), float32. q, d_out [B, nq, bq, K, G, D]; k, v as in
    `blocked_forward_step`; lse [B, nq, bq, K, G] float32 of the merged softmax (+inf: the row
    saw nothing), delta from `blocked_delta` with the merged output."""
    layout = jax.tree.map(jnp.asarray, layout.shared())
    geom, K = layout.geom, k.shape[2]

    def row(i, carry):
        dq_all, dk_all, dv_all = carry
        q_blk, do_blk = (_rows_last(lax.dynamic_index_in_dim(x, i, 1, False))
                         for x in (q, d_out))
        lse_blk, delta_blk = (_rows_last(lax.dynamic_index_in_dim(x, i, 1, False))
                              for x in (lse, delta))

        def visit(t, c):
            dq, dk_all, dv_all = c
            j = layout.kv_blocks[0, i, t]
            k_blk, v_blk = (lax.dynamic_index_in_dim(x, j, 1, False) for x in (k, v))
            dq_j, dk, dv = block_grads(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk,
                                       kind=layout.visit_kinds[0, i, t], mask=mask, i=i, j=j,
                                       geom=geom, head=None, num_kv_heads=K, scale=scale,
                                       softcap=softcap)
            dq = dq + dq_j
            dk_all = lax.dynamic_update_index_in_dim(
                dk_all, lax.dynamic_index_in_dim(dk_all, j, 1, False) + dk, j, 1)
            dv_all = lax.dynamic_update_index_in_dim(
                dv_all, lax.dynamic_index_in_dim(dv_all, j, 1, False) + dv, j, 1)
            return dq, dk_all, dv_all

        dq = _rows_last(lax.dynamic_index_in_dim(dq_all, i, 1, False))
        dq, dk_all, dv_all = lax.fori_loop(0, layout.counts[0, i], visit, (dq, dk_all, dv_all))
        return lax.dynamic_update_index_in_dim(dq_all, _rows_back(dq), i, 1), dk_all, dv_all

    return lax.fori_loop(0, geom.num_q_blocks, row, carry)
