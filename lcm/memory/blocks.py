"""Retrieved block memory (InfLLM, Xiao et al. 2024), training-free on any loaded model.

Every layer keeps the K/V of the whole document so far in blocks of `block_size` tokens. Each
query block of a segment attends, through the block-sparse path with a layout computed at run
time (`BlockMask` & `Causal`), to: the first `init_blocks` blocks (attention sinks), the
`local_blocks` blocks just before the segment and the segment itself (causal), and the `top_k`
other past blocks whose representative key (the block's mean key, before RoPE) best matches the
block's mean query. Unselected blocks are never computed.

Positions (InfLLM's choice, `clip_positions=True`): keys are stored unrotated; the segment and
the local window keep their true positions, while sink and retrieved blocks are all placed just
before the local window, so no query-key distance exceeds segment + local window + one block
and a model runs far past its training length. With `clip_positions=False` every key keeps its
absolute position (then, with enough `top_k`, this is exactly full causal attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lcm.attention import BlockMask, Causal
from lcm.memory.base import Memory, f32, key_validity
from lcm.positions import apply_rope


@dataclasses.dataclass(frozen=True)
class RetrievedBlocks(Memory):
    """InfLLM-style block retrieval over a per-layer store of `capacity` tokens (tokens past it
    are not stored). State "layers": k (unrotated), v [B, layers, capacity, kv_heads, head_dim],
    valid [B, layers, capacity]."""

    capacity: int
    block_size: int = 64
    init_blocks: int = 1
    local_blocks: int = 4
    top_k: int = 4
    clip_positions: bool = True

    def __post_init__(self):
        for name in ("capacity", "block_size", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"RetrievedBlocks({name}={v!r}); expected a positive int")
        for name in ("init_blocks", "local_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"RetrievedBlocks({name}={v!r}); expected an int >= 0")
        if self.capacity % self.block_size:
            raise ValueError(f"RetrievedBlocks(capacity={self.capacity}) is not a multiple of "
                             f"block_size={self.block_size}")

    def check_segment(self, segment_len):
        if segment_len % self.block_size:
            raise ValueError(f"segment_len={segment_len} is not a multiple of RetrievedBlocks("
                             f"block_size={self.block_size})")

    def init(self, cfg, batch, memory_params):
        shape = (batch, cfg.num_layers, self.capacity, cfg.num_kv_heads, cfg.head_dim)
        return {"layers": {"k": jnp.zeros(shape, cfg.compute_dtype),
                           "v": jnp.zeros(shape, cfg.compute_dtype),
                           "valid": jnp.zeros(shape[:3], bool)}}

    def selection(self, state, q, ctx):
        """Per example, query head and query block, the visible key blocks: bool
        [B, H, nq, nk] over the store's blocks then the segment's."""
        B, T, H, D = q.shape
        K = state["k"].shape[2]
        bs, C = self.block_size, self.capacity
        nq, nc = T // bs, C // bs
        first = ctx.positions[:, 0] // bs  # [B]: the store block where this segment starts
        reps = state["k"].astype(f32).reshape(B, nc, bs, K, D).mean(2)  # [B, nc, K, D]
        q_mean = q.astype(f32).reshape(B, nq, bs, K, H // K, D).mean((2, 4))  # [B, nq, K, D]
        scores = jnp.einsum("bikd,bjkd->bkij", q_mean, reps)  # [B, K, nq, nc]
        j = jnp.arange(nc)[None]
        filled = state["valid"].reshape(B, nc, bs).any(-1)  # [B, nc]
        fixed = filled & ((j < self.init_blocks) | (j >= first[:, None] - self.local_blocks))
        candidate = (filled & ~fixed)[:, None, None]  # [B, 1, 1, nc]
        scores = jnp.where(candidate, scores, -jnp.inf)
        _, top = lax.top_k(scores, min(self.top_k, nc))
        chosen = jnp.zeros(scores.shape, bool).at[
            jnp.arange(B)[:, None, None, None], jnp.arange(K)[None, :, None, None],
            jnp.arange(nq)[None, None, :, None], top].set(True)
        past = (chosen & candidate) | fixed[:, None, None]  # [B, K, nq, nc]
        past = jnp.repeat(past, H // K, axis=1)  # per query head
        current = jnp.broadcast_to(jnp.ones((nq, nq), bool), (B, H, nq, nq))
        return jnp.concatenate([past, current], -1)

    def _key_positions(self, state, ctx):
        """The RoPE position of every stored key [B, C] (see the module docstring)."""
        B, C = state["valid"].shape
        idx = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
        if not self.clip_positions:
            return idx
        local_start = jnp.maximum(ctx.positions[:, :1] - self.local_blocks * self.block_size, 0)
        return jnp.where(idx >= local_start, idx, jnp.maximum(local_start - 1, 0))

    def read(self, state, params, h, q, k, v, ctx):
        T = q.shape[1]
        grid = self.selection(state, q, ctx)
        store_k = apply_rope(state["k"], self._key_positions(state, ctx), ctx.inv_freq,
                             ctx.attention_factor)
        keys = jnp.concatenate([store_k.astype(q.dtype), ctx.rope(k)], 1)
        values = jnp.concatenate([state["v"].astype(v.dtype), v], 1)
        kv_valid = jnp.concatenate([state["valid"], jnp.ones_like(ctx.valid)], 1)

        def one(q1, k1, v1, grid1, valid1):
            mask = (BlockMask(grid1, self.block_size) & Causal()
                    & key_validity(T, valid1[None]))
            return ctx.attend(q1[None], k1[None], v1[None], mask)[0]

        return jax.vmap(one)(ctx.rope(q), keys, values, grid, kv_valid)

    def write(self, state, params, h, q, k, v, ctx):
        B, T = ctx.valid.shape
        slot = jnp.where(ctx.valid, ctx.positions, self.capacity)  # past capacity: dropped
        rows = jnp.arange(B)[:, None]
        return {"k": state["k"].at[rows, slot].set(lax.stop_gradient(k).astype(state["k"].dtype),
                                                   mode="drop"),
                "v": state["v"].at[rows, slot].set(lax.stop_gradient(v).astype(state["v"].dtype),
                                                   mode="drop"),
                "valid": state["valid"].at[rows, slot].set(True, mode="drop")}
