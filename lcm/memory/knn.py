"""kNN memory of the Memorizing Transformer (Wu et al. 2022).

Every layer keeps an external, non-differentiable store of the (key, value) pairs of past
tokens, per example, a ring buffer of `capacity` entries. Each query retrieves its top-k keys
from the store of its KV head and attends to them and to its own segment (causally) under one
softmax, so with k >= capacity it is dense attention over the store and the segment. Keys are
stored after RoPE at their absolute positions (positions continue across segments).

The store's capacity axis carries the logical name "seq", so `shard` (e.g.
`LogicalSharding(mesh)`, "seq" -> "context") spreads it over a mesh axis: with `shards` equal to
that axis' size, top-k runs per shard, then over the shards' candidates (exact, and the
score matrix is never gathered onto one device).

`layers=(i,)` gives the kNN memory to layer i only, as the Memorizing Transformer does (one
layer near the top); the other layers attend within the segment alone. The stores then sit in
the state's "carried" part, one per memory layer, not one per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcm.checks import is_int
from lcm.memory.base import Memory, NoMemory, default_scale, f32, grouped, softmax_parts

_STORE_AXES = ("batch", "seq", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class KNNMemory(Memory):
    """A per-layer (key, value) store of `capacity` past tokens; each query attends to its
    top-`k` stored keys and to its segment. `approx`: `jax.lax.approx_max_k` (TPU-friendly)
    instead of exact top-k. `shards`: the store is searched in that many slices (the size of
    the mesh axis its capacity is sharded over; must divide capacity). `layers`: the layers
    that have the memory (None: all of them); the others attend within their segment.

    State "layers": k, v [B, layers, capacity, kv_heads, head_dim], valid [B, layers, capacity];
    with `layers` given, the same under "carried" with len(layers) in place of all the layers.
    """

    capacity: int
    k: int
    approx: bool = False
    shards: int = 1
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        self._check_ints(1, "capacity", "k", "shards")
        if self.k > self.capacity:
            raise ValueError(f"KNNMemory(k={self.k}) > capacity={self.capacity}; expected "
                             f"k <= capacity")
        if self.capacity % self.shards:
            raise ValueError(f"KNNMemory(shards={self.shards}) does not divide capacity="
                             f"{self.capacity}")
        if not isinstance(self.approx, bool):
            raise ValueError(f"KNNMemory(approx={self.approx!r}); expected a bool")
        if self.layers is not None and (
                not isinstance(self.layers, tuple) or not self.layers
                or any(not is_int(i) or i < 0 for i in self.layers)
                or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"KNNMemory(layers={self.layers!r}); expected None (every layer) or "
                             f"a non-empty tuple of distinct layer indices >= 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def check(self, cfg):
        super().check(cfg)
        if self.layers is not None and max(self.layers) >= cfg.num_layers:
            raise ValueError(f"KNNMemory(layers={self.layers}) names a layer the model lacks: "
                             f"cfg.num_layers={cfg.num_layers}; expected indices in "
                             f"0..{cfg.num_layers - 1}")

    def check_segment(self, segment_len):
        if segment_len > self.capacity:
            raise ValueError(f"segment_len={segment_len} > KNNMemory(capacity={self.capacity}); "
                             f"a segment must fit in the store")

    def init(self, cfg, batch, memory_params):
        n = cfg.num_layers if self.layers is None else len(self.layers)
        shape = (batch, n, self.capacity, cfg.num_kv_heads, cfg.head_dim)
        store = {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype),
                 "valid": jnp.zeros(shape[:3], bool)}
        return {"layers": store} if self.layers is None else {"carried": store}

    def carried_layer(self, state, carried, params, h, q, k, v, ctx):
        if self.layers is None:
            return super().carried_layer(state, carried, params, h, q, k, v, ctx)
        table = np.full(ctx.cfg.num_layers, -1, np.int32)
        table[list(self.layers)] = np.arange(len(self.layers))
        slot = jnp.asarray(table)[ctx.layer]  # this layer's store, or -1: no memory here
        index = jnp.maximum(slot, 0)

        def with_memory(carried):
            mine = jax.tree.map(lambda s: lax.dynamic_index_in_dim(s, index, 1, keepdims=False),
                                carried)
            out = self.read(mine, params, h, q, k, v, ctx)
            new = self.write(mine, params, h, q, k, v, ctx)
            return out, jax.tree.map(lambda s, n: lax.dynamic_update_index_in_dim(s, n, index, 1),
                                     carried, new)

        def local(carried):
            return NoMemory().read(None, params, h, q, k, v, ctx).astype(q.dtype), carried

        out, carried = lax.cond(slot >= 0, with_memory, local, carried)
        return out, state, carried

    def read(self, state, params, h, q, k, v, ctx):
        qr, kr = ctx.rope(q), ctx.rope(k)
        B, T, H, D = q.shape
        K = k.shape[2]
        scale = default_scale(D)
        store_k = ctx.shard(state["k"], _STORE_AXES)
        store_v = ctx.shard(state["v"], _STORE_AXES)
        ret_logits, ret_values = retrieve(qr, store_k, store_v, state["valid"], k=self.k,
                                          scale=scale, approx=self.approx, shards=self.shards,
                                          shard=ctx.shard)
        qg = grouped(qr, K)
        local = jnp.einsum("btkgd,bskd->bkgts", qg, kr, preferred_element_type=f32) * scale
        t = jnp.arange(T)
        vis = ctx.self_mask().visible(t, t, 0)[0, 0]  # [T, T]: causal or the sliding window
        local = jnp.where(vis, local, -jnp.inf)
        p_local, p_ret = softmax_parts([local, ret_logits])
        out = (jnp.einsum("bkgts,bskd->btkgd", p_local, v.astype(f32))
               + jnp.einsum("bkgtn,bkgtnd->btkgd", p_ret, ret_values.astype(f32)))
        return out.reshape(B, T, H, D).astype(q.dtype)

    def write(self, state, params, h, q, k, v, ctx):
        B, T = ctx.valid.shape
        # Slot = position mod capacity (a ring buffer); padding goes out of bounds: dropped.
        slot = jnp.where(ctx.valid, ctx.positions % self.capacity, self.capacity)
        rows = jnp.arange(B)[:, None]
        kr = lax.stop_gradient(ctx.rope(k)).astype(state["k"].dtype)
        return {"k": state["k"].at[rows, slot].set(kr, mode="drop"),
                "v": state["v"].at[rows, slot].set(lax.stop_gradient(v).astype(state["v"].dtype),
                                                   mode="drop"),
                "valid": state["valid"].at[rows, slot].set(True, mode="drop")}


def retrieve(q, keys, values, valid, *, k, scale, approx=False, shards=1, shard=None):
    """Each query's top-k stored keys: (logits [B, K, G, T, k] float32, -inf for empty slots;
    values [B, K, G, T, k, D]). q [B, T, H, D]; keys, values [B, C, K, D]; valid [B, C]."""
    K = keys.shape[2]
    scores = jnp.einsum("btkgd,bckd->bkgtc", grouped(q, K), keys,
                        preferred_element_type=f32) * scale
    scores = jnp.where(valid[:, None, None, None, :], scores, -jnp.inf)
    top, idx = _top_k(scores, k, approx, shards, shard)
    vals = jnp.take_along_axis(values.transpose(0, 2, 1, 3)[:, :, None, None],
                               idx[..., None], axis=4)
    return top, vals


def _top_k(scores, k, approx, shards, shard):
    """Top-k over the last axis [..., C]; in `shards` slices first when shards > 1."""
    if approx:
        return lax.approx_max_k(scores, k)
    if shards == 1:
        return lax.top_k(scores, k)
    *lead, C = scores.shape
    chunk = C // shards
    s = scores.reshape(*lead, shards, chunk)
    if shard is not None:  # the slices follow the store's sharding of its capacity axis
        s = shard(s, ("batch", "kv_heads", None, None, "seq", None))
    top, idx = lax.top_k(s, min(k, chunk))
    offsets = jnp.arange(shards, dtype=idx.dtype) * chunk
    idx = idx + offsets.reshape((1,) * len(lead) + (shards, 1))
    top, pos = lax.top_k(top.reshape(*lead, -1), k)
    return top, jnp.take_along_axis(idx.reshape(*lead, -1), pos, axis=-1)


def knn_attention(q, keys, values, valid, *, k, scale=None, approx=False, shards=1):
    """Attention of q [B, T, H, D] over its top-k keys of a store (keys, values [B, C, K, D],
    valid [B, C] bool) alone: [B, T, H, D]. With k >= the valid entries it is dense attention
    over the store."""
    B, T, H, D = q.shape
    scale = default_scale(D) if scale is None else scale
    logits, vals = retrieve(q, keys, values, valid, k=k, scale=scale, approx=approx,
                            shards=shards)
    (p,) = softmax_parts([logits])
    out = jnp.einsum("bkgtn,bkgtnd->btkgd", p, vals.astype(f32))
    return out.reshape(B, T, H, D).astype(q.dtype)
