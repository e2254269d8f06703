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

Each mask kind is one class that also carries its own lowering, so no backend asks what kind of
mask it holds:
  * `kernel_fn(lowering, under_or=)`: the in-kernel mask of PARTIAL blocks for the block-sparse
    kernels (lcm.attention.kernel_masks.kernel_mask collects it, with segment ids and per-head
    index tables);
  * `position_fn(backend)`: `fn(q_pos, k_pos)` for kernels that see positions only (the fused
    ring), or ValueError;
  * `per_head` / `reads_batch_index`: whether visibility differs between heads, and whether the
    mask reads the example's index in the batch (context parallelism keeps those axes whole);
  * `shard_specs(batch_spec)` / `check_original_order(length)`: how the mask's arrays are laid
    out when the sequence is sharded (per-token arrays stay whole, in the original order).
Index masks (Causal, Local, SinkWindow, Chunked, PrefixLM) and MaskFn are pure functions of
indices, evaluated in-kernel; masks holding per-head arrays (VerticalSlash, BlockMask) reach the
kernels as per-head index tables. `And` / `Or` combine every one of these answers in one place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

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

    def prepare(self, q_len: int, kv_len: int, *, batch: int | None = None,
                num_heads: int | None = None) -> Mask:
        """Precomputes per-position tables once per call (before the block loops); `batch` and
        `num_heads` (when known) bind the sizes a mask that reads those indices needs."""
        del q_len, kv_len, batch, num_heads
        return self

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        """Raises ValueError if the mask cannot apply to these shapes."""

    @property
    def per_head(self) -> bool:
        """Whether visibility may differ between heads (then context parallelism keeps heads
        whole on each device, and GQA layouts are the union over each group)."""
        return False

    @property
    def reads_batch_index(self) -> bool:
        """Whether visibility depends on the example's index in the batch (not on per-example
        arrays, which shard with the batch): context parallelism then keeps the batch whole."""
        return False

    def kernel_fn(self, lowering, *, under_or: bool = False):
        """The in-kernel mask of PARTIAL blocks: `fn(q_row, k, q_seg, k_seg, ctx) -> bool`, or
        None when the block layout alone applies the mask. `lowering` (a
        lcm.attention.kernel_masks.KernelLowering) gives the offset and block sizes and collects
        segment ids and per-head tables; ctx is (head, tables, q_start, k_start) when the
        lowering is head-aware, else None. `under_or`: the mask sits under an `|`."""
        del lowering, under_or
        raise ValueError(f"impl='pallas' cannot evaluate a {type(self).__name__} mask in-kernel")

    def position_fn(self, backend: str):
        """`fn(q_pos, k_pos) -> bool` over key coordinates, for kernels that see positions
        only; ValueError naming `backend` when the mask needs more (arrays, batch or head)."""
        raise ValueError(f"{backend} evaluates index masks (Causal, Local, SinkWindow, Chunked, "
                         f"PrefixLM, MaskFn of positions) in-kernel, not {type(self).__name__}")

    def shard_specs(self, batch_spec):
        """A PartitionSpec per array leaf (a pytree like the mask) when the sequence is sharded:
        replicated unless the mask says otherwise. `batch_spec`: the mesh axes of the batch."""
        del batch_spec
        return jax.tree.map(lambda _: PartitionSpec(), self)

    def check_original_order(self, length: int) -> None:
        """Raises ValueError if per-token arrays are not in the original order, [.., length]
        (inputs in a ring order keep the mask's arrays unpermuted)."""
        del length

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

    def kernel_fn(self, lowering, *, under_or=False):
        offset = lowering.offset
        return lambda q, k, qs, ks, ctx: self.fn(q + offset, k)

    def position_fn(self, backend):
        return self.fn

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
    """`&` / `|` of masks: every answer of the parts, combined by `_op` here and nowhere else."""

    masks: tuple
    _op = None  # "and" | "or"

    @property
    def is_static(self):
        return all(m.is_static for m in self.masks)

    @property
    def per_head(self):
        return any(m.per_head for m in self.masks)

    @property
    def reads_batch_index(self):
        return any(m.reads_batch_index for m in self.masks)

    def validate(self, batch, num_heads, q_len, kv_len):
        for m in self.masks:
            m.validate(batch, num_heads, q_len, kv_len)

    def check_original_order(self, length):
        for m in self.masks:
            m.check_original_order(length)

    def prepare(self, q_len, kv_len, *, batch=None, num_heads=None):
        return type(self)(tuple(m.prepare(q_len, kv_len, batch=batch, num_heads=num_heads)
                                for m in self.masks))

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

    def kernel_fn(self, lowering, *, under_or=False):
        under_or = under_or or self._op == "or"
        fns = [m.kernel_fn(lowering, under_or=under_or) for m in self.masks]
        # A part the layout applies exactly (None) needs no element work under `&`; under `|`
        # every part lowers to a function (parts report None only when not under_or).
        fns = [f for f in fns if f is not None]
        if not fns:
            return None
        return lambda *args: self._reduce([f(*args) for f in fns])

    def position_fn(self, backend):
        fns = [m.position_fn(backend) for m in self.masks]
        return lambda q, k: self._reduce([f(q, k) for f in fns])

    def shard_specs(self, batch_spec):
        return type(self)(tuple(m.shard_specs(batch_spec) for m in self.masks))


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
