"""The GPU (Pallas Triton) block-sparse kernel, interpreted on CPU, against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
from helpers import INTERPRET, block_kinds, merged_two_pass, random_qkv
from lcm.kernels.block_sparse.layout import FULL, PARTIAL, SKIP, layout_from_kinds
from lcm.kernels.block_sparse.reference import attention_reference, dense_mask

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2}


def make_mask_fn(name, T, S, window=17):
    """mask_fn by name; queries sit at the end of the keys (offset S - T), as in decoding."""
    off = S - T
    if name == "none":
        return None
    if name == "causal":
        return lambda qi, ki, qs, ks: qi + off >= ki
    if name == "local":
        return lambda qi, ki, qs, ks: (qi + off >= ki) & (qi + off - ki < window)
    if name == "causal&document":
        return lambda qi, ki, qs, ks: (qi + off >= ki) & (qs == ks)
    raise ValueError(name)


def document_ids(key, B, T, S):
    kv = jnp.sort(jax.random.randint(key, (B, S), 0, 4), axis=1).astype(jnp.int32)
    return kv[:, S - T:], kv


def per_kv_head(kinds, K):
    """Lh = K layout: odd heads treat FULL blocks as PARTIAL (same truth, other code path)."""
    heads = [jnp.where(kinds[0] == FULL, PARTIAL, kinds[0]) if h % 2 else kinds[0]
             for h in range(K)]
    return jnp.stack(heads)


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    atol = tol * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, atol=atol, rtol=tol, err_msg=what)


def check_against_reference(q, k, v, kinds, *, mask_fn, segs, scale, softcap, block_q, block_k,
                            seed=0, alibi_slopes=None):
    q_seg, kv_seg = segs if segs is not None else (None, None)
    kv_blocks, counts = layout_from_kinds(kinds)

    @jax.jit
    def kernel(q, k, v):
        return block_sparse_attention_gpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=mask_fn,
            q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale, softcap=softcap,
            block_q=block_q, block_k=block_k, interpret=INTERPRET, alibi_slopes=alibi_slopes)

    def reference(q, k, v):
        return attention_reference(q, k, v, mask_fn=mask_fn, q_segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, scale=scale, softcap=softcap,
                                   alibi_slopes=alibi_slopes)

    tol = TOL[q.dtype.type]
    got, vjp_got = jax.vjp(kernel, q, k, v)
    want, vjp_want = jax.vjp(reference, q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got, want, tol, "out")
    ct = jax.random.normal(jax.random.key(seed), got.shape, jnp.float32).astype(q.dtype)
    for name, g, w in zip(("dq", "dk", "dv"), vjp_got(ct), vjp_want(ct)):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, 2 * tol, name)
    return got


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    T = 2 * draw(st.integers(0, 60)) + 1
    S = draw(st.integers(T, 160))
    return {
        "B": B, "T": T, "S": S, "K": draw(st.sampled_from([1, 2])),
        "G": draw(st.sampled_from([1, 2, 3])), "D": draw(st.sampled_from([16, 32, 64])),
        "block_q": draw(st.sampled_from([16, 32, 64])),
        "block_k": draw(st.sampled_from([16, 32, 64])),
        "mask": draw(st.sampled_from(["causal", "local", "causal&document", "none"])),
        "dtype": draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        "softcap": draw(st.sampled_from([None, 3.0])),
        "per_head": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=6)
@given(cases())
def test_matches_reference(case):
    B, T, S, K, G, D = (case[n] for n in ("B", "T", "S", "K", "G", "D"))
    bq, bk = case["block_q"], case["block_k"]
    key_qkv, key_seg = jax.random.split(jax.random.key(case["seed"]))
    q, k, v = random_qkv(key_qkv, B, T, S, K * G, K, D, case["dtype"])
    mask_fn = make_mask_fn(case["mask"], T, S)
    segs = document_ids(key_seg, B, T, S) if case["mask"] == "causal&document" else None
    kinds = block_kinds(dense_mask(mask_fn, T, S, *(segs or (None, None))), bq, bk)
    if case["per_head"]:
        kinds = per_kv_head(kinds, K)
    check_against_reference(q, k, v, kinds, mask_fn=mask_fn, segs=segs, scale=D ** -0.5 * 1.3,
                            softcap=case["softcap"], block_q=bq, block_k=bk, seed=case["seed"])


@pytest.mark.parametrize("mask,G,dtype,per_head", [("causal&document", 3, jnp.float32, True),
                                                  ("local", 2, jnp.bfloat16, False),
                                                  ("none", 1, jnp.float32, False)])
def test_alibi_matches_reference(mask, G, dtype, per_head):
    """ALiBi with GQA (the dK/dV kernel's head loop reads each head's slope), T < S."""
    B, T, S, K, D, bq, bk = 2, 37, 70, 2, 32, 16, 16
    q, k, v = random_qkv(jax.random.key(5), B, T, S, K * G, K, D, dtype)
    mask_fn = make_mask_fn(mask, T, S)
    segs = document_ids(jax.random.key(6), B, T, S) if "document" in mask else None
    kinds = block_kinds(dense_mask(mask_fn, T, S, *(segs or (None, None))), bq, bk)
    if per_head:
        kinds = per_kv_head(kinds, K)
    slopes = np.linspace(0.05, 0.8, K * G).astype(np.float32)
    check_against_reference(q, k, v, kinds, mask_fn=mask_fn, segs=segs, scale=D ** -0.5,
                            softcap=None, block_q=bq, block_k=bk, alibi_slopes=slopes)


def test_fully_masked_rows_are_zero_with_finite_grads():
    B, T, S, K, G, D, bq, bk = 2, 37, 45, 1, 2, 24, 16, 16  # D=24 pads to 32 inside
    q, k, v = random_qkv(jax.random.key(1), B, T, S, K * G, K, D, jnp.float32)
    q_seg, kv_seg = document_ids(jax.random.key(2), B, T, S)
    q_seg = q_seg.at[:, :5].set(99)  # a document with no keys: rows 0..4 see nothing
    mask_fn = make_mask_fn("causal&document", T, S)
    kinds = block_kinds(dense_mask(mask_fn, T, S, q_seg, kv_seg), bq, bk)
    out = check_against_reference(q, k, v, kinds, mask_fn=mask_fn, segs=(q_seg, kv_seg),
                                  scale=0.3, softcap=None, block_q=bq, block_k=bk)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), 0.0)


def test_empty_layout_rows_and_short_sequences():
    # T=1 < block; a layout row with no visits at all (counts 0) gives zeros, grads zero.
    q, k, v = random_qkv(jax.random.key(3), 1, 1, 3, 2, 1, 16, jnp.float32)
    kinds = jnp.zeros((1, 1, 1), jnp.int32)
    kv_blocks, counts = layout_from_kinds(kinds)

    def f(q, k, v):
        return block_sparse_attention_gpu(q, k, v, kinds=kinds, kv_blocks=kv_blocks,
                                          counts=counts, scale=0.25, block_q=16, block_k=16,
                                          interpret=INTERPRET)

    out, vjp = jax.vjp(f, q, k, v)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    for g in vjp(jnp.ones_like(out)):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_runtime_per_head_layouts_do_not_recompile():
    """Layouts drawn inside jit (SKIP/FULL per KV head, mask_fn=None) drive one compiled kernel."""
    B, T, S, K, G, D, bq, bk = 1, 40, 56, 2, 2, 16, 16, 16
    nq, nk = -(-T // bq), -(-S // bk)
    q, k, v = random_qkv(jax.random.key(4), B, T, S, K * G, K, D, jnp.float32)
    traces = []

    @jax.jit
    def run(q, k, v, key):
        traces.append(1)
        kinds = jnp.where(jax.random.bernoulli(key, 0.6, (K, nq, nk)), FULL, SKIP)
        kv_blocks, counts = layout_from_kinds(kinds.astype(jnp.int32))

        def f(q, k, v):
            return block_sparse_attention_gpu(q, k, v, kinds=kinds, kv_blocks=kv_blocks,
                                              counts=counts, scale=0.25, block_q=bq,
                                              block_k=bk, interpret=INTERPRET)

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out), kinds

    def reference(q, k, v, kinds):
        """Each KV head's group of query heads under its own block mask."""
        outs = []
        for h in range(K):
            blocks = jnp.asarray(kinds[h]) == FULL
            fn = lambda qi, ki, qs, ks, blocks=blocks: blocks[qi // bq, ki // bk]
            outs.append(attention_reference(q[:, :, h * G:(h + 1) * G], k[:, :, h:h + 1],
                                            v[:, :, h:h + 1], mask_fn=fn, scale=0.25))
        return jnp.concatenate(outs, axis=2)

    seen = []
    for seed in (0, 1):
        out, grads, kinds = run(q, k, v, jax.random.key(seed))
        want, vjp = jax.vjp(lambda q, k, v, kinds=kinds: reference(q, k, v, kinds), q, k, v)
        assert_close(out, want, TOL[jnp.float32], "out")
        for name, g, w in zip(("dq", "dk", "dv"), grads, vjp(want)):
            assert_close(g, w, 2 * TOL[jnp.float32], name)
        seen.append(np.asarray(kinds))
    assert not np.array_equal(seen[0], seen[1]), "the two draws should differ"
    assert not np.array_equal(seen[0][0], seen[0][1]), "KV heads should have their own layouts"
    assert len(traces) == 1, f"traced {len(traces)} times; layouts must be runtime values"


@pytest.mark.parametrize("block_q,block_k,bad", [(8, 16, "block_q=8"), (48, 16, "block_q=48"),
                                                 (16, 24, "block_k=24"), (16, 0, "block_k=0")])
def test_bad_block_sizes_raise(block_q, block_k, bad):
    q, k, v = random_qkv(jax.random.key(0), 1, 32, 32, 1, 1, 16, jnp.float32)
    kinds = jnp.ones((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match=bad):
        block_sparse_attention_gpu(q, k, v, kinds=kinds, kv_blocks=jnp.zeros((1, 2, 2), jnp.int32),
                                   counts=jnp.zeros((1, 2), jnp.int32), scale=1.0,
                                   block_q=block_q, block_k=block_k, interpret=INTERPRET)


def test_bad_layout_shapes_raise():
    q, k, v = random_qkv(jax.random.key(0), 1, 40, 40, 4, 2, 16, jnp.float32)
    good = {"kinds": jnp.ones((2, 3, 3), jnp.int32),
            "kv_blocks": jnp.zeros((2, 3, 3), jnp.int32), "counts": jnp.zeros((2, 3), jnp.int32)}
    bad = [("kinds", jnp.ones((3, 3, 3), jnp.int32)), ("kinds", jnp.ones((1, 2, 3), jnp.int32)),
           ("kv_blocks", jnp.zeros((2, 3, 0), jnp.int32)), ("counts", jnp.zeros((2, 4), jnp.int32))]
    for name, value in bad:
        with pytest.raises(ValueError, match=rf"{name}\.shape"):
            block_sparse_attention_gpu(q, k, v, **{**good, name: value}, scale=1.0,
                                       block_q=16, block_k=16, interpret=INTERPRET)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention_gpu(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2),
                                   **good, scale=1.0, block_q=16, block_k=16, interpret=INTERPRET)


def test_numpy_scalars_are_accepted_as_python_numbers():
    q, k, v = random_qkv(jax.random.key(1), 1, 40, 40, 4, 2, 16, jnp.float32)
    kinds = np.ones((1, 3, 3), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    common = dict(kinds=kinds, kv_blocks=kv_blocks, counts=counts, interpret=INTERPRET)
    want = block_sparse_attention_gpu(q, k, v, **common, scale=0.25, softcap=5.0, block_q=16,
                                      block_k=16, num_warps=4)
    got = block_sparse_attention_gpu(q, k, v, **common, scale=np.float32(0.25),
                                     softcap=np.float64(5.0), block_q=np.int64(16),
                                     block_k=np.int32(16), num_warps=np.int64(4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_q=24"):
        block_sparse_attention_gpu(q, k, v, **common, scale=1.0, block_q=np.int64(24),
                                   block_k=16)


def test_forward_lse_and_backward_merge_two_passes():
    """The exposed forward (out, lse) and backward (given a merged out and lse) of two disjoint
    passes, near (distance < 11) and far, merged by logsumexp, equal one causal pass."""
    from lcm.kernels.block_sparse.gpu import (block_sparse_attention_gpu_bwd,
                                              block_sparse_attention_gpu_fwd)
    B, T, S, K, G, D, bq, bk, w = 2, 37, 45, 2, 2, 32, 16, 16, 11
    off = S - T
    near = lambda qi, ki, qs, ks: (ki <= qi + off) & (ki > qi + off - w)  # noqa: E731
    far = lambda qi, ki, qs, ks: ki <= qi + off - w  # noqa: E731
    q, k, v = random_qkv(jax.random.key(7), B, T, S, K * G, K, D, jnp.float32)
    d_out = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)
    slopes = np.linspace(0.05, 0.8, K * G).astype(np.float32)

    got = merged_two_pass(block_sparse_attention_gpu_fwd, block_sparse_attention_gpu_bwd,
                          q, k, v, d_out, near, far,
                          block_q=bq, block_k=bk, alibi_slopes=slopes)
    causal = make_mask_fn("causal", T, S)
    want, vjp = jax.vjp(lambda q, k, v: attention_reference(
        q, k, v, mask_fn=causal, scale=0.2, alibi_slopes=slopes), q, k, v)
    for name, g, w_ in zip(("out", "dq", "dk", "dv"), got, (want, *vjp(d_out))):
        assert_close(g, w_, TOL[jnp.float32], name)
