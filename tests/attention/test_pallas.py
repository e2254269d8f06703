"""attend(impl="pallas") (the TPU kernel interpreted on CPU) against the reference and xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import random_qkv

from lcm.attention import (BlockMask, Causal, Chunked, Document, Local, MaskFn, PrefixLM,
                           SinkWindow, VerticalSlash, attend)

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


@pytest.mark.parametrize("name,alibi", [("causal", False), ("sinkwindow|document", True),
                                        ("blockmask&causal", False), ("none", True)])
def test_pallas_sinks_match_reference(name, alibi):
    """Sink logits through the pallas kernels (GQA, T < S, soft cap, ALiBi): values and
    gradients, d sinks included."""
    q, k, v, doc = inputs(5)
    mask = MASKS[name](doc)
    slopes = np.linspace(0.05, 0.6, H).astype(np.float32) if alibi else None
    sinks = jnp.asarray(np.random.default_rng(5).standard_normal(H) * 3, jnp.float32)
    cot = jnp.sin(jnp.arange(D, dtype=jnp.float32))[None, None, None]

    def run(impl):
        fn = lambda q, k, v, s: jnp.sum(attend(  # noqa: E731
            q, k, v, mask, impl=impl, block_q=16, block_k=16, softcap=20.0,
            alibi_slopes=slopes, sinks=s) * cot)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(q, k, v, sinks)

    want, want_grads = run("reference")
    got, got_grads = run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g, w in zip(["q", "k", "v", "sinks"], got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5, err_msg=f"d{name}")


def test_pallas_bfloat16_forward():
    q, k, v, doc = inputs(1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = attend(q, k, v, Causal() & doc, impl="pallas", block_q=16, block_k=16)
    want = attend(q, k, v, Causal() & doc, impl="reference")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=3e-2)


def vertical_slash(rng, heads, S, nv=3, ns=4):
    return VerticalSlash(jnp.asarray(rng.integers(0, S, (heads, nv)), jnp.int32),
                         jnp.asarray(rng.integers(0, S, (heads, ns)), jnp.int32))


HEAD_AWARE = {
    # per-head VerticalSlash under GQA, OR'd with a per-head BlockMask of 8-token cells
    # (not whole 16-token kernel blocks): both go through the kernels' head-aware tables
    "verticalslash|blockmask_per_head": lambda rng, doc: vertical_slash(rng, H, S) | BlockMask(
        rng.random((H, 6, 8)) < 0.2, 8),
    # a runtime (jnp) grid under |, and Document, under & Causal
    "(blockmask_runtime|document)&causal": lambda rng, doc: (BlockMask(
        jnp.asarray(rng.random((4, 6)) < 0.3), 12) | doc) & Causal(),
}


@pytest.mark.parametrize("name", list(HEAD_AWARE))
def test_pallas_head_aware_masks_match_reference(name):
    """Masks evaluated in-kernel from per-head tables: values and gradients vs reference."""
    q, k, v, doc = inputs()
    mask = HEAD_AWARE[name](np.random.default_rng(3), doc)
    cot = jnp.cos(jnp.arange(D, dtype=jnp.float32))[None, None, None]

    def run(impl):
        fn = lambda q, k, v: jnp.sum(  # noqa: E731
            attend(q, k, v, mask, impl=impl, block_q=16, block_k=16) * cot)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    want, want_grads = run("reference")
    causal = jnp.sum(attend(q, k, v, Causal(), impl="reference") * cot)
    assert abs(float(want) - float(causal)) > 1e-3  # the mask is not plain causal
    got, got_grads = run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_gpu_kernel_evaluates_vertical_slash(with_sinks):
    """The GPU kernel (interpreted) from the same lowering: VerticalSlash with one shared slash
    list and per-head columns, GQA, T < S; values and gradients vs the reference, with and
    without sink logits (then d sinks too)."""
    from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
    from lcm.attention.kernel_masks import kernel_mask
    from lcm.attention.layout import mask_layout

    q, k, v, _ = inputs(1)
    rng = np.random.default_rng(4)
    mask = VerticalSlash(jnp.asarray(rng.integers(0, S, (H, 3)), jnp.int32),
                         jnp.asarray(rng.integers(0, 20, (1, 3)), jnp.int32))
    fn, _, _, tables = kernel_mask(mask, offset=S - T, block_q=16, block_k=16, grouped=True)
    layout = mask_layout(mask, T, S, 16, 16, num_heads=H, num_kv_heads=K)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(H) * 3, jnp.float32)
    args = (q, k, v, sinks) if with_sinks else (q, k, v)

    def gpu(q, k, v, *sinks):
        return block_sparse_attention_gpu(
            q, k, v, kinds=layout.kinds, kv_blocks=layout.kv_blocks, counts=layout.counts,
            mask_fn=fn, mask_tables=tables, scale=D ** -0.5, block_q=16, block_k=16,
            interpret=True, sinks=sinks[0] if sinks else None)

    want_out, want_vjp = jax.vjp(lambda q, k, v, *sinks: attend(
        q, k, v, mask, impl="reference", sinks=sinks[0] if sinks else None), *args)
    got_out, got_vjp = jax.vjp(gpu, *args)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=2e-5)
    for g, w in zip(got_vjp(d_out), want_vjp(d_out)):
        np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5)


# ------------------------------------------------------------------ attend-level sweep

SWEEP_MASKS = ["none", "causal", "local", "sinkwindow", "chunked", "prefixlm", "document",
               "causal&document", "local|document", "sinkwindow|document", "prefixlm&document",
               "blockmask", "blockmask_runtime&causal", "blockmask_per_head", "verticalslash",
               "blockmask_cells|local", "verticalslash|document", "maskfn_head_window&causal",
               "maskfn_hash|document"]


def head_window(b, h, q, k):
    """A MaskFn predicate reading the head: query head h sees its last 3 * (h + 1) keys."""
    return q - k < 3 * (h + 1)


def hashed(b, h, q, k):
    return (q * 7 + k * 13) % 5 != 0


def sweep_mask(kind, window, block, seg_q, seg_kv, num_heads, group, rng):
    """Every mask kind: index masks, Document under & and |, BlockMask grids of whole kernel
    blocks (shared or per head, also under GQA) or of smaller cells under |, and per-head
    VerticalSlash (head-aware in-kernel tables)."""
    del group
    T, S = seg_q.shape[1], seg_kv.shape[1]
    doc = Document(seg_q, seg_kv)
    grid_shape = (-(-T // block), -(-S // block))
    grid = rng.random((num_heads, *grid_shape)) < 0.5
    cell = max(1, window // 3)
    cells = rng.random((num_heads, -(-T // cell), -(-S // cell))) < 0.3
    vs = VerticalSlash(jnp.asarray(rng.integers(0, S, (num_heads, 3)), jnp.int32),
                       jnp.asarray(rng.integers(0, window + 1, (1, 2)), jnp.int32))
    return {"none": None, "causal": Causal(), "local": Local(window),
            "sinkwindow": SinkWindow(window % 5, window), "chunked": Chunked(window),
            "prefixlm": PrefixLM(window), "document": doc, "causal&document": Causal() & doc,
            "local|document": Local(window) | doc,
            "sinkwindow|document": SinkWindow(2, window) | doc,
            "prefixlm&document": PrefixLM(window) & doc,
            "blockmask": BlockMask(grid[0], block),
            "blockmask_runtime&causal": BlockMask(jnp.asarray(grid[0]), block) & Causal(),
            "blockmask_per_head": BlockMask(grid, block), "verticalslash": vs,
            "blockmask_cells|local": BlockMask(cells, cell) | Local(window),
            "verticalslash|document": vs | doc,
            "maskfn_head_window&causal": MaskFn(head_window) & Causal(),
            "maskfn_hash|document": MaskFn(hashed) | doc}[kind]


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
                sinks=draw(st.sampled_from([None, 1.0, 4.0])),
                segments=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**16)))


@pytest.mark.slow
@settings(max_examples=10)
@given(sweep_cases())
def test_pallas_sweep_matches_reference(case):
    """attend(impl="pallas") over drawn shapes (odd lengths, T < S), GQA ratios, every mask kind
    the kernels evaluate, soft caps, ALiBi, sinks and dtypes: values and gradients (d sinks
    too) vs the reference."""
    B, T, S, K, G, D = (case[n] for n in ("B", "T", "S", "K", "G", "D"))
    H, bq, bk, dtype = K * G, case["block_q"], case["block_k"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    q, k, v = random_qkv(jax.random.key(case["seed"]), B, T, S, H, K, D, dtype)
    seg_kv = np.sort(rng.integers(0, case["segments"], (B, S)), axis=1).astype(np.int32)
    mask = sweep_mask(case["mask"], case["window"], max(bq, bk), jnp.asarray(seg_kv[:, S - T:]),
                      jnp.asarray(seg_kv), H, G, rng)
    slopes = np.linspace(0.05, 0.5, H).astype(np.float32) if case["alibi"] else None
    cot = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    args = (q, k, v)
    if case["sinks"] is not None:
        args += (jnp.asarray(rng.standard_normal(H) * case["sinks"], jnp.float32),)

    def run(impl):
        def fn(q, k, v, *sinks):
            out = attend(q, k, v, mask, impl=impl, block_q=bq, block_k=bk,
                         softcap=case["softcap"], alibi_slopes=slopes,
                         sinks=sinks[0] if sinks else None)
            return jnp.sum(out.astype(jnp.float32) * cot), out
        return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args))),
                                          has_aux=True))(*args)

    (_, want), want_grads = run("reference")
    (_, got), got_grads = run("pallas")
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    assert got.dtype == dtype
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(got), f32(want), atol=tol, rtol=tol)
    for name, g, w in zip(["q", "k", "v", "sinks"], got_grads, want_grads):
        scale = max(1.0, float(np.abs(f32(w)).max()))
        np.testing.assert_allclose(f32(g), f32(w), atol=2 * tol * scale, rtol=tol,
                                   err_msg=f"d{name}")
