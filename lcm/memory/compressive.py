"""Compressive memory of Infini-attention (Munkhdalai et al. 2024).

Per layer and KV head a linear-attention memory M [D, D] and normaliser z [D]. Each segment
reads A_mem = s(Q) M / (s(Q) z) with s = elu + 1, mixes it with causal softmax attention within
the segment by a learned per-head gate, A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_local,
then writes M += s(K)^T V, z += sum_t s(K_t) (or, with `delta_rule`,
M += s(K)^T (V - s(K) M / (s(K) z))). The memory reads and writes the keys and queries before
RoPE (it has no positions; the paper leaves this open). Gradients flow through M and z across
segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.memory.base import Memory, f32, grouped
from lcm.model import WeightSpec


def _feature(x):
    return jax.nn.elu(x.astype(f32)) + 1.0


@dataclasses.dataclass(frozen=True)
class CompressiveMemory(Memory):
    """Infini-attention's per-head memory. Params: "layers" / "gate" [layers, heads] (beta, zero
    at init: an even mix). State "layers": M [B, layers, kv_heads, D, D], z [B, layers,
    kv_heads, D], float32."""

    delta_rule: bool = False

    def __post_init__(self):
        if not isinstance(self.delta_rule, bool):
            raise ValueError(f"CompressiveMemory(delta_rule={self.delta_rule!r}); expected a bool")

    def param_specs(self, cfg):
        return {"layers": {"gate": WeightSpec((cfg.num_layers, cfg.num_heads),
                                              ("layers", "heads"), "zeros")}}

    def init(self, cfg, batch, memory_params):
        K, D = cfg.num_kv_heads, cfg.head_dim
        return {"layers": {"M": jnp.zeros((batch, cfg.num_layers, K, D, D), f32),
                           "z": jnp.zeros((batch, cfg.num_layers, K, D), f32)}}

    def read(self, state, params, h, q, k, v, ctx):
        local = ctx.attend(ctx.rope(q), ctx.rope(k), v, ctx.self_mask()).astype(f32)
        B, T, H, D = q.shape
        sq = grouped(_feature(q), k.shape[2])  # [B, T, K, G, D]
        num = jnp.einsum("btkgd,bkde->btkge", sq, state["M"])
        den = jnp.einsum("btkgd,bkd->btkg", sq, state["z"])[..., None]
        # An empty memory (z = 0) reads zeros rather than 0 / 0.
        mem = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0).reshape(B, T, H, D)
        g = jax.nn.sigmoid(params["gate"].astype(f32))[None, None, :, None]
        return (g * mem + (1.0 - g) * local).astype(q.dtype)

    def write(self, state, params, h, q, k, v, ctx):
        sk = _feature(k) * ctx.valid[:, :, None, None]  # padding writes nothing
        vf = v.astype(f32)
        if self.delta_rule:
            num = jnp.einsum("btkd,bkde->btke", sk, state["M"])
            den = jnp.einsum("btkd,bkd->btk", sk, state["z"])[..., None]
            vf = vf - jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
        return {"M": state["M"] + jnp.einsum("btkd,btke->bkde", sk, vf),
                "z": state["z"] + sk.sum(1)}
