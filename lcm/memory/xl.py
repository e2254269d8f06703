"""Transformer-XL memory: each layer also attends to the K/V of the last `mem_len` tokens.

Keys are cached after RoPE at their absolute positions, and positions continue across segments,
so query-key distances are the true ones (RoPE is relative). The cache is stop-gradient, as in
Transformer-XL. Padding tokens of a short last segment enter the cache flagged invalid and are
never attended to.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from lcm.memory.base import Memory, key_validity


@dataclasses.dataclass(frozen=True)
class TransformerXL(Memory):
    """Per-layer cache of the last `mem_len` keys and values (Dai et al. 2019).

    State "layers": k, v [B, layers, mem_len, kv_heads, head_dim] (compute dtype), valid
    [B, layers, mem_len] bool. With mem_len >= the sequence length it equals full causal attention.
    """

    mem_len: int

    def __post_init__(self):
        self._check_ints(1, "mem_len")

    def init(self, cfg, batch, memory_params):
        shape = (batch, cfg.num_layers, self.mem_len, cfg.num_kv_heads, cfg.head_dim)
        return {"layers": {"k": jnp.zeros(shape, cfg.compute_dtype),
                           "v": jnp.zeros(shape, cfg.compute_dtype),
                           "valid": jnp.zeros(shape[:3], bool)}}

    def read(self, state, params, h, q, k, v, ctx):
        T = q.shape[1]
        keys = jnp.concatenate([state["k"], ctx.rope(k).astype(state["k"].dtype)], 1)
        values = jnp.concatenate([state["v"], v.astype(state["v"].dtype)], 1)
        kv_valid = jnp.concatenate([state["valid"], jnp.ones_like(ctx.valid)], 1)
        # Queries sit at the end of the keys, so Causal / Local see the cache as the past.
        mask = ctx.self_mask() & key_validity(T, kv_valid)
        return ctx.attend(ctx.rope(q), keys.astype(q.dtype), values.astype(q.dtype), mask)

    def write(self, state, params, h, q, k, v, ctx):
        M = self.mem_len
        keys = jnp.concatenate([state["k"], ctx.rope(k).astype(state["k"].dtype)], 1)
        values = jnp.concatenate([state["v"], v.astype(state["v"].dtype)], 1)
        valid = jnp.concatenate([state["valid"], ctx.valid], 1)
        return {"k": lax.stop_gradient(keys[:, -M:]), "v": lax.stop_gradient(values[:, -M:]),
                "valid": valid[:, -M:]}
