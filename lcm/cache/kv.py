"""The KV cache pytree: static capacity, per-(batch, kv-head) lengths, original positions.

    k, v      [L, B, K, C, D]  keys (RoPE applied at `pos`, or un-rotated when
                               rotation == "cache") and values, compute dtype
    pos       [L, B, K, C]     int32 original position of each entry, -1 in empty slots
    length    [L, B, K]        int32: entries held by each (layer, batch, kv-head)
    next_pos  [B]              int32 position of each row's next token
    score     [L, B, K, C]     float32 per-entry accumulators (H2O at decode), or None
    step      []               int32 decode steps since the last compression
    queries   [L, B, W, H, D]  un-rotated queries decoded since the last compression, for
                               decode-time compression by attention scorers, or None
    query_pos [B, W]           their positions, -1 in empty buffer slots, or None

Slots past `length` are empty (zero K/V, pos -1); entries inside are in no particular order
(`kept_positions` sorts). That is the "uniform" layout: one static capacity C for every layer
and head. Policies whose budgets differ by layer or head store just their budgets instead
(`lcm.cache.layouts`), so memory is the sum of the budgets, not the largest one times heads:

- "layered" (PyramidKV): `layer_slots` (static) holds each layer's capacity C_l; k, v
  [B, K, N, D] and pos [B, K, N] (score too) hold the layers one after another along the slot
  axis (N = sum C_l; layer l owns slots [sum C_<l, sum C_<=l)).
- "pooled" (AdaKV): each layer is one pool of P = K * (budget + room) slots shared by its kv
  heads; k, v [L, B, P, D], pos [L, B, P] and `head` [L, B, P] (int32 kv head of each entry,
  -1 when empty). The first sum(length[l, b]) slots of row b hold entries.

`rotation` is static: "original"
caches keys rotated at their original positions (as transformers and kvpress); "cache" keeps
keys un-rotated and rotates them at attention time by their rank in the cache, StreamingLLM's
position handling after eviction.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from lcm.checks import check_int
from lcm.sharding.mesh import host_array
from lcm.positions import apply_rope

ROTATIONS = ("original", "cache")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "pos", "length", "next_pos", "score", "step",
                                "queries", "query_pos", "head"],
                   meta_fields=["rotation", "layer_slots"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A batched, layered KV cache with static capacity; see the module docstring."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    next_pos: jax.Array
    score: jax.Array | None = None
    step: jax.Array | None = None
    rotation: str = "original"
    queries: jax.Array | None = None
    query_pos: jax.Array | None = None
    head: jax.Array | None = None
    layer_slots: tuple[int, ...] | None = None

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, num_kv_heads: int, capacity: int,
              head_dim: int, dtype=jnp.float32, scores: bool = False,
              rotation: str = "original") -> KVCache:
        """A cache with no entries (next position 0 for every row)."""
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation={rotation!r}; expected one of {list(ROTATIONS)}")
        for name, value in (("num_layers", num_layers), ("batch", batch),
                            ("num_kv_heads", num_kv_heads), ("capacity", capacity),
                            ("head_dim", head_dim)):
            check_int(None, name, value, 1)
        num_layers, batch, num_kv_heads, capacity, head_dim = map(
            int, (num_layers, batch, num_kv_heads, capacity, head_dim))
        shape = (num_layers, batch, num_kv_heads, capacity)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype),
                   v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, -1, jnp.int32),
                   length=jnp.zeros(shape[:3], jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32),
                   score=jnp.zeros(shape, jnp.float32) if scores else None,
                   step=jnp.zeros((), jnp.int32), rotation=rotation)

    @property
    def layout(self) -> str:
        """"uniform", "layered" (per-layer capacities) or "pooled" (per-layer pools of heads)."""
        if self.layer_slots is not None:
            return "layered"
        return "uniform" if self.head is None else "pooled"

    @property
    def num_layers(self) -> int:
        return self.length.shape[0]

    @property
    def num_heads(self) -> int:
        """Heads of the cache (kv heads; query heads for per-query-head policies)."""
        return self.length.shape[2]

    @property
    def capacity(self) -> int:
        """Static slots per (layer, batch, kv-head): the largest layer's for "layered", the
        pool per head (P / K) for "pooled"."""
        if self.layer_slots is not None:
            return max(self.layer_slots)
        if self.head is not None:
            return self.k.shape[2] // self.num_heads
        return self.k.shape[3]

    def layer_offset(self, layer: int) -> int:
        """First slot of `layer` in a "layered" cache."""
        return sum(self.layer_slots[:layer])

    def layer(self, layer: int) -> dict:
        """One layer's arrays (a static index): k, v, pos[, score] ([B, K, C_l, ...] or the
        pool's [B, P, ...] with head), and length [B, K]."""
        names = [n for n in ("k", "v", "pos", "score", "head") if getattr(self, n) is not None]
        if self.layer_slots is not None:
            start, size = self.layer_offset(layer), self.layer_slots[layer]
            out = {n: getattr(self, n)[:, :, start:start + size] for n in names}
        else:
            out = {n: getattr(self, n)[layer] for n in names}
        return dict(out, length=self.length[layer])

    def valid(self, layer=None):
        """Bool [L, B, K, C] (or [B, K, C] for one layer; the pool's [B, P] for "pooled"):
        which slots hold entries."""
        if self.layer_slots is not None or self.head is not None:
            if layer is None:
                raise ValueError(f"valid(layer=None) needs a uniform cache; this one is "
                                 f"{self.layout!r}: pass a layer")
            entries = self.layer(layer)
            if self.head is not None:
                return slot_valid(entries["length"].sum(-1), entries["pos"].shape[-1])
            return entries_valid(entries)
        length = self.length if layer is None else self.length[layer]
        return slot_valid(length, self.capacity)

    def kept_positions(self, layer: int):
        """Original positions kept by `layer`, sorted: int32 [B, K, C] (C: the layer's slots,
        the whole pool for "pooled"), -1 after each head's `length` entries."""
        big = jnp.iinfo(jnp.int32).max
        if self.head is not None:
            entries = self.layer(layer)
            heads = jnp.arange(self.num_heads, dtype=jnp.int32)[None, :, None]
            mine = self.valid(layer)[:, None] & (entries["head"][:, None] == heads)
            pos = jnp.where(mine, entries["pos"][:, None], big)
        else:
            pos = jnp.where(self.valid(layer), self.layer(layer)["pos"], big)
        pos = jnp.sort(pos, axis=-1)
        return jnp.where(pos == big, -1, pos)

    def nbytes(self) -> int:
        """Bytes held by the arrays of the cache (what a device must store)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)

    def grow(self, extra: int) -> KVCache:
        """A uniform cache with `extra` more empty slots per head (the same entries)."""
        if self.layout != "uniform":
            raise ValueError(f"grow needs a uniform cache; this one is {self.layout!r}")

        def pad(x, fill):
            widths = [(0, 0)] * x.ndim
            widths[3] = (0, extra)
            return jnp.pad(x, widths, constant_values=fill)

        changes = dict(k=pad(self.k, 0), v=pad(self.v, 0), pos=pad(self.pos, -1))
        if self.score is not None:
            changes["score"] = pad(self.score, 0)
        return self.replace(**changes)


def slot_valid(length, capacity: int):
    """Bool [..., capacity]: slot < length, for lengths [...]."""
    slots = jnp.arange(capacity, dtype=jnp.int32).reshape((1,) * length.ndim + (capacity,))
    return slots < length[..., None]


def layer_slices(cache: KVCache):
    """The per-layer arrays as a dict with leading L axis, for `lax.scan` over layers."""
    out = {"k": cache.k, "v": cache.v, "pos": cache.pos, "length": cache.length}
    if cache.score is not None:
        out["score"] = cache.score
    return out


def from_layer_slices(cache: KVCache, layers: dict, **changes) -> KVCache:
    """The inverse of `layer_slices`: a cache whose per-layer arrays are `layers`."""
    return cache.replace(k=layers["k"], v=layers["v"], pos=layers["pos"],
                         length=layers["length"], score=layers.get("score"), **changes)


def expand_heads(layer: dict, groups: int) -> dict:
    """One entry set per query head: each kv head's K/V, positions and lengths repeated for the
    `groups` query heads that share it (transformers' repeat_kv order)."""
    if groups == 1:
        return layer
    return {name: jnp.repeat(x, groups, axis=1) for name, x in layer.items()}


def gather_entries(layer: dict, idx, keep):
    """Keeps, per (batch, kv-head), the entries at slots idx [B, K, n], compacted to the front.

    `keep` [B, K, n] bool marks real picks; they must come first along the last axis. Returns a
    layer dict with capacity n: dropped picks become empty slots (zero K/V, pos -1, score 0).
    """
    def take(x):
        if x.ndim == 4:
            return jnp.take_along_axis(x, idx[..., None], axis=2)
        return jnp.take_along_axis(x, idx, axis=2)

    out = {"k": jnp.where(keep[..., None], take(layer["k"]), 0).astype(layer["k"].dtype),
           "v": jnp.where(keep[..., None], take(layer["v"]), 0).astype(layer["v"].dtype),
           "pos": jnp.where(keep, take(layer["pos"]), -1),
           "length": keep.sum(-1).astype(jnp.int32)}
    if "score" in layer:
        out["score"] = jnp.where(keep, take(layer["score"]), 0.0)
    return out


def pad_capacity(layer: dict, capacity: int) -> dict:
    """Grows (with empty slots) a layer dict with capacity axis 2 to `capacity` slots."""
    extra = capacity - layer["pos"].shape[-1]
    if extra < 0:
        raise ValueError(f"capacity={capacity} is below the {layer['pos'].shape[-1]} slots held")
    if extra == 0:
        return layer

    def grow(x, fill):
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, extra)
        return jnp.pad(x, widths, constant_values=fill)

    out = dict(layer, k=grow(layer["k"], 0), v=grow(layer["v"], 0), pos=grow(layer["pos"], -1))
    if "score" in layer:
        out["score"] = grow(layer["score"], 0)
    return out


