"""strategy="pallas" (`attend(..., impl="ring_pallas")`): ring attention's forward and backward
as fused Pallas TPU kernels (kernels/ring): K/V, and in the backward the dK/dV accumulators, move
by in-kernel remote DMA.

The kernel evaluates masks that are functions of positions alone (`Mask.position_fn`: Causal,
Local, SinkWindow, Chunked, PrefixLM, a MaskFn that reads neither batch nor head, and their
& / |) at original positions, for the "none" and "zigzag" orders without padding; other masks
and orders raise ValueError naming what to use instead.

Sink logits are merged once per row after the kernel's ring, into its output and logsumexp
(lse' = logaddexp(lse, sink), out' = out * exp(lse - lse')); the backward kernel takes the merged
output and lse, and d sinks is -sum over rows of exp(sink - lse') * rowsum(dO * out').
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from lcm.kernels.block_sparse.common import sink_grad
from lcm.kernels.ring import ring_attention_tpu, ring_attention_tpu_bwd
from lcm.attention.pallas import default_platform


def kernel_mask_fn(mask):
    """mask_fn(q_pos, k_pos) over original positions, or None; ValueError if the mask is not a
    function of positions alone."""
    if mask is None:
        return None
    try:
        return mask.position_fn("strategy='pallas' (impl='ring_pallas')")
    except ValueError as e:
        raise ValueError(f"{e}; use strategy='ring' (impl='ring')") from None


def check_kernel_order(order, axis_name):
    if order.load_balance not in ("none", "zigzag") or order.padded_length != order.length:
        raise ValueError(f"strategy='pallas' (impl='ring_pallas') needs load_balance 'none' or "
                         f"'zigzag' and a sequence length ({order.length}) that splits evenly "
                         f"over mesh axis {axis_name!r} (multiple of {order.num_chunks} chunks of "
                         f"whole blocks, here {order.padded_length}); use strategy='ring' "
                         f"(impl='ring') otherwise")


def _interpret():
    return pltpu.InterpretParams() if default_platform() == "interpret" else False


def _kernel_forward(st, mask_fn, q, k, v, sinks):
    """[B, T, H, D] shards -> (out [B, T, H, D], lse [B, T, H, 1] with -inf for nothing seen);
    with sinks ([H] float32), both include them."""
    order = st.plan.order
    out, lse = ring_attention_tpu(
        *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), axis_name=st.axis_name,
        num_devices=order.num_devices, order=order.load_balance, mask_fn=mask_fn,
        scale=st.scale, interpret=_interpret())
    lse = lse.transpose(0, 2, 1, 3)
    out, lse = out.transpose(0, 2, 1, 3), jnp.where(jnp.isposinf(lse), -jnp.inf, lse)
    if sinks is None:
        return out, lse
    merged = jnp.logaddexp(lse, jnp.broadcast_to(sinks[:, None], lse.shape))
    weight = jnp.exp(lse - jnp.where(jnp.isneginf(merged), 0.0, merged))  # -inf rows: 0
    return (out.astype(jnp.float32) * weight).astype(out.dtype), merged


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def pallas_ring_local(st, mask_fn, q, k, v, mask, sinks):
    return _kernel_forward(st, mask_fn, q, k, v, sinks)[0]


def _fwd(st, mask_fn, q, k, v, mask, sinks):
    out, lse = _kernel_forward(st, mask_fn, q, k, v, sinks)
    return out, (q, k, v, mask, sinks, out, lse)


def _bwd(st, mask_fn, residuals, d_out):
    """The fused backward kernel: dK/dV travel around the ring with K/V by remote DMA."""
    q, k, v, mask, sinks, out, lse = residuals
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # the kernel's "saw nothing"
    t = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    dq, dk, dv = ring_attention_tpu_bwd(
        t(q), t(k), t(v), t(out), t(lse), t(d_out), axis_name=st.axis_name,
        num_devices=st.plan.order.num_devices, order=st.plan.order.load_balance,
        mask_fn=mask_fn, scale=st.scale, interpret=_interpret())
    d_sinks = None
    if sinks is not None:  # this device's rows; shard_map's transpose sums over devices
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        d_sinks = sink_grad(sinks, lse[..., 0], delta, axis=(0, 1))
    return t(dq), t(dk), t(dv), None, d_sinks


pallas_ring_local.defvjp(_fwd, _bwd)
