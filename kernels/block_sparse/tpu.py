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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_sparse.common import (
    cap_logits,
    f32,
    finish_softmax,
    logit_grad,
    num_blocks,
    online_softmax_step,
    pad_axis,
    visit_kinds,
)
from kernels.block_sparse.layout import FULL, transpose_layout

_LANES = 128  # TPU vreg lanes: the minor-dim tile, and the width of the m/l scratch rows.
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_PARALLEL4 = (pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call: hashed as custom_vjp's nondiff argument."""
    mask_fn: Callable | None
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    per_head: bool  # layout has one head per KV head (else one shared)
    max_q_visits: int
    interpret: Any


def block_sparse_attention_tpu(q, k, v, *, kinds, kv_blocks, counts, mask_fn=None,
                               q_segment_ids=None, kv_segment_ids=None, scale, softcap=None,
                               block_q=128, block_k=128, interpret=False, max_q_visits=None):
    """Attention over a block layout. q [B, T, H, D]; k, v [B, S, K, D]; H % K == 0.

    kinds [Lh, nq, nk], kv_blocks [Lh, nq, max_visits], counts [Lh, nq] int32 (layout.py), with
    Lh 1 or K, nq = ceil(T / block_q), nk = ceil(S / block_k); they may be traced. mask_fn follows
    reference.py's protocol and may capture no array (a Pallas kernel takes none): runtime data
    reaches it as q_seg / k_seg, from q_segment_ids [B or 1, T] / kv_segment_ids [B or 1, S].
    max_q_visits (static) bounds the query blocks that visit one key block (the dK/dV grid);
    default: exact when kinds is concrete, else nq. A bound that is too small drops gradients.
    interpret: False on TPU; True or pltpu.InterpretParams() on CPU. Returns [B, T, H, D] in q's
    dtype; rows that see no key are zeros. Differentiable w.r.t. q, k, v.

    The layout is prefetched into SMEM as Lh * nq * (max_visits + 1) int32 words (the dK/dV
    kernel: Lh * nk * (max_q_visits + 1)); SMEM is 1 MiB on v5e, so at very long lengths use
    larger blocks or a layout with fewer visits per row.
    """
    B, T, _, _, S, K = _check_inputs(q, k, v)
    segmented = mask_fn is not None and q_segment_ids is not None
    _check_blocks(block_q, block_k, interpret, segmented)
    nq, nk = num_blocks(T, block_q), num_blocks(S, block_k)
    per_head = _check_layout(kinds, kv_blocks, counts, nq, nk, K)
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale={scale!r}; expected a positive float")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap={softcap!r}; expected a positive float or None")
    segs = _prepare_segments(q_segment_ids, kv_segment_ids, B, T, S, nq * block_q, nk * block_k)
    if mask_fn is None:
        segs = None  # segment ids only ever reach the mask through mask_fn
    st = _Static(mask_fn, float(scale), None if softcap is None else float(softcap), block_q,
                 block_k, T, S, per_head, _q_visit_bound(kinds, nq, max_q_visits), interpret)
    layout = (jnp.asarray(kinds, jnp.int32), jnp.clip(jnp.asarray(kv_blocks, jnp.int32), 0, nk - 1),
              jnp.asarray(counts, jnp.int32))
    return _attention(st, q, k, v, layout, segs)


