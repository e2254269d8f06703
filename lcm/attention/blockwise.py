"""The `xla` backend: blockwise attention with an online softmax, visiting only laid-out blocks.

For each query block a `while` loop runs over the key blocks its layout keeps (so Causal costs
about half of dense, Local(w) costs O(seq * w)); FULL blocks skip the mask work. Softmax
statistics are float32. Memory is O(seq * block) forward and backward: the custom VJP keeps only
q, k, v, the output and the per-row logsumexp, and recomputes probabilities block by block.
ALiBi slopes (static floats) add -slope * (query pos - key pos) to the logits of every visit.
Sink logits (one per query head, differentiable) start each row's running max and sum as a key
seen before any block, so the lse residual includes them and the block backward is unchanged;
d sinks is -sum over rows of exp(sink - lse) * rowsum(dO * O).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcm.attention.alibi import alibi_bias
from lcm.attention.layout import FULL, BlockLayout
from lcm.attention.masks import Mask, group_heads
from lcm.kernels.block_sparse.common import row_seen, sink_grad, sink_stats

f32 = jnp.float32


def blockwise_attention(q, k, v, mask: Mask | None, layout: BlockLayout, *, scale: float,
                        softcap: float | None = None,
                        alibi_slopes: tuple[float, ...] | None = None, sinks=None):
    """q [B, T, H, D]; k, v [B, S, K, D]; layout from `mask_layout(mask, T, S, bq, bk)`;
    alibi_slopes: None or H floats (see lcm.attention.alibi); sinks: None or [H] float sink
    logits (see lcm.attention.attend), differentiated."""
    alibi = _static_slopes(alibi_slopes)
    # NumPy layouts become arrays: traced block indices index them.
    layout = jax.tree.map(jnp.asarray, layout)
    K = k.shape[2]
    if sinks is not None:
        sinks = jnp.asarray(sinks).astype(f32).reshape(K, -1)  # [K, G]
    if layout.counts.shape[0] == 1:  # one layout: each key block is visited for all heads at once
        return _flash(q, k, v, mask, layout, None, sinks, scale, softcap, K, alibi)
    # One layout per KV head (per-head masks): map over KV heads, each visiting only its blocks.
    B, T, H, D = q.shape
    qh = q.reshape(B, T, K, H // K, D).transpose(2, 0, 1, 3, 4)
    kh, vh = k.transpose(2, 0, 1, 3)[..., None, :], v.transpose(2, 0, 1, 3)[..., None, :]

    def one_head(args):
        h, q_h, k_h, v_h, lay, sinks_h = args
        return _flash(q_h, k_h, v_h, mask, lay, h, sinks_h, scale, softcap, K, alibi)

    per_head = jax.tree.map(lambda x: x[:, None], layout)  # [K, 1, ...]: Lh = 1 inside the map
    sinks_h = None if sinks is None else sinks[:, None]  # [K, 1, G]
    out = lax.map(one_head, (jnp.arange(K), qh, kh, vh, per_head, sinks_h))  # [K, B, T, G, D]
    return out.transpose(1, 2, 0, 3, 4).reshape(B, T, H, D)


def attention_with_lse(q, k, v, mask: Mask | None, layout: BlockLayout, *, scale: float,
                       softcap: float | None = None,
                       alibi_slopes: tuple[float, ...] | None = None):
    """Forward only, for callers that merge several passes (e.g. Self-Extend, ReRoPE).

    Returns (out [B, T, H, D], lse [B, T, H, 1] float32; +inf for rows that see no key). Uses the
    layout's union over heads. Differentiate the merged result with `attention_backward`.
    """
    layout = jax.tree.map(jnp.asarray, layout.shared())
    out, lse = _forward(q, k, v, mask, layout, None, None, scale, softcap, k.shape[2],
                        _static_slopes(alibi_slopes))
    return out, _from_q_blocks(lse[..., None], q.shape[1])


def attention_backward(q, k, v, mask: Mask | None, layout: BlockLayout, out, lse, d_out, *,
                       scale: float, softcap: float | None = None,
                       alibi_slopes: tuple[float, ...] | None = None):
    """(dq, dk, dv) of a pass whose softmax normaliser is `lse` [B, T, H, 1] and whose (possibly
    merged) output is `out`: with the merged lse and output, each pass's backward gives its
    share of the gradient of the merged softmax."""
    layout = jax.tree.map(jnp.asarray, layout.shared())
    K = k.shape[2]
    lse_b = _q_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), layout.geom, K)[..., 0]
    lse_b = jnp.where(_q_blocks(jnp.isposinf(lse), layout.geom, K)[..., 0], jnp.inf, lse_b)
    return _flash_bwd(scale, softcap, K, _static_slopes(alibi_slopes),
                      (q, k, v, mask, layout, None, None, out, lse_b), d_out)[:3]


def _static_slopes(alibi_slopes):
    return None if alibi_slopes is None else tuple(float(x) for x in alibi_slopes)


def _q_blocks(x, geom, num_kv_heads):
    """[B, T, H, D] -> [nq, B, K, G, bq, D], zero-padded to whole blocks."""
    B, T, H, D = x.shape
    nq, bq = geom.num_q_blocks, geom.block_q
    x = jnp.pad(x, ((0, 0), (0, nq * bq - T), (0, 0), (0, 0)))
    x = x.reshape(B, nq, bq, num_kv_heads, H // num_kv_heads, D)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _from_q_blocks(x, T):
    """[nq, B, K, G, bq, D] -> [B, T, H, D]."""
    nq, B, K, G, bq, D = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, D)[:, :T]


def _kv_padded(x, geom):
    """[B, S, K, D] -> [B, K, nk*bk, D], zero-padded to whole blocks."""
    pad = geom.num_k_blocks * geom.block_k - x.shape[1]
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _scores(q_blk, k_blk, scale, softcap):
    """Logits of one block pair, float32 [B, K, G, bq, bk], and tanh(raw/softcap) for backward."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=f32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _bias(alibi, i, j, geom, head, num_kv_heads):
    """The ALiBi bias of block (i, j), float32 [1, K|1, G, bq, bk]."""
    slopes = jnp.asarray(alibi, f32).reshape(num_kv_heads, -1)
    if head is not None:  # inside the map over KV heads: this head's group only
        slopes = lax.dynamic_slice_in_dim(slopes, head, 1, axis=0)
    q_pos = i * geom.block_q + jnp.arange(geom.block_q)[:, None] + geom.offset
    k_pos = j * geom.block_k + jnp.arange(geom.block_k)[None, :]
    return alibi_bias(slopes[None, :, :, None, None], q_pos, k_pos)


