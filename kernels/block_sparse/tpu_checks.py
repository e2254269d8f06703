"""Argument checks and static configuration of the TPU block-sparse kernel (tpu.py).

Everything here runs before tracing: a block the hardware cannot tile, a layout of the wrong
shape, mismatched segment ids or slopes raise ValueError naming the argument and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .common import (check_alibi_slopes, check_mask_tables, check_sinks, num_blocks, pad_axis,
                     as_static)
from .layout import max_q_visits_of

_LANES = 128  # TPU vreg lanes: the minor-dim tile


@dataclasses.dataclass(frozen=True)
class TpuStatic:
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
    alibi: tuple[float, ...] | None = None  # one slope per query head
    n_tables: int = 0  # > 0: mask_fn is head-aware and reads this many SMEM tables
    sinks: bool = False  # the forward takes one sink logit per query head


_OPTIONS = dict(kinds=None, visit_kinds=None, mask_fn=None, q_segment_ids=None,
                kv_segment_ids=None, softcap=None,
                block_q=128, block_k=128, interpret=False, max_q_visits=None, alibi_slopes=None,
                mask_tables=None, sinks=None)


def defaults(kwargs):
    unknown = set(kwargs) - set(_OPTIONS) - {"kv_blocks", "counts", "scale"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; expected those of "
                         f"block_sparse_attention_tpu")
    return {**_OPTIONS, **kwargs}


def prepare(q, k, v, kinds, kv_blocks, counts, mask_fn, q_segment_ids, kv_segment_ids, scale,
             softcap, block_q, block_k, interpret, max_q_visits, alibi_slopes, mask_tables=None,
             visit_kinds=None, sinks=None):
    """Validates everything static; returns (static config, layout arrays, segment ids, mask
    tables: a tuple of 1-D int32 arrays, empty unless mask_fn is head-aware, sinks: None or
    float32 [H])."""
    block_q, block_k, max_q_visits, scale, softcap = as_static(block_q, block_k, max_q_visits,
                                                               scale, softcap)
    B, T, H, _, S, K = check_inputs(q, k, v)
    segmented = mask_fn is not None and q_segment_ids is not None
    _check_blocks(block_q, block_k, interpret, segmented)
    nq, nk = num_blocks(T, block_q), num_blocks(S, block_k)
    per_head = _check_layout(kinds, visit_kinds, kv_blocks, counts, nq, nk, K)
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale={scale!r}; expected a positive float")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap={softcap!r}; expected a positive float or None")
    segs = _prepare_segments(q_segment_ids, kv_segment_ids, B, T, S, nq * block_q, nk * block_k)
    if mask_fn is None:
        segs = None  # segment ids only ever reach the mask through mask_fn
    tables = check_mask_tables(mask_tables, mask_fn)
    st = TpuStatic(mask_fn, float(scale), None if softcap is None else float(softcap), block_q,
                 block_k, T, S, per_head, _q_visit_bound(kv_blocks, counts, nq, nk, max_q_visits),
                 interpret,
                 check_alibi_slopes(alibi_slopes, H), len(tables))
    sinks = check_sinks(sinks, H)
    st = dataclasses.replace(st, sinks=sinks is not None)
    kv_blocks = jnp.clip(jnp.asarray(kv_blocks, jnp.int32), 0, nk - 1)
    if visit_kinds is None:
        visit_kinds = jnp.take_along_axis(jnp.asarray(kinds, jnp.int32), kv_blocks, axis=-1)
    layout = (jnp.asarray(visit_kinds, jnp.int32), kv_blocks, jnp.asarray(counts, jnp.int32))
    return st, layout, segs, tables, sinks


def check_inputs(q, k, v):
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


def _check_layout(kinds, visit_kinds, kv_blocks, counts, nq, nk, K):
    """Checks the layout: the dense `kinds` or the per-visit `visit_kinds` (exactly one)."""
    if (kinds is None) == (visit_kinds is None):
        raise ValueError("pass the layout's kinds either per visit (visit_kinds [Lh, nq, "
                         "max_visits], the compressed form) or dense (kinds [Lh, nq, nk]), "
                         "exactly one of them")
    shapes = {n: getattr(x, "shape", None) for n, x in
              (("kinds", kinds), ("kv_blocks", kv_blocks), ("counts", counts))}
    kb = shapes["kv_blocks"]
    if kinds is not None:
        ks = shapes["kinds"]
        if ks is None or len(ks) != 3 or ks[0] not in (1, K) or tuple(ks[1:]) != (nq, nk):
            raise ValueError(f"kinds has shape {ks}; expected (Lh, nq, nk) = (1 or {K}, {nq}, "
                             f"{nk}) for these lengths and block sizes")
        Lh = ks[0]
    else:
        Lh = kb[0] if kb is not None and len(kb) == 3 and kb[0] in (1, K) else None
    if Lh is None or kb is None or len(kb) != 3 or tuple(kb[:2]) != (Lh, nq) or kb[2] < 1:
        raise ValueError(f"kv_blocks has shape {kb}; expected ({Lh or f'1 or {K}'}, {nq}, "
                         f"max_visits >= 1)")
    if visit_kinds is not None and getattr(visit_kinds, "shape", None) != kb:
        raise ValueError(f"visit_kinds has shape {getattr(visit_kinds, 'shape', None)}; expected "
                         f"the shape of kv_blocks {kb}")
    if shapes["counts"] is None or tuple(shapes["counts"]) != (Lh, nq):
        raise ValueError(f"counts has shape {shapes['counts']}; expected ({Lh}, {nq})")
    given = kinds if kinds is not None else visit_kinds
    for name, x in (("kinds" if kinds is not None else "visit_kinds", given),
                    ("kv_blocks", kv_blocks), ("counts", counts)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={x.dtype}; expected an integer dtype (int32)")
    return Lh == K and K > 1


def _q_visit_bound(kv_blocks, counts, nq, nk, max_q_visits):
    if max_q_visits is not None:
        if not isinstance(max_q_visits, int) or not 1 <= max_q_visits <= nq:
            raise ValueError(f"max_q_visits={max_q_visits!r}; expected an int in [1, nq={nq}]")
        return max_q_visits
    if isinstance(kv_blocks, jax.core.Tracer) or isinstance(counts, jax.core.Tracer):
        return nq
    return max_q_visits_of(kv_blocks, counts, nk)


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
