"""MaskFn: a mask written as a predicate on (batch, head, query, key) indices, as FlexAttention's
`mask_mod` or splash attention's computable masks.

One function has two consumers: at trace time it is evaluated over every block of the grid (per
example and head when it reads them) to give the block layout, FULL / PARTIAL / SKIP exactly;
inside the kernels it runs on the indices of PARTIAL blocks only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcm.attention.masks import BlockGeometry, Mask

_i32 = jnp.int32
_PROBE = (2, 3, 5, 7)  # distinct sizes, so a result of the wrong shape cannot pass by accident


@dataclasses.dataclass(frozen=True, eq=False)
class MaskFn(Mask):
    """A mask from a predicate `fn(batch, head, q_index, kv_index) -> bool`, written in jnp.

    The arguments are int32 arrays that broadcast against each other (4-D index grids in XLA,
    scalars and [block_q, 1] x [1, block_k] tiles inside the kernels), so `fn` must be
    elementwise: arithmetic, comparisons, `jnp.where`, `&`, `|`, `~`. Python scalars may be
    captured; arrays may not (a Pallas kernel takes none; per-example or per-head data belongs in
    Document or BlockMask). Arguments:

      * batch: the example's index in the batch (0..B-1);
      * head: the query head (0..H-1; under GQA query heads h*G..h*G+G-1 share KV head h);
      * q_index: the query's position on the key axis. Queries are aligned to the end of the
        keys, so query row i (0..q_len-1) arrives as i + (kv_len - q_len): causal is
        `q_index >= kv_index` for prefill and decoding alike (with q_len == kv_len it is the row);
      * kv_index: the key's index (0..kv_len-1).

    `fn` is stored and compared by identity: the mask is hashable and static, and its layout is
    computed once per shape (exactly, O(B * H * q_len * kv_len) predicate calls at trace time
    when fn reads batch and head, O(q_len * kv_len) otherwise). `batch` / `num_heads` are bound
    by `prepare` (attend does this) when fn reads them. Backends: reference, xla, ring,
    allgather and pallas take every fn (pallas: not a fn reading `batch` beside a Document, as
    the kernels take one pair of segment ids); ring_pallas a fn of the positions only.
    """

    fn: Callable
    batch: int | None = dataclasses.field(default=None, kw_only=True)
    num_heads: int | None = dataclasses.field(default=None, kw_only=True)
    _reads: tuple = dataclasses.field(init=False, repr=False)  # (batch?, head?)

    def __post_init__(self):
        object.__setattr__(self, "_reads", _reads(self.fn))
        for name in ("batch", "num_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"MaskFn({name}={value!r}); expected a positive int or None")

    def __eq__(self, other):
        return (type(other) is MaskFn and other.fn is self.fn and other.batch == self.batch
                and other.num_heads == self.num_heads)

    def __hash__(self):
        return hash((id(self.fn), self.batch, self.num_heads))

    @property
    def reads_batch_index(self):
        return self._reads[0]

    @property
    def per_head(self):
        return self._reads[1]

    def prepare(self, q_len, kv_len, *, batch=None, num_heads=None):
        sizes = {}
        if self.reads_batch_index and batch is not None:
            sizes["batch"] = batch
        if self.per_head and num_heads is not None:
            sizes["num_heads"] = num_heads
        return dataclasses.replace(self, **sizes) if sizes else self

    def validate(self, batch, num_heads, q_len, kv_len):
        for name, bound, size in (("batch", self.batch, batch),
                                  ("num_heads", self.num_heads, num_heads)):
            if bound is not None and bound != size:
                raise ValueError(f"MaskFn was prepared for {name}={bound}; these inputs have "
                                 f"{size}")

    def _sizes(self):
        """(B or 1, H or 1): how many examples and heads the predicate is evaluated for."""
        sizes = []
        for reads, bound, name in ((self.reads_batch_index, self.batch, "batch"),
                                   (self.per_head, self.num_heads, "head")):
            if reads and bound is None:
                raise ValueError(f"MaskFn: fn reads the {name} index, so the mask needs the "
                                 f"sizes: mask.prepare(q_len, kv_len, batch=B, num_heads=H) "
                                 f"first (attend does this)")
            sizes.append(bound if reads else 1)
        return tuple(sizes)

    def visible(self, q_idx, k_idx, offset):
        B, H = self._sizes()
        q = (jnp.asarray(q_idx, _i32) + offset)[None, None, :, None]
        k = jnp.asarray(k_idx, _i32)[None, None, None, :]
        out = self.fn(jnp.arange(B, dtype=_i32)[:, None, None, None],
                      jnp.arange(H, dtype=_i32)[None, :, None, None], q, k)
        return jnp.broadcast_to(out, (B, H, q.shape[2], k.shape[3]))

    def block_visibility(self, geom):
        self._sizes()  # raises, naming the fix, before any evaluation
        return _block_visibility(self, geom)

    def kernel_fn(self, lowering, *, under_or=False):
        """fn in-kernel on partial blocks: the head from the head-aware protocol's ctx; the
        batch index travels as the kernels' segment ids (every id of row b is b), so a fn that
        reads it cannot share the mask with a Document (one pair of segment ids)."""
        fn, offset = self.fn, lowering.offset
        zero = jnp.zeros((), _i32)
        batch = None
        if self.reads_batch_index:
            B, T, S = lowering.batch, lowering.q_len, lowering.kv_len
            if None in (B, T, S):
                raise ValueError("MaskFn reads the batch index: kernel_mask needs batch, q_len "
                                 "and kv_len (attend passes them)")
            rows = jnp.arange(B, dtype=_i32)[:, None]
            lowering.add_segments(jnp.broadcast_to(rows, (B, T)), jnp.broadcast_to(rows, (B, S)))

            def batch(qs):
                return qs
        if self.per_head:
            lowering.need_head()
            return lambda q, k, qs, ks, ctx: fn(zero if batch is None else batch(qs), ctx[0],
                                                q + offset, k)
        return lambda q, k, qs, ks, ctx: fn(zero if batch is None else batch(qs), zero,
                                            q + offset, k)

    def position_fn(self, backend):
        if self.reads_batch_index or self.per_head:
            raise ValueError(f"{backend} calls masks with positions only, and this MaskFn's fn "
                             f"reads the batch or head index, not MaskFn of positions")
        fn = self.fn
        return lambda q, k: fn(jnp.zeros((), _i32), jnp.zeros((), _i32), q, k)


# No leaves: the whole mask (fn and sizes) is static, so it crosses jit in the treedef.
jax.tree_util.register_pytree_node(MaskFn, lambda m: ((), m), lambda m, _: m)


def _reads(fn):
    """_probe(fn), cached per fn (prepare rebuilds the mask once per call)."""
    try:
        return _cached_probe(fn)
    except TypeError:  # an unhashable callable
        return _probe(fn)


def _probe(fn):
    """(reads batch, reads head) of fn, from the shape of its result on index grids of distinct
    sizes (abstractly: nothing runs); ValueError naming MaskFn for a bad fn."""
    if not callable(fn):
        raise ValueError(f"MaskFn(fn={fn!r}); expected a callable fn(batch, head, q_index, "
                         f"kv_index) -> bool")
    grid = [tuple(n if d == a else 1 for d in range(4)) for a, n in enumerate(_PROBE)]
    tile = [(), (), (_PROBE[2], 1), (1, _PROBE[3])]  # the kernels' call: scalars and tiles
    shape = None
    for shapes, want in ((grid, _PROBE), (tile, _PROBE[2:])):
        args = [jax.ShapeDtypeStruct(s, _i32) for s in shapes]
        try:
            out = jax.eval_shape(fn, *args)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported as such
            raise ValueError(f"MaskFn: fn(batch, head, q_index, kv_index) failed on int32 index "
                             f"arrays of shapes {shapes} (fn must be elementwise jnp): "
                             f"{type(e).__name__}: {e}") from e
        out_shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if (dtype != jnp.bool_ or out_shape is None or len(out_shape) > len(want)
                or any(s not in (1, n) for s, n in zip(out_shape[::-1], want[::-1]))):
            raise ValueError(f"MaskFn: fn(batch, head, q_index, kv_index) returned "
                             f"{dtype}{list(out_shape) if out_shape is not None else ''} on "
                             f"int32 index arrays of shapes {shapes}; expected bool "
                             f"broadcastable to {list(want)}")
        if shape is None:
            shape = (1,) * (4 - len(out_shape)) + tuple(out_shape)
    return shape[0] > 1, shape[1] > 1


_cached_probe = functools.lru_cache(maxsize=256)(_probe)


@functools.lru_cache(maxsize=64)
def _block_visibility(mask: MaskFn, geom: BlockGeometry):
    """NumPy (any, all) [B or 1, H or 1, nq, nk] over the real pairs of each block, exact."""
    with jax.ensure_compile_time_eval():  # concrete even while an outer jit traces
        any_, all_ = _evaluate_blocks(mask, geom)
    return np.asarray(any_), np.asarray(all_)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate_blocks(mask, geom):
    """One query block row of one (example, head) at a time: fn on [block_q, keys] tiles, the
    kernels' call, so memory stays O(block_q * kv_len)."""
    B, H = mask._sizes()
    nq, nk, bq, bk = geom.num_q_blocks, geom.num_k_blocks, geom.block_q, geom.block_k
    k = jnp.arange(nk * bk, dtype=_i32)[None, :]

    def row(idx):
        b, h, i = idx
        q = i * bq + jnp.arange(bq, dtype=_i32)[:, None]
        real = (q < geom.q_len) & (k < geom.kv_len)
        vis = jnp.broadcast_to(mask.fn(b, h, q + geom.offset, k), real.shape)
        any_ = (vis & real).reshape(bq, nk, bk).any((0, 2))
        all_ = (vis | ~real).reshape(bq, nk, bk).all((0, 2))
        return any_, all_

    b, h, i = (x.reshape(-1) for x in jnp.meshgrid(jnp.arange(B, dtype=_i32),
                                                   jnp.arange(H, dtype=_i32),
                                                   jnp.arange(nq, dtype=_i32), indexing="ij"))
    any_, all_ = lax.map(row, (b, h, i))
    return any_.reshape(B, H, nq, nk), all_.reshape(B, H, nq, nk)
