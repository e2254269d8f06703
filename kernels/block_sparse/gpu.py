"""Block-sparse flash attention for GPUs: Pallas kernels for the Triton backend (interpret on CPU).

Forward: one program per (query block i, batch b, query head h) loads its q block once and walks
the key blocks its layout lists, kv_blocks[i, :counts[i]] (a `fori_loop` with a dynamic trip
count, so a layout computed inside `jit` drives the same compiled kernel), with an online softmax
in float32. Only PARTIAL blocks evaluate `mask_fn`; keys past kv_len are always hidden. Rows that
see no key get out = 0 and lse = +inf, so backward's exp(s - lse) is 0 there, never NaN.

Backward recomputes probabilities from the lse residual: a dQ kernel over the same row layout,
and a dK/dV kernel over the transposed layout (per key block, the query blocks that visit it);
each dK/dV program for KV head k also loops over the G query heads that share it, so grouped
heads accumulate in registers with no atomics and K/V are never repeated.

The Triton backend has no scalar prefetch: layouts are ordinary inputs and the kernels read
scalars from them (kinds[i, j], kv_blocks[i, t], counts[i]); tensors are power-of-two blocks.
ALiBi slopes are one more input, read as a scalar per query head; the bias is built from iotas.
Sink logits are read the same way by the forward alone: they start each row's running max and
sum, so lse includes them, the backward kernels are unchanged, and d sinks is a sum over the
rows' statistics outside the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .common import alibi_bias, pad_axis, row_seen, sink_grad, sink_stats
from .gpu_checks import defaults, GpuParams, prepare
from .layout import FULL, PARTIAL, SKIP, transpose_visits

f32 = jnp.float32

def block_sparse_attention_gpu(q, k, v, *, kinds=None, kv_blocks, counts, mask_fn=None,
                               q_segment_ids=None, kv_segment_ids=None, scale, softcap=None,
                               block_q=64, block_k=64, num_warps=None, num_stages=None,
                               interpret=False, alibi_slopes=None, mask_tables=None,
                               visit_kinds=None, sinks=None):
    """softmax(q k^T * scale) v over a block layout. q [B, T, H, D]; k, v [B, S, K, D]; H % K == 0.

    kv_blocks int32 [Lh, nq, max_visits], counts int32 [Lh, nq] and either visit_kinds int32
    [Lh, nq, max_visits] (compressed) or the dense kinds int32 [Lh, nq, nk] (see layout.py),
    Lh in {1, K}, nq = ceil(T / block_q), nk = ceil(S / block_k); they may be traced.
    Backward walks the transpose of exactly the blocks the forward visited. mask_fn follows
    reference.py's protocol; segment ids [B, T] / [B, S] only reach mask_fn. Returns [B, T, H, D] in
    q's dtype; rows with no visible key are zeros. alibi_slopes: None or H concrete floats, the
    bias -slope_h * (i + S - T - j) after soft-capping (reference.py); not differentiated.
    mask_tables: None or a tuple of 1-D int arrays (may be traced) read by a head-aware mask_fn
    (reference.py); each program passes its own query head. sinks: None, or [H] float sink
    logits (may be traced; differentiated): each row's softmax gets one more logit sinks[h]
    whose value vector is zero.
    """
    p, segs, layout, tables, sinks = prepare(q, k, v, kinds, kv_blocks, counts, mask_fn,
                                              q_segment_ids, kv_segment_ids, scale, softcap,
                                              block_q, block_k, num_warps, num_stages, interpret,
                                              alibi_slopes, mask_tables, visit_kinds, sinks)
    return _attention(p, q, k, v, segs, layout, tables, sinks)


def block_sparse_attention_gpu_fwd(q, k, v, **kwargs):
    """Forward only, for callers that merge several passes (Self-Extend, ReRoPE, rings):
    (out [B, T, H, D], lse [B, T, H] float32, +inf on rows that see no key). Arguments as
    `block_sparse_attention_gpu`; with sinks, lse includes them (finite on every row).
    Differentiate merged results with `..._gpu_bwd` (and d sinks with common.sink_grad)."""
    p, segs, layout, tables, sinks = prepare(q, k, v, **defaults(kwargs))
    out, lse = _forward(p, q, k, v, segs, layout, tables, sinks)
    return out, lse[:, :, :q.shape[1]].transpose(0, 2, 1)


def block_sparse_attention_gpu_bwd(q, k, v, out, lse, d_out, **kwargs):
    """(dq, dk, dv) of a pass whose softmax normaliser is lse [B, T, H] (+inf: row sees
    nothing) and whose output is `out` [B, T, H, D]: with a merged output and logsumexp, each
    pass's backward gives its share of the merged softmax's gradient. Takes no sinks: a sink
    enters through lse (d sinks: common.sink_grad of the merged lse)."""
    if kwargs.get("sinks") is not None:
        raise ValueError("sinks= is not an argument of the backward: pass the lse that includes "
                         "the sinks; their gradient is common.sink_grad(sinks, lse, delta)")
    p, segs, layout, tables, _ = prepare(q, k, v, **defaults(kwargs))
    Tp = -(-p.q_len // p.block_q) * p.block_q
    lse = jnp.pad(jnp.asarray(lse, f32).transpose(0, 2, 1), ((0, 0), (0, 0), (0, Tp - p.q_len)),
                  constant_values=jnp.inf)
    return _backward(p, q, k, v, segs, layout, tables, out, lse, d_out)



# ----------------------------------------------------------------------------- in-kernel math


def _dot(a, b, contract):
    """a @ b contracting dims `contract`, float32 accumulation; f32 inputs stay IEEE f32."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=f32,
                           precision=precision)


