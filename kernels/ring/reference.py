"""The pure-JAX twin of kernels/ring/tpu.py: the same ring, with `lax.ppermute` and dense steps.

Same arguments and results as `ring_attention_tpu` (inside shard_map, per-device shards
q [B, H, T, D], k, v [B, K, T, D]); float32 throughout. The ground truth for the kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..block_sparse.common import finish_softmax, online_softmax_step
from .tpu import shard_positions


def ring_attention_reference(q, k, v, *, axis_name: str, num_devices: int, order: str = "zigzag",
                             mask_fn=None, scale: float):
    """(out [B, H, T, D] in q's dtype, lse [B, H, T, 1] float32, +inf where nothing is seen)."""
    B, H, T, D = q.shape
    K = k.shape[1]
    P = num_devices
    device = lax.axis_index(axis_name)
    q_pos = shard_positions(order, device, P, T)
    qg = q.astype(jnp.float32).reshape(B, K, H // K, T, D)
    m = jnp.full((B, K, H // K, T, 1), -jnp.inf, jnp.float32)
    l = jnp.zeros_like(m)
    acc = jnp.zeros(qg.shape, jnp.float32)
    for s in range(P):
        k_pos = shard_positions(order, (device - s + P) % P, P, T)
        logits = jnp.einsum("bkgqd,bksd->bkgqs", qg, k.astype(jnp.float32)) * scale
        if mask_fn is not None:
            logits = jnp.where(mask_fn(q_pos[:, None], k_pos[None, :]), logits, -jnp.inf)
        m, alpha, p, l = online_softmax_step(m, l, logits)
        acc = alpha * acc + jnp.einsum("bkgqs,bksd->bkgqd", p, v.astype(jnp.float32))
        if s < P - 1:
            k, v = lax.ppermute((k, v), axis_name, [(i, (i + 1) % P) for i in range(P)])
    out, lse = finish_softmax(acc, m, l)
    return out.reshape(B, H, T, D).astype(q.dtype), lse.reshape(B, H, T, 1)
