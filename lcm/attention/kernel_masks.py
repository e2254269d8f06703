"""Masks as the Pallas kernels take them: an in-kernel `mask_fn`, segment ids and mask tables.

The kernels (kernels/block_sparse) evaluate `mask_fn` on PARTIAL blocks only. Index masks and
Document lower to plain `mask_fn(q_idx [bq,1], k_idx [1,bk], q_seg, k_seg)` functions exactly.
Masks that hold per-head index data lower to the kernels' head-aware protocol (reference.py):
their data travels as 1-D int32 `mask_tables` (scalar prefetch into SMEM on TPU), and mask_fn is
called per query head with the block's origin, so each head of a GQA group applies its own mask
while the group shares the K/V fetch:

- VerticalSlash: per head, the sorted vertical columns and slash offsets. A block reads only the
  entries that cross it (two binary searches per list), so its cost is O(log n + hits) scalar
  reads and one compare per hit, never a dense [T, S] mask.
- BlockMask under `|`, with cells that are not whole kernel blocks, or per head under GQA: the
  grid, flattened; a block loops over the cells it overlaps. A BlockMask whose cells are whole
  kernel blocks, not under `|`, and shared by each group needs no element work (its layout is
  exact).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lcm.attention.data_masks import BlockMask, Document, VerticalSlash
from lcm.attention.masks import And, IndexMask, Mask, Or


def kernel_mask(mask: Mask | None, *, offset: int, block_q: int, block_k: int,
                grouped: bool = False):
    """(mask_fn or None, q_segment_ids or None, kv_segment_ids or None, mask_tables or None).

    With mask_tables (a tuple of 1-D int32 arrays), mask_fn is head-aware (reference.py's
    protocol). `grouped`: the layout is shared by several query heads (GQA with a per-KV-head
    layout). Raises ValueError for masks the kernels cannot evaluate in-kernel.
    """
    if mask is None:
        return None, None, None, None
    documents, tables = [], []
    fn = _lower(mask, offset, block_q, block_k, documents, tables, under_or=False,
                grouped=grouped)
    ids = {(id(d.q_segment_ids), id(d.kv_ids)): d for d in documents}
    if len(ids) > 1:
        raise ValueError("impl='pallas' takes one Document per mask (one pair of segment id "
                         "arrays); merge the segment ids or use impl='xla'")
    doc = next(iter(ids.values()), None)
    q_seg, kv_seg = (doc.q_segment_ids, doc.kv_ids) if doc else (None, None)
    if fn is None:
        return None, q_seg, kv_seg, None
    if not tables:
        return (lambda q, k, qs, ks: fn(q, k, qs, ks, None)), q_seg, kv_seg, None

    def head_aware(q, k, qs, ks, head, tabs, q_start, k_start):
        return fn(q, k, qs, ks, (head, tabs, q_start, k_start))
    return head_aware, q_seg, kv_seg, tuple(tables)


def _lower(mask, offset, block_q, block_k, documents, tables, under_or, grouped):
    """A function (q, k, qs, ks, ctx) -> bool, or None when the layout alone applies `mask`;
    ctx is (head, tables, q_start, k_start) for head-aware masks, else None."""
    if isinstance(mask, IndexMask):
        return lambda q, k, qs, ks, ctx: mask.fn(q + offset, k)
    if isinstance(mask, Document):
        documents.append(mask)
        return lambda q, k, qs, ks, ctx: qs == ks
    if isinstance(mask, BlockMask):
        aligned = mask.block_size % block_q == 0 and mask.block_size % block_k == 0
        per_head = mask.blocks.ndim == 3 and mask.blocks.shape[0] > 1
        if aligned and not under_or and not (per_head and grouped):
            return None  # constant over each kernel block: the layout alone applies it
        return _block_grid_fn(mask, tables)
    if isinstance(mask, VerticalSlash):
        return _vertical_slash_fn(mask, offset, tables)
    if isinstance(mask, (And, Or)):
        is_or = isinstance(mask, Or)
        fns = [_lower(m, offset, block_q, block_k, documents, tables, under_or or is_or, grouped)
               for m in mask.masks]
        fns = [f for f in fns if f is not None]
        if not fns:
            return None

        def combined(q, k, qs, ks, ctx):
            out = fns[0](q, k, qs, ks, ctx)
            for f in fns[1:]:
                out = (out | f(q, k, qs, ks, ctx)) if is_or else (out & f(q, k, qs, ks, ctx))
            return out
        return combined
    raise ValueError(f"impl='pallas' cannot evaluate a {type(mask).__name__} mask in-kernel")


def _add_table(tables, values):
    """Appends a flat int32 table; returns its position in the kernels' `tables`."""
    tables.append(jnp.asarray(values, jnp.int32).reshape(-1))
    return len(tables) - 1


