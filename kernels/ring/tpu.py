"""A fused ring attention forward kernel for TPU (Pallas Mosaic): K/V move by remote DMA.

Public TPU ring attentions rotate K/V with `lax.ppermute` between kernel calls. Here one kernel
runs the whole ring: at step s it starts remote copies of the K/V shard it holds into the right
neighbour's other buffer (double buffering: two K/V slots, DMA semaphores per slot), computes its
queries against the shard it holds while the copies fly, then waits for them. A barrier with
both neighbours at the start of each step makes sure the neighbour has finished reading the slot
about to be overwritten. Steps whose block pair is fully masked skip the matmuls.

Call it inside `jax.shard_map` over a 1-D mesh axis of P devices, with the sequence split
contiguously ("none") or zigzag (device d holds chunks d and 2P-1-d). Softmax statistics are
float32; it returns the output and the per-row logsumexp (+inf for rows that see nothing), so a
caller can merge it or differentiate it with a ring backward (lcm.attention.ring does).
Runs on CPU with `interpret=pltpu.InterpretParams()` (remote DMAs and semaphores included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..block_sparse.common import finish_softmax, online_softmax_step

ORDERS = ("none", "zigzag")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def shard_positions(order: str, device, num_devices: int, shard_length: int):
    """Original positions [shard_length] of device's tokens (int32; device may be traced)."""
    r = lax.broadcasted_iota(jnp.int32, (shard_length,), 0)
    if order == "none":
        return device * shard_length + r
    half = shard_length // 2
    chunk = jnp.where(r < half, device, 2 * num_devices - 1 - device)
    return chunk * half + r % half


def ring_attention_tpu(q, k, v, *, axis_name: str, num_devices: int, order: str = "zigzag",
                       mask_fn: Callable | None = None, scale: float, interpret=False):
    """Per-device shards (inside shard_map): q [B, H, T, D]; k, v [B, K, T, D]; H % K == 0.

    mask_fn(q_pos [R, 1], k_pos [1, C]) -> bool over original positions (e.g. an IndexMask's
    `fn`), or None for full attention. Returns (out [B, H, T, D] in q's dtype, lse [B, H, T, 1]
    float32, +inf where a row saw no key).
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {list(ORDERS)}")
    B, H, T, D = q.shape
    K = k.shape[1]
    if k.shape != (B, K, T, D) or v.shape != k.shape or H % K:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, H, T, D] and "
                         f"k, v [B, K, T, D] with H a multiple of K")
    if order == "zigzag" and T % 2:
        raise ValueError(f"shard length {T} must be even for order='zigzag'")
    kernel = functools.partial(_kernel, axis_name=axis_name, P=num_devices, order=order,
                               mask_fn=mask_fn, scale=float(scale), G=H // K)
    vmem = pltpu.MemorySpace.VMEM
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)),
        in_specs=[pl.BlockSpec(memory_space=vmem)] * 3,
        out_specs=(pl.BlockSpec(memory_space=vmem), pl.BlockSpec(memory_space=vmem)),
        scratch_shapes=[
            pltpu.VMEM((2,) + k.shape, k.dtype),  # K slots
            pltpu.VMEM((2,) + v.shape, v.dtype),  # V slots
            pltpu.VMEM((B, H, T, D), jnp.float32),  # accumulator
            pltpu.VMEM((B, H, T, 1), jnp.float32),  # running max
            pltpu.VMEM((B, H, T, 1), jnp.float32),  # running sum
            pltpu.SemaphoreType.DMA((2, 2)),  # send: [K or V, slot]
            pltpu.SemaphoreType.DMA((2, 2)),  # receive
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
    )(q, k, v)


def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, k_buf, v_buf, acc_ref, m_ref, l_ref,
            send_sem, recv_sem, *, axis_name, P, order, mask_fn, scale, G):
    T = q_ref.shape[2]
    device = lax.axis_index(axis_name)
    right, left = lax.rem(device + 1, P), lax.rem(device + P - 1, P)
    k_buf[0] = k_ref[...]
    v_buf[0] = v_ref[...]
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    q_pos = shard_positions(order, device, P, T)

    def copies(slot):
        """Remote copies of this device's K/V in `slot` into the right neighbour's other slot."""
        return [pltpu.make_async_remote_copy(
            src_ref=buf.at[slot], dst_ref=buf.at[1 - slot], send_sem=send_sem.at[i, slot],
            recv_sem=recv_sem.at[i, 1 - slot], device_id={axis_name: right})
            for i, buf in enumerate((k_buf, v_buf))]

    def step(s, carry):
        slot = lax.rem(s, 2)
        # Barrier: both neighbours have finished step s - 1, so the right one no longer reads
        # the slot we are about to write, and the left one is ready to send.
        barrier = pltpu.get_barrier_semaphore()
        for neighbour in (left, right):
            pl.semaphore_signal(barrier, 1, device_id={axis_name: neighbour})
        pl.semaphore_wait(barrier, 2)
        descriptors = copies(slot)

        @pl.when(s < P - 1)
        def _():
            for d in descriptors:
                d.start()

        source = lax.rem(device - s + P, P)
        k_pos = shard_positions(order, source, P, T)
        _attend_step(q_ref, k_buf, v_buf, slot, acc_ref, m_ref, l_ref, q_pos, k_pos, mask_fn,
                     scale, G)

        @pl.when(s < P - 1)
        def _():
            for d in descriptors:
                d.wait_send()
                d.wait_recv()

        return carry

    lax.fori_loop(0, P, step, 0)
    out, lse = finish_softmax(acc_ref[...], m_ref[...], l_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _attend_step(q_ref, k_buf, v_buf, slot, acc_ref, m_ref, l_ref, q_pos, k_pos, mask_fn, scale,
                 G):
    """Online-softmax update of every (batch, head) with the K/V shard in `slot`."""
    B, H, T, _ = q_ref.shape
    K = k_buf.shape[2]
    if mask_fn is None:
        visible = None
    else:
        visible = mask_fn(q_pos[:, None], k_pos[None, :])  # [T, T]

    def update():
        for b in range(B):
            for kh in range(K):
                k = k_buf[slot, b, kh].astype(jnp.float32)  # [T, D]
                v = v_buf[slot, b, kh]
                for g in range(G):
                    h = kh * G + g
                    q = q_ref[b, h].astype(jnp.float32)
                    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
                    if visible is not None:
                        s = jnp.where(visible, s, -jnp.inf)
                    m, alpha, p, l = online_softmax_step(m_ref[b, h], l_ref[b, h], s)
                    pv = lax.dot_general(p.astype(v.dtype), v, _NN,
                                         preferred_element_type=jnp.float32)
                    acc_ref[b, h] = alpha * acc_ref[b, h] + pv
                    m_ref[b, h] = m
                    l_ref[b, h] = l

    if visible is None:
        update()
    else:
        pl.when(jnp.any(visible))(update)  # a fully masked step: no matmuls
