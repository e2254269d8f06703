"""Block-sparse flash attention for TPU (Pallas Mosaic); runs interpreted on CPU.

The block layout (kernels/block_sparse/layout.py) is scalar-prefetched into SMEM, so index maps
pick which K/V block each grid step DMAs: a layout computed inside `jit` drives the same compiled
kernel. The query heads of one KV group share each K/V fetch: a grid step holds the q block of all
G heads, [G, block_q, D], flattened to [G * block_q, D] for the matmuls.

    forward, dQ  grid (B, K, nq, max_visits)    step t visits key block kv_blocks[h, i, t]
    dK/dV        grid (B, K, nk, max_q_visits)  step t visits query block q_blocks[h, j, t]

Steps past a row's count repeat the previous block index (no new DMA) and skip the body. FULL
blocks skip the mask work; PARTIAL ones evaluate `mask_fn` in-kernel (reference.py's protocol)
and hide keys past kv_len. Softmax statistics and gradient accumulators are float32 VMEM scratch.
ALiBi slopes arrive as a [G, 1, 1] VMEM block per KV head; the bias is built per block from iotas.
Sink logits arrive the same way, for the forward only: they start each row's running max and sum
(as splash attention does), so the lse residual includes them, the backward kernels are unchanged
and d sinks is a sum over the rows' statistics outside the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import (
    alibi_bias,
    cap_logits,
    f32,
    finish_softmax,
    logit_grad,
    num_blocks,
    online_softmax_step,
    pad_axis,
    sink_grad,
    sink_stats,
)
from .layout import FULL, transpose_visits
from .tpu_checks import check_inputs, defaults, prepare

_LANES = 128  # TPU vreg lanes: the minor-dim tile, and the width of the m/l scratch rows.
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_PARALLEL4 = (pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)




def block_sparse_attention_tpu(q, k, v, *, kinds=None, kv_blocks, counts, mask_fn=None,
                               q_segment_ids=None, kv_segment_ids=None, scale, softcap=None,
                               block_q=128, block_k=128, interpret=False, max_q_visits=None,
                               alibi_slopes=None, mask_tables=None, visit_kinds=None,
                               sinks=None):
    """Attention over a block layout. q [B, T, H, D]; k, v [B, S, K, D]; H % K == 0.

    kv_blocks [Lh, nq, max_visits], counts [Lh, nq] and either visit_kinds [Lh, nq, max_visits]
    (the compressed layout) or the dense kinds [Lh, nq, nk], int32 (layout.py), with Lh 1 or K,
    nq = ceil(T / block_q), nk = ceil(S / block_k); they may be traced. The kernels only ever
    take the visit lists: backward transposes them without a dense grid (O(visits)). mask_fn follows
    reference.py's protocol and may capture no array (a Pallas kernel takes none): runtime data
    reaches it as q_seg / k_seg, from q_segment_ids [B or 1, T] / kv_segment_ids [B or 1, S].
    max_q_visits (static) bounds the query blocks that visit one key block (the dK/dV grid);
    default: exact when the layout is concrete, else nq. A bound that is too small drops gradients.
    interpret: False on TPU; True or pltpu.InterpretParams() on CPU. Returns [B, T, H, D] in q's
    dtype; rows that see no key are zeros. Differentiable w.r.t. q, k, v (and sinks).

    The layout is prefetched into SMEM as Lh * nq * (max_visits + 1) int32 words (the dK/dV
    kernel: Lh * nk * (max_q_visits + 1)); SMEM is 1 MiB on v5e, so at very long lengths use
    larger blocks or a layout with fewer visits per row.

    alibi_slopes: None or H concrete floats; adds -slope_h * (i + S - T - j) to the logits of
    query row i and key j after soft-capping (reference.py). Slopes are not differentiated.

    mask_tables: None, or a tuple of 1-D int arrays (may be traced) for a head-aware mask_fn
    (reference.py): they are scalar-prefetched into SMEM after the layout, and mask_fn runs once
    per query head of the group on PARTIAL blocks, so each head applies its own mask while the
    group shares the K/V fetch (the layout must then be the union over each group's heads).

    sinks: None, or [H] float sink logits (may be traced; differentiated): each row's softmax
    gets one more logit sinks[h] whose value vector is zero (reference.py).
    """
    st, layout, segs, tables, sinks = prepare(q, k, v, kinds, kv_blocks, counts, mask_fn,
                                               q_segment_ids, kv_segment_ids, scale, softcap,
                                               block_q, block_k, interpret, max_q_visits,
                                               alibi_slopes, mask_tables, visit_kinds, sinks)
    return _attention(st, q, k, v, layout, segs, tables, sinks)


def block_sparse_attention_tpu_fwd(q, k, v, **kwargs):
    """Forward only, for callers that merge several passes (Self-Extend, ReRoPE, rings):
    (out [B, T, H, D], lse [B, T, H] float32, +inf on rows that see no key). Arguments as
    `block_sparse_attention_tpu`; with sinks, lse includes them (finite on every row).
    Differentiate merged results with `..._tpu_bwd` (and d sinks with common.sink_grad)."""
    st, layout, segs, tables, sinks = prepare(q, k, v, **defaults(kwargs))
    out, lse = _forward(st, q, k, v, layout, segs, tables, sinks)
    return out, _from_heads_major(lse, q.shape[1])[..., 0]


def block_sparse_attention_tpu_bwd(q, k, v, out, lse, d_out, **kwargs):
    """(dq, dk, dv) of a pass whose softmax normaliser is lse [B, T, H] (+inf: row sees
    nothing) and whose output is `out` [B, T, H, D]: with a merged output and logsumexp, each
    pass's backward gives its share of the merged softmax's gradient. Takes no sinks: a sink
    enters through lse (d sinks: common.sink_grad of the merged lse)."""
    if kwargs.get("sinks") is not None:
        raise ValueError("sinks= is not an argument of the backward: pass the lse that includes "
                         "the sinks; their gradient is common.sink_grad(sinks, lse, delta)")
    st, layout, segs, tables, _ = prepare(q, k, v, **defaults(kwargs))
    B, T, H, _ = q.shape
    K = k.shape[2]
    Tp = num_blocks(T, st.block_q) * st.block_q
    lse = jnp.pad(jnp.asarray(lse, f32), ((0, 0), (0, Tp - T), (0, 0)), constant_values=jnp.inf)
    lse5 = lse.reshape(B, Tp, K, H // K).transpose(0, 2, 3, 1)[..., None]
    return _backward(st, q, k, v, out, lse5, layout, segs, tables, d_out)



def _to_heads_major(x, K, length):
    """q-like [B, T, H, D] -> [B, K, G, length, D], zero-padded; length is a block multiple."""
    B, _, H, D = x.shape
    x = pad_axis(x, 1, length).reshape(B, length, K, H // K, D)
    return x.transpose(0, 2, 3, 1, 4)


def _from_heads_major(x, T):
    """[B, K, G, Tp, D] -> [B, T, K * G, D]."""
    B, K, G, Tp, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, Tp, K * G, D)[:, :T]


def _kv_heads_major(x, length):
    """[B, S, K, D] -> [B, K, length, D], zero-padded."""
    return pad_axis(x, 1, length).transpose(0, 2, 1, 3)


def _flat_layout(kinds, blocks, counts):
    """Scalar-prefetch operands, flat (1-D arrays pad least in SMEM): each visit packed as
    block << 2 | kind (half the SMEM of two arrays), and the counts. kinds are per visit."""
    kind = jnp.clip(kinds, 0, 3)
    return (jnp.left_shift(blocks, 2) | kind).reshape(-1), counts.reshape(-1)


def _unpack(code):
    """(block, kind) of a packed visit."""
    return jnp.right_shift(code, 2), jnp.bitwise_and(code, 3)


def _row(h, x, n, per_head):
    """Flat index of layout row x (of n) for KV head h."""
    return h * n + x if per_head else x


def _visit(t, row, counts_ref, width):
    """Flat index of visit t of `row`, clamped to the row's last real visit: steps past the count
    repeat the previous block index, so the pipeline issues no new DMA."""
    last = jnp.maximum(counts_ref[row] - 1, 0)
    return row * width + jnp.minimum(t, last)


def _visible(st, i, j, qs_ref, ks_ref, tables, h, G):
    """bool [G or 1, bq, bk]: which pairs of query block i x key block j may attend, for the G
    query heads of KV head h (one shared plane unless the mask is head-aware)."""
    bq, bk = st.block_q, st.block_k
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    vis = jnp.broadcast_to(k_idx < st.kv_len, (bq, bk))
    if st.mask_fn is None:
        return vis[None]
    q_seg = None if qs_ref is None else qs_ref[...]
    k_seg = None if ks_ref is None else ks_ref[...]
    if not st.n_tables:
        return jnp.logical_and(vis, jnp.broadcast_to(st.mask_fn(q_idx, k_idx, q_seg, k_seg),
                                                     (bq, bk)))[None]
    planes = [jnp.broadcast_to(st.mask_fn(q_idx, k_idx, q_seg, k_seg, h * G + g, tables,
                                          i * bq, j * bk), (bq, bk)) for g in range(G)]
    return jnp.logical_and(vis[None], jnp.stack(planes))


def _logits(st, q_ref, k_ref, i, j, qs_ref, ks_ref, slopes_ref, tables, h, masked):
    """(s [G, bq, bk] float32, capped, biased and hidden with -inf, tanh or None) for one
    block pair."""
    G, bq, D = q_ref.shape
    s = lax.dot_general(q_ref[...].reshape(G * bq, D), k_ref[...], _NT,
                        preferred_element_type=f32) * st.scale
    s, tanh = cap_logits(s.reshape(G, bq, st.block_k), st.softcap)
    if slopes_ref is not None:
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0) + (st.kv_len - st.q_len)
        k_pos = j * st.block_k + lax.broadcasted_iota(jnp.int32, (1, st.block_k), 1)
        s = s + alibi_bias(slopes_ref[...], q_pos, k_pos)  # [G, 1, 1] slopes
    if masked:
        s = jnp.where(_visible(st, i, j, qs_ref, ks_ref, tables, h, G), s, -jnp.inf)
    return s, tanh


def _grad_block(st, ins, i, j, segs, masked):
    """(p, ds, dO) of one block pair, flattened to [G * bq, bk|D] rows: p = exp(s - lse) and ds
    the gradient of the (pre-scale) logits q k^T."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    s, tanh = _logits(st, q_ref, k_ref, i, j, *segs, masked)
    p = jnp.exp(s - lse_ref[...])  # lse = +inf on rows that saw nothing: p = 0
    G, bq, bk = s.shape
    do = do_ref[...].reshape(G * bq, -1)
    dp = lax.dot_general(do.astype(v_ref.dtype), v_ref[...], _NT, preferred_element_type=f32)
    ds = logit_grad(p, dp.reshape(G, bq, bk), delta_ref[...], tanh, scale=st.scale,
                    softcap=st.softcap)
    return p.reshape(G * bq, bk), ds.reshape(G * bq, bk), do


def _run_visit(st, active, kind, j, body):
    """Runs body(masked) when the step is real: unmasked for FULL blocks that hold no padding."""
    unmasked = kind == FULL
    if st.kv_len % st.block_k:  # the last key block holds padding keys: always mask it
        unmasked = jnp.logical_and(unmasked, j != num_blocks(st.kv_len, st.block_k) - 1)
    pl.when(jnp.logical_and(active, unmasked))(lambda: body(False))
    pl.when(jnp.logical_and(active, jnp.logical_not(unmasked)))(lambda: body(True))


def _split(refs, n_in, segmented, alibi):
    """(inputs, (qs_ref, ks_ref, slopes_ref), rest) from a kernel's refs after the prefetch
    refs; absent optional inputs are None."""
    ins, rest = refs[:n_in], refs[n_in:]
    segs = (None, None)
    if segmented:
        segs, rest = rest[:2], rest[2:]
    slopes = None
    if alibi:
        slopes, rest = rest[0], rest[1:]
    return ins, (*segs, slopes), rest


def _fwd_kernel(visits_ref, counts_ref, *refs, st, rows, width, segmented):
    tables, refs = refs[:st.n_tables], refs[st.n_tables:]
    (q_ref, k_ref, v_ref), segs, rest = _split(refs, 3, segmented, st.alibi is not None)
    sinks_ref, rest = (rest[0], rest[1:]) if st.sinks else (None, rest)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    segs = (*segs, tables, h)
    row = _row(h, i, rows, st.per_head)

    @pl.when(t == 0)
    def _init():
        # A sink ([G, 1, 1] logits) is the first key every row sees.
        m, l = sink_stats(None if sinks_ref is None else sinks_ref[...], m_ref.shape)
        m_ref[...] = m
        l_ref[...] = l
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    j, kind = _unpack(visits_ref[row * width + t])

    def body(masked):
        s, _ = _logits(st, q_ref, k_ref, i, j, *segs, masked)
        m_next, alpha, p, l_next = online_softmax_step(m_ref[...], l_ref[...], s)
        G, bq, bk = s.shape
        pv = lax.dot_general(p.reshape(G * bq, bk).astype(v_ref.dtype), v_ref[...], _NN,
                             preferred_element_type=f32)
        acc_ref[...] = alpha[..., :1] * acc_ref[...] + pv.reshape(acc_ref.shape)
        m_ref[...] = m_next
        l_ref[...] = l_next

    _run_visit(st, t < counts_ref[row], kind, j, body)

    @pl.when(t == width - 1)
    def _finish():
        out, lse = finish_softmax(acc_ref[...], m_ref[...], l_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(visits_ref, counts_ref, *refs, st, rows, width, segmented):
    tables, refs = refs[:st.n_tables], refs[st.n_tables:]
    ins, segs, (dq_ref, acc_ref) = _split(refs, 6, segmented, st.alibi is not None)
    k_ref = ins[1]
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    segs = (*segs, tables, h)
    row = _row(h, i, rows, st.per_head)

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    j, kind = _unpack(visits_ref[row * width + t])

    def body(masked):
        _, ds, _ = _grad_block(st, ins, i, j, segs, masked)
        dq = lax.dot_general(ds.astype(k_ref.dtype), k_ref[...], _NN, preferred_element_type=f32)
        acc_ref[...] += dq.reshape(acc_ref.shape)

    _run_visit(st, t < counts_ref[row], kind, j, body)

    @pl.when(t == width - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(visits_ref, counts_ref, *refs, st, rows, width, segmented):
    tables, refs = refs[:st.n_tables], refs[st.n_tables:]
    ins, segs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split(refs, 6, segmented,
                                                         st.alibi is not None)
    q_ref = ins[0]
    h, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    segs = (*segs, tables, h)
    row = _row(h, j, rows, st.per_head)

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, f32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, f32)

    i, kind = _unpack(visits_ref[row * width + t])

    def body(masked):
        p, ds, do = _grad_block(st, ins, i, j, segs, masked)
        # Contracting the G * bq rows sums dK/dV over the group's query heads.
        q = q_ref[...].reshape(do.shape[0], -1)
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=f32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=f32)

    _run_visit(st, t < counts_ref[row], kind, j, body)

    @pl.when(t == width - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Specs:
    """BlockSpecs of one grid (B, K, x, t). q_major: x walks query blocks and step t visits the
    row's key blocks (forward, dQ); else x walks key blocks and t their query blocks (dK/dV)."""
    q: pl.BlockSpec      # q, out, dO, dQ: [B, K, G, Tp, D]
    stat: pl.BlockSpec   # lse, delta: [B, K, G, Tp, 1]
    kv: pl.BlockSpec     # k, v, dK, dV: [B, K, Sp, D]
    q_seg: pl.BlockSpec  # [B, Tp, 1]
    kv_seg: pl.BlockSpec  # [B, 1, Sp]
    slopes: pl.BlockSpec  # [K, G, 1, 1]; also the sinks'


def make_specs(st, G, D, rows, width, *, q_major):
    bq, bk = st.block_q, st.block_k

    def visited(b, h, x, t, visits_ref, counts_ref, *tables):
        del b
        return _unpack(visits_ref[_visit(t, _row(h, x, rows, st.per_head), counts_ref, width)])[0]

    def walked(b, h, x, t, *prefetch):
        return x

    qi, kj = (walked, visited) if q_major else (visited, walked)
    return _Specs(
        q=pl.BlockSpec((None, None, G, bq, D), lambda b, h, *r: (b, h, 0, qi(b, h, *r), 0)),
        stat=pl.BlockSpec((None, None, G, bq, 1), lambda b, h, *r: (b, h, 0, qi(b, h, *r), 0)),
        kv=pl.BlockSpec((None, None, bk, D), lambda b, h, *r: (b, h, kj(b, h, *r), 0)),
        q_seg=pl.BlockSpec((None, bq, 1), lambda b, h, *r: (b, qi(b, h, *r), 0)),
        kv_seg=pl.BlockSpec((None, 1, bk), lambda b, h, *r: (b, 0, kj(b, h, *r))),
        slopes=pl.BlockSpec((None, G, 1, 1), lambda b, h, *r: (h, 0, 0, 0)))


def _pallas(kernel, st, *, name, grid, prefetch, inputs, in_specs, segs, specs, out_shape,
            out_specs, scratch, sinks=None):
    if segs is not None:
        inputs, in_specs = [*inputs, *segs], [*in_specs, specs.q_seg, specs.kv_seg]
    if st.alibi is not None:
        K, G = inputs[1].shape[1], inputs[0].shape[2]  # k [B, K, Sp, D], q [B, K, G, Tp, D]
        slopes = jnp.asarray(np.asarray(st.alibi, np.float32).reshape(K, G, 1, 1))
        inputs, in_specs = [*inputs, slopes], [*in_specs, specs.slopes]
    if sinks is not None:  # after the slopes, as a [G, 1, 1] block per KV head
        K, G = inputs[1].shape[1], inputs[0].shape[2]
        inputs, in_specs = [*inputs, sinks.reshape(K, G, 1, 1)], [*in_specs, specs.slopes]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_PARALLEL4),
        interpret=st.interpret,
        name=name,
    )(*prefetch, *inputs)


