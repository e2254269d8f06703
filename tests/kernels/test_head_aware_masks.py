"""Head-aware in-kernel masks (per-head tables, reference.py's protocol) in the TPU and GPU
kernels, interpreted on CPU: values and gradients against the dense reference under GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from helpers import block_kinds, random_qkv
from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
from lcm.kernels.block_sparse.layout import layout_from_kinds
from lcm.kernels.block_sparse.reference import attention_reference, dense_mask
from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu


def sinks_and_windows(T, S, n_cols):
    """Causal; query head h sees its own listed key columns, plus keys within its own window.
    tables[0]: [H * n_cols] columns; tables[1]: [H] windows."""
    off = S - T

    def fn(q, k, qs, ks, head, tables, q_start, k_start):
        del qs, ks, q_start, k_start
        cols = lax.fori_loop(0, n_cols, lambda t, acc: acc | (k == tables[0][head * n_cols + t]),
                             jnp.zeros(k.shape, jnp.bool_))
        return (q + off >= k) & (cols | (q + off - k < tables[1][head]))
    return fn


def per_kv_head_kinds(vis, K, block_q, block_k):
    """kinds [K, nq, nk] from vis [1, H, T, S]: each KV head's union over its query heads."""
    G = vis.shape[1] // K
    return np.concatenate([block_kinds(vis[0, h * G:(h + 1) * G], block_q, block_k)
                           for h in range(K)])


def case(seed, *, B=1, T=37, S=53, K=2, G=2, D=16, n_cols=3):
    H = K * G
    rng = np.random.default_rng(seed)
    tables = (jnp.asarray(rng.integers(0, S, H * n_cols), jnp.int32),
              jnp.asarray(rng.integers(1, 12, H), jnp.int32))
    q, k, v = random_qkv(jax.random.key(seed), B, T, S, H, K, D, jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    return q, k, v, d_out, sinks_and_windows(T, S, n_cols), tables


def value_and_grads(attn, q, k, v, d_out):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(d_out))


def check(kernel, seed, block_q, block_k, **extra):
    q, k, v, d_out, fn, tables = case(seed)
    T, S, H, K = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    vis = np.asarray(dense_mask(fn, T, S, mask_tables=tables, num_heads=H))
    assert vis.shape == (1, H, T, S)
    assert (vis[0, 0] != vis[0, 1]).any()  # heads of one group really differ
    kinds = per_kv_head_kinds(vis, K, block_q, block_k)
    kv_blocks, counts = layout_from_kinds(kinds)
    want = value_and_grads(lambda q, k, v: attention_reference(
        q, k, v, mask_fn=fn, mask_tables=tables, scale=0.25), q, k, v, d_out)
    got = value_and_grads(lambda q, k, v: kernel(
        q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=fn,
        mask_tables=tables, scale=0.25, block_q=block_q, block_k=block_k, **extra),
        q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


def test_tpu_head_aware_mask_matches_reference():
    check(block_sparse_attention_tpu, 1, 16, 8, interpret=True)


@pytest.mark.slow
def test_tpu_head_aware_mask_with_tpu_interpret_semantics():
    """SMEM scalar prefetch of the tables, as a TPU runs it."""
    check(block_sparse_attention_tpu, 2, 16, 16, interpret=pltpu.InterpretParams())


def test_gpu_head_aware_mask_matches_reference():
    check(block_sparse_attention_gpu, 0, 16, 32, interpret=True)


def test_head_aware_mask_lowers_for_tpu():
    """The compiled kernels with SMEM tables and scalar loops lower to Mosaic (no TPU needed)."""
    q, k, v, _, fn, tables = case(0, T=200, S=300, D=64)
    kinds = np.ones((2, 2, 3), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)

    def loss(q, k, v):
        out = block_sparse_attention_tpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=fn,
            mask_tables=tables, scale=0.1, block_q=128, block_k=128, interpret=False)
        return out.sum()

    args = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


def test_head_aware_mask_lowers_for_gpu():
    """The Triton kernels with table inputs and scalar loops lower for an (abstract) H100."""
    q, k, v, _, fn, tables = case(0, T=200, S=300, D=64)
    kinds = np.ones((2, 4, 5), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)

    def loss(q, k, v):
        out = block_sparse_attention_gpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=fn,
            mask_tables=tables, scale=0.1, block_q=64, block_k=64)
        return out.sum()

    args = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device)):
        text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3  # fwd, dQ, dK/dV


@pytest.mark.parametrize("kernel", [block_sparse_attention_tpu, block_sparse_attention_gpu])
@pytest.mark.parametrize("tables, match", [
    ((jnp.zeros((2, 3), jnp.int32),), r"mask_tables\[0\] has shape \(2, 3\)"),
    ((jnp.zeros(3, jnp.float32),), "mask_tables.*float32"),
    ([], "non-empty tuple"),
])
def test_bad_mask_tables_raise(kernel, tables, match):
    q, k, v, _, fn, _ = case(0)
    kinds = np.ones((1, 3, 2), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    with pytest.raises(ValueError, match=match):
        kernel(q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=fn,
               mask_tables=tables, scale=0.1, block_q=16, block_k=32, interpret=True)


def test_mask_tables_without_mask_fn_raise():
    q, k, v, _, _, tables = case(0)
    kinds = np.ones((1, 3, 4), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    with pytest.raises(ValueError, match="without a mask_fn"):
        block_sparse_attention_tpu(q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts,
                                   mask_tables=tables, scale=0.1, block_q=16, block_k=16,
                                   interpret=True)
