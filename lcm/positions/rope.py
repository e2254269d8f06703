"""Rotary position embeddings: frequencies from a RopeConfig, and the rotation itself."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lcm.config import RopeConfig

LAYOUTS = ("half", "interleaved")


def rope_frequencies(rope: RopeConfig, head_dim: int, seq_len=None):
    """Inverse frequencies and the attention factor: `(inv_freq [head_dim//2] float32, float)`.

    `seq_len` is for the length-dependent scaling types; the default type ignores it.
    inv_freq[i] = theta ** (-2i / head_dim), as Hugging Face computes it.
    """
    del seq_len
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim}; expected a positive even int")
    if rope.rope_type != "default":
        raise ValueError(f"rope.rope_type={rope.rope_type!r}; only 'default' is implemented")
    # float64 on the host, then float32, as HF does with int64 arange / float.
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    return jnp.asarray(inv_freq, jnp.float32), 1.0


def apply_rope(x, positions, inv_freq, attention_factor=1.0, *, layout="half"):
    """Rotates feature pairs of x by position.

    x [B, T, H, D]; positions [B, T] int; inv_freq [D//2] float32.

    layout="half" pairs feature i with i + D/2 (Llama/HF "rotate_half"); "interleaved" pairs
    2i with 2i+1 (GPT-J, Meta's original Llama). Angles are float32 whatever x's dtype.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {list(LAYOUTS)}")
    if x.shape[-1] != 2 * inv_freq.shape[-1]:
        raise ValueError(f"x has head_dim {x.shape[-1]} but inv_freq has {inv_freq.shape[-1]} "
                         f"entries; expected head_dim // 2")
    # float32: bf16 positions cannot tell 257 from 256, and angles of large positions need it.
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None]  # [B, T, D/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)
