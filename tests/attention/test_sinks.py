"""Attention sinks (attend's `sinks`): the definition, the gradient d sinks, the limits of very
negative and very large sinks, sinks=None unchanged, and the argument checks. The random sweeps
of test_attention.py, test_pallas.py and test_ring.py compare every backend with the reference
with and without sinks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

from lcm.attention import Causal, Document, Local, attend

B, T, S, H, K, D = 2, 21, 37, 4, 2, 16
SINGLE_DEVICE = ("reference", "xla", "pallas")


def f32(x):
    return np.asarray(x, np.float32)


def inputs(seed=0, dtype=jnp.float32):
    q, k, v = random_qkv(jax.random.key(seed), B, T, S, H, K, D, dtype)
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    doc = Document(jnp.asarray(seg[:, S - T:]), jnp.asarray(seg))
    sinks = jnp.asarray(rng.standard_normal(H) * 2, jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    return q, k, v, doc, sinks, d_out


def numpy_sink_attention(q, k, v, vis, sinks, scale, softcap):
    """The definition in float64: per row, softmax over the visible keys' (capped) logits and
    one more logit sinks[h] with a zero value vector. Returns (out [B, T, H, D], p_sink
    [B, H, T]: the sink's softmax weight)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kh, vh = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kh) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    sink = np.asarray(sinks, np.float64)[None, :, None, None]
    m = np.maximum(np.where(vis, s, -np.inf).max(-1, keepdims=True), sink)
    e = np.where(vis, np.exp(s - m), 0.0)
    denom = e.sum(-1, keepdims=True) + np.exp(sink - m)
    return np.einsum("bhts,bshd->bthd", e / denom, vh), (np.exp(sink - m) / denom)[..., 0]


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_reference_matches_definition_and_sink_gradient(softcap):
    """The reference against the NumPy definition (GQA, T < S, causal documents, rows that see
    nothing), and its autodiff d sinks against the derived -sum over rows of p_sink *
    rowsum(dO * O)."""
    q, k, v, doc, sinks, d_out = inputs(1)
    seg_q = doc.q_segment_ids.at[:, :5].set(99)  # no key is in segment 99
    mask = Causal() & Document(seg_q, doc.kv_segment_ids)
    vis = np.asarray(mask.prepare(T, S).visible(jnp.arange(T), jnp.arange(S), S - T))
    assert not vis.any(-1).all()  # some rows see no key: they must give zeros
    want, p_sink = numpy_sink_attention(q, k, v, vis, sinks, D ** -0.5, softcap)

    def fn(q, k, v, sinks):
        return attend(q, k, v, mask, impl="reference", softcap=softcap, sinks=sinks)

    out, vjp = jax.vjp(fn, q, k, v, sinks)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6)
    assert np.all(f32(out)[~np.broadcast_to(vis.any(-1), (B, H, T)).transpose(0, 2, 1)] == 0)
    delta = np.einsum("bthd,bthd->bht", np.asarray(d_out, np.float64), want)
    np.testing.assert_allclose(vjp(d_out)[3], -(p_sink * delta).sum((0, 2)), atol=1e-5,
                               rtol=1e-5)


def run_all(q, k, v, mask, sinks, d_out, impl, **kw):
    """(out, (dq, dk, dv[, d sinks])) of attend under jit."""
    def fn(q, k, v, *sinks_arg):
        out = attend(q, k, v, mask, impl=impl, block_q=16, block_k=16,
                     sinks=sinks_arg[0] if sinks_arg else None, **kw)
        return out, jnp.sum(out.astype(jnp.float32) * d_out)

    args = (q, k, v) if sinks is None else (q, k, v, sinks)
    grad = jax.grad(lambda *a: fn(*a)[1], argnums=tuple(range(len(args))))
    return jax.jit(lambda *a: (fn(*a)[0], grad(*a)))(*args)


@pytest.mark.parametrize("impl", SINGLE_DEVICE)
def test_neutral_sinks_change_nothing(impl):
    """sinks=None runs the plain path; a sink of -inf is no sink (bit for bit: values and
    dq, dk, dv; d sinks = 0); a very negative finite sink equals no sink."""
    q, k, v, doc, _, d_out = inputs(2)
    mask = Local(9) | doc
    plain, plain_grads = run_all(q, k, v, mask, None, d_out, impl)
    for value, exact in ((-jnp.inf, True), (-1e4, False)):
        out, grads = run_all(q, k, v, mask, jnp.full((H,), value), d_out, impl)
        check = np.testing.assert_array_equal if exact else (
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6))
        check(f32(out), f32(plain))
        for g, w in zip(grads[:3], plain_grads):
            check(f32(g), f32(w))
        np.testing.assert_allclose(grads[3], 0.0, atol=1e-6)


