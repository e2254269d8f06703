"""Pure layer functions of the decoder: RMSNorm, SwiGLU MLP, grouped-query attention block."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.attention import attend
from lcm.positions import apply_rope, position_attention


def _identity(x, axes):
    del axes
    return x


def rms_norm(x, weight, eps):
    """x [..., E] normalised by its root mean square (float32 statistics), times weight [E]."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * xf.astype(x.dtype)


def swiglu_mlp(x, p, *, shard=_identity):
    """down(silu(x @ gate) * (x @ up)). x [B, T, E]."""
    dt = x.dtype
    gate = jnp.einsum("bte,ef->btf", x, p["w_gate"].astype(dt))
    up = jnp.einsum("bte,ef->btf", x, p["w_up"].astype(dt))
    h = shard(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fe->bte", h, p["w_down"].astype(dt))


def project_qkv(x, p, *, shard=_identity):
    """The query, key and value projections (with Qwen2's biases), before RoPE.

    x [B, T, E] -> q [B, T, H, D], k and v [B, T, K, D]. Decoders that keep their own K/V (the
    KV cache, segment memories) reuse this and `project_out` around their attention.
    """
    dt = x.dtype

    def project(w, b):
        y = jnp.einsum("bte,ehd->bthd", x, p[w].astype(dt))
        return y + p[b].astype(dt)[None, None] if b in p else y

    q = shard(project("wq", "bq"), ("batch", "seq", "heads", "head_dim"))
    k = shard(project("wk", "bk"), ("batch", "seq", "kv_heads", "head_dim"))
    v = shard(project("wv", "bv"), ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def project_out(out, p, *, shard=_identity):
    """The attention output projection. out [B, T, H, D] -> [B, T, E]."""
    out = shard(out, ("batch", "seq", "heads", "head_dim"))
    return jnp.einsum("bthd,hde->bte", out, p["wo"].astype(out.dtype))


def attention_block(x, p, *, positions, inv_freq, attention_factor, mask, attention,
                    shard=_identity, position=None, ring_order=None):
    """Grouped-query self-attention with RoPE. x [B, T, E]; positions [B, T]; returns [B, T, E].

    `attention` is an AttentionConfig (backend and block sizes); `mask` a lcm.attention Mask;
    `position` a PositionConfig (None or type "rope": RoPE as trained; others see
    `lcm.positions.position_attention`). `ring_order`: for impl "ring" / "allgather", the
    RingOrder x and positions are already in (the decoder applies it once at its input; the
    mask's segment ids stay in the original order); None lets each call permute by
    `attention.load_balance`.
    """
    q, k, v = project_qkv(x, p, shard=shard)
    if position is None or position.type == "rope":
        q = apply_rope(q, positions, inv_freq, attention_factor)
        k = apply_rope(k, positions, inv_freq, attention_factor)
        balance = {}
        if attention.context_parallel:
            balance["load_balance"] = attention.load_balance if ring_order is None else ring_order
        out = attend(q, k, v, mask, impl=attention.impl, block_q=attention.block_q,
                     block_k=attention.block_k, **balance)
    else:
        out = position_attention(q, k, v, positions=positions, inv_freq=inv_freq,
                                 attention_factor=attention_factor, mask=mask,
                                 position=position, impl=attention.impl,
                                 block_q=attention.block_q, block_k=attention.block_k)
    return project_out(out.astype(x.dtype), p, shard=shard)
