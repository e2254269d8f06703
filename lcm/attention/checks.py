"""Input checks shared by every attention backend (attend and the context-parallel ring)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lcm.attention.masks import Mask
from lcm.checks import check_int
from lcm.kernels.block_sparse.common import check_sinks

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_inputs(q, k, v, mask, scale, softcap, block_q, block_k, sinks=None):
    """Raises ValueError naming the argument and the fix for inputs no backend takes: q [B, T, H, D]
    and k, v [B, S, K, D] float arrays (or ShapeDtypeStructs) with H a multiple of K and T <= S,
    a Mask (validated at these shapes) or None, positive scale / softcap or None, positive int
    block sizes, sinks None or a float array [H] (may be traced). Shapes and dtypes only: runs
    before tracing."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} has shape {getattr(x, 'shape', None)}; expected 4 dims "
                             f"[batch, length, heads, head_dim]")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype}; expected float32, bfloat16 or float16")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v shape {k.shape} does not fit q shape {q.shape}: batch and "
                         f"head_dim must match")
    if min(B, T, H, D, k.shape[1], k.shape[2]) == 0:
        raise ValueError(f"empty dimension in q {q.shape} or k {k.shape}")
    if H % k.shape[2]:
        raise ValueError(f"q has {H} heads, not a multiple of the {k.shape[2]} KV heads of k/v")
    if T > k.shape[1]:
        raise ValueError(f"q_len={T} > kv_len={k.shape[1]}: queries are aligned to the end of "
                         f"the keys, so q_len may not exceed kv_len")
    if mask is not None:
        if not isinstance(mask, Mask):
            raise ValueError(f"mask={mask!r}; expected None or a Mask (Causal(), Local(w), "
                             f"Document(ids), combined with & and |)")
        mask.validate(B, H, T, k.shape[1])
    for name, x in (("scale", scale), ("softcap", softcap)):
        if x is not None and not (_is_number(x) and math.isfinite(x) and x > 0):
            raise ValueError(f"{name}={x!r}; expected a positive finite float or None")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        check_int(None, name, b, 1)
    check_sinks(sinks, H)


def _is_number(x) -> bool:
    """A Python or NumPy int or float, not a bool (NumPy scalars come from configs and sweeps)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_))
