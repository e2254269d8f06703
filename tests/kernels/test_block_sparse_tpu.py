"""The TPU block-sparse kernel (interpreted on CPU) vs the dense reference: values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from helpers import INTERPRET, block_kinds, merged_two_pass
from lcm.kernels.block_sparse.layout import FULL, PARTIAL, SKIP, layout_from_kinds
from lcm.kernels.block_sparse.reference import attention_reference, dense_mask
from lcm.kernels.block_sparse.tpu import make_specs, block_sparse_attention_tpu
from lcm.kernels.block_sparse.tpu_checks import TpuStatic

MASKS = ("none", "causal", "local", "document")


def _mask(name, B, T, S, window=17, doc_len=23):
    """(mask_fn, q_segment_ids, kv_segment_ids): queries sit at the end of the keys."""
    off = S - T
    if name == "none":
        return None, None, None
    if name == "causal":
        return (lambda q, k, qs, ks: k <= q + off), None, None
    if name == "local":
        return (lambda q, k, qs, ks: (k <= q + off) & (k > q + off - window)), None, None
    # Documents of varying length per example, causal inside each.
    starts = np.zeros((B, S), np.int32)
    for b in range(B):
        starts[b, (np.arange(0, S, doc_len + 5 * b) + 3 * b) % S] = 1
    kv_seg = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    return ((lambda q, k, qs, ks: (k <= q + off) & (qs == ks)), kv_seg[:, off:], kv_seg)


def _qkv(key, B, T, S, K, G, D, dtype):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, T, K * G, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
    d_out = jax.random.normal(kd, (B, T, K * G, D), jnp.float32).astype(dtype)
    return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(d_out))


def _assert_close(got, want, tol, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = np.abs(got - want).max() / (1.0 + np.abs(want).max())
    assert err <= tol, f"{name}: scaled max error {err:.3g} > {tol}"


def _slopes(H):
    """ALiBi slopes, steep enough that the bias moves the softmax at these lengths."""
    return np.linspace(0.05, 0.8, H).astype(np.float32)


def _check_against_reference(*, B, T, S, K, G, D, bq, bk, mask, dtype, softcap, per_head,
                             interpret=INTERPRET, seed=0, alibi=False):
    mask_fn, q_seg, kv_seg = _mask(mask, B, T, S)
    kinds = block_kinds(dense_mask(mask_fn, T, S, q_seg, kv_seg), bq, bk)
    if per_head:
        # One layout per KV head: head 0 exact, the others visit every block (still correct:
        # the mask hides the extra pairs), so rows differ in counts and order between heads.
        kinds = np.concatenate([kinds] + [np.full_like(kinds, PARTIAL)] * (K - 1))
    kv_blocks, counts = layout_from_kinds(kinds)
    scale = 0.7 / np.sqrt(D)
    q, k, v, d_out = _qkv(jax.random.key(seed), B, T, S, K, G, D, dtype)
    slopes = _slopes(K * G) if alibi else None

    def kernel(q, k, v):
        return block_sparse_attention_tpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=mask_fn,
            q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale, softcap=softcap,
            block_q=bq, block_k=bk, interpret=interpret, alibi_slopes=slopes)

    def reference(q, k, v):
        return attention_reference(q, k, v, mask_fn=mask_fn, q_segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, scale=scale, softcap=softcap,
                                   alibi_slopes=slopes)

    got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(q, k, v, d_out)
    want = jax.jit(lambda *a: _value_and_grads(reference, *a))(q, k, v, d_out)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, tol, name)


@settings(max_examples=8)
@given(B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3),
       D=st.sampled_from([32, 64, 128]), T=st.integers(1, 256), extra=st.integers(0, 80),
       bq=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32, 64]),
       mask=st.sampled_from(MASKS), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       softcap=st.sampled_from([None, 4.0]), per_head=st.booleans())
def test_matches_reference(B, K, G, D, T, extra, bq, bk, mask, dtype, softcap, per_head):
    _check_against_reference(B=B, T=T, S=T + extra, K=K, G=G, D=D, bq=bq, bk=bk, mask=mask,
                             dtype=dtype, softcap=softcap, per_head=per_head)


@pytest.mark.parametrize("mask, dtype, softcap, per_head", [
    ("none", jnp.float32, 5.0, False),  # FULL blocks holding padding keys
    ("local", jnp.bfloat16, None, True),
])
def test_odd_lengths(mask, dtype, softcap, per_head):
    _check_against_reference(B=2, T=45, S=77, K=2, G=2, D=32, bq=16, bk=16, mask=mask,
                             dtype=dtype, softcap=softcap, per_head=per_head)


@pytest.mark.parametrize("mask, dtype, per_head, alibi", [("document", jnp.float32, True, True),
                                                          ("causal", jnp.bfloat16, False, False)])
def test_tpu_interpret_semantics(mask, dtype, per_head, alibi):
    """Scalar prefetch, DMAs and revisited blocks under the TPU interpreter (slow: tiny)."""
    _check_against_reference(B=1, T=19, S=29, K=2, G=2, D=32, bq=8, bk=8, mask=mask,
                             dtype=dtype, softcap=3.0, per_head=per_head,
                             interpret=pltpu.InterpretParams(), alibi=alibi)


@pytest.mark.parametrize("mask, G, dtype, softcap, per_head", [
    ("causal", 3, jnp.float32, None, False),
    ("local", 2, jnp.float32, 4.0, True),     # FULL, PARTIAL and skipped blocks
    ("none", 1, jnp.bfloat16, None, False),   # T < S: the bias of end-aligned queries
])
def test_alibi_matches_reference(mask, G, dtype, softcap, per_head):
    _check_against_reference(B=2, T=37, S=70, K=2, G=G, D=32, bq=16, bk=16, mask=mask,
                             dtype=dtype, softcap=softcap, per_head=per_head, alibi=True)


def test_rows_that_see_nothing_are_zero():
    """Whole query blocks with no key (count 0) and single empty rows give 0 and finite grads."""
    B, T, S, K, G, D, bq, bk = 1, 40, 40, 1, 2, 32, 8, 8
    mask_fn = lambda q, k, qs, ks: k <= q - 13  # rows 0..12 see nothing
    kinds = block_kinds(dense_mask(mask_fn, T, S), bq, bk)
    kv_blocks, counts = layout_from_kinds(kinds)
    assert int(counts.min()) == 0
    q, k, v, d_out = _qkv(jax.random.key(1), B, T, S, K, G, D, jnp.float32)
    out, dq, dk, dv = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: block_sparse_attention_tpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=mask_fn,
            scale=0.2, block_q=bq, block_k=bk, interpret=INTERPRET), *a))(q, k, v, d_out)
    assert np.all(np.asarray(out[:, :13]) == 0)
    assert np.all(np.asarray(dq[:, :13]) == 0)
    for g in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    want = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask_fn=mask_fn, scale=0.2), *a))(
            q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        _assert_close(g, w, 2e-5, name)


def _restricted(kinds, bq, bk, T, S):
    """Dense [Lh, T, S] visibility of the visited blocks of kinds (mask_fn=None)."""
    vis = np.repeat(np.repeat(np.asarray(kinds) != SKIP, bq, axis=1), bk, axis=2)
    return vis[:, :T, :S]


def test_runtime_layouts_do_not_recompile_and_only_listed_blocks_count():
    """Layouts computed inside jit drive one compiled kernel, forward and backward; blocks a
    layout leaves out are not visited (per KV head), so values and grads are those of attention
    over the listed blocks only."""
    B, T, S, K, G, D, bq, bk = 1, 32, 48, 2, 2, 32, 8, 16
    nq, nk = T // bq, S // bk
    traces = []

    @jax.jit
    def run(q, k, v, d_out, visit):
        traces.append(1)
        kinds = jnp.where(visit, FULL, SKIP).astype(jnp.int32)
        kv_blocks, counts = layout_from_kinds(kinds)
        return _value_and_grads(lambda q, k, v: block_sparse_attention_tpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, scale=0.3, block_q=bq,
            block_k=bk, interpret=INTERPRET), q, k, v, d_out)

    @jax.jit
    def reference(q, k, v, d_out, vis):
        return _value_and_grads(lambda q, k, v: attention_reference(
            q, k, v, mask_fn=lambda qi, ki, qs, ks: vis[qi, ki], scale=0.3), q, k, v, d_out)

    q, k, v, d_out = _qkv(jax.random.key(2), B, T, S, K, G, D, jnp.float32)
    rng = np.random.default_rng(0)
    for _ in range(3):
        visit = rng.random((K, nq, nk)) < 0.5
        got = run(q, k, v, d_out, jnp.asarray(visit))
        vis = _restricted(visit, bq, bk, T, S)  # [K, T, S]
        for h in range(K):
            qh, kh = slice(h * G, (h + 1) * G), slice(h, h + 1)
            want = reference(q[:, :, qh], k[:, :, kh], v[:, :, kh], d_out[:, :, qh],
                             jnp.asarray(vis[h]))
            for name, g, w in zip(("out", "dq", "dk", "dv"),
                                  (got[0][:, :, qh], got[1][:, :, qh], got[2][:, :, kh],
                                   got[3][:, :, kh]), want):
                _assert_close(g, w, 2e-5, f"{name} head {h}")
    assert len(traces) == 1
    assert run._cache_size() == 1


def test_steps_past_the_count_repeat_the_block_index():
    """Index maps clamp visits past a row's count to its last block: no new DMA there."""
    stat = TpuStatic(None, 1.0, None, 8, 8, 16, 32, False, 2, True)
    specs = make_specs(stat, 1, 32, rows=2, width=4, q_major=True)
    blocks = np.array([0, 2, 3, 1, 3, 0, 0, 0], np.int32)  # rows 0 and 1, width 4
    visits = blocks * 4 + PARTIAL  # packed as block << 2 | kind
    counts = np.array([3, 1], np.int32)
    kv_block = [int(specs.kv.index_map(0, 0, row, t, visits, counts)[2])
                for row in range(2) for t in range(4)]
    assert kv_block == [0, 2, 3, 3, 3, 3, 3, 3]


