"""`attend`: the one attention entry point, dispatching to interchangeable backends."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from lcm.attention.alibi import check_alibi_slopes
from lcm.attention.blockwise import blockwise_attention
from lcm.attention.checks import check_inputs
from lcm.attention.layout import mask_layout
from lcm.attention.masks import Mask
from lcm.attention.pallas import default_platform, pallas_attention
from lcm.attention.reference import reference_attention
from lcm.attention.ring.attention import ring_attention
from lcm.sharding.rules import DEFAULT_RULES


def attend(q, k, v, mask: Mask | None = None, *, impl: str = "auto", scale: float | None = None,
           softcap: float | None = None, block_q: int = 512, block_k: int = 512,
           alibi_slopes=None, sinks=None, mesh=None, axis_name: str = "context",
           load_balance="zigzag", rules: Mapping | None = None):
    """Multi-head attention with grouped KV heads.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K (GQA/MQA; K/V are never repeated).
    Queries are aligned to the end of the keys (query i sits at key position i + S - T), so
    decoding passes T < S. `mask` is a Mask value (Causal(), Local(w), SinkWindow(sinks, w),
    Chunked(size), PrefixLM(n), Document(ids), BlockMask(grid, size), VerticalSlash(cols, diags),
    MaskFn(fn) for a predicate fn(batch, head, q_index, kv_index), and their `&` / `|`) or None
    for full attention. `scale` defaults to 1/sqrt(D); `softcap` applies
    softcap * tanh(logits / softcap). `alibi_slopes` (ALiBi: [H] concrete floats, e.g.
    lcm.positions.alibi_slopes(H)) adds -slope_h * (query position - key position) to the
    capped logits; xla and pallas build it per block (no [T, S] bias array). `sinks`
    (attention sinks as in gpt-oss: None or a float array [H], one learned logit per query head,
    may be traced and is differentiated) adds to every row's softmax one logit sinks[h] whose
    value vector is zero: out = sum_j exp(s_j) v_j / (exp(sinks[h]) + sum_j exp(s_j)) over the
    visible keys' logits s_j (after scale, soft cap and ALiBi; the sink itself is not capped).
    A row's weights over its keys then sum to less than one; a very negative sink is no sink, a
    very large one drives the output to zero. Every impl takes it; context parallelism counts it
    once per row.
    Returns [B, T, H, D] in q's dtype; rows that see no key are zeros.

    impl, one of IMPLS (one backend each, from one table):

    - "reference": dense float32, the ground truth;
    - "xla": blockwise online softmax over the mask's block layout, O(seq * block) memory;
    - "pallas": the block-sparse Pallas kernels: TPU Mosaic on a TPU, Triton on a GPU, the TPU
      kernel interpreted on a CPU (slow);
    - "auto": "pallas" on a TPU or GPU, "xla" on a CPU;
    - context parallelism (CONTEXT_PARALLEL_IMPLS; self-attention, T == S) over the mesh axis
      `axis_name` of `mesh` (default: the mesh of `jax.set_mesh`), with `load_balance` ("none",
      "zigzag", "striped", "mask_aware" or a RingOrder) and `rules` (logical axis -> mesh axes
      for batch and KV heads; default lcm.sharding.DEFAULT_RULES); see
      lcm.attention.ring_attention: "ring" (K/V passed around a ring, the xla local step),
      "allgather" (K/V gathered, the xla local step) or "ring_pallas" (the ring as fused Pallas
      TPU kernels moving K/V and dK/dV by remote DMA: index masks only, load_balance "none" or
      "zigzag" with a length that splits evenly into whole blocks, no softcap; interpreted, and
      slow, off TPU).

    block_q / block_k are the block sizes of the blockwise backends, clipped to the (rounded-up)
    lengths; lengths need not be multiples of them.
    """
    backend = _BACKENDS.get(impl) if isinstance(impl, str) else None
    if backend is None:
        raise ValueError(f"impl={impl!r}; expected one of {list(IMPLS)}")
    # Context parallelism checks the mask itself, at the true length (ring-order inputs are
    # padded; the mask is not).
    check_inputs(q, k, v, None if backend.context_parallel else mask, scale, softcap, block_q,
                 block_k, sinks)
    H, D = q.shape[2], q.shape[3]
    alibi = check_alibi_slopes(alibi_slopes, H)
    if backend.context_parallel and alibi is not None:
        raise ValueError(f"alibi_slopes with impl={impl!r}: not supported (ring shards hold "
                         f"permuted positions); use impl='xla' or 'pallas'")
    if not backend.context_parallel:
        for name, value in (("mesh", mesh), ("rules", rules)):
            if value is not None:
                raise ValueError(f"{name}= is for impl in {list(CONTEXT_PARALLEL_IMPLS)}, not "
                                 f"impl={impl!r}")
    options = _Options(scale=1.0 / math.sqrt(D) if scale is None else float(scale),
                       softcap=None if softcap is None else float(softcap), block_q=int(block_q),
                       block_k=int(block_k), alibi=alibi,
                       sinks=None if sinks is None else jnp.asarray(sinks).astype(jnp.float32),
                       mesh=mesh, axis_name=axis_name,
                       load_balance=load_balance,
                       rules=DEFAULT_RULES if rules is None else rules)
    return backend.run(q, k, v, mask, options)


@dataclasses.dataclass(frozen=True)
class _Options:
    """attend's checked keyword options; each backend reads the ones it uses."""

    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    alibi: Any
    sinks: Any  # None or float32 [H], an array (may be traced)
    mesh: Any
    axis_name: str
    load_balance: Any
    rules: Mapping


