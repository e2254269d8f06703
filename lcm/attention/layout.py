"""Lowering a mask to a block layout: per query block, which key blocks to visit and how.

Every backend shares this layout. Kinds: SKIP (no pair visible: never computed), PARTIAL (apply
the element mask), FULL (every pair visible: no mask work). Static masks give NumPy layouts at
trace time; data-dependent masks give jnp layouts computed inside `jit`, which drive the same
loops through index arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention.masks import BlockGeometry, Mask

SKIP, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """A block layout over `geom`.

    kinds [nq, nk] int32 in {SKIP, PARTIAL, FULL}; kv_blocks [nq, nk] int32: for each query
    block, the key blocks to visit first (ascending), then the skipped ones; counts [nq] int32:
    how many key blocks each query block visits.
    """

    kinds: jax.Array
    kv_blocks: jax.Array
    counts: jax.Array
    geom: BlockGeometry = dataclasses.field(metadata=dict(static=True))

    @property
    def num_visits(self):
        """Total number of (query block, key block) pairs computed."""
        return self.counts.sum()

    @property
    def density(self):
        """Fraction of all block pairs that are computed."""
        return self.num_visits / self.kinds.size


def mask_layout(mask: Mask | None, q_len: int, kv_len: int, block_q: int,
                block_k: int) -> BlockLayout:
    """The block layout of `mask` (None: every pair visible) for these lengths and blocks.

    Blocks that contain padding keys (kv_len not a multiple of block_k) are never FULL. A
    data-dependent mask's layout is reduced over the batch: a block is visited if any example
    needs it, and FULL only if it is FULL for all of them.
    """
    geom = BlockGeometry(q_len, kv_len, block_q, block_k)
    nq, nk = geom.num_q_blocks, geom.num_k_blocks
    if mask is None:
        any_, all_ = np.ones((1, nq, nk), bool), np.ones((1, nq, nk), bool)
    else:
        any_, all_ = mask.block_visibility(geom)
    lib = np if isinstance(any_, np.ndarray) and isinstance(all_, np.ndarray) else jnp
    # Reduce a per-example layout [B or 1, nq, nk] over the batch.
    any_ = lib.broadcast_to(any_.any(0), (nq, nk))
    all_ = lib.broadcast_to(all_.all(0), (nq, nk))
    if kv_len % block_k:
        # The last key block holds padding, which the element mask must hide.
        all_ = lib.concatenate([all_[:, :-1], lib.zeros((nq, 1), bool)], axis=1)
    kinds = lib.where(any_, lib.where(all_, FULL, PARTIAL), SKIP).astype(lib.int32)
    # Stable sort on "is skipped" puts the visited blocks first, in ascending order.
    kv_blocks = lib.argsort(kinds == SKIP, axis=1, stable=True).astype(lib.int32)
    counts = (kinds != SKIP).sum(axis=1).astype(lib.int32)
    return BlockLayout(kinds=kinds, kv_blocks=kv_blocks, counts=counts, geom=geom)