def _forward(st, q, k, v, layout, segs, tables, sinks=None):
    """(out [B, T, H, D], lse [B, K, G, Tp, 1] float32); sinks: None or float32 [H]."""
    B, T, H, D, S, K = check_inputs(q, k, v)
    G, nq, nk = H // K, num_blocks(T, st.block_q), num_blocks(S, st.block_k)
    kinds, kv_blocks, counts = layout
    width = kv_blocks.shape[-1]
    specs = make_specs(st, G, D, nq, width, q_major=True)
    q5 = _to_heads_major(q, K, nq * st.block_q)
    kernel = functools.partial(_fwd_kernel, st=st, rows=nq, width=width,
                               segmented=segs is not None)
    out5, lse = _pallas(
        kernel, st, name="block_sparse_fwd", grid=(B, K, nq, width),
        prefetch=(*_flat_layout(kinds, kv_blocks, counts), *tables),
        inputs=[q5, _kv_heads_major(k, nk * st.block_k), _kv_heads_major(v, nk * st.block_k)],
        in_specs=[specs.q, specs.kv, specs.kv], segs=segs, specs=specs,
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype),
                   jax.ShapeDtypeStruct(q5.shape[:-1] + (1,), f32)],
        out_specs=[specs.q, specs.stat],
        scratch=[pltpu.VMEM((G, st.block_q, _LANES), f32),   # running max m
                 pltpu.VMEM((G, st.block_q, _LANES), f32),   # running sum l
                 pltpu.VMEM((G, st.block_q, D), f32)],       # unnormalised output
        sinks=sinks)
    return _from_heads_major(out5, T), lse