@dataclasses.dataclass(frozen=True)
class _Backend:
    """run(q, k, v, mask, options) -> out. A context-parallel backend splits the sequence over a
    mesh axis, validates the mask itself and takes mesh / load_balance / rules; the others
    reject mesh and rules."""

    run: Callable
    context_parallel: bool = False


def _reference(q, k, v, mask, o):
    return reference_attention(q, k, v, mask, scale=o.scale, softcap=o.softcap,
                               alibi_slopes=o.alibi, sinks=o.sinks)


def _prepared(mask, q, k):
    """The mask with its per-call tables and the sizes it reads (batch, heads) bound."""
    if mask is None:
        return None
    return mask.prepare(q.shape[1], k.shape[1], batch=q.shape[0], num_heads=q.shape[2])


def _xla(q, k, v, mask, o):
    T, S = q.shape[1], k.shape[1]
    mask = _prepared(mask, q, k)
    layout = mask_layout(mask, T, S, min(o.block_q, T), min(o.block_k, S), num_heads=q.shape[2],
                         num_kv_heads=k.shape[2])
    return blockwise_attention(q, k, v, mask, layout, scale=o.scale, softcap=o.softcap,
                               alibi_slopes=o.alibi, sinks=o.sinks)


def _pallas(q, k, v, mask, o):
    T, S = q.shape[1], k.shape[1]
    # Kernels pad inside; clip blocks to the lengths rounded up to the TPU tile multiples.
    block_q, block_k = min(o.block_q, _round_up(T, 8)), min(o.block_k, _round_up(S, 128))
    return pallas_attention(q, k, v, _prepared(mask, q, k), scale=o.scale, softcap=o.softcap,
                            block_q=block_q, block_k=block_k, alibi_slopes=o.alibi,
                            sinks=o.sinks)


def _auto(q, k, v, mask, o):
    return (_pallas if default_platform() != "interpret" else _xla)(q, k, v, mask, o)


def _context_parallel(strategy, q, k, v, mask, o):
    return ring_attention(q, k, v, mask, mesh=o.mesh, axis_name=o.axis_name,
                          load_balance=o.load_balance, scale=o.scale, softcap=o.softcap,
                          block_q=o.block_q, block_k=o.block_k, strategy=strategy, rules=o.rules,
                          sinks=o.sinks)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


_BACKENDS = {
    "auto": _Backend(_auto),
    "reference": _Backend(_reference),
    "xla": _Backend(_xla),
    "pallas": _Backend(_pallas),
    "ring": _Backend(functools.partial(_context_parallel, "ring"), context_parallel=True),
    "allgather": _Backend(functools.partial(_context_parallel, "allgather"),
                          context_parallel=True),
    "ring_pallas": _Backend(functools.partial(_context_parallel, "pallas"),
                            context_parallel=True),
}
IMPLS = tuple(_BACKENDS)
CONTEXT_PARALLEL_IMPLS = tuple(name for name, b in _BACKENDS.items() if b.context_parallel)
