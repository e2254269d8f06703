"""Masks that hold arrays, possibly computed inside `jit`: Document, BlockMask, VerticalSlash."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from lcm.attention.kernel_masks import any_equal, div
from lcm.attention.masks import Causal, Mask


def _check_int_array(owner, name, x, shape_desc, ndims):
    if getattr(x, "ndim", None) not in ndims:
        raise ValueError(f"{owner} {name} has shape {getattr(x, 'shape', None)}; expected "
                         f"{shape_desc}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{owner} {name} dtype {x.dtype}; expected an integer dtype")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Document(Mask):
    """Packed sequences: a query sees only keys of the same segment id.

    q_segment_ids [B, q_len] int; kv_segment_ids [B, kv_len] (defaults to q_segment_ids, which
    then needs q_len == kv_len). Combine with Causal() for packed causal LM training.
    """

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array | None = None

    is_static = False

    @property
    def kv_ids(self):
        return self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def validate(self, batch, num_heads, q_len, kv_len):
        q, kv = self.q_segment_ids, self.kv_ids
        if q.ndim != 2 or q.shape != (batch, q_len):
            raise ValueError(f"Document q_segment_ids shape {tuple(q.shape)}; expected "
                             f"[batch, q_len] = {(batch, q_len)}")
        if kv.ndim != 2 or kv.shape != (batch, kv_len):
            hint = (" (pass kv_segment_ids when q_len != kv_len)"
                    if self.kv_segment_ids is None else "")
            raise ValueError(f"Document kv_segment_ids shape {tuple(kv.shape)}; expected "
                             f"[batch, kv_len] = {(batch, kv_len)}{hint}")
        for name, ids in (("q_segment_ids", q), ("kv_segment_ids", kv)):
            _check_int_array("Document", name, ids, "[batch, length]", (2,))

    def check_original_order(self, length):
        for ids in (self.q_segment_ids, self.kv_segment_ids):
            if ids is not None and (getattr(ids, "ndim", None) != 2 or ids.shape[1] != length):
                raise ValueError(f"Document segment ids shape {getattr(ids, 'shape', None)}: "
                                 f"with a RingOrder they stay in the original order, [batch, "
                                 f"{length}] (do not pass them through order.to_ring)")

    def shard_specs(self, batch_spec):
        """Segment ids follow the batch and stay whole along the sequence: the layout and the
        element mask read them at original positions on every device."""
        spec = PartitionSpec(batch_spec, None)
        return dataclasses.replace(self, q_segment_ids=spec,
                                   kv_segment_ids=None if self.kv_segment_ids is None else spec)

    def kernel_fn(self, lowering, *, under_or=False):
        """The kernels slice the segment ids per block (q_seg [bq, 1], k_seg [1, bk])."""
        lowering.add_segments(self.q_segment_ids, self.kv_ids)
        return lambda q, k, qs, ks, ctx: qs == ks

    def visible(self, q_idx, k_idx, offset):
        del offset
        q, kv = self.q_segment_ids, self.kv_ids
        qs = jnp.take(q, jnp.clip(q_idx, 0, q.shape[1] - 1), axis=1)
        ks = jnp.take(kv, jnp.clip(k_idx, 0, kv.shape[1] - 1), axis=1)
        return (qs[:, :, None] == ks[:, None, :])[:, None]

    def block_visibility(self, geom):
        qmin, qmax = _block_min_max(self.q_segment_ids, geom.block_q)
        kmin, kmax = _block_min_max(self.kv_ids, geom.block_k)
        # Any: the id ranges of the two blocks overlap (conservative). All: one shared id.
        any_ = (qmax[:, :, None] >= kmin[:, None, :]) & (kmax[:, None, :] >= qmin[:, :, None])
        all_ = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
                & (qmin[:, :, None] == kmin[:, None, :]))
        return any_[:, None], all_[:, None]


def _block_min_max(ids, block):
    """Per-block min and max of ids [B, L] -> two [B, ceil(L/block)] arrays (edge-padded)."""
    length = ids.shape[1]
    pad = -length % block
    ids = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(ids.shape[0], -1, block)
    return ids.min(-1), ids.max(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask(Mask):
    """A boolean grid over blocks of `block_size` tokens: [heads, q_blocks, k_blocks] or
    [q_blocks, k_blocks]; cell (i, j) makes query rows i*bs.. see keys j*bs... (FlexAttention's
    BlockMask). Independent of the kernels' own block sizes. A NumPy grid is static (layout at
    trace time); a jax array grid is data-dependent (layout inside `jit`).
    """

    blocks: jax.Array | np.ndarray
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        # Only the static field is checked here: JAX rebuilds pytrees with placeholder leaves.
        if not isinstance(self.block_size, (int, np.integer)) or self.block_size <= 0:
            raise ValueError(f"BlockMask(block_size={self.block_size!r}); expected a positive int")

    @property
    def is_static(self):
        return isinstance(self.blocks, np.ndarray)

    @property
    def _grid(self):
        """[H or 1, q_blocks, k_blocks]."""
        return self.blocks if self.blocks.ndim == 3 else self.blocks[None]

    @property
    def per_head(self):
        return self.blocks.ndim == 3 and self.blocks.shape[0] > 1

    def kernel_fn(self, lowering, *, under_or=False):
        """None when the cells are whole kernel blocks, not under `|`, and shared by each
        group: the layout is then exact. Otherwise head-aware: the grid travels flattened as a
        table and a block ORs the cells of its head's grid that it overlaps."""
        bs = self.block_size
        aligned = bs % lowering.block_q == 0 and bs % lowering.block_k == 0
        if aligned and not under_or and not (self.per_head and lowering.grouped):
            return None
        hb, nr, nc = self._grid.shape
        tb = lowering.add_table(jnp.asarray(self._grid).astype(jnp.int32))

        def fn(q, k, qs, ks, ctx):
            head, tabs, q0, k0 = ctx
            bq, bk = q.shape[0], k.shape[1]
            base = (head if hb > 1 else 0) * (nr * nc)
            q_cell, k_cell = div(q, bs), div(k, bs)

            def row(r, vis):
                def col(c, cols):
                    return cols | ((k_cell == c) & (tabs[tb][base + r * nc + c] != 0))
                cols = lax.fori_loop(jnp.minimum(div(k0, bs), nc - 1),
                                     jnp.minimum(div(k0 + bk - 1, bs), nc - 1) + 1, col,
                                     jnp.zeros(k_cell.shape, jnp.bool_))
                return vis | ((q_cell == r) & cols)
            return lax.fori_loop(jnp.minimum(div(q0, bs), nr - 1),
                                 jnp.minimum(div(q0 + bq - 1, bs), nr - 1) + 1, row,
                                 jnp.zeros((bq, bk), jnp.bool_))
        return fn

    def validate(self, batch, num_heads, q_len, kv_len):
        if getattr(self.blocks, "ndim", None) not in (2, 3) or self.blocks.dtype != bool:
            raise ValueError(f"BlockMask blocks: shape {getattr(self.blocks, 'shape', None)}, "
                             f"dtype {getattr(self.blocks, 'dtype', None)}; expected bool "
                             f"[heads, q_blocks, k_blocks] or [q_blocks, k_blocks]")
        bs = self.block_size
        want = (-(-q_len // bs), -(-kv_len // bs))
        h, *grid = self._grid.shape
        if tuple(grid) != want or h not in (1, num_heads):
            raise ValueError(f"BlockMask blocks shape {tuple(self.blocks.shape)}; expected "
                             f"[{num_heads} or none, ceil(q_len/{bs}), ceil(kv_len/{bs})] = "
                             f"[.., {want[0]}, {want[1]}]")

    def visible(self, q_idx, k_idx, offset):
        del offset
        grid = jnp.asarray(self._grid)
        qb = jnp.clip(q_idx // self.block_size, 0, grid.shape[1] - 1)
        kb = jnp.clip(k_idx // self.block_size, 0, grid.shape[2] - 1)
        return grid[:, qb[:, None], kb[None, :]][None]

    def block_visibility(self, geom):
        lib = np if self.is_static else jnp
        grid = self._grid
        bs = self.block_size
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        # Cells covered by each kernel block: rows r0..r1-1 [nq, 1], columns c0..c1-1 [1, nk].
        r0, r1 = qlo // bs, qhi // bs + 1
        c0, c1 = klo // bs, khi // bs + 1
        # 2-D prefix sums count the visible cells of every such rectangle in O(1).
        csum = lib.pad(lib.cumsum(lib.cumsum(grid.astype(lib.int32), 1), 2),
                       ((0, 0), (1, 0), (1, 0)))
        count = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
        cells = ((r1 - r0) * (c1 - c0))[None]
        return (count > 0)[None], (count == cells)[None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerticalSlash(Mask):
    """MInference's vertical-slash pattern (causal): per head, a few key columns seen by every
    query (vertical_idx [H, nv], key positions) and a few diagonals (slash_offsets [H, ns],
    query position - key position >= 0). Padding entries may repeat a real index.
    """

    vertical_idx: jax.Array
    slash_offsets: jax.Array
    _tables: tuple | None = None  # (columns [H, S], diagonals [H, S]) once prepared

    is_static = False

    def validate(self, batch, num_heads, q_len, kv_len):
        for name, x in (("vertical_idx", self.vertical_idx), ("slash_offsets", self.slash_offsets)):
            _check_int_array("VerticalSlash", name, x, "[heads, n]", (2,))
            if x.shape[0] not in (1, num_heads):
                raise ValueError(f"VerticalSlash {name} has {x.shape[0]} heads; expected 1 or "
                                 f"{num_heads}")

    @property
    def per_head(self):
        return max(self.vertical_idx.shape[0], self.slash_offsets.shape[0]) > 1

    def static_bound(self, geom):
        """Causal: no block above the diagonal is ever needed."""
        return Causal().static_bound(geom)

    def kernel_fn(self, lowering, *, under_or=False):
        """Head-aware: causal, and the key is a listed column or on a listed diagonal of the
        query's head. The sorted lists travel as tables; a block reads only the entries that
        cross it (two binary searches per list), so its cost is O(log n + hits) scalar reads
        and one compare per hit, never a dense [T, S] mask. Entries outside [0, kv_len) never
        match a real key (as in prepare)."""
        offset = lowering.offset
        vert = jnp.sort(jnp.asarray(self.vertical_idx, jnp.int32), axis=-1)
        slash = jnp.sort(jnp.asarray(self.slash_offsets, jnp.int32), axis=-1)
        (hv, nv), (hs, ns) = vert.shape, slash.shape
        tv, ts = lowering.add_table(vert), lowering.add_table(slash)

        def fn(q, k, qs, ks, ctx):
            head, tabs, q0, k0 = ctx
            bq, bk = q.shape[0], k.shape[1]
            d = q + offset - k  # [bq, bk] diagonal offsets
            cols = any_equal(k, tabs[tv], (head if hv > 1 else 0) * nv, nv, k0, k0 + bk - 1)
            lo = jnp.maximum(q0 + offset - (k0 + bk - 1), 0)
            diags = any_equal(d, tabs[ts], (head if hs > 1 else 0) * ns, ns, lo,
                              q0 + bq - 1 + offset - k0)
            return (d >= 0) & (cols | diags)
        return fn

    def prepare(self, q_len, kv_len, *, batch=None, num_heads=None):
        """Dense per-head tables over key positions and diagonal offsets (0..kv_len-1)."""
        def table(idx):
            heads = jnp.arange(idx.shape[0])[:, None]
            ok = (idx >= 0) & (idx < kv_len)
            return jnp.zeros((idx.shape[0], kv_len), bool).at[
                heads, jnp.clip(idx, 0, kv_len - 1)].max(ok)
        return dataclasses.replace(self, _tables=(table(self.vertical_idx),
                                                  table(self.slash_offsets)))

    def visible(self, q_idx, k_idx, offset):
        if self._tables is None:
            raise ValueError("VerticalSlash.visible needs the tables of prepare(q_len, kv_len); "
                             "attend() prepares masks itself")
        columns, diagonals = self._tables
        S = columns.shape[1]
        d = q_idx[:, None] + offset - k_idx[None, :]
        col = jnp.take(columns, jnp.clip(k_idx, 0, S - 1), axis=1)[:, None, :]
        diag = jnp.take(diagonals, jnp.clip(d, 0, S - 1), axis=1)
        return ((d >= 0)[None] & (col | diag))[None]

    def block_visibility(self, geom):
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        qlo, qhi = qlo + geom.offset, qhi + geom.offset
        vert = jnp.sort(self.vertical_idx, axis=-1)
        slash = jnp.sort(self.slash_offsets, axis=-1)

        def any_in(sorted_vals, lo, hi):  # per head: any value in [lo, hi] (elementwise ranges)
            n_le_hi = jax.vmap(lambda v: jnp.searchsorted(v, hi, side="right"))(sorted_vals)
            n_lt_lo = jax.vmap(lambda v: jnp.searchsorted(v, lo, side="left"))(sorted_vals)
            return n_le_hi > n_lt_lo

        causal = jnp.asarray(klo <= qhi)
        # A column in [klo, min(khi, qhi)] is seen by some query of the block.
        cols = any_in(vert, jnp.broadcast_to(klo, causal.shape),
                      jnp.asarray(np.minimum(khi, qhi)))
        # Diagonal offsets crossing the block: qpos - k in [max(qlo - khi, 0), qhi - klo].
        diags = any_in(slash, jnp.asarray(np.maximum(qlo - khi, 0)), jnp.asarray(qhi - klo))
        any_ = causal[None] & (cols | diags)
        return any_[None], jnp.zeros_like(any_)[None]
