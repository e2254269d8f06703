"""The fused Pallas TPU ring kernel (remote DMAs, TPU interpret mode on the 8-device CPU mesh)
vs its ppermute twin and the dense reference; lcm's ring_attention(strategy="pallas")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from lcm.kernels.ring import ring_attention_reference, ring_attention_tpu, ring_attention_tpu_bwd
from lcm.attention import Causal, Local, attend, make_ring_order, ring_attention
from lcm.sharding import make_mesh


def _run_kernel(fn, mesh, P, order, mask_fn, q, k, v, **kw):
    spec = PartitionSpec(None, None, "context", None)
    body = functools.partial(fn, axis_name="context", num_devices=P, order=order,
                             mask_fn=mask_fn, scale=q.shape[-1] ** -0.5, **kw)
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec),
                                check_vma=False))
    return run(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)))


@pytest.mark.parametrize("P,order,mask,H,K", [
    (4, "none", Causal(), 4, 2),     # GQA; later steps of early devices fully masked: skipped
    pytest.param(8, "zigzag", Causal(), 2, 2, marks=pytest.mark.slow),
    pytest.param(2, "zigzag", None, 2, 1, marks=pytest.mark.slow),
    pytest.param(4, "zigzag", Local(5), 2, 2, marks=pytest.mark.slow),  # rows see one shard
])
def test_kernel_matches_twin_and_reference(devices, P, order, mask, H, K):
    L = 16 * P
    mesh = make_mesh((P,), ("context",), devices=devices[:P])
    q, k, v = random_qkv(jax.random.key(P), 2, L, L, H, K, 8, jnp.float32)
    mask_fn = None if mask is None else mask.fn
    out, lse = _run_kernel(ring_attention_tpu, mesh, P, order, mask_fn, q, k, v,
                           interpret=pltpu.InterpretParams())
    twin, twin_lse = _run_kernel(ring_attention_reference, mesh, P, order, mask_fn, q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(twin), atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(twin_lse), atol=2e-6)
    # Back to [B, L, H, D] in original order, against the dense reference.
    ring_order = make_ring_order(L, P, order, block=8)
    got = ring_order.from_ring(out.transpose(0, 2, 1, 3))
    want = attend(*(ring_order.from_ring(x) for x in (q, k, v)), mask, impl="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-6)


@pytest.mark.parametrize("P,order,mask", [
    (2, "zigzag", Causal()),
    pytest.param(3, "zigzag", Causal(), marks=pytest.mark.slow),  # odd P: home after P hops
    pytest.param(4, "none", Local(5), marks=pytest.mark.slow),  # fully masked steps skipped
])
def test_backward_kernel_matches_reference_gradients(devices, P, order, mask):
    """The fused backward (dK/dV around the ring by remote DMA) gives the dense reference's
    gradients, GQA included."""
    L, H, K = 16 * P, 4, 2
    mesh = make_mesh((P,), ("context",), devices=devices[:P])
    q, k, v = random_qkv(jax.random.key(P), 2, L, L, H, K, 8, jnp.float32)
    do = jax.random.normal(jax.random.key(9), q.shape)
    spec = PartitionSpec(None, None, "context", None)
    kw = dict(axis_name="context", num_devices=P, order=order, mask_fn=mask.fn,
              scale=8 ** -0.5, interpret=pltpu.InterpretParams())

    def body(q, k, v, do):
        out, lse = ring_attention_tpu(q, k, v, **kw)
        return ring_attention_tpu_bwd(q, k, v, out, lse, do, **kw)

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 3,
                                check_vma=False))
    ring_order = make_ring_order(L, P, order, block=8)
    got = run(*(ring_order.to_ring(x).transpose(0, 2, 1, 3) for x in (q, k, v, do)))
    _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, impl="reference"), q, k, v)
    for name, a, b in zip("qkv", got, vjp(do)):
        a = ring_order.from_ring(a.transpose(0, 2, 1, 3))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5,
                                   err_msg=f"d{name}")


@pytest.mark.slow
def test_ring_attention_pallas_strategy_values_and_grads(devices):
    mesh = make_mesh((1, 1, 1, 4), devices=devices[:4])
    q, k, v = random_qkv(jax.random.key(0), 1, 64, 64, 2, 1, 8, jnp.float32)
    do = jax.random.normal(jax.random.key(1), q.shape)
    kw = dict(mesh=mesh, load_balance="zigzag", block_q=8, block_k=8)

    def loss(impl):
        def f(q, k, v):
            out = (ring_attention(q, k, v, Causal(), strategy="pallas", **kw) if impl == "pallas"
                   else attend(q, k, v, Causal(), impl="reference"))
            return jnp.sum(out * do)
        return f

    got = jax.jit(jax.value_and_grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_pallas_strategy_rejects_what_the_kernel_cannot_do(devices):
    from lcm.attention import Document

    mesh = make_mesh((1, 1, 1, 4), devices=devices[:4])
    q, k, v = random_qkv(jax.random.key(0), 1, 60, 60, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="splits evenly over mesh axis 'context'"):
        ring_attention(q, k, v, Causal(), mesh=mesh, strategy="pallas", block_q=8, block_k=8)
    q, k, v = random_qkv(jax.random.key(0), 1, 64, 64, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="not Document; use strategy='ring'"):
        ring_attention(q, k, v, Document(jnp.zeros((1, 64), jnp.int32)), mesh=mesh,
                       strategy="pallas", block_q=8, block_k=8)
    with pytest.raises(ValueError, match="load_balance 'none' or 'zigzag'"):
        ring_attention(q, k, v, Causal(), mesh=mesh, strategy="pallas", load_balance="striped",
                       block_q=8, block_k=8)