@pytest.mark.parametrize("impl", SINGLE_DEVICE)
def test_large_sink_drives_the_output_to_zero(impl):
    q, k, v, doc, _, d_out = inputs(3)
    out, grads = run_all(q, k, v, Causal() & doc, jnp.full((H,), 1e4), d_out, impl,
                         softcap=5.0)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)
    for g in grads:
        assert np.isfinite(f32(g)).all()
        np.testing.assert_allclose(g, 0.0, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sinks_per_head_layouts_and_bfloat16(impl):
    """Per-head sinks under a per-KV-head layout (the xla map over KV heads, the kernels'
    per-head layout), in bfloat16 with bfloat16 sinks: the gradient keeps the sinks' dtype."""
    from lcm.attention import BlockMask

    q, k, v, _, sinks, d_out = inputs(4, jnp.bfloat16)
    grid = np.random.default_rng(4).random((H, 2, 3)) < 0.6
    mask = BlockMask(grid, 16) & Causal()
    sinks = sinks.astype(jnp.bfloat16)
    want, want_grads = run_all(q, k, v, mask, sinks, d_out, "reference")
    got, got_grads = run_all(q, k, v, mask, sinks, d_out, impl)
    assert got_grads[3].dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(got), f32(want), atol=3e-2, rtol=3e-2)
    for name, g, w in zip(["q", "k", "v", "sinks"], got_grads, want_grads):
        scale = max(1.0, float(np.abs(f32(w)).max()))
        np.testing.assert_allclose(f32(g), f32(w), atol=6e-2 * scale, rtol=3e-2,
                                   err_msg=f"d{name}")


def test_sinks_are_traced_parameters():
    """sinks may be a traced array (a parameter under jit / grad): one compilation serves any
    values."""
    q, k, v, _, sinks, _ = inputs(5)
    traces = []

    @jax.jit
    def fn(s):
        traces.append(s)
        return attend(q, k, v, Causal(), impl="xla", block_q=16, block_k=16, sinks=s)

    a, b = fn(sinks), fn(sinks + 1.0)
    assert len(traces) == 1 and isinstance(traces[0], jax.core.Tracer)
    assert np.abs(f32(a) - f32(b)).max() > 1e-3


@pytest.mark.parametrize("sinks,match", [
    (np.zeros(3, np.float32), r"sinks has shape \(3,\) .* \[num_heads\] = \[4\]"),
    (np.zeros((1, 4), np.float32), r"sinks has shape \(1, 4\)"),
    (np.zeros(4, np.int32), "dtype int32; expected a float array"),
    ([0.0, 1.0], r"sinks has shape \(2,\)"),
])
def test_bad_sinks_raise(sinks, match):
    q, k, v, *_ = inputs()
    for impl in ("reference", "xla", "pallas"):
        with pytest.raises(ValueError, match=match):
            attend(q, k, v, impl=impl, sinks=sinks)


def test_kernel_forward_lse_counts_the_sink():
    """The kernels' forward-only entry (for merged passes) returns an lse that includes the sink:
    logaddexp of the sink-free lse and the sink; the backward entries refuse sinks= (the sink
    reaches them through lse)."""
    from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu_bwd
    from lcm.kernels.block_sparse.tpu import (block_sparse_attention_tpu_bwd,
                                              block_sparse_attention_tpu_fwd)

    q, k, v, _, sinks, d_out = inputs(6)
    kw = dict(kinds=np.full((1, 2, 3), 2, np.int32), kv_blocks=np.tile(np.arange(3), (1, 2, 1)),
              counts=np.full((1, 2), 3), scale=0.25, block_q=16, block_k=16, interpret=True)
    _, plain = block_sparse_attention_tpu_fwd(q, k, v, **kw)
    out, with_sink = block_sparse_attention_tpu_fwd(q, k, v, sinks=sinks, **kw)
    np.testing.assert_allclose(with_sink, jnp.logaddexp(plain, sinks[None, None]), atol=1e-5,
                               rtol=1e-6)
    for bwd in (block_sparse_attention_tpu_bwd, block_sparse_attention_gpu_bwd):
        with pytest.raises(ValueError, match="sinks= is not an argument of the backward"):
            bwd(q, k, v, out, with_sink, d_out, sinks=sinks, **kw)


def test_kernels_with_sinks_lower_for_tpu_and_gpu():
    """The compiled (interpret=False) kernels with sinks, forward and backward with d sinks,
    lower to Mosaic for a TPU target and to Triton for an (abstract) H100: block shapes and
    in-kernel ops are checked without the hardware."""
    from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
    from lcm.kernels.block_sparse.layout import layout_from_kinds
    from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu

    T_, S_, H_, K_, D_ = 200, 300, 4, 2, 64
    q, k, v = random_qkv(jax.random.key(7), 1, T_, S_, H_, K_, D_, jnp.bfloat16)
    sinks = jnp.zeros((H_,), jnp.float32)

    layouts = {}
    for block in (64, 128):  # outside the abstract mesh below: eager NumPy-backed layouts
        kinds = np.ones((1, -(-T_ // block), -(-S_ // block)), np.int32)
        layouts[block] = (kinds, *(np.asarray(x) for x in layout_from_kinds(kinds)))

    def grads(kernel, block, **kw):
        kinds, kv_blocks, counts = layouts[block]

        def loss(q, k, v, sinks):
            out = kernel(q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, scale=0.1,
                         softcap=5.0, block_q=block, block_k=block, sinks=sinks, **kw)
            return out.astype(jnp.float32).sum()
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))).trace(q, k, v, sinks)

    text = grads(block_sparse_attention_tpu, 128, interpret=False).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device)):
        text = grads(block_sparse_attention_gpu, 64).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3
