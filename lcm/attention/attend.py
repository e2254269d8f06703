"""`attend`: the one attention entry point, dispatching to interchangeable backends."""

from __future__ import annotations

import math


from lcm.attention.alibi import check_alibi_slopes
from lcm.attention.blockwise import blockwise_attention
from lcm.attention.checks import check_inputs
from lcm.attention.layout import mask_layout
from lcm.attention.masks import Mask
from lcm.attention.pallas import default_platform, pallas_attention
from lcm.attention.reference import reference_attention
from lcm.attention.ring.attention import ring_attention

IMPLS = ("auto", "reference", "xla", "pallas", "ring", "allgather")


def attend(q, k, v, mask: Mask | None = None, *, impl: str = "auto", scale: float | None = None,
           softcap: float | None = None, block_q: int = 512, block_k: int = 512,
           alibi_slopes=None, mesh=None, axis_name: str = "context",
           load_balance="zigzag"):
    """Multi-head attention with grouped KV heads.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K (GQA/MQA; K/V are never repeated).
    Queries are aligned to the end of the keys (query i sits at key position i + S - T), so
    decoding passes T < S. `mask` is a Mask value (Causal(), Local(w), SinkWindow(sinks, w),
    Chunked(size), PrefixLM(n), Document(ids), BlockMask(grid, size), VerticalSlash(cols, diags),
    and their `&` / `|`) or None for full attention. `scale` defaults to 1/sqrt(D); `softcap`
    applies softcap * tanh(logits / softcap). `alibi_slopes` (ALiBi: [H] concrete floats, e.g.
    lcm.positions.alibi_slopes(H)) adds -slope_h * (query position - key position) to the
    capped logits; xla and pallas build it per block (no [T, S] bias array). Returns
    [B, T, H, D] in q's dtype; rows that see no key are zeros.

    impl: "reference" (dense float32, the ground truth), "xla" (blockwise online softmax over the
    mask's block layout, O(seq * block) memory), "pallas" (the block-sparse Pallas kernels: TPU
    Mosaic on a TPU, Triton on a GPU, the TPU kernel interpreted on a CPU, which is slow), or
    "auto" ("pallas" on a TPU or GPU, "xla" on a CPU), or context parallelism over the mesh axis
    `axis_name` of `mesh` (default: the mesh of `jax.set_mesh`): "ring" (K/V passed around a
    ring) or "allgather" (K/V gathered), both with `load_balance` ("none", "zigzag", "striped",
    "mask_aware" or a RingOrder); see lcm.attention.ring_attention. block_q / block_k are the
    block sizes of the blockwise backends, clipped to the (rounded-up) lengths; lengths need not
    be multiples of them.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {list(IMPLS)}")
    # Context parallelism checks the mask itself, at the true length (ring-order inputs are
    # padded; the mask is not).
    ring = impl in ("ring", "allgather")
    check_inputs(q, k, v, None if ring else mask, scale, softcap, block_q, block_k)
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    alibi = check_alibi_slopes(alibi_slopes, H)
    if ring:
        if alibi is not None:
            raise ValueError(f"alibi_slopes with impl={impl!r}: not supported (ring shards hold "
                             f"permuted positions); use impl='xla' or 'pallas'")
        return ring_attention(q, k, v, mask, mesh=mesh, axis_name=axis_name,
                              load_balance=load_balance, scale=scale, softcap=softcap,
                              block_q=block_q, block_k=block_k, strategy=impl)
    if mesh is not None:
        raise ValueError(f"mesh= is for impl='ring' or 'allgather', not impl={impl!r}")
    if impl == "auto":
        impl = "pallas" if default_platform() != "interpret" else "xla"
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale=scale, softcap=softcap,
                                   alibi_slopes=alibi)
    if impl == "pallas":
        # Kernels pad inside; clip blocks to the lengths rounded up to the TPU tile multiples.
        block_q, block_k = min(block_q, _round_up(T, 8)), min(block_k, _round_up(S, 128))
        return pallas_attention(q, k, v, mask.prepare(T, S) if mask is not None else None,
                                scale=scale, softcap=softcap, block_q=block_q, block_k=block_k,
                                alibi_slopes=alibi)
    layout = mask_layout(mask, T, S, min(block_q, T), min(block_k, S), num_heads=H,
                         num_kv_heads=k.shape[2])
    if mask is not None:
        mask = mask.prepare(T, S)
    return blockwise_attention(q, k, v, mask, layout, scale=scale, softcap=softcap,
                               alibi_slopes=alibi)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple
