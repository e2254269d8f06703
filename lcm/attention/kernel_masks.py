"""Masks as the Pallas kernels take them: an in-kernel `mask_fn` plus segment ids.

The kernels (kernels/block_sparse) evaluate `mask_fn(q_idx [bq,1], k_idx [1,bk], q_seg, k_seg)`
on PARTIAL blocks only. Index masks and Document lower to such functions exactly. A BlockMask
whose cells are whole kernel blocks needs no element work (its layout is exact), unless it sits
under an `|`, where its cells would have to be known in-kernel. VerticalSlash tables do not fit
the protocol yet: those masks raise here, and run on impl="xla" or "reference".
"""

from __future__ import annotations

from lcm.attention.data_masks import BlockMask, Document, VerticalSlash
from lcm.attention.masks import And, IndexMask, Mask, Or


def kernel_mask(mask: Mask | None, *, offset: int, block_q: int, block_k: int,
                grouped: bool = False):
    """(mask_fn or None, q_segment_ids or None, kv_segment_ids or None) for the kernels.

    `grouped`: the layout is shared by several query heads (GQA with a per-KV-head layout), so
    a per-head BlockMask cannot be left to the layout. Raises ValueError for masks the kernels
    cannot evaluate in-kernel.
    """
    if mask is None:
        return None, None, None
    documents = []
    fn = _lower(mask, offset, block_q, block_k, documents, under_or=False, grouped=grouped)
    ids = {(id(d.q_segment_ids), id(d.kv_ids)): d for d in documents}
    if len(ids) > 1:
        raise ValueError("impl='pallas' takes one Document per mask (one pair of segment id "
                         "arrays); merge the segment ids or use impl='xla'")
    doc = next(iter(ids.values()), None)
    return fn, (doc.q_segment_ids if doc else None), (doc.kv_ids if doc else None)


def _lower(mask, offset, block_q, block_k, documents, under_or, grouped):
    if isinstance(mask, IndexMask):
        return lambda q, k, qs, ks: mask.fn(q + offset, k)
    if isinstance(mask, Document):
        documents.append(mask)
        return lambda q, k, qs, ks: qs == ks
    if isinstance(mask, BlockMask):
        aligned = mask.block_size % block_q == 0 and mask.block_size % block_k == 0
        per_head = mask.blocks.ndim == 3 and mask.blocks.shape[0] > 1
        if aligned and not under_or and not (per_head and grouped):
            return None  # constant over each kernel block: the layout alone applies it
        raise ValueError(
            f"impl='pallas' evaluates BlockMask(block_size={mask.block_size}) only when its cells "
            f"are whole kernel blocks (block_size a multiple of block_q={block_q} and "
            f"block_k={block_k}), it is not under '|', and, with grouped query heads, its grid "
            f"is shared by the heads of each group; use impl='xla' otherwise")
    if isinstance(mask, VerticalSlash):
        raise ValueError("impl='pallas' does not evaluate VerticalSlash in-kernel yet; "
                         "use impl='xla' (same layout, same skipping)")
    if isinstance(mask, (And, Or)):
        is_or = isinstance(mask, Or)
        fns = [_lower(m, offset, block_q, block_k, documents, under_or or is_or, grouped)
               for m in mask.masks]
        fns = [f for f in fns if f is not None]
        if not fns:
            return None

        def combined(q, k, qs, ks):
            out = fns[0](q, k, qs, ks)
            for f in fns[1:]:
                out = (out | f(q, k, qs, ks)) if is_or else (out & f(q, k, qs, ks))
            return out
        return combined
    raise ValueError(f"impl='pallas' cannot evaluate a {type(mask).__name__} mask in-kernel")
