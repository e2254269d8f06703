"""Block layouts as the kernels take them (plain arrays, no Pallas), and their transposes.

A layout over `nq` query blocks and `nk` key blocks, for `Lh` layout heads (1: shared by all
heads; K: one per KV head, already reduced over the query heads of each group):

    kinds      int32 [Lh, nq, nk]          0 skip, 1 partial (apply the mask), 2 full (no mask)
    kv_blocks  int32 [Lh, nq, max_visits]  per query block, the key blocks to visit, ascending
    counts     int32 [Lh, nq]              how many entries of kv_blocks are real

Entries of kv_blocks past counts are ignored. The dK/dV kernels walk the transpose: per key
block, the query blocks that visit it.
"""

from __future__ import annotations

import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2


def layout_from_kinds(kinds, max_visits: int | None = None):
    """(kv_blocks [Lh, nq, max_visits], counts [Lh, nq]) from kinds [Lh, nq, nk]; jit-safe.

    max_visits (static) bounds the key blocks a query block visits; the default nk always fits.
    A row that needs more than max_visits would be silently truncated, so counts are clipped and
    callers pick max_visits from a bound they know (e.g. a static layout's max count).
    """
    kinds = jnp.asarray(kinds, jnp.int32)
    nk = kinds.shape[-1]
    max_visits = nk if max_visits is None else max_visits
    order = jnp.argsort(kinds == SKIP, axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.minimum((kinds != SKIP).sum(-1), max_visits).astype(jnp.int32)
    return order[..., :max_visits], counts


def transpose_layout(kinds, max_visits: int | None = None):
    """(kinds_t [Lh, nk, nq], q_blocks [Lh, nk, max_visits], counts_t [Lh, nk]) for dK/dV."""
    kinds_t = jnp.swapaxes(jnp.asarray(kinds, jnp.int32), -1, -2)
    q_blocks, counts_t = layout_from_kinds(kinds_t, max_visits)
    return kinds_t, q_blocks, counts_t