def _backward(st, q, k, v, out, lse, layout, segs, tables, d_out):
    B, T, H, D, S, K = check_inputs(q, k, v)
    G, nq, nk = H // K, num_blocks(T, st.block_q), num_blocks(S, st.block_k)
    Tp, Sp = nq * st.block_q, nk * st.block_k
    kinds, kv_blocks, counts = layout
    q5, do5 = _to_heads_major(q, K, Tp), _to_heads_major(d_out.astype(q.dtype), K, Tp)
    delta = jnp.sum(do5.astype(f32) * _to_heads_major(out, K, Tp).astype(f32), axis=-1,
                    keepdims=True)
    k4, v4 = _kv_heads_major(k, Sp), _kv_heads_major(v, Sp)
    inputs = [q5, k4, v4, do5, lse, delta]
    segmented = segs is not None

    width = kv_blocks.shape[-1]
    specs = make_specs(st, G, D, nq, width, q_major=True)
    dq5 = _pallas(
        functools.partial(_dq_kernel, st=st, rows=nq, width=width, segmented=segmented), st,
        name="block_sparse_dq", grid=(B, K, nq, width),
        prefetch=(*_flat_layout(kinds, kv_blocks, counts), *tables), inputs=inputs,
        in_specs=[specs.q, specs.kv, specs.kv, specs.q, specs.stat, specs.stat], segs=segs,
        specs=specs, out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype), out_specs=specs.q,
        scratch=[pltpu.VMEM((G, st.block_q, D), f32)])

    q_blocks, kinds_t, counts_t = transpose_visits(kv_blocks, kinds, counts, nk, st.max_q_visits)
    width_t = q_blocks.shape[-1]
    specs = make_specs(st, G, D, nk, width_t, q_major=False)
    dk4, dv4 = _pallas(
        functools.partial(_dkv_kernel, st=st, rows=nk, width=width_t, segmented=segmented), st,
        name="block_sparse_dkv", grid=(B, K, nk, width_t),
        prefetch=(*_flat_layout(kinds_t, q_blocks, counts_t), *tables), inputs=inputs,
        in_specs=[specs.q, specs.kv, specs.kv, specs.q, specs.stat, specs.stat], segs=segs,
        specs=specs,
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k.dtype),
                   jax.ShapeDtypeStruct(v4.shape, v.dtype)],
        out_specs=[specs.kv, specs.kv],
        scratch=[pltpu.VMEM((st.block_k, D), f32), pltpu.VMEM((st.block_k, D), f32)])
    dk = dk4.transpose(0, 2, 1, 3)[:, :S]
    dv = dv4.transpose(0, 2, 1, 3)[:, :S]
    return _from_heads_major(dq5, T), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, layout, segs, tables, sinks):
    return _forward(st, q, k, v, layout, segs, tables, sinks)[0]


def _attention_fwd(st, q, k, v, layout, segs, tables, sinks):
    out, lse = _forward(st, q, k, v, layout, segs, tables, sinks)
    return out, (q, k, v, out, lse, layout, segs, tables, sinks)


def _attention_bwd(st, residuals, d_out):
    *residuals, sinks = residuals
    dq, dk, dv = _backward(st, *residuals, d_out)
    d_sinks = None
    if sinks is not None:  # lse includes the sinks: [B, K, G, Tp, 1] -> [B, T, H]
        q, out, lse = residuals[0], residuals[3], residuals[4]
        delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
        d_sinks = sink_grad(sinks, _from_heads_major(lse, q.shape[1])[..., 0], delta,
                            axis=(0, 1))
    return dq, dk, dv, None, None, None, d_sinks


_attention.defvjp(_attention_fwd, _attention_bwd)
