"""The block layout of one (device, ring step): a slice of the global layout, and the mask there.

Every block of a `RingOrder` lies inside one chunk, so the key blocks that device d's query
blocks meet at ring step s (keys of device (d - s) mod P) are rows and columns of the global
block layout over the original positions. Static masks give that global layout in NumPy at trace
time; masks holding arrays (Document, a jax-array BlockMask, VerticalSlash) give it inside `jit`
from their (replicated) arrays. The element mask of PARTIAL blocks is the global mask evaluated
at the original positions of the local rows and keys (`PlacedMask`), which also hides padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.kernels.block_sparse.layout import layout_from_kinds
from lcm.attention.layout import FULL, PARTIAL, SKIP, BlockLayout
from lcm.attention.masks import BlockGeometry, Mask
from lcm.attention.ring.order import RingOrder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlacedMask(Mask):
    """`base` seen from local rows and keys: local index i is original position q_pos[i]."""

    base: Mask | None
    q_pos: jax.Array
    k_pos: jax.Array
    length: int = dataclasses.field(metadata=dict(static=True))

    is_static = False

    def visible(self, q_idx, k_idx, offset):
        del offset  # ring attention is self-attention over one sequence: offset 0
        qp = jnp.take(self.q_pos, jnp.clip(q_idx, 0, self.q_pos.shape[0] - 1))
        kp = jnp.take(self.k_pos, jnp.clip(k_idx, 0, self.k_pos.shape[0] - 1))
        real = (kp < self.length)[None, None, None, :]  # padding keys are never visible
        if self.base is None:
            return real
        return self.base.visible(qp, kp, 0) & real


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """Static facts of one ring attention call (hashable)."""

    order: RingOrder
    block_q: int
    block_k: int
    max_visits: int  # most key blocks a local query block visits in one step
    num_steps: int  # ring steps some device needs (keys from up to num_steps - 1 hops away)

    @property
    def geom(self) -> BlockGeometry:
        n = self.order.shard_length
        return BlockGeometry(n, n, self.block_q, self.block_k)

    @property
    def global_geom(self) -> BlockGeometry:
        L = self.order.length
        return BlockGeometry(L, L, self.block_q, self.block_k)


def block_rows(order: RingOrder, block: int, device):
    """Global block indices of a device's local blocks, in local order. device: int or traced."""
    per_chunk = order.chunk_size // block
    chunks = jnp.asarray(np.asarray(order.chunks, np.int32))[device]
    return (chunks[:, None] * per_chunk + jnp.arange(per_chunk, dtype=jnp.int32)[None]).reshape(-1)


def token_positions(order: RingOrder, device):
    """Original positions of a device's local tokens, int32 [shard_length]."""
    return block_rows(order, 1, device)


def _np_rows(order, block, device):
    per_chunk = order.chunk_size // block
    chunks = np.asarray(order.chunks[device])
    return (chunks[:, None] * per_chunk + np.arange(per_chunk)[None]).reshape(-1)


def global_kinds(mask: Mask | None, plan: RingPlan, lib=np):
    """kinds [nq_padded, nk_padded] int32 of the whole (padded) sequence in original order."""
    geom = plan.global_geom
    nq, nk = geom.num_q_blocks, geom.num_k_blocks
    if mask is None:
        any_ = lib.ones((nq, nk), bool)
        all_ = any_
    else:
        any_, all_ = mask.block_visibility(geom)
        any_, all_ = lib.asarray(any_).any((0, 1)), lib.asarray(all_).all((0, 1))
    if geom.kv_len % geom.block_k:  # the last key block holds padding the element mask hides
        all_ = all_ & (lib.arange(nk) < nk - 1)[None, :]
    kinds = lib.where(any_, lib.where(all_, FULL, PARTIAL), SKIP).astype(lib.int32)
    Lp = plan.order.padded_length
    return lib.pad(kinds, ((0, Lp // plan.block_q - nq), (0, Lp // plan.block_k - nk)))


@functools.lru_cache(maxsize=64)
def _cached_static_kinds(mask, plan):
    return global_kinds(mask, plan, np)


def static_kinds(mask, plan):
    """Global kinds of a static mask (cached when the mask is hashable)."""
    try:
        return _cached_static_kinds(mask, plan)
    except TypeError:  # an unhashable static mask (a NumPy BlockMask)
        return global_kinds(mask, plan, np)


def make_plan(mask: Mask | None, order: RingOrder, block_q: int, block_k: int) -> RingPlan:
    """Visit bound and step count from the static part of `mask` (trace time, NumPy)."""
    plan = RingPlan(order, block_q, block_k, 1, order.num_devices)
    geom = plan.global_geom
    if mask is None:
        bound = np.ones((geom.num_q_blocks, geom.num_k_blocks), bool)
    else:
        bound = np.asarray(mask.static_bound(geom))
    Lp = order.padded_length
    bound = np.pad(bound, ((0, Lp // block_q - bound.shape[0]),
                           (0, Lp // block_k - bound.shape[1])))
    P = order.num_devices
    rows = [_np_rows(order, block_q, d) for d in range(P)]
    cols = [_np_rows(order, block_k, d) for d in range(P)]
    visits, steps = 1, 1
    for d in range(P):
        for s in range(P):
            n = bound[rows[d]][:, cols[(d - s) % P]].sum(-1).max()
            if n:
                visits, steps = max(visits, int(n)), max(steps, s + 1)
    return dataclasses.replace(plan, max_visits=visits, num_steps=steps)


def step_layout(kinds_g, plan: RingPlan, device, source) -> BlockLayout:
    """The BlockLayout of device's queries against source's keys (both may be traced)."""
    rows = block_rows(plan.order, plan.block_q, device)
    cols = block_rows(plan.order, plan.block_k, source)
    kinds = jnp.asarray(kinds_g)[rows[:, None], cols[None, :]][None]
    kv_blocks, counts = layout_from_kinds(kinds, plan.max_visits)
    return BlockLayout(kinds=kinds, kv_blocks=kv_blocks, counts=counts, geom=plan.geom,
                       max_visits=plan.max_visits)


def placed_mask(mask, plan: RingPlan, device, source) -> PlacedMask:
    return PlacedMask(mask, token_positions(plan.order, device),
                      token_positions(plan.order, source), plan.order.length)


def gathered_layout(kinds_g, mask, plan: RingPlan, device):
    """Layout and mask of device's queries against every key in ring order (all-gather)."""
    order = plan.order
    P = order.num_devices
    rows = block_rows(order, plan.block_q, device)
    cols = jnp.concatenate([block_rows(order, plan.block_k, d) for d in range(P)])
    kinds = jnp.asarray(kinds_g)[rows[:, None], cols[None, :]][None]
    max_visits = min(plan.max_visits * plan.num_steps, kinds.shape[-1])
    kv_blocks, counts = layout_from_kinds(kinds, max_visits)
    geom = BlockGeometry(order.shard_length, order.padded_length, plan.block_q, plan.block_k)
    layout = BlockLayout(kinds=kinds, kv_blocks=kv_blocks, counts=counts, geom=geom,
                         max_visits=max_visits)
    positions = jnp.concatenate([token_positions(order, d) for d in range(P)])
    return layout, PlacedMask(mask, token_positions(order, device), positions, order.length)