def insert(entries, k, v, position):
    """Appends one entry per (batch, kv-head): k, v [B, K, D]; position [B].

    Written at slot `length`; a full head overwrites its oldest entry instead.
    """
    B, K, C = entries["pos"].shape
    full = entries["length"] >= C
    big = jnp.iinfo(jnp.int32).max
    oldest = jnp.argmin(jnp.where(entries_valid(entries), entries["pos"], big), -1)
    slot = jnp.where(full, oldest, entries["length"]).astype(jnp.int32)
    b, h = jnp.arange(B)[:, None], jnp.arange(K)[None, :]
    out = dict(entries,
               k=entries["k"].at[b, h, slot].set(k.astype(entries["k"].dtype)),
               v=entries["v"].at[b, h, slot].set(v.astype(entries["v"].dtype)),
               pos=entries["pos"].at[b, h, slot].set(jnp.broadcast_to(position[:, None], (B, K))),
               length=jnp.minimum(entries["length"] + 1, C))
    if "score" in entries:
        out["score"] = entries["score"].at[b, h, slot].set(0.0)
    return out


def entries_valid(entries):
    """Bool [B, K, C]: which slots of a layer dict hold entries (its "valid" mask when it has
    one: a window onto a layered cache)."""
    if "valid" in entries:
        return entries["valid"]
    return slot_valid(entries["length"], entries["pos"].shape[-1])