def test_lowers_for_tpu():
    """The compiled (interpret=False) forward and backward lower to Mosaic for a TPU target;
    this checks block shapes and in-kernel ops without a TPU (compiling needs libtpu)."""
    B, T, S, K, G, D, bq, bk = 1, 200, 300, 2, 2, 64, 64, 128
    mask_fn, q_seg, kv_seg = _mask("document", B, T, S)
    kinds = block_kinds(dense_mask(mask_fn, T, S, q_seg, kv_seg), bq, bk)
    kv_blocks, counts = layout_from_kinds(kinds)
    q, k, v, _ = _qkv(jax.random.key(3), B, T, S, K, G, D, jnp.bfloat16)

    def loss(q, k, v):
        out = block_sparse_attention_tpu(
            q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=mask_fn,
            q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=0.1, softcap=5.0,
            block_q=bq, block_k=bk, interpret=False, alibi_slopes=_slopes(K * G))
        return out.astype(jnp.float32).sum()

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    text = fn.trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


def _call(dtype=jnp.float32, **overrides):
    B, T, S, K, G, D = 1, 20, 30, 2, 1, 32
    q, k, v, _ = _qkv(jax.random.key(0), B, T, S, K, G, D, dtype)
    kinds = np.ones((1, -(-T // 8), -(-S // 8)), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    kw = {"kinds": kinds, "kv_blocks": kv_blocks, "counts": counts, "scale": 0.1, "block_q": 8,
          "block_k": 8, "interpret": INTERPRET}
    kw.update(overrides)
    return block_sparse_attention_tpu(q, k, v, **kw)


@pytest.mark.parametrize("overrides, match", [
    ({"block_q": 12}, "block_q=12"),
    ({"block_q": 0}, "block_q=0"),
    ({"block_k": 20}, "block_k=20"),
    ({"block_k": 64, "interpret": False, "mask_fn": lambda q, k, qs, ks: qs == ks,
      "q_segment_ids": jnp.zeros((1, 20), jnp.int32),
      "kv_segment_ids": jnp.zeros((1, 30), jnp.int32)}, "block_k=64.*128"),
    ({"kinds": np.ones((1, 2, 4), np.int32)}, "kinds"),
    ({"kinds": np.ones((3, 3, 4), np.int32)}, "kinds"),
    ({"kv_blocks": np.zeros((1, 2, 4), np.int32)}, "kv_blocks"),
    ({"counts": np.zeros((1, 4), np.int32)}, "counts"),
    ({"q_segment_ids": jnp.zeros((1, 20), jnp.int32)}, "segment_ids"),
    ({"scale": 0.0}, "scale"),
    ({"softcap": -1.0}, "softcap"),
    ({"max_q_visits": 9}, "max_q_visits"),
    ({"kv_blocks": np.zeros((1, 3, 4), np.float32)}, "kv_blocks.dtype"),
    ({"dtype": jnp.float16}, "float16"),
    ({"alibi_slopes": np.ones(3, np.float32)}, "alibi_slopes has shape"),
    ({"alibi_slopes": [0.5, float("nan")]}, "finite"),
])
def test_bad_arguments_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_numpy_scalars_are_accepted_as_python_numbers():
    """np.int64 block sizes / max_q_visits and np.float32 scale / softcap (as a config read from
    NumPy gives them) run and equal the Python-number call."""
    want = _call(softcap=5.0, max_q_visits=3)
    got = _call(block_q=np.int64(8), block_k=np.int32(8), scale=np.float32(0.1),
                softcap=np.float64(5.0), max_q_visits=np.int64(3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_q=12"):
        _call(block_q=np.int64(12))


def test_traced_alibi_slopes_raise():
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda s: _call(alibi_slopes=s))(jnp.ones(2, jnp.float32))


def test_forward_lse_and_backward_merge_two_passes():
    """The exposed forward (out, lse) and backward (given a merged out and lse) of two disjoint
    passes, near (distance < 11) and far, merged by logsumexp, equal one causal pass."""
    from lcm.kernels.block_sparse.tpu import (block_sparse_attention_tpu_bwd,
                                              block_sparse_attention_tpu_fwd)
    B, T, S, K, G, D, bq, bk, w = 2, 37, 45, 2, 2, 32, 8, 16, 11
    off = S - T
    near = lambda q, k, qs, ks: (k <= q + off) & (k > q + off - w)  # noqa: E731
    far = lambda q, k, qs, ks: k <= q + off - w  # noqa: E731
    causal = lambda q, k, qs, ks: k <= q + off  # noqa: E731
    q, k, v, d_out = _qkv(jax.random.key(4), B, T, S, K, G, D, jnp.float32)
    slopes = _slopes(K * G)

    got = merged_two_pass(block_sparse_attention_tpu_fwd, block_sparse_attention_tpu_bwd,
                          q, k, v, d_out, near, far,
                          block_q=bq, block_k=bk, alibi_slopes=slopes)
    want = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask_fn=causal, scale=0.2,
                                            alibi_slopes=slopes), *a))(q, k, v, d_out)
    for name, g, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(g, w_, 2e-5, name)
