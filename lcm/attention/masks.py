"""Attention masks as values.

A mask answers:
  * `visible(q_idx, k_idx, offset)`: which (query, key) pairs may attend, elementwise, as a bool
    array [B or 1, H or 1, len(q_idx), len(k_idx)];
  * `block_visibility(geom)`: for each (query block, key block), whether *any* pair in it may be
    visible and whether *all* pairs are, [B or 1, H or 1, nq, nk], so a backend can skip the
    block or skip the mask work. The answers may be conservative, never wrong.

Query row `i` sits at key coordinate `i + offset`, with `offset = kv_len - q_len`: queries are
aligned to the end of the keys, as in decoding. Static masks answer with NumPy at trace time;
masks holding arrays (Document, data-dependent BlockMask, VerticalSlash) answer with jnp inside
`jit`. `&` and `|` combine any masks. Masks are pytrees, so they cross `jit` boundaries.

Index masks (Causal, Local, SinkWindow, Chunked, PrefixLM) are pure functions of positions, so
kernels evaluate them in-kernel; masks holding per-head arrays (VerticalSlash, BlockMask) reach
the kernels as per-head index tables. See `kernel_mask` in lcm.attention.kernel_masks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcm.checks import check_int


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
        """Bool array [B or 1, H or 1, len(q_idx), len(k_idx)]."""
        raise NotImplementedError

    def block_visibility(self, geom: BlockGeometry):
        """`(any, all)` bool arrays [B or 1, H or 1, nq, nk]."""
        raise NotImplementedError

    def static_bound(self, geom: BlockGeometry) -> np.ndarray:
        """A NumPy [nq, nk] superset of the blocks any example or head can need (trace time)."""
        if self.is_static:
            return np.asarray(self.block_visibility(geom)[0]).any(axis=(0, 1))
        return np.ones((geom.num_q_blocks, geom.num_k_blocks), bool)

    def prepare(self, q_len: int, kv_len: int) -> Mask:
        """Precomputes per-position tables once per call (before the block loops)."""
        del q_len, kv_len
        return self

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        """Raises ValueError if the mask cannot apply to these shapes."""

    def __and__(self, other):
        return And(_parts(self, And) + _parts(_check_mask(other), And))

    def __or__(self, other):
        return Or(_parts(self, Or) + _parts(_check_mask(other), Or))


def group_heads(vis, num_kv_heads):
    """A visibility [B|1, H|1, T, S] as [B|1, K|1, G|1, T, S], matching grouped-query scores."""
    b, h, t, s = vis.shape
    if h == 1:
        return vis[:, :, None]
    return vis.reshape(b, num_kv_heads, h // num_kv_heads, t, s)


def _check_mask(m):
    if not isinstance(m, Mask):
        raise ValueError(f"cannot combine a mask with {type(m).__name__}; expected a Mask")
    return m


def _parts(m, kind):
    return m.masks if isinstance(m, kind) else (m,)


def positive_int(owner, name, value, minimum=1):
    """Raises ValueError unless value is an int >= minimum (`Owner(name=value)` in the error)."""
    check_int(owner, name, value, minimum, call=True)


class IndexMask(Mask):
    """A mask that is a pure function of query and key positions: `fn(qpos, k)` -> bool.

    `qpos` is the query's key coordinate (row + offset). `fn` broadcasts, so the same code runs
    on [T, 1] x [1, S] index grids in XLA and inside kernels; block answers are exact.
    """

    def fn(self, qpos, k):
        raise NotImplementedError

    def visible(self, q_idx, k_idx, offset):
        return self.fn(q_idx[:, None] + offset, k_idx[None, :])[None, None]

    def block_bounds(self, qlo, qhi, klo, khi):
        """(any, all) over the rectangle of key coordinates [qlo, qhi] x [klo, khi]."""
        raise NotImplementedError

    def block_visibility(self, geom):
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        any_, all_ = self.block_bounds(qlo + geom.offset, qhi + geom.offset, klo, khi)
        shape = (geom.num_q_blocks, geom.num_k_blocks)
        return np.broadcast_to(any_, shape)[None, None], np.broadcast_to(all_, shape)[None, None]


def causal_bounds(qlo, qhi, klo, khi):
    return klo <= qhi, khi <= qlo


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Causal(IndexMask):
    """Each query sees keys at or before its own position."""

    def fn(self, qpos, k):
        return k <= qpos

    def block_bounds(self, qlo, qhi, klo, khi):
        return causal_bounds(qlo, qhi, klo, khi)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Local(IndexMask):
    """Causal sliding window: a query at p sees keys p - window + 1 .. p (itself included).

    This is Mistral's / Hugging Face's `sliding_window` convention.
    """

    window: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        positive_int("Local", "window", self.window)

    def fn(self, qpos, k):
        return (k <= qpos) & (k > qpos - self.window)

    def block_bounds(self, qlo, qhi, klo, khi):
        w = self.window
        return (klo <= qhi) & (khi > qlo - w), (khi <= qlo) & (klo > qhi - w)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkWindow(IndexMask):
    """StreamingLLM: every query sees the first `sinks` keys and its last `window` keys (causal)."""

    sinks: int = dataclasses.field(metadata=dict(static=True))
    window: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        positive_int("SinkWindow", "sinks", self.sinks, minimum=0)
        positive_int("SinkWindow", "window", self.window)

    def fn(self, qpos, k):
        return (k <= qpos) & ((k < self.sinks) | (k > qpos - self.window))

    def block_bounds(self, qlo, qhi, klo, khi):
        s, w = self.sinks, self.window
        causal_any, causal_all = causal_bounds(qlo, qhi, klo, khi)
        any_ = causal_any & ((klo < s) | (khi > qlo - w))
        all_ = causal_all & ((khi < s) | (klo > qhi - w))
        return any_, all_


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Chunked(IndexMask):
    """Chunked causal attention (Llama 4's local layers): causal within chunks of `size` keys."""

    size: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        positive_int("Chunked", "size", self.size)

    def fn(self, qpos, k):
        return (k <= qpos) & (k // self.size == qpos // self.size)

    def block_bounds(self, qlo, qhi, klo, khi):
        c = self.size
        causal_any, causal_all = causal_bounds(qlo, qhi, klo, khi)
        # Chunk ranges [qlo//c, qhi//c] and [klo//c, khi//c] must overlap for any pair.
        any_ = causal_any & (klo // c <= qhi // c) & (khi // c >= qlo // c)
        all_ = causal_all & (qlo // c == qhi // c) & (klo // c == khi // c) & (qlo // c == klo // c)
        return any_, all_


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixLM(IndexMask):
    """Prefix LM: the first `prefix_len` keys are visible to every query; causal after them."""

    prefix_len: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        positive_int("PrefixLM", "prefix_len", self.prefix_len, minimum=0)

    def fn(self, qpos, k):
        return (k <= qpos) | (k < self.prefix_len)

    def block_bounds(self, qlo, qhi, klo, khi):
        causal_any, causal_all = causal_bounds(qlo, qhi, klo, khi)
        return causal_any | (klo < self.prefix_len), causal_all | (khi < self.prefix_len)


def _combine(values, op):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _lib(arrays):
    return np if all(isinstance(a, (np.ndarray, np.bool_, bool)) for a in arrays) else jnp


class _Combination(Mask):
    masks: tuple
    _op = None  # "and" | "or"

    @property
    def is_static(self):
        return all(m.is_static for m in self.masks)

    def validate(self, batch, num_heads, q_len, kv_len):
        for m in self.masks:
            m.validate(batch, num_heads, q_len, kv_len)

    def prepare(self, q_len, kv_len):
        return type(self)(tuple(m.prepare(q_len, kv_len) for m in self.masks))

    def _reduce(self, values):
        lib = _lib(values)
        return _combine(values, lib.logical_and if self._op == "and" else lib.logical_or)

    def visible(self, q_idx, k_idx, offset):
        return self._reduce([m.visible(q_idx, k_idx, offset) for m in self.masks])

    def block_visibility(self, geom):
        parts = [m.block_visibility(geom) for m in self.masks]
        return self._reduce([p[0] for p in parts]), self._reduce([p[1] for p in parts])

    def static_bound(self, geom):
        return self._reduce([m.static_bound(geom) for m in self.masks])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class And(_Combination):
    """Visible where every part is visible."""

    masks: tuple
    _op = "and"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Or(_Combination):
    """Visible where any part is visible."""

    masks: tuple
    _op = "or"
