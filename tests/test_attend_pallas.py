"""attend(impl="pallas") (the TPU kernel interpreted on CPU) against the reference and xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import random_qkv

from lcm.attention import (BlockMask, Causal, Chunked, Document, Local, PrefixLM, SinkWindow,
                           VerticalSlash, attend)

B, T, S, H, K, D = 2, 45, 61, 4, 2, 32


def inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, S, K, D))
    v = jax.random.normal(ks[2], (B, S, K, D))
    seg = np.sort(np.random.default_rng(seed).integers(0, 3, (B, S)), axis=1).astype(np.int32)
    return q, k, v, Document(jnp.asarray(seg[:, S - T:]), jnp.asarray(seg))


MASKS = {
    "none": lambda doc: None,
    "causal": lambda doc: Causal(),
    "local": lambda doc: Local(9),
    "sinkwindow|document": lambda doc: SinkWindow(4, 16) | doc,
    "chunked": lambda doc: Chunked(16),
    "prefixlm&document": lambda doc: PrefixLM(20) & doc,
    "causal&document": lambda doc: Causal() & doc,
    "blockmask&causal": lambda doc: BlockMask(
        np.random.default_rng(1).random((3, 4)) < 0.5, 16) & Causal(),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_pallas_matches_reference_and_xla(name):
    q, k, v, doc = inputs()
    mask = MASKS[name](doc)
    cot = jnp.cos(jnp.arange(D, dtype=jnp.float32))[None, None, None]

    def run(impl):
        fn = lambda q, k, v: jnp.sum(  # noqa: E731
            attend(q, k, v, mask, impl=impl, block_q=16, block_k=16, softcap=20.0) * cot)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    want, want_grads = run("reference")
    for impl in ("pallas", "xla"):
        got, got_grads = run(impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=impl)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5, err_msg=impl)


@pytest.mark.parametrize("name", ["causal", "local", "sinkwindow|document", "none"])
def test_pallas_alibi_matches_reference(name):
    """ALiBi through the pallas kernels (GQA, T < S, soft cap): values and gradients."""
    q, k, v, doc = inputs(2)
    mask = MASKS[name](doc)
    slopes = np.linspace(0.05, 0.6, H).astype(np.float32)
    cot = jnp.sin(jnp.arange(D, dtype=jnp.float32))[None, None, None]

    def run(impl):
        fn = lambda q, k, v: jnp.sum(attend(  # noqa: E731
            q, k, v, mask, impl=impl, block_q=16, block_k=16, softcap=20.0,
            alibi_slopes=slopes) * cot)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    want, want_grads = run("reference")
    got, got_grads = run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5)


def test_pallas_bfloat16_forward():
    q, k, v, doc = inputs(1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = attend(q, k, v, Causal() & doc, impl="pallas", block_q=16, block_k=16)
    want = attend(q, k, v, Causal() & doc, impl="reference")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=3e-2)


def test_pallas_rejects_masks_it_cannot_evaluate():
    q, k, v, _ = inputs()
    vs = VerticalSlash(jnp.zeros((H, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="VerticalSlash"):
        attend(q, k, v, vs, impl="pallas", block_q=16, block_k=16)
    per_head = BlockMask(np.ones((H, 3, 4), bool), 16)
    with pytest.raises(ValueError, match="grouped query heads"):
        attend(q, k, v, per_head, impl="pallas", block_q=16, block_k=16)
    unaligned = BlockMask(np.ones((6, 8), bool), 8)
    with pytest.raises(ValueError, match="whole kernel blocks"):
        attend(q, k, v, unaligned, impl="pallas", block_q=16, block_k=16)


# ------------------------------------------------------------------ attend-level sweep

SWEEP_MASKS = ["none", "causal", "local", "sinkwindow", "chunked", "prefixlm", "document",
               "causal&document", "local|document", "sinkwindow|document", "prefixlm&document",
               "blockmask", "blockmask_runtime&causal", "blockmask_per_head"]


def sweep_mask(kind, window, block, seg_q, seg_kv, num_heads, group, rng):
    """A mask the pallas backend evaluates: every index mask, Document under & and |, and
    BlockMask grids whose cells are whole kernel blocks (per head only without grouping)."""
    T, S = seg_q.shape[1], seg_kv.shape[1]
    doc = Document(seg_q, seg_kv)
    grid_shape = (-(-T // block), -(-S // block))
    heads = num_heads if group == 1 else 1
    grid = rng.random((heads, *grid_shape)) < 0.5
    return {"none": None, "causal": Causal(), "local": Local(window),
            "sinkwindow": SinkWindow(window % 5, window), "chunked": Chunked(window),
            "prefixlm": PrefixLM(window), "document": doc, "causal&document": Causal() & doc,
            "local|document": Local(window) | doc,
            "sinkwindow|document": SinkWindow(2, window) | doc,
            "prefixlm&document": PrefixLM(window) & doc,
            "blockmask": BlockMask(grid[0], block),
            "blockmask_runtime&causal": BlockMask(jnp.asarray(grid[0]), block) & Causal(),
            "blockmask_per_head": BlockMask(grid, block)}[kind]


@st.composite
def sweep_cases(draw):
    T = draw(st.integers(1, 70))
    return dict(B=draw(st.integers(1, 2)), T=T, S=draw(st.integers(T, 90)),
                K=draw(st.sampled_from([1, 2])), G=draw(st.sampled_from([1, 2, 3])),
                D=draw(st.sampled_from([16, 32])), mask=draw(st.sampled_from(SWEEP_MASKS)),
                window=draw(st.integers(1, 40)), block_q=draw(st.sampled_from([8, 16, 32])),
                block_k=draw(st.sampled_from([8, 16, 32])),
                dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
                softcap=draw(st.sampled_from([None, 3.0])), alibi=draw(st.booleans()),
                segments=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**16)))


@pytest.mark.slow
@settings(max_examples=12)
@given(sweep_cases())
def test_pallas_sweep_matches_reference(case):
    """attend(impl="pallas") over drawn shapes (odd lengths, T < S), GQA ratios, every mask kind
    the kernels evaluate, soft caps, ALiBi and dtypes: values and gradients vs the reference."""
    B, T, S, K, G, D = (case[n] for n in ("B", "T", "S", "K", "G", "D"))
    H, bq, bk, dtype = K * G, case["block_q"], case["block_k"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    q, k, v = random_qkv(jax.random.key(case["seed"]), B, T, S, H, K, D, dtype)
    seg_kv = np.sort(rng.integers(0, case["segments"], (B, S)), axis=1).astype(np.int32)
    mask = sweep_mask(case["mask"], case["window"], max(bq, bk), jnp.asarray(seg_kv[:, S - T:]),
                      jnp.asarray(seg_kv), H, G, rng)
    slopes = np.linspace(0.05, 0.5, H).astype(np.float32) if case["alibi"] else None
    cot = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)

    def run(impl):
        def fn(q, k, v):
            out = attend(q, k, v, mask, impl=impl, block_q=bq, block_k=bk,
                         softcap=case["softcap"], alibi_slopes=slopes)
            return jnp.sum(out.astype(jnp.float32) * cot), out
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, want), want_grads = run("reference")
    (_, got), got_grads = run("pallas")
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    assert got.dtype == dtype
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(got), f32(want), atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        scale = max(1.0, float(np.abs(f32(w)).max()))
        np.testing.assert_allclose(f32(g), f32(w), atol=2 * tol * scale, rtol=tol,
                                   err_msg=f"d{name}")