def _logits(q, k, p: GpuParams):
    """q [bq, D] . k [bk, D] -> float32 [bq, bk] scaled (and soft-capped), plus tanh for bwd."""
    s = _dot(q, k, ((1,), (1,))) * p.scale
    if p.softcap is None:
        return s, None
    t = jnp.tanh(s / p.softcap)
    return p.softcap * t, t


def _biased(s, slopes_ref, head, i, j, p: GpuParams):
    """s plus the ALiBi bias of query block i, key block j for query head `head`."""
    if slopes_ref is None:
        return s
    q_pos = i * p.block_q + lax.broadcasted_iota(jnp.int32, (p.block_q, 1), 0)
    k_pos = j * p.block_k + lax.broadcasted_iota(jnp.int32, (1, p.block_k), 1)
    return s + alibi_bias(slopes_ref[head], q_pos + (p.kv_len - p.q_len), k_pos)


def _optional_refs(refs, p: GpuParams, num_out):
    """(q_seg_ref, kv_seg_ref, slopes_ref, mask tables, outputs) from the refs after the fixed
    inputs."""
    segs, rest = ((refs[0], refs[1]), refs[2:]) if p.segments else ((None, None), refs)
    slopes, rest = (rest[0], rest[1:]) if p.alibi is not None else (None, rest)
    tables, rest = tuple(rest[:p.n_tables]), rest[p.n_tables:]
    assert len(rest) == num_out  # internal invariant of the pallas_call wiring
    return (*segs, slopes, tables, rest)


def _masked(s, kind, i, j, q_seg, k_seg, p: GpuParams, head, tables):
    """Hides invisible pairs with -inf: mask_fn on non-FULL blocks, keys >= kv_len always.
    A head-aware mask_fn (p.n_tables > 0) gets the query head, the tables and the block origin."""
    bq, bk = p.block_q, p.block_k
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    if p.mask_fn is not None:
        def apply(s):
            q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            extra = (head, tables, i * bq, j * bk) if p.n_tables else ()
            vis = jnp.broadcast_to(p.mask_fn(q_idx, k_idx, q_seg, k_seg, *extra), (bq, bk))
            return jnp.where(vis, s, -jnp.inf)

        # FULL blocks skip the mask work; a listed SKIP block is masked like PARTIAL.
        s = lax.cond(kind == FULL, lambda s: s, apply, s)
    if p.kv_len % bk:  # only the last key block has padding, but the compare is cheap
        s = jnp.where(jnp.broadcast_to(k_idx < p.kv_len, (bq, bk)), s, -jnp.inf)
    return s


