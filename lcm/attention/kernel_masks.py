"""Masks as the Pallas kernels take them: an in-kernel `mask_fn`, segment ids and mask tables.

The kernels (kernels/block_sparse) evaluate `mask_fn` on PARTIAL blocks only. Each mask lowers
itself (`Mask.kernel_fn`, next to its other answers in lcm.attention.masks, data_masks and
mask_fn); `kernel_mask` hands it a `KernelLowering` that collects what the kernels take besides
the function: one pair of segment ids (Document) and 1-D int32 `mask_tables` (scalar prefetch
into SMEM on TPU). With tables, or when a mask reads the head index, mask_fn follows the
kernels' head-aware protocol (reference.py): it is called per query head with the block's
origin, so each head of a GQA group applies its own mask while the group shares the K/V fetch.

The helpers below (`div`, `lower_bound`, `any_equal`) are what table-reading masks use in-kernel:
scalar loops over SMEM refs that also run on plain arrays.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from lcm.attention.masks import Mask


@dataclasses.dataclass
class KernelLowering:
    """What the kernels need besides `mask_fn`, collected while a mask lowers itself.

    offset: kv_len - q_len (query row i sits at key coordinate i + offset); block_q / block_k:
    the kernels' blocks; grouped: one layout serves several query heads (GQA, per-KV-head
    layout), so a per-head mask cannot rely on the layout alone.
    """

    offset: int
    block_q: int
    block_k: int
    grouped: bool = False
    batch: int | None = None   # the lengths and batch size of the call, for masks that build
    q_len: int | None = None   # per-example arrays (a MaskFn reading the batch index)
    kv_len: int | None = None
    segments: dict = dataclasses.field(default_factory=dict)  # (id, id) -> (q ids, kv ids)
    tables: list = dataclasses.field(default_factory=list)
    head_aware: bool = False

    def add_segments(self, q_segment_ids, kv_segment_ids) -> None:
        """Registers the segment ids the kernels pass to mask_fn as q_seg / k_seg."""
        self.segments[(id(q_segment_ids), id(kv_segment_ids))] = (q_segment_ids, kv_segment_ids)

    def add_table(self, values) -> int:
        """Appends a flat int32 table (makes mask_fn head-aware); returns its position in the
        kernels' `tables`."""
        self.tables.append(jnp.asarray(values, jnp.int32).reshape(-1))
        self.head_aware = True
        return len(self.tables) - 1

    def need_head(self) -> None:
        """mask_fn reads ctx's head (the query head) even without tables."""
        self.head_aware = True


def kernel_mask(mask: Mask | None, *, offset: int, block_q: int, block_k: int,
                batch: int | None = None, q_len: int | None = None, kv_len: int | None = None,
                grouped: bool = False):
    """(mask_fn or None, q_segment_ids or None, kv_segment_ids or None, mask_tables or None).

    With mask_tables (a tuple of 1-D int32 arrays), mask_fn is head-aware (reference.py's
    protocol). `grouped`: the layout is shared by several query heads (GQA with a per-KV-head
    layout). Raises ValueError for masks the kernels cannot evaluate in-kernel.
    """
    if mask is None:
        return None, None, None, None
    lowering = KernelLowering(offset, block_q, block_k, grouped, batch, q_len, kv_len)
    fn = mask.kernel_fn(lowering, under_or=False)
    if len(lowering.segments) > 1:
        raise ValueError("impl='pallas' passes the kernels one pair of segment id arrays, and "
                         "this mask needs two (several Documents, or a Document and a MaskFn "
                         "that reads the batch index): merge them or use impl='xla'")
    q_seg, kv_seg = next(iter(lowering.segments.values()), (None, None))
    if fn is None:
        return None, q_seg, kv_seg, None
    if not lowering.head_aware:
        return (lambda q, k, qs, ks: fn(q, k, qs, ks, None)), q_seg, kv_seg, None
    # The kernels call mask_fn per query head only when it reads tables: a mask that reads
    # just the head index passes a one-word placeholder.
    tables = tuple(lowering.tables) or (jnp.zeros((1,), jnp.int32),)

    def head_aware(q, k, qs, ks, head, tabs, q_start, k_start):
        return fn(q, k, qs, ks, (head, tabs, q_start, k_start))
    return head_aware, q_seg, kv_seg, tables


def div(x, n):
    """x // n for non-negative int32 x (scalar or array) and a positive int n, as one truncating
    division: Mosaic cannot lower the sign fix-up of a general floor division."""
    x = jnp.asarray(x, jnp.int32)
    return lax.div(x, jnp.full(x.shape, n, jnp.int32))


def lower_bound(table, base, n, x):
    """First t in [0, n] with table[base + t] >= x, for an ascending run of n entries (a binary
    search of n.bit_length() scalar steps; runs in-kernel on SMEM refs and on arrays)."""
    def step(_, bounds):
        lo, hi = bounds
        mid = div(lo + hi, 2)
        below = table[base + jnp.minimum(mid, n - 1)] < x
        live = lo < hi
        return (jnp.where(live & below, mid + 1, lo), jnp.where(live & ~below, mid, hi))
    lo, _ = lax.fori_loop(0, n.bit_length(), step, (jnp.int32(0), jnp.int32(n)))
    return lo


def any_equal(x, table, base, n, lo, hi):
    """bool like x: x equals some entry of the ascending run table[base:base + n] that lies in
    [lo, hi]; only those entries are read."""
    start = lower_bound(table, base, n, lo)
    stop = lower_bound(table, base, n, hi + 1)
    return lax.fori_loop(start, stop, lambda t, acc: acc | (x == table[base + t]),
                         jnp.zeros(x.shape, jnp.bool_))
