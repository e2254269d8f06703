"""MaskFn (a predicate on batch, head, query and key indices) on every backend: values and
gradients against the dense reference of the same visibility, its block layout, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import block_kinds, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.attention import (FULL, PARTIAL, SKIP, BlockMask, Causal, Document, Local, MaskFn,
                           attend, mask_layout)
from lcm.sharding import make_mesh

# Written with operators only, so the same lambda evaluates on NumPy grids (the dense truth,
# without MaskFn's machinery) and on jnp inside every backend. q is the kv-aligned position.
PREDICATES = {
    "dilated": lambda b, h, q, k: (q - k) % 3 == 0,
    "head_window": lambda b, h, q, k: q - k < 4 * (h + 1),
    "batch_prefix": lambda b, h, q, k: k < 5 + 9 * b,
    "hash": lambda b, h, q, k: (q * 7 + k * 13) % 5 != 0,
    "head_parity_or_diagonal": lambda b, h, q, k: ((k + h) % 2 == 0) | (q == k),
    "batch_head": lambda b, h, q, k: (k < 7 + 6 * b) | ((q - k) % (h + 2) == 0),
}
READS_BATCH = {"batch_prefix", "batch_head"}
READS_HEAD = {"head_window", "head_parity_or_diagonal", "batch_head"}
COMBINATIONS = ["alone", "causal&", "document&", "causal&document&", "|local"]


def f32(x):
    return np.asarray(x, np.float32)


def segment_ids(rng, B, T, S, num_segments):
    kv = np.sort(rng.integers(0, num_segments, (B, S)), axis=1).astype(np.int32)
    return kv[:, S - T:], kv


def case_masks(name, combination, B, T, S, H, seg_q, seg_kv, window=5):
    """(the MaskFn mask, dense truth [B, H, T, S] bool) for a predicate under a combination."""
    fn = PREDICATES[name]
    b, h = np.arange(B)[:, None, None, None], np.arange(H)[None, :, None, None]
    q = (np.arange(T) + S - T)[None, None, :, None]
    k = np.arange(S)[None, None, None, :]
    vis = np.broadcast_to(fn(b, h, q, k), (B, H, T, S))
    mask = MaskFn(fn)
    if combination.startswith("causal&"):
        mask, vis = Causal() & mask, vis & (q >= k)
    if "document&" in combination:
        doc = Document(jnp.asarray(seg_q), jnp.asarray(seg_kv))
        mask, vis = doc & mask, vis & (seg_q[:, :, None] == seg_kv[:, None, :])[:, None]
    if combination == "|local":
        mask, vis = mask | Local(window), vis | ((q >= k) & (k > q - window))
    return mask, np.broadcast_to(vis, (B, H, T, S))


def dense_reference(q, k, v, vis, **kw):
    """attend(impl="reference") with the dense visibility: per example, a BlockMask of 1-token
    cells per head (BlockMask has no batch axis; examples are independent)."""
    return jnp.concatenate([
        attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], BlockMask(np.array(vis[i]), 1),
               impl="reference", **kw) for i in range(q.shape[0])])


def value_and_grads(fn, q, k, v, cot):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(got, want, tol):
    (out, grads), (want_out, want_grads) = got, want
    assert not np.isnan(f32(out)).any()
    np.testing.assert_allclose(f32(out), f32(want_out), atol=tol, rtol=tol)
    for name, g, w in zip("qkv", grads, want_grads):
        scale = max(1.0, float(np.abs(f32(w)).max()))
        np.testing.assert_allclose(f32(g), f32(w), atol=2 * tol * scale, rtol=tol,
                                   err_msg=f"d{name}")


@st.composite
def cases(draw, predicates):
    T = draw(st.integers(1, 50))
    return dict(B=draw(st.integers(1, 2)), T=T, S=draw(st.integers(T, 60)),
                K=draw(st.sampled_from([1, 2])), G=draw(st.sampled_from([1, 2, 3])),
                D=draw(st.sampled_from([8, 16])), name=draw(st.sampled_from(predicates)),
                combination=draw(st.sampled_from(COMBINATIONS)),
                block_q=draw(st.sampled_from([8, 16, 32])),
                block_k=draw(st.sampled_from([8, 16, 32])),
                dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
                softcap=draw(st.sampled_from([None, 3.0])),
                segments=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**16)))


def run_case(case, impl):
    B, T, S, K, G, D = (case[n] for n in ("B", "T", "S", "K", "G", "D"))
    H, dtype = K * G, case["dtype"]
    rng = np.random.default_rng(case["seed"])
    q, k, v = random_qkv(jax.random.key(case["seed"]), B, T, S, H, K, D, dtype)
    seg_q, seg_kv = segment_ids(rng, B, T, S, case["segments"])
    mask, vis = case_masks(case["name"], case["combination"], B, T, S, H, seg_q, seg_kv)
    cot = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    kw = dict(softcap=case["softcap"])
    want = value_and_grads(lambda q, k, v: dense_reference(q, k, v, vis, **kw), q, k, v, cot)
    got = value_and_grads(lambda q, k, v: attend(q, k, v, mask, impl=impl,
                                                 block_q=case["block_q"],
                                                 block_k=case["block_k"], **kw), q, k, v, cot)
    assert got[0].dtype == dtype
    assert_close(got, want, 2e-5 if dtype == jnp.float32 else 3e-2)


@settings(max_examples=6)
@given(cases(sorted(PREDICATES)))
def test_xla_sweep_matches_dense_reference(case):
    """attend(impl="xla") with MaskFn over drawn shapes (odd lengths, T < S), GQA ratios,
    blocks, dtypes, soft caps, and MaskFn alone, under & with Causal and Document and | Local."""
    run_case(case, "xla")


@pytest.mark.slow
@settings(max_examples=4)
@given(cases(sorted(set(PREDICATES) - READS_BATCH)))
def test_pallas_sweep_matches_dense_reference(case):
    """The same through the Pallas kernels (interpreted): fn runs in-kernel on PARTIAL blocks,
    per query head when it reads the head."""
    run_case(case, "pallas")


@pytest.mark.slow
@pytest.mark.parametrize("combination", ["alone", "causal&", "|local"])
def test_pallas_gives_fn_the_batch_index(combination):
    """A fn reading the batch index on the kernels (the index travels as segment ids), with
    the head index too: values and gradients equal the dense reference."""
    case = dict(B=2, T=19, S=27, K=2, G=2, D=32, dtype=jnp.float32, seed=3, segments=2,
                softcap=None, block_q=8, block_k=16, combination=combination,
                name="batch_head")
    run_case(case, "pallas")


@pytest.mark.parametrize("name,combination", [
    ("head_window", "causal&document&"), ("batch_prefix", "document&"), ("hash", "|local")])
def test_reference_impl_matches_dense(name, combination):
    """attend(impl="reference") evaluates MaskFn itself: the same as the dense visibility."""
    B, T, S, H, K = 2, 13, 21, 4, 2
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(jax.random.key(0), B, T, S, H, K, 8, jnp.float32)
    seg_q, seg_kv = segment_ids(rng, B, T, S, 3)
    mask, vis = case_masks(name, combination, B, T, S, H, seg_q, seg_kv)
    np.testing.assert_allclose(attend(q, k, v, mask, impl="reference"),
                               dense_reference(q, k, v, vis), atol=1e-6, rtol=1e-6)


def test_pallas_head_dependent_fn_matches_reference():
    """A head-dependent fn under GQA and T < S, with Document: the kernels call it per query
    head (values and gradients; the fast counterpart of the slow pallas sweep)."""
    case = dict(B=2, T=21, S=37, K=2, G=2, D=8, name="head_window",
                combination="causal&document&", block_q=8, block_k=16, dtype=jnp.float32,
                softcap=None, segments=2, seed=1)
    run_case(case, "pallas")


def test_fully_masked_rows_give_zeros():
    """Rows the predicate hides entirely give zeros and zero dq, never NaN, on every backend."""
    B, T, H = 1, 24, 2
    q, k, v = random_qkv(jax.random.key(0), B, T, T, H, H, 8, jnp.float32)
    mask = Causal() & MaskFn(lambda b, h, q, k: q % 4 != 1)  # rows 1, 5, 9, ... see nothing
    hidden = np.arange(T) % 4 == 1
    for impl in ("reference", "xla", "pallas"):
        fn = lambda q, k, v: attend(q, k, v, mask, impl=impl, block_q=8, block_k=8)  # noqa: E731
        out = fn(q, k, v)
        dq = jax.grad(lambda *a: fn(*a).sum())(q, k, v)
        assert np.all(f32(out)[:, hidden] == 0) and np.abs(f32(out)[:, ~hidden]).sum() > 0, impl
        assert np.isfinite(f32(dq)).all() and np.all(f32(dq)[:, hidden] == 0), impl


# ------------------------------------------------------------------ layouts and identity


@pytest.mark.parametrize("T,S,bq,bk", [(64, 64, 16, 16), (45, 61, 16, 8), (1, 77, 8, 16),
                                       (30, 30, 32, 8)])
def test_causal_fn_gives_causals_layout(T, S, bq, bk):
    """A MaskFn equal to Causal lowers to the same FULL / PARTIAL / SKIP blocks (exact), so it
    costs what Causal costs; a windowed fn matches Local's."""
    causal = MaskFn(lambda b, h, q, k: q >= k)
    np.testing.assert_array_equal(mask_layout(causal, T, S, bq, bk).kinds,
                                  mask_layout(Causal(), T, S, bq, bk).kinds)
    window = MaskFn(lambda b, h, q, k: (q >= k) & (k > q - 7))
    np.testing.assert_array_equal(mask_layout(window, T, S, bq, bk).kinds,
                                  mask_layout(Local(7), T, S, bq, bk).kinds)