def _fwd_kernel(kinds_ref, kv_blocks_ref, counts_ref, q_ref, k_ref, v_ref, *refs, p: GpuParams):
    q_seg_ref, kv_seg_ref, slopes_ref, tables, rest = _optional_refs(refs, p, 3 if p.sinks else 2)
    sinks_ref, (out_ref, lse_ref) = (rest[0], rest[1:]) if p.sinks else (None, rest)
    bq, bk = p.block_q, p.block_k
    i, h = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]                                             # [bq, D]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    def visit(t, carry):
        m, l, acc = carry
        j = kv_blocks_ref[i, t]
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_seg = None if kv_seg_ref is None else kv_seg_ref[keys][None, :]
        s, _ = _logits(q, k_ref[keys, :], p)
        s = _biased(s, slopes_ref, h, i, j, p)
        s = _masked(s, kinds_ref[i, t], i, j, q_seg, k_seg, p, h, tables)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        pr = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + _dot(pr.astype(v.dtype), v, ((1,), (0,)))
        return m_new, alpha * l + jnp.sum(pr, axis=1), acc

    # A sink is the first key every row sees.
    init = (*sink_stats(None if sinks_ref is None else sinks_ref[h], (bq,)),
            jnp.zeros(q.shape, f32))
    m, l, acc = lax.fori_loop(0, counts_ref[i], visit, init)
    seen = row_seen(m)
    l_safe = jnp.where(seen, l, 1.0)
    out_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def _dq_kernel(kinds_ref, kv_blocks_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, p: GpuParams):
    q_seg_ref, kv_seg_ref, slopes_ref, tables, (dq_ref,) = _optional_refs(refs, p, 1)
    bk = p.block_k
    i, h = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    def visit(t, dq):
        j = kv_blocks_ref[i, t]
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_seg = None if kv_seg_ref is None else kv_seg_ref[keys][None, :]
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, tanh = _logits(q, k, p)
        s = _biased(s, slopes_ref, h, i, j, p)
        s = _masked(s, kinds_ref[i, t], i, j, q_seg, k_seg, p, h, tables)
        ds = _dlogits(s, tanh, lse, delta, _dot(do, v, ((1,), (1,))), p)
        return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    dq = lax.fori_loop(0, counts_ref[i], visit, jnp.zeros(q.shape, f32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dlogits(s, tanh, lse, delta, dp, p: GpuParams):
    """dL/d(q k^T) of one block from p = exp(s - lse); lse = +inf rows give exactly 0."""
    ds = jnp.exp(s - lse) * (dp - delta)
    if p.softcap is not None:
        ds = ds * (1.0 - tanh * tanh)
    return ds * p.scale


def _dkdv_kernel(kinds_t_ref, q_blocks_ref, counts_t_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, *refs, p: GpuParams):
    q_seg_ref, kv_seg_ref, slopes_ref, tables, (dk_ref, dv_ref) = _optional_refs(refs, p, 2)
    bq = p.block_q
    j, kv_head = pl.program_id(0), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]                              # [bk, D]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[...][None, :]
    count = counts_t_ref[j]

    def head(g, carry):
        def visit(t, carry):
            dk, dv = carry
            i = q_blocks_ref[j, t]
            rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]      # [bq, D]
            q_seg = None if q_seg_ref is None else q_seg_ref[rows][:, None]
            s, tanh = _logits(q, k, p)
            s = _biased(s, slopes_ref, kv_head * p.group + g, i, j, p)
            s = _masked(s, kinds_t_ref[j, t], i, j, q_seg, k_seg, p, kv_head * p.group + g,
                        tables)
            lse, delta = lse_ref[g, rows][:, None], delta_ref[g, rows][:, None]
            pr = jnp.exp(s - lse)
            dv = dv + _dot(pr.astype(do.dtype), do, ((0,), (0,)))
            ds = _dlogits(s, tanh, lse, delta, _dot(do, v, ((1,), (1,))), p)
            return dk + _dot(ds.astype(q.dtype), q, ((0,), (0,))), dv

        return lax.fori_loop(0, count, visit, carry)

    zeros = jnp.zeros(k.shape, f32)
    dk, dv = lax.fori_loop(0, p.group, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _head_dim(D):
    return max(16, pl.next_power_of_2(D))  # tl.dot tiles: power of two, at least 16


def _compiler_params(p: GpuParams, head_dim):
    num_warps = p.num_warps
    if num_warps is None:
        num_warps = 4 if head_dim <= 64 and p.block_q * p.block_k <= 64 * 64 else 8
    num_stages = 2 if p.num_stages is None else p.num_stages
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _layout_specs(p: GpuParams, rows, visits):
    """Specs for visit kinds, visits, counts of one layout head: h // group when per KV head,
    else 0."""
    def lh(h):
        return lax.div(h, p.group) if p.per_head_layout else 0

    return [pl.BlockSpec((None, rows, visits), lambda x, b, h: (lh(h), 0, 0)),
            pl.BlockSpec((None, rows, visits), lambda x, b, h: (lh(h), 0, 0)),
            pl.BlockSpec((None, rows), lambda x, b, h: (lh(h), 0))]


def _row_specs(p: GpuParams, Sp, Dp):
    """Specs for a (query block i, batch b, head h) grid: q-like, whole K/V, per-row, segments."""
    bq, G = p.block_q, p.group
    q_spec = pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    seg_specs = [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0))] if p.segments else []
    return q_spec, kv_spec, row_spec, seg_specs + _slopes_specs(p)