def _biased(s, alibi, i, j, geom, head, num_kv_heads):
    """s [B, K|1, G, bq, bk] plus the ALiBi bias of block (i, j); unchanged without slopes."""
    if alibi is None:
        return s
    return s + _bias(alibi, i, j, geom, head, num_kv_heads)


def _masked(s, kind, mask, i, j, geom, head, num_kv_heads):
    """Hides invisible pairs of a PARTIAL block with -inf; FULL blocks pass through untouched."""
    return lax.cond(kind == FULL, lambda s: s,
                    lambda s: apply_mask(s, mask, i, j, geom, head, num_kv_heads), s)


def _visible(mask, i, j, geom, head, num_kv_heads):
    """bool [B|1, K|1, G|1, bq, bk]: the visible pairs of block (i, j) (keys past kv_len hidden)."""
    q_idx = i * geom.block_q + jnp.arange(geom.block_q)
    k_idx = j * geom.block_k + jnp.arange(geom.block_k)
    vis = (k_idx < geom.kv_len)[None, None, None, None, :]
    if mask is not None:
        m = group_heads(mask.visible(q_idx, k_idx, geom.offset), num_kv_heads)
        if head is not None and m.shape[1] > 1:  # keep this KV head's row of the mask
            m = lax.dynamic_slice_in_dim(m, head, 1, axis=1)
        vis = vis & m
    return vis


def apply_mask(s, mask, i, j, geom, head, num_kv_heads):
    """s [B, K, G, bq, bk] with the invisible pairs of block (i, j) set to -inf."""
    return jnp.where(_visible(mask, i, j, geom, head, num_kv_heads), s, -jnp.inf)