def test_head_dependent_layout_is_per_kv_head():
    """Per (batch, head) evaluation: one layout per KV head, the union over its query heads,
    equal to the blocks of the dense visibility; an unbound head-reading fn names the fix."""
    T, S, H, K, bq, bk = 40, 40, 4, 2, 4, 4
    mask = MaskFn(PREDICATES["head_window"]) & Causal()
    with pytest.raises(ValueError, match=r"MaskFn: fn reads the head index.*prepare"):
        mask_layout(mask, T, S, bq, bk, num_heads=H, num_kv_heads=K)
    layout = mask_layout(mask.prepare(T, S, num_heads=H), T, S, bq, bk, num_heads=H,
                         num_kv_heads=K)
    _, vis = case_masks("head_window", "causal&", 1, T, S, H, None, None)
    for kv_head in range(K):
        group = vis[0, kv_head * 2:(kv_head + 1) * 2]
        np.testing.assert_array_equal(layout.kinds[kv_head], block_kinds(group, bq, bk)[0])
    kinds = np.asarray(layout.kinds)
    assert (kinds[1] != SKIP).sum() > (kinds[0] != SKIP).sum()  # wider windows, more blocks
    assert {FULL, PARTIAL, SKIP} <= set(np.unique(kinds))


def test_mask_fn_is_static_and_compared_by_identity():
    f = PREDICATES["dilated"]
    g = lambda b, h, q, k: (q - k) % 3 == 0  # noqa: E731 - same code, another function
    assert MaskFn(f) == MaskFn(f) and hash(MaskFn(f)) == hash(MaskFn(f))
    assert MaskFn(f) != MaskFn(g)
    assert jax.tree.leaves(Causal() & MaskFn(f)) == []  # all static: a jit sees no arrays
    m = MaskFn(f)
    assert not m.per_head and not m.reads_batch_index
    assert MaskFn(PREDICATES["head_window"]).per_head
    assert MaskFn(PREDICATES["batch_prefix"]).reads_batch_index
    assert m.prepare(8, 8, batch=2, num_heads=4) is m  # reads neither: nothing to bind
    out = jax.jit(lambda q, mask: attend(q, q, q, mask, impl="xla"))(
        jnp.ones((1, 8, 1, 8)), Causal() & m)
    assert out.shape == (1, 8, 1, 8)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("fn,match", [
    (3, r"MaskFn\(fn=3\); expected a callable"),
    (lambda b, h, q, k: q - k, r"MaskFn: fn.*returned int32.*expected bool"),
    (lambda b, h, q, k: jnp.ones((3,), bool), r"MaskFn: fn.*returned bool\[3\]"),
    (lambda b, h, q, k: (q >= k).reshape(-1), r"MaskFn: fn.*returned bool"),
    (lambda b, h, q, k: q >= k if q > 0 else q < k, r"MaskFn: fn.*failed.*elementwise"),
    (lambda b, h: b == h, r"MaskFn: fn.*failed"),
])
def test_bad_fn_raises_naming_mask_fn(fn, match):
    with pytest.raises(ValueError, match=match):
        MaskFn(fn)


