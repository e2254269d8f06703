"""The fused ring attention backward for TPU (Pallas Mosaic): K/V and dK/dV move by remote DMA.

The mirror of kernels/ring/tpu.py's forward. Each device keeps its queries, dO, the forward's
logsumexp and delta = rowsum(dO * O); the K/V shard it holds travels right around the ring, and
with it the float32 dK/dV accumulators of that shard. At step s a device starts the remote copies
of the K/V it holds into the right neighbour's other slot, adds its queries' share to dQ and to
the travelling dK/dV, then sends those accumulators on (they depend on this step's compute, so
they go one hop behind K/V). After P steps every accumulator has made a full turn and is home.
Fully masked steps skip the matmuls (the accumulators still travel).

Call inside `jax.shard_map` over a 1-D mesh axis, with the shards and order of the forward.
Runs on CPU with `interpret=pltpu.InterpretParams()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .tpu import ORDERS, shard_positions

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def ring_attention_tpu_bwd(q, k, v, out, lse, d_out, *, axis_name: str, num_devices: int,
                           order: str = "zigzag", mask_fn: Callable | None = None, scale: float,
                           interpret=False):
    """(dq, dk, dv) of `ring_attention_tpu`, per-device shards inside shard_map.

    q, out, d_out [B, H, T, D]; k, v [B, K, T, D]; lse [B, H, T, 1] float32 from the forward
    (+inf where a row saw no key). Returns gradients in the dtypes of q, k, v.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {list(ORDERS)}")
    B, H, T, D = q.shape
    K = k.shape[1]
    if (k.shape != (B, K, T, D) or v.shape != k.shape or H % K or out.shape != q.shape
            or d_out.shape != q.shape or lse.shape != (B, H, T, 1)):
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape}, lse "
                         f"{lse.shape}, d_out {d_out.shape}: expected q, out, d_out [B, H, T, D], "
                         f"k, v [B, K, T, D] (H a multiple of K) and lse [B, H, T, 1]")
    if order == "zigzag" and T % 2:
        raise ValueError(f"shard length {T} must be even for order='zigzag'")
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    kernel = functools.partial(_kernel, axis_name=axis_name, P=num_devices, order=order,
                               mask_fn=mask_fn, scale=float(scale), G=H // K)
    vmem = pltpu.MemorySpace.VMEM
    f32 = jnp.float32
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
        in_specs=[pl.BlockSpec(memory_space=vmem)] * 6,
        out_specs=tuple(pl.BlockSpec(memory_space=vmem) for _ in range(3)),
        scratch_shapes=[
            pltpu.VMEM((2,) + k.shape, k.dtype),  # K slots
            pltpu.VMEM((2,) + v.shape, v.dtype),  # V slots
            pltpu.VMEM((2,) + k.shape, f32),  # dK accumulator slots (travel with K)
            pltpu.VMEM((2,) + v.shape, f32),  # dV accumulator slots
            pltpu.VMEM(q.shape, f32),  # dQ accumulator (stays)
            pltpu.SemaphoreType.DMA((4, 2)),  # send: [K, V, dK, dV] x slot
            pltpu.SemaphoreType.DMA((4, 2)),  # receive
        ],
        compiler_params=pltpu.CompilerParams(collective_id=1, has_side_effects=True),
        interpret=interpret,
    )(q, k, v, d_out, lse, delta)


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, k_buf,
            v_buf, dk_buf, dv_buf, dq_acc, send_sem, recv_sem, *, axis_name, P, order, mask_fn,
            scale, G):
    T = q_ref.shape[2]
    device = lax.axis_index(axis_name)
    right, left = lax.rem(device + 1, P), lax.rem(device + P - 1, P)
    k_buf[0] = k_ref[...]
    v_buf[0] = v_ref[...]
    dk_buf[0] = jnp.zeros(dk_buf.shape[1:], jnp.float32)
    dv_buf[0] = jnp.zeros(dv_buf.shape[1:], jnp.float32)
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    q_pos = shard_positions(order, device, P, T)

    def copies(bufs, first, slot):
        """Remote copies of bufs[slot] into the right neighbour's other slot."""
        return [pltpu.make_async_remote_copy(
            src_ref=buf.at[slot], dst_ref=buf.at[1 - slot], send_sem=send_sem.at[first + i, slot],
            recv_sem=recv_sem.at[first + i, 1 - slot], device_id={axis_name: right})
            for i, buf in enumerate(bufs)]

    def step(s, carry):
        slot = lax.rem(s, 2)
        # Barrier: both neighbours have finished step s - 1 (their sends from the slot we are
        # about to overwrite have completed).
        barrier = pltpu.get_barrier_semaphore()
        for neighbour in (left, right):
            pl.semaphore_signal(barrier, 1, device_id={axis_name: neighbour})
        pl.semaphore_wait(barrier, 2)
        kv = copies((k_buf, v_buf), 0, slot)

        @pl.when(s < P - 1)
        def _():
            for d in kv:
                d.start()

        k_pos = shard_positions(order, lax.rem(device - s + P, P), P, T)
        _grad_step(q_ref, do_ref, lse_ref, delta_ref, k_buf, v_buf, dk_buf, dv_buf, dq_acc,
                   slot, q_pos, k_pos, mask_fn, scale, G)
        # The accumulators go on after this step's compute; the P-th hop brings them home.
        grads = copies((dk_buf, dv_buf), 2, slot)
        for d in grads:
            d.start()

        @pl.when(s < P - 1)
        def _():
            for d in kv:
                d.wait_send()
                d.wait_recv()

        for d in grads:
            d.wait_send()
            d.wait_recv()
        return carry

    lax.fori_loop(0, P, step, 0)
    home = P % 2
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
    dk_ref[...] = dk_buf[home].astype(dk_ref.dtype)
    dv_ref[...] = dv_buf[home].astype(dv_ref.dtype)


def _grad_step(q_ref, do_ref, lse_ref, delta_ref, k_buf, v_buf, dk_buf, dv_buf, dq_acc, slot,
               q_pos, k_pos, mask_fn, scale, G):
    """This device's queries' gradient against the K/V shard in `slot`, into the accumulators."""
    B, H, T, _ = q_ref.shape
    K = k_buf.shape[2]
    visible = None if mask_fn is None else mask_fn(q_pos[:, None], k_pos[None, :])  # [T, T]

    def update():
        for b in range(B):
            for kh in range(K):
                k = k_buf[slot, b, kh].astype(jnp.float32)  # [T, D]
                v = v_buf[slot, b, kh].astype(jnp.float32)
                dk = dk_buf[slot, b, kh]
                dv = dv_buf[slot, b, kh]
                for g in range(G):
                    h = kh * G + g
                    q = q_ref[b, h].astype(jnp.float32)
                    do = do_ref[b, h].astype(jnp.float32)
                    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
                    if visible is not None:
                        s = jnp.where(visible, s, -jnp.inf)
                    p = jnp.exp(s - lse_ref[b, h])  # 0 where hidden or the row saw nothing
                    dv = dv + lax.dot_general(p, do, _TN, preferred_element_type=jnp.float32)
                    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
                    ds = p * (dp - delta_ref[b, h]) * scale
                    dq_acc[b, h] += lax.dot_general(ds, k, _NN,
                                                    preferred_element_type=jnp.float32)
                    dk = dk + lax.dot_general(ds, q, _TN, preferred_element_type=jnp.float32)
                dk_buf[slot, b, kh] = dk
                dv_buf[slot, b, kh] = dv

    if visible is None:
        update()
    else:
        pl.when(jnp.any(visible))(update)  # a fully masked step: no matmuls