def block_grads(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, *, kind, mask, i, j, geom,
                head, num_kv_heads, scale, softcap, alibi=None):
    """One visited block pair's share of the gradient: (dq [B, K, G, bq, D], dk, dv
    [B, K, bk, D]), float32. q_blk, do_blk [B, K, G, bq, D]; k_blk, v_blk [B, K, bk, D];
    lse_blk (+inf: the row saw nothing) and delta_blk [B, K, G, bq] float32; `kind` the visit's
    block kind (FULL skips the mask work).

    Key-major: the probabilities P and dS are laid out [B, K, bk, G, bq], so dV = P dO,
    dK = dS Q and dQ^T = K^T dS are plain matmuls over the block (only [.., D]-sized operands
    and results are transposed). Query-major, XLA materialised transposed copies of P and dS:
    five block-sized buffers live at once instead of three. The logits are computed inside the
    kind branch (a block-sized cond operand would be copied into the branch)."""
    def key_major(x):  # [.., G, bq, bk] -> [.., bk, G, bq]
        return jnp.moveaxis(x, -1, 2)

    def probs(partial):
        s = _dot(k_blk, q_blk, 3, 4) * scale  # [B, K, bk, G, bq]
        tanh = None
        if softcap is not None:
            tanh = jnp.tanh(s / softcap)
            s = softcap * tanh
        if alibi is not None:
            s = s + key_major(_bias(alibi, i, j, geom, head, num_kv_heads))
        if partial:
            s = jnp.where(key_major(_visible(mask, i, j, geom, head, num_kv_heads)), s, -jnp.inf)
        return jnp.exp(s - lse_blk[:, :, None]), tanh

    p, tanh = lax.cond(kind == FULL, lambda: probs(False), lambda: probs(True))
    dv = _dot(p.astype(do_blk.dtype), do_blk, (3, 4), (2, 3))
    ds = p * (_dot(v_blk, do_blk, 3, 4) - delta_blk[:, :, None])
    if softcap is not None:
        ds = ds * (1.0 - tanh * tanh)
    ds = ds * scale
    dk = _dot(ds.astype(q_blk.dtype), q_blk, (3, 4), (2, 3))
    # dQ^T [B, K, D, G, bq] from an explicit K^T [B, K, D, bk] (the barrier keeps XLA from
    # folding the transpose into the dot: XLA:CPU runs a dot that contracts a non-minor lhs
    # axis on a fallback that lacks bfloat16 x bfloat16 -> float32).
    k_t = lax.optimization_barrier(jnp.swapaxes(k_blk, 2, 3))
    dq = _dot(k_t, ds.astype(k_blk.dtype), 3, 2)
    return jnp.moveaxis(dq, 2, -1), dk, dv


def _dot(a, b, a_contract, b_contract):
    """Batched over the two leading axes (B, K), float32 accumulation: a's free axes, then b's."""
    a_contract = (a_contract,) if isinstance(a_contract, int) else a_contract
    b_contract = (b_contract,) if isinstance(b_contract, int) else b_contract
    return lax.dot_general(a, b, ((a_contract, b_contract), ((0, 1), (0, 1))),
                           preferred_element_type=f32)


def _kv_block(x, j, geom):
    return lax.dynamic_slice_in_dim(x, j * geom.block_k, geom.block_k, axis=2)