def test_backends_that_cannot_take_an_index_raise_before_tracing(devices):
    q, k, v = random_qkv(jax.random.key(0), 2, 64, 64, 2, 1, 8, jnp.float32)
    batch = MaskFn(PREDICATES["batch_prefix"])
    ids = jnp.zeros((2, 64), jnp.int32)
    with pytest.raises(ValueError, match=r"impl='pallas' passes the kernels one pair of segment "
                                         r"id arrays.*impl='xla'"):
        attend(q, k, v, Document(ids) & batch, impl="pallas")
    mesh = make_mesh((1, 1, 1, 4), devices=devices[:4])
    head = MaskFn(PREDICATES["head_window"])
    with pytest.raises(ValueError, match=r"impl='ring_pallas'.*reads the batch or head index.*"
                                         r"use strategy='ring'"):
        attend(q, k, v, head & Causal(), impl="ring_pallas", mesh=mesh, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="MaskFn was prepared for num_heads=4"):
        attend(q, k, v, head.prepare(64, 64, num_heads=4), impl="xla")


# ------------------------------------------------------------------ context parallelism


@pytest.mark.parametrize("name,combination,strategy,P,load_balance", [
    ("dilated", "causal&document&", "ring", 4, "zigzag"),
    ("head_window", "causal&", "ring", 8, "striped"),
    ("batch_prefix", "document&", "allgather", 4, "zigzag"),
    ("hash", "|local", "ring", 2, "none"),
])
def test_context_parallel_matches_dense_reference(devices, name, combination, strategy, P,
                                                  load_balance):
    """ring / allgather over P of the 8 CPU devices (a data axis of 2 where P allows it: a fn
    reading the batch keeps the batch whole), values and gradients."""
    B, L, H, K = 2, 40, 4, 2
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(jax.random.key(2), B, L, L, H, K, 8, jnp.float32)
    seg_q, _ = segment_ids(rng, B, L, L, 3)
    mask, vis = case_masks(name, combination, B, L, L, H, seg_q, seg_q)
    data = 2 if 2 * P <= len(devices) else 1
    mesh = make_mesh((data, 1, 1, P), devices=devices[:data * P])
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    want = value_and_grads(lambda q, k, v: dense_reference(q, k, v, vis), q, k, v, cot)
    got = value_and_grads(lambda q, k, v: attend(q, k, v, mask, impl=strategy, mesh=mesh,
                                                 load_balance=load_balance, block_q=8,
                                                 block_k=8), q, k, v, cot)
    assert_close(got, want, 3e-5)


@pytest.mark.slow
def test_ring_pallas_takes_a_fn_of_positions(devices):
    """The fused Pallas ring (interpreted) calls a fn that reads neither batch nor head with
    original positions: values and gradients."""
    B, L, H, K = 1, 64, 2, 1  # zigzag over 4 devices: 8 chunks of one 8-token block
    q, k, v = random_qkv(jax.random.key(3), B, L, L, H, K, 8, jnp.float32)
    mask, vis = case_masks("dilated", "causal&", B, L, L, H, None, None)
    cot = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    want = value_and_grads(lambda q, k, v: dense_reference(q, k, v, vis), q, k, v, cot)
    got = value_and_grads(lambda q, k, v: attend(
        q, k, v, mask, impl="ring_pallas", mesh=make_mesh((1, 1, 1, 4), devices=devices[:4]),
        block_q=8, block_k=8), q, k, v, cot)
    assert_close(got, want, 3e-5)