def rank_positions(entries):
    """Each entry's rank among its head's valid entries by original position: [B, K, C]."""
    big = jnp.iinfo(jnp.int32).max
    pos = jnp.where(entries_valid(entries), entries["pos"], big)
    order = jnp.argsort(pos, axis=-1)
    ranks = jnp.argsort(order, axis=-1).astype(jnp.int32)
    return jnp.where(entries_valid(entries), ranks, -1)


def cache_rotation(entries, inv_freq, factor):
    """StreamingLLM positions: keys (stored un-rotated) rotated by their rank in the cache, and
    the newest entry's rank as the query position. Returns (q_pos [B, K, 1], keys [B, K, C, D])."""
    ranks = rank_positions(entries)
    keys = rotate_heads(entries["k"], jnp.maximum(ranks, 0), inv_freq, factor)
    return (entries["length"] - 1)[..., None], keys


def rotate_heads(k, positions, inv_freq, factor):
    """k [B, K, C, D] rotated at positions [B, K, C] (each head's entries at their own)."""
    B, K, C, D = k.shape
    flat = k.reshape(B, K * C, 1, D)
    return apply_rope(flat, positions.reshape(B, K * C), inv_freq, factor).reshape(B, K, C, D)


def window_entries(entries, lengths, size: int):
    """The last `size` entries of each row of an uncompressed layer (`prompt_entries`): what a
    sliding-window layer keeps ({k, v [B, K, size, D], pos, length}, slots in position order).
    Decoding into `size` >= window slots then overwrites the oldest entry, which the window no
    longer sees: a ring buffer."""
    T = entries["pos"].shape[-1]
    start = jnp.maximum(lengths - size, 0)  # [B]
    idx = start[:, None] + jnp.arange(size, dtype=jnp.int32)[None]  # [B, size]
    keep = idx < lengths[:, None]
    idx = jnp.minimum(idx, T - 1)

    def take(x, fill):
        got = jnp.take_along_axis(x, idx.reshape(idx.shape[:1] + (1, size) + (1,) * (
            x.ndim - 3)), axis=2)
        mask = keep.reshape(keep.shape[:1] + (1, size) + (1,) * (x.ndim - 3))
        return jnp.where(mask, got, fill).astype(x.dtype)

    out = {"k": take(entries["k"], 0), "v": take(entries["v"], 0),
           "pos": take(entries["pos"], -1),
           "length": jnp.minimum(entries["length"], size).astype(jnp.int32)}
    if "score" in entries:
        out["score"] = take(entries["score"], 0)
    return out


