"""Lowering a mask to a block layout: per query block, which key blocks to visit and how.

Every backend shares this layout. Kinds: SKIP (no pair visible: never computed), PARTIAL (apply
the element mask), FULL (every pair visible: no mask work). Static masks give NumPy layouts at
trace time (cached); data-dependent masks give jnp layouts computed inside `jit`, which drive the
same loops and kernels through index arrays, with a static bound on the key blocks per row taken
from the mask's static part.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention.masks import BlockGeometry, Mask

SKIP, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, init=False)
class BlockLayout:
    """A block layout over `geom` for `Lh` layout heads (1: shared; K: one per KV head).

    kv_blocks [Lh, nq, max_visits] int32: for each query block, the key blocks to visit
    (ascending), then filler; visit_kinds [Lh, nq, max_visits] int32: the kind of each visit
    (PARTIAL or FULL; SKIP in filler); counts [Lh, nq] int32: how many visits are real.
    max_visits is static: no row of any layout of this mask at these shapes visits more. The
    layout is O(nq * max_visits), so a static Local(w) layout stays small at any length.

    `kinds` [Lh, nq, nk] (SKIP, PARTIAL, FULL per block pair) is derived on demand and is
    O(nq * nk): for inspection and for code that wants the dense grid. Constructing with
    `kinds=` (and kv_blocks, counts) still works; the visit kinds are then read from it.
    """

    visit_kinds: jax.Array
    kv_blocks: jax.Array
    counts: jax.Array
    geom: BlockGeometry
    max_visits: int

    def __init__(self, kinds=None, kv_blocks=None, counts=None, geom=None, max_visits=None, *,
                 visit_kinds=None):
        if visit_kinds is None:
            if kinds is None:
                raise ValueError("BlockLayout needs visit_kinds (or the dense kinds)")
            lib = _lib(kinds, kv_blocks)
            visit_kinds = lib.take_along_axis(lib.asarray(kinds), lib.asarray(kv_blocks), axis=-1)
        for name, value in (("visit_kinds", visit_kinds), ("kv_blocks", kv_blocks),
                            ("counts", counts), ("geom", geom), ("max_visits", max_visits)):
            object.__setattr__(self, name, value)

    @property
    def kinds(self):
        """The dense kinds [Lh, nq, nk] (NumPy for static layouts), derived from the visits."""
        lib = _lib(self.visit_kinds, self.kv_blocks, self.counts)
        Lh, nq, width = self.kv_blocks.shape
        real = lib.arange(width)[None, None, :] < self.counts[..., None]
        kinds = lib.where(real, self.visit_kinds, SKIP).astype(lib.int32)
        heads = lib.broadcast_to(lib.arange(Lh)[:, None, None], (Lh, nq, width))
        rows = lib.broadcast_to(lib.arange(nq)[None, :, None], (Lh, nq, width))
        # Filler entries (kind SKIP) may name a real block again: max keeps the real kind.
        shape = (Lh, nq, self.geom.num_k_blocks)
        if lib is np:
            dense = np.zeros(shape, np.int32)
            np.maximum.at(dense, (heads, rows, self.kv_blocks), kinds)
            return dense
        return jnp.zeros(shape, jnp.int32).at[heads, rows, self.kv_blocks].max(kinds)

    @property
    def num_visits(self):
        """Block pairs computed (summed over layout heads)."""
        return self.counts.sum()

    @property
    def density(self):
        """Fraction of all block pairs that are computed."""
        Lh = self.counts.shape[0]
        return self.num_visits / (Lh * self.geom.num_q_blocks * self.geom.num_k_blocks)

    def shared(self) -> BlockLayout:
        """The union over layout heads (Lh = 1): visited if any head visits, FULL if all are."""
        if self.counts.shape[0] == 1:
            return self
        kinds = self.kinds
        any_, all_ = (kinds != SKIP).any(0), (kinds == FULL).all(0)
        lib = _lib(kinds)
        # The union may visit more blocks per row than any one head: recount when static (a
        # traced layout's max_visits is already a bound over every head).
        max_visits = max(int(any_.sum(-1).max()), 1) if lib is np else self.max_visits
        return _from_any_all(any_[None], all_[None], self.geom, max_visits, lib)


def _flatten(layout):
    return (layout.visit_kinds, layout.kv_blocks, layout.counts), (layout.geom, layout.max_visits)


def _unflatten(aux, children):
    visit_kinds, kv_blocks, counts = children
    return BlockLayout(kv_blocks=kv_blocks, counts=counts, geom=aux[0], max_visits=aux[1],
                       visit_kinds=visit_kinds)


jax.tree_util.register_pytree_node(BlockLayout, _flatten, _unflatten)


def _lib(*arrays):
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def mask_layout(mask: Mask | None, q_len: int, kv_len: int, block_q: int, block_k: int, *,
                num_heads: int = 1, num_kv_heads: int | None = None) -> BlockLayout:
    """The block layout of `mask` (None: every pair visible) for these lengths and blocks.

    With `num_kv_heads`, a per-head mask gives one layout per KV head (the union over the query
    heads of its group); otherwise one layout for all heads. Per-example layouts are reduced over
    the batch (a block is visited if any example needs it, FULL only if FULL for all). Blocks
    holding padding keys (kv_len not a multiple of block_k) are never FULL.
    """
    geom = BlockGeometry(q_len, kv_len, block_q, block_k)
    if mask is None or mask.is_static:
        layout_fn = _cached_static_layout if _hashable(mask) else _static_layout
        return layout_fn(mask, geom, num_heads, num_kv_heads)
    any_, all_ = mask.block_visibility(geom)
    any_, all_ = _reduce_heads(any_, all_, num_heads, num_kv_heads, jnp)
    max_visits = int(mask.static_bound(geom).sum(-1).max())
    return _from_any_all(any_, all_, geom, max(max_visits, 1), jnp)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:  # e.g. a BlockMask over a NumPy grid
        return False
    return True


def _static_layout(mask, geom, num_heads, num_kv_heads):
    nq, nk = geom.num_q_blocks, geom.num_k_blocks
    if mask is None:
        any_, all_ = np.ones((1, 1, nq, nk), bool), np.ones((1, 1, nq, nk), bool)
    else:
        any_, all_ = (np.asarray(a) for a in mask.block_visibility(geom))
    any_, all_ = _reduce_heads(any_, all_, num_heads, num_kv_heads, np)
    max_visits = int(any_.sum(-1).max())
    return _from_any_all(any_, all_, geom, max(max_visits, 1), np)


_cached_static_layout = functools.lru_cache(maxsize=256)(_static_layout)


def _reduce_heads(any_, all_, num_heads, num_kv_heads, lib):
    """[B|1, H|1, nq, nk] -> [Lh, nq, nk]: over the batch, then over heads or query groups."""
    any_, all_ = any_.any(0), all_.all(0)
    if num_kv_heads is None or any_.shape[0] == 1 and all_.shape[0] == 1:
        return any_.any(0, keepdims=True), all_.all(0, keepdims=True)
    nq, nk = any_.shape[-2:]
    group = num_heads // num_kv_heads
    any_ = lib.broadcast_to(any_, (num_heads, nq, nk)).reshape(num_kv_heads, group, nq, nk)
    all_ = lib.broadcast_to(all_, (num_heads, nq, nk)).reshape(num_kv_heads, group, nq, nk)
    return any_.any(1), all_.all(1)


def _from_any_all(any_, all_, geom, max_visits, lib):
    """kinds, kv_blocks, counts from per-block any/all [Lh, nq, nk]."""
    if geom.kv_len % geom.block_k:
        # The last key block holds padding, which the element mask must hide.
        last = (lib.arange(geom.num_k_blocks) == geom.num_k_blocks - 1)[None, None]
        all_ = all_ & ~last
    kinds = lib.where(any_, lib.where(all_, FULL, PARTIAL), SKIP).astype(lib.int32)
    # A stable sort on "is skipped" puts the visited blocks first, in ascending order.
    order = lib.argsort(kinds == SKIP, axis=-1, stable=True).astype(lib.int32)[..., :max_visits]
    counts = (kinds != SKIP).sum(-1).astype(lib.int32)
    visit_kinds = lib.take_along_axis(kinds, order, axis=-1)
    return BlockLayout(kv_blocks=order, counts=counts, geom=geom, max_visits=max_visits,
                       visit_kinds=visit_kinds)
