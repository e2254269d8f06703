"""Argument checks and static configuration of the GPU block-sparse kernel (gpu.py).

Everything here runs before tracing: block sizes Triton cannot tile, layouts of the wrong shape,
mismatched segment ids or slopes raise ValueError naming the argument and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from .common import check_alibi_slopes, check_mask_tables, check_sinks, as_static

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class GpuParams:
    """Static configuration of one call (hashable: it is a custom_vjp nondiff argument)."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    group: int            # query heads per KV head
    per_head_layout: bool  # Lh == K (else one layout shared by all heads)
    scale: float
    softcap: float | None
    mask_fn: Callable | None
    segments: bool
    num_warps: int | None
    num_stages: int | None
    interpret: Any
    alibi: tuple[float, ...] | None = None  # one slope per query head
    n_tables: int = 0  # > 0: mask_fn is head-aware and reads this many tables
    sinks: bool = False  # the forward takes one sink logit per query head



_OPTIONS = dict(kinds=None, visit_kinds=None, mask_fn=None, q_segment_ids=None,
                kv_segment_ids=None, softcap=None, block_q=64,
                block_k=64, num_warps=None, num_stages=None, interpret=False, alibi_slopes=None,
                mask_tables=None, sinks=None)


def defaults(kwargs):
    unknown = set(kwargs) - set(_OPTIONS) - {"kv_blocks", "counts", "scale"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; expected those of "
                         f"block_sparse_attention_gpu")
    return {**_OPTIONS, **kwargs}


def prepare(q, k, v, kinds, kv_blocks, counts, mask_fn, q_segment_ids, kv_segment_ids, scale,
             softcap, block_q, block_k, num_warps, num_stages, interpret, alibi_slopes,
             mask_tables=None, visit_kinds=None, sinks=None):
    """(static parameters, segment ids or None, layout arrays, mask tables: a tuple of 1-D int32
    arrays, empty unless mask_fn is head-aware, sinks: None or float32 [H]), validated before
    tracing."""
    block_q, block_k, num_warps, num_stages, scale, softcap = as_static(
        block_q, block_k, num_warps, num_stages, scale, softcap)
    p = _check(q, k, v, kinds, visit_kinds, kv_blocks, counts, mask_fn, q_segment_ids,
               kv_segment_ids, scale, softcap, block_q, block_k, num_warps, num_stages, interpret)
    tables = check_mask_tables(mask_tables, mask_fn)
    sinks = check_sinks(sinks, q.shape[2])
    p = dataclasses.replace(p, alibi=check_alibi_slopes(alibi_slopes, q.shape[2]),
                            n_tables=len(tables), sinks=sinks is not None)
    segs = None
    if p.segments:
        segs = (jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32))
    kv_blocks = jnp.asarray(kv_blocks, jnp.int32)
    if visit_kinds is None:  # the kernels take kinds per visit
        nk = -(-p.kv_len // p.block_k)
        visit_kinds = jnp.take_along_axis(jnp.asarray(kinds, jnp.int32),
                                          jnp.clip(kv_blocks, 0, nk - 1), axis=-1)
    layout = (jnp.asarray(visit_kinds, jnp.int32), kv_blocks, jnp.asarray(counts, jnp.int32))
    return p, segs, layout, tables, sinks


def _is_pow2_block(b):
    return isinstance(b, int) and not isinstance(b, bool) and b >= 16 and b & (b - 1) == 0


def _check(q, k, v, kinds, visit_kinds, kv_blocks, counts, mask_fn, q_seg, kv_seg, scale, softcap,
           block_q, block_k, num_warps, num_stages, interpret) -> GpuParams:
    """Validates everything static before tracing; returns the call's static parameters."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2_block(b):
            raise ValueError(f"{name}={b!r}; expected a power of two >= 16 (16, 32, 64, 128, "
                             "...): Triton's dot needs power-of-two tiles of at least 16")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D] / [B, S, K, D]; got q.shape={q.shape}, "
                         f"k.shape={k.shape}, v.shape={v.shape}")
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} must both be "
                         f"[{B}, S, K, {D}] to match q.shape={q.shape}")
    if K == 0 or H % K:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads K={K}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be equal and "
                         f"one of {[str(d) for d in _DTYPES]}")
    nq, nk = -(-T // block_q), -(-S // block_k)
    if (kinds is None) == (visit_kinds is None):
        raise ValueError("pass the layout's kinds either per visit (visit_kinds [Lh, nq, "
                         "max_visits], the compressed form) or dense (kinds [Lh, nq, nk]), "
                         "exactly one of them")
    kb_shape = tuple(jnp.shape(kv_blocks))
    if kinds is not None:
        kinds_shape = tuple(jnp.shape(kinds))
        if len(kinds_shape) != 3 or kinds_shape[0] not in (1, K) or kinds_shape[1:] != (nq, nk):
            raise ValueError(f"kinds.shape={kinds_shape}; expected (Lh, {nq}, {nk}) with Lh in "
                             f"(1, {K}) for T={T}, S={S}, block_q={block_q}, block_k={block_k}")
        Lh = kinds_shape[0]
    else:
        Lh = kb_shape[0] if len(kb_shape) == 3 and kb_shape[0] in (1, K) else f"1 or {K}"
        if tuple(jnp.shape(visit_kinds)) != kb_shape:
            raise ValueError(f"visit_kinds.shape={tuple(jnp.shape(visit_kinds))}; expected the "
                             f"shape of kv_blocks {kb_shape}")
    if len(kb_shape) != 3 or kb_shape[:2] != (Lh, nq) or kb_shape[2] < 1:
        raise ValueError(f"kv_blocks.shape={kb_shape}; expected ({Lh}, {nq}, max_visits >= 1)")
    if tuple(jnp.shape(counts)) != (Lh, nq):
        raise ValueError(f"counts.shape={tuple(jnp.shape(counts))}; expected ({Lh}, {nq})")
    named = ("kinds", kinds) if kinds is not None else ("visit_kinds", visit_kinds)
    for name, x in (named, ("kv_blocks", kv_blocks), ("counts", counts)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} dtype {jnp.result_type(x)}; expected an integer dtype")
    if mask_fn is not None and not callable(mask_fn):
        raise ValueError(f"mask_fn={mask_fn!r}; expected a callable or None")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together or not at all")
    if q_seg is not None and (tuple(jnp.shape(q_seg)) != (B, T)
                              or tuple(jnp.shape(kv_seg)) != (B, S)):
        raise ValueError(f"q_segment_ids.shape={tuple(jnp.shape(q_seg))} and "
                         f"kv_segment_ids.shape={tuple(jnp.shape(kv_seg))}; expected "
                         f"({B}, {T}) and ({B}, {S})")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}; expected a positive number or None")
    for name, x in (("num_warps", num_warps), ("num_stages", num_stages)):
        if x is not None and (not isinstance(x, int) or x < 1):
            raise ValueError(f"{name}={x!r}; expected a positive int or None")
    return GpuParams(q_len=T, kv_len=S, block_q=block_q, block_k=block_k, group=H // K,
                   per_head_layout=Lh > 1, scale=float(scale),
                   softcap=None if softcap is None else float(softcap), mask_fn=mask_fn,
                   # Segment ids only ever reach mask_fn (reference.dense_mask ignores them
                   # without one), so without a mask_fn they are not even loaded.
                   segments=q_seg is not None and mask_fn is not None,
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret)