def prompt_entries(k, v, real, lengths):
    """One layer's uncompressed cache: k, v [B, T, K, D] -> layer dict with capacity T."""
    B, T, K, _ = k.shape
    keep = real[:, None, :, None]
    pos = jnp.where(real, jnp.arange(T, dtype=jnp.int32)[None], -1)
    return {"k": jnp.where(keep, k.transpose(0, 2, 1, 3), 0).astype(k.dtype),
            "v": jnp.where(keep, v.transpose(0, 2, 1, 3), 0).astype(v.dtype),
            "pos": jnp.broadcast_to(pos[:, None], (B, K, T)),
            "length": jnp.broadcast_to(lengths[:, None], (B, K)).astype(jnp.int32)}


_warned = set()


def make_room(cache: KVCache, cfg, n: int) -> KVCache:
    """A concrete cache with room for `n` more tokens in every head of its full-attention
    layers (sliding layers are ring buffers of their window by design): a uniform cache that
    lacks it grows by max(64, capacity // 4, what is missing) slots, with a warning once (size
    it with `prefill(..., max_new_tokens=n)` to avoid the copy). A layered or pooled cache
    cannot grow: its oldest entries are then replaced (a sliding window), with a warning once.
    Under `jit` nothing is checked: `generate` sizes its cache, and a full head replaces its
    oldest entry."""
    if isinstance(cache.length, jax.core.Tracer) or not cache.length.is_fully_addressable:
        return cache
    held = host_array(cache.length).max(axis=(1, 2))  # per layer
    slots = cache.layer_slots or (cache.capacity,) * cache.num_layers
    short = [h + n - c for h, c, kind in zip(held, slots, cfg.layer_kinds)
             if kind.window is None and h + n > c]
    if not short:
        return cache
    if cache.layout == "uniform":
        extra = max(64, cache.capacity // 4, max(short))
        if "grow" not in _warned:
            _warned.add("grow")
            warnings.warn(f"the KV cache is full ({cache.capacity} slots per head); it grows by "
                          f"{extra} slots (a copy). Pass prefill(..., max_new_tokens=n) to size "
                          f"it once.", stacklevel=3)
        return cache.grow(extra)
    if "window" not in _warned:
        _warned.add("window")
        warnings.warn(f"a full-attention layer of the {cache.layout} KV cache is full; each new "
                      f"token replaces its oldest entry (a sliding window). Pass prefill(..., "
                      f"max_new_tokens=n) to keep every token.", stacklevel=3)
    return cache
