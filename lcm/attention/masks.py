"""Attention masks as values.

A mask answers two questions:
  * `visible(q_idx, k_idx, offset)`: which (query, key) pairs may attend, elementwise;
  * `block_visibility(geom)`: for each (query block, key block), whether *any* pair in it may be
    visible and whether *all* pairs are (so a backend can skip the block or skip the mask work).

Query row `i` sits at key coordinate `i + offset`, with `offset = kv_len - q_len`: queries are
aligned to the end of the keys, as in decoding. Static masks (Causal, Local) answer with NumPy at
trace time; data-dependent ones (Document) answer with jnp inside `jit`. `&` and `|` combine
masks; the block answers of a combination are conservative (never claim a visible block empty).

Masks are pytrees, so they can cross `jit` boundaries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """How q and kv are cut into blocks. Lengths are the true (unpadded) ones."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    def q_ranges(self):
        """First and last real query row of each query block, as [nq, 1] int arrays."""
        lo = np.arange(self.num_q_blocks) * self.block_q
        hi = np.minimum(lo + self.block_q, self.q_len) - 1
        return lo[:, None], hi[:, None]

    def k_ranges(self):
        """First and last real key of each key block, as [1, nk] int arrays."""
        lo = np.arange(self.num_k_blocks) * self.block_k
        hi = np.minimum(lo + self.block_k, self.kv_len) - 1
        return lo[None, :], hi[None, :]


class Mask:
    """Base of all masks: supports `a & b` and `a | b`."""

    is_static = True

    def visible(self, q_idx, k_idx, offset):
        """Bool array [B or 1, len(q_idx), len(k_idx)]."""
        raise NotImplementedError

    def block_visibility(self, geom: BlockGeometry):
        """`(any, all)` bool arrays [B or 1, nq, nk]."""
        raise NotImplementedError

    def validate(self, batch: int, q_len: int, kv_len: int) -> None:
        """Raises ValueError if the mask cannot apply to these shapes."""

    def __and__(self, other):
        return And(_parts(self, And) + _parts(_check_mask(other), And))

    def __or__(self, other):
        return Or(_parts(self, Or) + _parts(_check_mask(other), Or))


def _check_mask(m):
    if not isinstance(m, Mask):
        raise ValueError(f"cannot combine a mask with {type(m).__name__}; expected a Mask")
    return m


def _parts(m, kind):
    return m.masks if isinstance(m, kind) else (m,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Each query sees keys at or before its own position."""

    def visible(self, q_idx, k_idx, offset):
        return (k_idx[None, :] <= q_idx[:, None] + offset)[None]

    def block_visibility(self, geom):
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        return (klo <= qhi + geom.offset)[None], (khi <= qlo + geom.offset)[None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Local(Mask):
    """Causal sliding window: a query at p sees keys p - window + 1 .. p (itself included).

    This is Mistral's / Hugging Face's `sliding_window` convention.
    """

    window: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        if not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"Local(window={self.window!r}); expected a positive int")

    def visible(self, q_idx, k_idx, offset):
        d = q_idx[:, None] + offset - k_idx[None, :]
        return ((d >= 0) & (d < self.window))[None]

    def block_visibility(self, geom):
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        off, w = geom.offset, self.window
        any_ = (klo <= qhi + off) & (khi >= qlo + off - w + 1)
        all_ = (khi <= qlo + off) & (klo >= qhi + off - w + 1)
        return any_[None], all_[None]


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
    def _kv(self):
        return self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def validate(self, batch, q_len, kv_len):
        q, kv = self.q_segment_ids, self._kv
        if q.ndim != 2 or q.shape != (batch, q_len):
            raise ValueError(f"Document q_segment_ids shape {tuple(q.shape)}; expected "
                             f"[batch, q_len] = {(batch, q_len)}")
        if kv.ndim != 2 or kv.shape != (batch, kv_len):
            hint = (" (pass kv_segment_ids when q_len != kv_len)"
                    if self.kv_segment_ids is None else "")
            raise ValueError(f"Document kv_segment_ids shape {tuple(kv.shape)}; expected "
                             f"[batch, kv_len] = {(batch, kv_len)}{hint}")
        for name, ids in (("q_segment_ids", q), ("kv_segment_ids", kv)):
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"Document {name} dtype {ids.dtype}; expected an integer dtype")

    def visible(self, q_idx, k_idx, offset):
        del offset
        q, kv = self.q_segment_ids, self._kv
        qs = jnp.take(q, jnp.clip(q_idx, 0, q.shape[1] - 1), axis=1)
        ks = jnp.take(kv, jnp.clip(k_idx, 0, kv.shape[1] - 1), axis=1)
        return qs[:, :, None] == ks[:, None, :]

    def block_visibility(self, geom):
        qmin, qmax = _block_min_max(self.q_segment_ids, geom.block_q)
        kmin, kmax = _block_min_max(self._kv, geom.block_k)
        # Any: the id ranges of the two blocks overlap (conservative). All: one shared id.
        any_ = (qmax[:, :, None] >= kmin[:, None, :]) & (kmax[:, None, :] >= qmin[:, :, None])
        all_ = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
                & (qmin[:, :, None] == kmin[:, None, :]))
        return any_, all_


def _block_min_max(ids, block):
    """Per-block min and max of ids [B, L] -> two [B, ceil(L/block)] arrays (edge-padded)."""
    length = ids.shape[1]
    pad = -length % block
    ids = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(ids.shape[0], -1, block)
    return ids.min(-1), ids.max(-1)


def _combine(values, op):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _lib(*arrays):
    return np if all(isinstance(a, (np.ndarray, np.bool_, bool)) for a in arrays) else jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Visible where every part is visible."""

    masks: tuple

    @property
    def is_static(self):
        return all(m.is_static for m in self.masks)

    def validate(self, batch, q_len, kv_len):
        for m in self.masks:
            m.validate(batch, q_len, kv_len)

    def visible(self, q_idx, k_idx, offset):
        return _combine([m.visible(q_idx, k_idx, offset) for m in self.masks], jnp.logical_and)

    def block_visibility(self, geom):
        parts = [m.block_visibility(geom) for m in self.masks]
        lib = _lib(*[a for p in parts for a in p])
        return (_combine([p[0] for p in parts], lib.logical_and),
                _combine([p[1] for p in parts], lib.logical_and))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Or(Mask):
    """Visible where any part is visible."""

    masks: tuple

    @property
    def is_static(self):
        return all(m.is_static for m in self.masks)

    def validate(self, batch, q_len, kv_len):
        for m in self.masks:
            m.validate(batch, q_len, kv_len)

    def visible(self, q_idx, k_idx, offset):
        return _combine([m.visible(q_idx, k_idx, offset) for m in self.masks], jnp.logical_or)

    def block_visibility(self, geom):
        parts = [m.block_visibility(geom) for m in self.masks]
        lib = _lib(*[a for p in parts for a in p])
        return (_combine([p[0] for p in parts], lib.logical_or),
                _combine([p[1] for p in parts], lib.logical_or))
