"""Block layouts as the kernels take them (plain arrays, no Pallas), and their transposes.

A layout over `nq` query blocks and `nk` key blocks, for `Lh` layout heads (1: shared by all
heads; K: one per KV head, already reduced over the query heads of each group):

    kv_blocks    int32 [Lh, nq, max_visits]  per query block, the key blocks to visit, ascending
    visit_kinds  int32 [Lh, nq, max_visits]  the kind of each visit: 1 partial (apply the
                                             mask), 2 full (no mask work)
    counts       int32 [Lh, nq]              how many entries of kv_blocks are real

Entries past counts are ignored. This compressed form is O(nq * max_visits); the dense grid
`kinds` int32 [Lh, nq, nk] (0 skip, 1 partial, 2 full) is accepted too, for convenience. The
dK/dV kernels walk the transpose (per key block, the query blocks that visit it), which
`transpose_visits` builds from the visit lists alone, without the dense grid.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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


def transpose_visits(kv_blocks, visit_kinds, counts, num_k_blocks: int,
                     max_q_visits: int | None = None):
    """(q_blocks [Lh, nk, w], kinds_t [Lh, nk, w], counts_t [Lh, nk]) from the visit lists;
    jit-safe, O(V log V) in the V = Lh * nq * max_visits listed visits (no [nq, nk] grid).

    Per key block j, the query blocks that list j, ascending, with the kind of that visit.
    w = max_q_visits (static; default nq) bounds them: longer columns are truncated, so callers
    pick it from a bound they know (`max_q_visits_of`).
    """
    kv_blocks = jnp.asarray(kv_blocks, jnp.int32)
    Lh, nq, width = kv_blocks.shape
    nk, w = num_k_blocks, nq if max_q_visits is None else max_q_visits
    counts = jnp.asarray(counts, jnp.int32)
    real = jnp.arange(width, dtype=jnp.int32)[None, None] < counts[..., None]
    rows = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (Lh, nq, width))
    # Sort every visit by (key block, query block); filler sorts last, into row nk (dropped).
    key = jnp.where(real, kv_blocks * nq + rows, nk * nq).reshape(Lh, -1)
    order = jnp.argsort(key, axis=-1, stable=True)
    key = jnp.take_along_axis(key, order, axis=-1)
    kind = jnp.take_along_axis(jnp.asarray(visit_kinds, jnp.int32).reshape(Lh, -1), order, -1)
    j, i = key // nq, key % nq
    heads = jnp.broadcast_to(jnp.arange(Lh)[:, None], key.shape)
    counts_t = jnp.zeros((Lh, nk + 1), jnp.int32).at[heads, j].add(1)[:, :nk]
    start = jnp.cumsum(counts_t, -1) - counts_t
    pos = jnp.arange(key.shape[1], dtype=jnp.int32)[None] - jnp.take_along_axis(
        jnp.pad(start, ((0, 0), (0, 1))), j, -1)
    q_blocks = jnp.zeros((Lh, nk, w), jnp.int32).at[heads, j, pos].set(i, mode="drop")
    kinds_t = jnp.zeros((Lh, nk, w), jnp.int32).at[heads, j, pos].set(kind, mode="drop")
    return q_blocks, kinds_t, jnp.minimum(counts_t, w)


def max_q_visits_of(kv_blocks, counts, num_k_blocks: int) -> int:
    """The most query blocks that visit one key block, from concrete visit lists (NumPy)."""
    kv_blocks, counts = np.asarray(kv_blocks), np.asarray(counts)
    real = np.arange(kv_blocks.shape[-1]) < counts[..., None]
    heads = np.broadcast_to(np.arange(kv_blocks.shape[0])[:, None, None], kv_blocks.shape)
    per_block = np.zeros((kv_blocks.shape[0], num_k_blocks), np.int64)
    np.add.at(per_block, (heads[real], np.clip(kv_blocks[real], 0, num_k_blocks - 1)), 1)
    return max(int(per_block.max(initial=0)), 1)