def _check_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} has shape {getattr(x, 'shape', None)}; expected 4 dims "
                             f"[batch, length, heads, head_dim]")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape [B, S, K, D] "
                         f"with B and D of q {q.shape}")
    S, K = k.shape[1], k.shape[2]
    if min(B, T, H, D, S, K) == 0:
        raise ValueError(f"empty dimension in q {q.shape} or k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (jnp.float32, jnp.bfloat16)):
        # float16 is left out: Mosaic cannot load float16 vectors on TPU (v5e, v6e).
        raise ValueError(f"q, k, v dtypes are {q.dtype}, {k.dtype}, {v.dtype}; expected all "
                         f"float32 or all bfloat16 (cast float16 to bfloat16)")
    if H % K:
        raise ValueError(f"q has {H} heads, not a multiple of the {K} KV heads of k/v")
    return B, T, H, D, S, K


def _check_blocks(block_q, block_k, interpret, segmented):
    """Mosaic tiles the last two dims of every VMEM block by (8 sublanes, 128 lanes) unless a dim
    spans the whole array. block_q and block_k are second-minor dims (q/out/lse [G, block_q, D|1],
    k/v [block_k, D]): multiples of 8. The kv segment-id block [1, block_k] puts block_k in the
    lanes: a multiple of 128 when compiled with segment ids (the interpreters need only 8)."""
    compiled = interpret is None or interpret is False
    k_multiple = _LANES if compiled and segmented else 8
    for name, b, multiple in (("block_q", block_q, 8), ("block_k", block_k, k_multiple)):
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % multiple:
            raise ValueError(
                f"{name}={b!r}; expected a positive multiple of {multiple} (block_q: multiple of "
                f"8; block_k: multiple of 8, or of 128 when compiled for TPU with segment ids, "
                f"whose [1, block_k] block Mosaic tiles by 128 lanes; 128 or more is fastest)")


def _check_layout(kinds, kv_blocks, counts, nq, nk, K):
    shapes = {n: getattr(x, "shape", None) for n, x in
              (("kinds", kinds), ("kv_blocks", kv_blocks), ("counts", counts))}
    ks = shapes["kinds"]
    if ks is None or len(ks) != 3 or ks[0] not in (1, K) or tuple(ks[1:]) != (nq, nk):
        raise ValueError(f"kinds has shape {ks}; expected (Lh, nq, nk) = (1 or {K}, {nq}, {nk}) "
                         f"for these lengths and block sizes")
    Lh = ks[0]
    kb = shapes["kv_blocks"]
    if kb is None or len(kb) != 3 or tuple(kb[:2]) != (Lh, nq) or kb[2] < 1:
        raise ValueError(f"kv_blocks has shape {kb}; expected ({Lh}, {nq}, max_visits >= 1)")
    if shapes["counts"] is None or tuple(shapes["counts"]) != (Lh, nq):
        raise ValueError(f"counts has shape {shapes['counts']}; expected ({Lh}, {nq})")
    for name, x in (("kinds", kinds), ("kv_blocks", kv_blocks), ("counts", counts)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={x.dtype}; expected an integer dtype (int32)")
    return Lh == K and K > 1


def _q_visit_bound(kinds, nq, max_q_visits):
    if max_q_visits is not None:
        if not isinstance(max_q_visits, int) or not 1 <= max_q_visits <= nq:
            raise ValueError(f"max_q_visits={max_q_visits!r}; expected an int in [1, nq={nq}]")
        return max_q_visits
    if isinstance(kinds, jax.core.Tracer):
        return nq
    return max(int((np.asarray(kinds) != 0).sum(-2).max()), 1)


def _prepare_segments(q_seg, kv_seg, B, T, S, Tp, Sp):
    """Segment ids as [B, Tp, 1] (a column per q block) and [B, 1, Sp] (a row per key block)."""
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_seg is None:
        return None
    for name, x, n in (("q_segment_ids", q_seg, T), ("kv_segment_ids", kv_seg, S)):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 2 or shape[0] not in (1, B) or shape[1] != n or not jnp.issubdtype(
                x.dtype, jnp.integer):
            raise ValueError(f"{name} has shape {shape or None}; expected an integer array of "
                             f"shape ({B} or 1, {n})")
    q_seg = jnp.broadcast_to(jnp.asarray(q_seg, jnp.int32), (B, T))
    kv_seg = jnp.broadcast_to(jnp.asarray(kv_seg, jnp.int32), (B, S))
    return pad_axis(q_seg, 1, Tp)[:, :, None], pad_axis(kv_seg, 1, Sp)[:, None, :]


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
    block << 2 | kind (half the SMEM of two arrays), and the counts."""
    kind = jnp.clip(visit_kinds(kinds, blocks), 0, 3)
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


def _visible(st, i, j, qs_ref, ks_ref):
    """bool [bq, bk]: which pairs of query block i x key block j may attend."""
    bq, bk = st.block_q, st.block_k
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    vis = jnp.broadcast_to(k_idx < st.kv_len, (bq, bk))
    if st.mask_fn is not None:
        q_seg = None if qs_ref is None else qs_ref[...]
        k_seg = None if ks_ref is None else ks_ref[...]
        vis = jnp.logical_and(vis, jnp.broadcast_to(st.mask_fn(q_idx, k_idx, q_seg, k_seg),
                                                    (bq, bk)))
    return vis


def _logits(st, q_ref, k_ref, i, j, qs_ref, ks_ref, masked):
    """(s [G, bq, bk] float32, capped and hidden with -inf, tanh or None) for one block pair."""
    G, bq, D = q_ref.shape
    s = lax.dot_general(q_ref[...].reshape(G * bq, D), k_ref[...], _NT,
                        preferred_element_type=f32) * st.scale
    s, tanh = cap_logits(s.reshape(G, bq, st.block_k), st.softcap)
    if masked:
        s = jnp.where(_visible(st, i, j, qs_ref, ks_ref)[None], s, -jnp.inf)
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


def _split(refs, n_in, segmented):
    """(inputs, (qs_ref, ks_ref), rest) from a kernel's refs after the prefetch refs."""
    ins, rest = refs[:n_in], refs[n_in:]
    if segmented:
        return ins, rest[:2], rest[2:]
    return ins, (None, None), rest


def _fwd_kernel(visits_ref, counts_ref, *refs, st, rows, width, segmented):
    (q_ref, k_ref, v_ref), segs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split(
        refs, 3, segmented)
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = _row(h, i, rows, st.per_head)

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, f32)
        l_ref[...] = jnp.zeros(l_ref.shape, f32)
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
    ins, segs, (dq_ref, acc_ref) = _split(refs, 6, segmented)
    k_ref = ins[1]
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
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
    ins, segs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split(refs, 6, segmented)
    q_ref = ins[0]
    h, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
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


def _make_specs(st, G, D, rows, width, *, q_major):
    bq, bk = st.block_q, st.block_k

    def visited(b, h, x, t, visits_ref, counts_ref):
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
        kv_seg=pl.BlockSpec((None, 1, bk), lambda b, h, *r: (b, 0, kj(b, h, *r))))