def _div(x, n):
    """x // n for non-negative int32 x (scalar or array) and a positive int n, as one truncating
    division: Mosaic cannot lower the sign fix-up of a general floor division."""
    x = jnp.asarray(x, jnp.int32)
    return lax.div(x, jnp.full(x.shape, n, jnp.int32))


def _lower_bound(table, base, n, x):
    """First t in [0, n] with table[base + t] >= x, for an ascending run of n entries (a binary
    search of n.bit_length() scalar steps; runs in-kernel on SMEM refs and on arrays)."""
    def step(_, bounds):
        lo, hi = bounds
        mid = _div(lo + hi, 2)
        below = table[base + jnp.minimum(mid, n - 1)] < x
        live = lo < hi
        return (jnp.where(live & below, mid + 1, lo), jnp.where(live & ~below, mid, hi))
    lo, _ = lax.fori_loop(0, n.bit_length(), step, (jnp.int32(0), jnp.int32(n)))
    return lo


def _any_equal(x, table, base, n, lo, hi):
    """bool like x: x equals some entry of the ascending run table[base:base + n] that lies in
    [lo, hi]; only those entries are read."""
    start = _lower_bound(table, base, n, lo)
    stop = _lower_bound(table, base, n, hi + 1)
    return lax.fori_loop(start, stop, lambda t, acc: acc | (x == table[base + t]),
                         jnp.zeros(x.shape, jnp.bool_))


def _vertical_slash_fn(mask: VerticalSlash, offset, tables):
    """Head-aware VerticalSlash: causal, and the key is a listed column or on a listed diagonal
    of the query's head. Entries outside [0, kv_len) never match a real key (as in prepare)."""
    vert = jnp.sort(jnp.asarray(mask.vertical_idx, jnp.int32), axis=-1)
    slash = jnp.sort(jnp.asarray(mask.slash_offsets, jnp.int32), axis=-1)
    (hv, nv), (hs, ns) = vert.shape, slash.shape
    tv, ts = _add_table(tables, vert), _add_table(tables, slash)

    def fn(q, k, qs, ks, ctx):
        head, tabs, q0, k0 = ctx
        bq, bk = q.shape[0], k.shape[1]
        d = q + offset - k  # [bq, bk] diagonal offsets
        cols = _any_equal(k, tabs[tv], (head if hv > 1 else 0) * nv, nv, k0, k0 + bk - 1)
        lo = jnp.maximum(q0 + offset - (k0 + bk - 1), 0)
        diags = _any_equal(d, tabs[ts], (head if hs > 1 else 0) * ns, ns, lo,
                           q0 + bq - 1 + offset - k0)
        return (d >= 0) & (cols | diags)
    return fn


def _block_grid_fn(mask: BlockMask, tables):
    """Head-aware BlockMask: a block ORs the cells of its head's grid that it overlaps."""
    grid = mask.blocks if mask.blocks.ndim == 3 else mask.blocks[None]
    hb, nr, nc = grid.shape
    bs = mask.block_size
    tb = _add_table(tables, jnp.asarray(grid).astype(jnp.int32))

    def fn(q, k, qs, ks, ctx):
        head, tabs, q0, k0 = ctx
        bq, bk = q.shape[0], k.shape[1]
        base = (head if hb > 1 else 0) * (nr * nc)
        q_cell, k_cell = _div(q, bs), _div(k, bs)

        def row(r, vis):
            def col(c, cols):
                return cols | ((k_cell == c) & (tabs[tb][base + r * nc + c] != 0))
            cols = lax.fori_loop(jnp.minimum(_div(k0, bs), nc - 1),
                                 jnp.minimum(_div(k0 + bk - 1, bs), nc - 1) + 1, col,
                                 jnp.zeros(k_cell.shape, jnp.bool_))
            return vis | ((q_cell == r) & cols)
        return lax.fori_loop(jnp.minimum(_div(q0, bs), nr - 1),
                             jnp.minimum(_div(q0 + bq - 1, bs), nr - 1) + 1, row,
                             jnp.zeros((bq, bk), jnp.bool_))
    return fn