def _table_specs(tables):
    """Each (power-of-two padded) mask table whole, for every program."""
    return [pl.BlockSpec(t.shape, lambda *_: (0,)) for t in tables]


def _padded_tables(tables):
    """Triton blocks are powers of two: pad each table (its padding is never read)."""
    return [pad_axis(t, 0, max(16, pl.next_power_of_2(t.shape[0]))) for t in tables]


def _slopes_specs(p: GpuParams):
    """The whole (padded) slopes vector for every program, when ALiBi is on."""
    if p.alibi is None:
        return []
    return [pl.BlockSpec((_slopes_length(p),), lambda *_: (0,))]


def _slopes_length(p: GpuParams):
    return max(16, pl.next_power_of_2(len(p.alibi)))  # Triton blocks: powers of two


def _clipped(layout, p: GpuParams):
    """Out-of-range entries would read outside K/V on a GPU; clip them instead of faulting."""
    kinds, kv_blocks, counts = layout
    return (kinds, jnp.clip(kv_blocks, 0, -(-p.kv_len // p.block_k) - 1),
            jnp.clip(counts, 0, kv_blocks.shape[-1]))


def _padded_inputs(p: GpuParams, q, k, v, segs):
    """Zero-pads T, S to whole blocks and D to a power of two; pads segment ids with -1."""
    Tp = -(-p.q_len // p.block_q) * p.block_q
    Sp = -(-p.kv_len // p.block_k) * p.block_k
    Dp = _head_dim(q.shape[-1])
    q = pad_axis(pad_axis(q, 1, Tp), 3, Dp)
    k = pad_axis(pad_axis(k, 1, Sp), 3, Dp)
    v = pad_axis(pad_axis(v, 1, Sp), 3, Dp)
    seg_args = []
    if p.segments:
        q_seg, kv_seg = segs
        seg_args = [jnp.pad(q_seg, ((0, 0), (0, Tp - p.q_len)), constant_values=-1),
                    jnp.pad(kv_seg, ((0, 0), (0, Sp - p.kv_len)), constant_values=-1)]
    if p.alibi is not None:  # slopes travel with the segment ids (after them)
        seg_args.append(pad_axis(jnp.asarray(p.alibi, f32), 0, _slopes_length(p)))
    return q, k, v, seg_args


def _forward(p: GpuParams, q, k, v, segs, layout, tables, sinks=None):
    """(out [B, T, H, D], lse float32 [B, H, Tp]); sinks: None or float32 [H]."""
    kinds, kv_blocks, counts = _clipped(layout, p)
    tables = _padded_tables(tables)
    B, T, H, D = q.shape
    qp, kp, vp, seg_args = _padded_inputs(p, q, k, v, segs)
    Tp, Sp, Dp = qp.shape[1], kp.shape[1], qp.shape[3]
    nq = kv_blocks.shape[1]
    q_spec, kv_spec, row_spec, seg_specs = _row_specs(p, Sp, Dp)
    sink_args, sink_specs = [], []
    if sinks is not None:  # the whole (power-of-two padded) vector, after the tables
        sink_args = [pad_axis(sinks, 0, max(16, pl.next_power_of_2(H)))]
        sink_specs = [pl.BlockSpec(sink_args[0].shape, lambda *_: (0,))]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid=(nq, B, H),
        in_specs=[*_layout_specs(p, nq, kv_blocks.shape[-1]), q_spec, kv_spec, kv_spec,
                  *seg_specs, *_table_specs(tables), *sink_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), f32)],
        compiler_params=_compiler_params(p, Dp),
        interpret=p.interpret,
        name="block_sparse_fwd",
    )(kinds, kv_blocks, counts, qp, kp, vp, *seg_args, *tables, *sink_args)
    return out[:, :T, :, :D], lse


def _visited_kinds(kinds, counts):
    """The kinds of the visits the forward really made: a real visit listed as SKIP was masked
    like PARTIAL, so it becomes PARTIAL (backward then matches the forward)."""
    real = jnp.arange(kinds.shape[-1], dtype=jnp.int32)[None, None, :] < counts[:, :, None]
    return jnp.where(real, jnp.maximum(kinds, PARTIAL), SKIP)


def _backward(p: GpuParams, q, k, v, segs, layout, tables, out, lse, d_out):
    kinds, kv_blocks, counts = _clipped(layout, p)
    tables = _padded_tables(tables)
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qp, kp, vp, seg_args = _padded_inputs(p, q, k, v, segs)
    Tp, Sp, Dp = qp.shape[1], kp.shape[1], qp.shape[3]
    dop = pad_axis(pad_axis(d_out, 1, Tp), 3, Dp)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=3)     # [B, T, H]
    delta = pad_axis(delta.transpose(0, 2, 1), 2, Tp)                # [B, H, Tp]
    bk, G = p.block_k, p.group
    nq, nk = kv_blocks.shape[1], -(-S // bk)
    params = _compiler_params(p, Dp)

    # dQ: the forward's grid and row layout.
    q_spec, kv_spec, row_spec, seg_specs = _row_specs(p, Sp, Dp)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        grid=(nq, B, H),
        in_specs=[*_layout_specs(p, nq, kv_blocks.shape[-1]), q_spec, kv_spec, kv_spec,
                  q_spec, row_spec, row_spec, *seg_specs, *_table_specs(tables)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=p.interpret,
        name="block_sparse_dq",
    )(kinds, kv_blocks, counts, qp, kp, vp, dop, lse, delta, *seg_args, *tables)

    # dK/dV: per key block j and KV head, the query blocks (of all G heads) that visit it.
    q_blocks, kinds_t, counts_t = transpose_visits(kv_blocks, _visited_kinds(kinds, counts),
                                                   counts, nk)
    heads_spec = pl.BlockSpec((None, Tp, None, G, Dp), lambda j, b, h: (b, 0, h, 0, 0))
    kblock_spec = pl.BlockSpec((None, bk, None, Dp), lambda j, b, h: (b, j, h, 0))
    stats_spec = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
    seg_specs = [pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0)),
                 pl.BlockSpec((None, bk), lambda j, b, h: (b, j))] if p.segments else []
    seg_specs += _slopes_specs(p)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, p=p),
        grid=(nk, B, K),
        # transposed layouts are per KV head already, so the head map is the identity
        in_specs=[*_layout_specs(dataclasses.replace(p, group=1), nk, q_blocks.shape[-1]),
                  heads_spec, kblock_spec, kblock_spec, heads_spec, stats_spec, stats_spec,
                  *seg_specs, *_table_specs(tables)],
        out_specs=[kblock_spec, kblock_spec],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params,
        interpret=p.interpret,
        name="block_sparse_dkdv",
    )(kinds_t, q_blocks, counts_t, qp.reshape(B, Tp, K, G, Dp), kp, vp,
      dop.reshape(B, Tp, K, G, Dp), lse.reshape(B, K, G, Tp), delta.reshape(B, K, G, Tp),
      *seg_args, *tables)
    return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(p, q, k, v, segs, layout, tables, sinks):
    return _forward(p, q, k, v, segs, layout, tables, sinks)[0]


def _flash_fwd(p, q, k, v, segs, layout, tables, sinks):
    out, lse = _forward(p, q, k, v, segs, layout, tables, sinks)
    return out, (q, k, v, segs, layout, tables, sinks, out, lse)


def _flash_bwd(p, residuals, d_out):
    q, k, v, segs, layout, tables, sinks, out, lse = residuals
    dq, dk, dv = _backward(p, q, k, v, segs, layout, tables, out, lse, d_out)
    d_sinks = None
    if sinks is not None:  # lse [B, H, Tp] includes the sinks
        delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [B, T, H]
        d_sinks = sink_grad(sinks, lse[:, :, :p.q_len].transpose(0, 2, 1), delta, axis=(0, 1))
    return dq, dk, dv, None, None, None, d_sinks


_flash.defvjp(_flash_fwd, _flash_bwd)
# jit with the static parameters so eager calls reuse one compilation per configuration.
_attention = jax.jit(_flash, static_argnums=0)