def _pallas(kernel, st, *, name, grid, prefetch, inputs, in_specs, segs, specs, out_shape,
            out_specs, scratch):
    if segs is not None:
        inputs, in_specs = [*inputs, *segs], [*in_specs, specs.q_seg, specs.kv_seg]
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


def _forward(st, q, k, v, layout, segs):
    """(out [B, T, H, D], lse [B, K, G, Tp, 1] float32)."""
    B, T, H, D, S, K = _check_inputs(q, k, v)
    G, nq, nk = H // K, num_blocks(T, st.block_q), num_blocks(S, st.block_k)
    kinds, kv_blocks, counts = layout
    width = kv_blocks.shape[-1]
    specs = _make_specs(st, G, D, nq, width, q_major=True)
    q5 = _to_heads_major(q, K, nq * st.block_q)
    kernel = functools.partial(_fwd_kernel, st=st, rows=nq, width=width,
                               segmented=segs is not None)
    out5, lse = _pallas(
        kernel, st, name="block_sparse_fwd", grid=(B, K, nq, width),
        prefetch=_flat_layout(kinds, kv_blocks, counts),
        inputs=[q5, _kv_heads_major(k, nk * st.block_k), _kv_heads_major(v, nk * st.block_k)],
        in_specs=[specs.q, specs.kv, specs.kv], segs=segs, specs=specs,
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype),
                   jax.ShapeDtypeStruct(q5.shape[:-1] + (1,), f32)],
        out_specs=[specs.q, specs.stat],
        scratch=[pltpu.VMEM((G, st.block_q, _LANES), f32),   # running max m
                 pltpu.VMEM((G, st.block_q, _LANES), f32),   # running sum l
                 pltpu.VMEM((G, st.block_q, D), f32)])       # unnormalised output
    return _from_heads_major(out5, T), lse


def _backward(st, q, k, v, out, lse, layout, segs, d_out):
    B, T, H, D, S, K = _check_inputs(q, k, v)
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
    specs = _make_specs(st, G, D, nq, width, q_major=True)
    dq5 = _pallas(
        functools.partial(_dq_kernel, st=st, rows=nq, width=width, segmented=segmented), st,
        name="block_sparse_dq", grid=(B, K, nq, width),
        prefetch=_flat_layout(kinds, kv_blocks, counts), inputs=inputs,
        in_specs=[specs.q, specs.kv, specs.kv, specs.q, specs.stat, specs.stat], segs=segs,
        specs=specs, out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype), out_specs=specs.q,
        scratch=[pltpu.VMEM((G, st.block_q, D), f32)])

    kinds_t, q_blocks, counts_t = transpose_layout(kinds, st.max_q_visits)
    width_t = q_blocks.shape[-1]
    specs = _make_specs(st, G, D, nk, width_t, q_major=False)
    dk4, dv4 = _pallas(
        functools.partial(_dkv_kernel, st=st, rows=nk, width=width_t, segmented=segmented), st,
        name="block_sparse_dkv", grid=(B, K, nk, width_t),
        prefetch=_flat_layout(kinds_t, q_blocks, counts_t), inputs=inputs,
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
def _attention(st, q, k, v, layout, segs):
    return _forward(st, q, k, v, layout, segs)[0]


def _attention_fwd(st, q, k, v, layout, segs):
    out, lse = _forward(st, q, k, v, layout, segs)
    return out, (q, k, v, out, lse, layout, segs)


def _attention_bwd(st, residuals, d_out):
    dq, dk, dv = _backward(st, *residuals, d_out)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