def _forward(q, k, v, mask, layout, head, sinks, scale, softcap, num_kv_heads, alibi):
    """(out [B, T, H, D], lse [nq, B, K, G, bq] float32). sinks: None or [K, G] float32 (the
    K of q, k, v here: 1 inside the map over KV heads)."""
    geom = layout.geom
    K = k.shape[2]
    qb = _q_blocks(q, geom, K)
    kp, vp = _kv_padded(k, geom), _kv_padded(v, geom)

    def row(args):
        i, q_blk = args

        def visit(t, carry):
            m, denom, acc = carry
            j = layout.kv_blocks[0, i, t]
            s, _ = _scores(q_blk, _kv_block(kp, j, geom), scale, softcap)
            s = _biased(s, alibi, i, j, geom, head, num_kv_heads)
            s = _masked(s, layout.visit_kinds[0, i, t], mask, i, j, geom, head, num_kv_heads)
            m_new = jnp.maximum(m, s.max(-1))
            # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), _kv_block(vp, j, geom),
                            preferred_element_type=f32)
            return m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + pv

        stats_shape = q_blk.shape[:-1]  # [B, K, G, bq]
        init = (*sink_stats(None if sinks is None else sinks[None, :, :, None], stats_shape),
                jnp.zeros(q_blk.shape, f32))
        m, denom, acc = lax.fori_loop(0, layout.counts[0, i], visit, init)
        seen = row_seen(m)  # not denom > 0: NaN logits must give NaN rows, not zeros
        out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
        # +inf for rows that saw nothing: backward's exp(s - lse) is then 0, not NaN.
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    out_blocks, lse = lax.map(row, (jnp.arange(geom.num_q_blocks), qb))
    return _from_q_blocks(out_blocks, q.shape[1]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, mask, layout, head, sinks, scale, softcap, num_kv_heads, alibi):
    """`head`: None, or the KV head (int32) whose slice of a per-head mask q, k, v hold;
    `sinks`: None or [K, G] float32 sink logits of these heads."""
    return _forward(q, k, v, mask, layout, head, sinks, scale, softcap, num_kv_heads, alibi)[0]


def _flash_fwd(q, k, v, mask, layout, head, sinks, scale, softcap, num_kv_heads, alibi):
    out, lse = _forward(q, k, v, mask, layout, head, sinks, scale, softcap, num_kv_heads, alibi)
    return out, (q, k, v, mask, layout, head, sinks, out, lse)


def _flash_bwd(scale, softcap, num_kv_heads, alibi, residuals, d_out):
    q, k, v, mask, layout, head, sinks, out, lse = residuals
    geom = layout.geom
    K = k.shape[2]
    qb, dob = _q_blocks(q, geom, K), _q_blocks(d_out, geom, K)
    delta = jnp.sum(dob.astype(f32) * _q_blocks(out, geom, K).astype(f32), axis=-1)
    kp, vp = _kv_padded(k, geom), _kv_padded(v, geom)

    def row(carry, xs):
        i, q_blk, do_blk, lse_blk, delta_blk = xs

        def visit(t, c):
            dq, dk_acc, dv_acc = c
            j = layout.kv_blocks[0, i, t]
            dq_j, dk, dv = block_grads(
                q_blk, _kv_block(kp, j, geom), _kv_block(vp, j, geom), do_blk, lse_blk,
                delta_blk, kind=layout.visit_kinds[0, i, t], mask=mask, i=i, j=j, geom=geom,
                head=head, num_kv_heads=num_kv_heads, scale=scale, softcap=softcap, alibi=alibi)
            dq = dq + dq_j
            start = j * geom.block_k
            dk_acc = lax.dynamic_update_slice_in_dim(
                dk_acc, _kv_block(dk_acc, j, geom) + dk, start, axis=2)
            dv_acc = lax.dynamic_update_slice_in_dim(
                dv_acc, _kv_block(dv_acc, j, geom) + dv, start, axis=2)
            return dq, dk_acc, dv_acc

        dq, dk_acc, dv_acc = lax.fori_loop(0, layout.counts[0, i], visit,
                                           (jnp.zeros(q_blk.shape, f32),) + carry)
        return (dk_acc, dv_acc), dq

    init = (jnp.zeros(kp.shape, f32), jnp.zeros(vp.shape, f32))
    xs = (jnp.arange(geom.num_q_blocks), qb, dob, lse, delta)
    (dk, dv), dq = lax.scan(row, init, xs)
    S = k.shape[1]
    dq = _from_q_blocks(dq, q.shape[1]).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3)[:, :S].astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3)[:, :S].astype(v.dtype)
    # lse [nq, B, K, G, bq] includes the sink; padded rows have dO = 0, so delta = 0 there.
    d_sinks = None if sinks is None else sink_grad(sinks[None, None, :, :, None], lse, delta,
                                                   axis=(0, 1, 4))
    return dq, dk, dv, None, None, None, d_sinks


_flash.defvjp(_flash_fwd, _flash_bwd)
