"""The xla backend against the dense reference: values and gradients over random shapes/masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import random_qkv

from lcm.attention import (FULL, SKIP, BlockMask, Causal, Chunked, Document, Local, MaskFn,
                           PrefixLM, SinkWindow, VerticalSlash, attend, mask_layout)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}

MASKS = ["none", "causal", "local", "document", "causal&document", "local|document",
         "causal&local", "sinkwindow", "sinkwindow|document", "chunked", "prefixlm",
         "blockmask", "blockmask_runtime&causal", "verticalslash", "verticalslash|local",
         "maskfn_dilated&document"]


def dilated(b, h, q, k):
    """A MaskFn predicate: every third diagonal (q is the query's kv-aligned position)."""
    return (q - k) % 3 != 1


def build_mask(kind, window, seg_q, seg_kv, *, num_heads=2, seed=0):
    """A mask by name; `window` sets every size parameter. Array masks draw from `seed`."""
    T, S = seg_q.shape[1], seg_kv.shape[1]
    rng = np.random.default_rng(seed)
    doc = Document(seg_q, seg_kv)
    bs = max(1, window // 3)
    grid = rng.random((num_heads, -(-T // bs), -(-S // bs))) < 0.4
    vs = VerticalSlash(jnp.asarray(rng.integers(0, S, (num_heads, 3)), jnp.int32),
                       jnp.asarray(rng.integers(0, S, (1, 4)), jnp.int32))
    return {"none": None, "causal": Causal(), "local": Local(window), "document": doc,
            "causal&document": Causal() & doc, "local|document": Local(window) | doc,
            "causal&local": Causal() & Local(window),
            "sinkwindow": SinkWindow(window % 5, window),
            "sinkwindow|document": SinkWindow(2, window) | doc,
            "chunked": Chunked(window), "prefixlm": PrefixLM(window),
            "blockmask": BlockMask(grid[0], bs),
            "blockmask_runtime&causal": BlockMask(jnp.asarray(grid), bs) & Causal(),
            "verticalslash": vs, "verticalslash|local": vs | Local(window),
            "maskfn_dilated&document": MaskFn(dilated) & doc}[kind]


def f32(x):
    return np.asarray(x, np.float32)


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 70))
    S = draw(st.integers(T, 90))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([8, 16, 32]))
    mask = draw(st.sampled_from(MASKS))
    window = draw(st.integers(1, 40))
    block_q = draw(st.sampled_from([8, 16, 32, 64]))
    block_k = draw(st.sampled_from([8, 16, 32, 64]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    softcap = draw(st.sampled_from([None, None, 3.0]))
    num_segments = draw(st.integers(1, 4))
    sinks = draw(st.sampled_from([None, 1.0, 4.0]))  # sink logits' spread, or no sinks
    seed = draw(st.integers(0, 2**16))
    return (B, T, S, K * G, K, D, mask, window, block_q, block_k, dtype, softcap, num_segments,
            sinks, seed)


def random_sinks(rng, spread, num_heads):
    """float32 [H] sink logits of standard deviation `spread`, or None."""
    if spread is None:
        return None
    return jnp.asarray(rng.standard_normal(num_heads) * spread, jnp.float32)


def segment_ids(rng, B, T, S, num_segments):
    """Sorted (packed) ids for the keys; queries take the last T of them."""
    kv = np.sort(rng.integers(0, num_segments, (B, S)), axis=1).astype(np.int32)
    return jnp.asarray(kv[:, S - T:]), jnp.asarray(kv)


@settings(max_examples=12)  # each mask kind also runs at a fixed shape just below
@given(cases())
def test_xla_matches_reference(case):
    """Values and gradients (d sinks too when drawn) of the xla backend vs the reference."""
    B, T, S, H, K, D, kind, window, bq, bk, dtype, softcap, nseg, spread, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(jax.random.key(seed), B, T, S, H, K, D, dtype)
    mask = build_mask(kind, window, *segment_ids(rng, B, T, S, nseg), num_heads=H, seed=seed)
    cot = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    sinks = random_sinks(rng, spread, H)
    args = (q, k, v) if sinks is None else (q, k, v, sinks)

    def loss(impl):
        def fn(q, k, v, *sinks):
            out = attend(q, k, v, mask, impl=impl, softcap=softcap, block_q=bq, block_k=bk,
                         sinks=sinks[0] if sinks else None)
            return jnp.sum(out.astype(jnp.float32) * cot), out
        return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True))

    (_, want), want_grads = loss("reference")(*args)
    (_, got), got_grads = loss("xla")(*args)
    tol = TOL[dtype]
    assert got.dtype == q.dtype
    assert not np.isnan(f32(got)).any()
    np.testing.assert_allclose(f32(got), f32(want), atol=tol, rtol=tol)
    for name, g, w in zip(["q", "k", "v", "sinks"], got_grads, want_grads):
        scale = max(1.0, float(np.abs(f32(w)).max()))
        np.testing.assert_allclose(f32(g), f32(w), atol=tol * scale * 2, rtol=tol,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("kind", MASKS)
def test_every_mask_kind_matches_reference(kind):
    """Each mask kind once at a fixed odd shape (GQA, q_len < kv_len), values and gradients."""
    B, T, S, H, K, D = 2, 45, 61, 4, 2, 16
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(jax.random.key(1), B, T, S, H, K, D, jnp.float32)
    mask = build_mask(kind, 12, *segment_ids(rng, B, T, S, 3), num_heads=H, seed=1)

    def fn(impl):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attend(q, k, v, mask, impl=impl, block_q=16, block_k=8)
                                    * jnp.cos(jnp.arange(D))[None, None, None]),
            argnums=(0, 1, 2)))

    want, want_grads = fn("reference")(q, k, v)
    got, got_grads = fn("xla")(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def numpy_alibi_attention(q, k, v, vis, slopes, scale):
    """Press et al.'s definition in float64: softmax(q.k * scale - m_h (i - j)) over visible
    keys, queries end-aligned. q [B, T, H, D]; k, v [B, S, K, D]; vis [B|1, H|1, T, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    kh = np.repeat(k, H // K, axis=2)
    vh = np.repeat(v, H // K, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kh) * scale
    distance = (np.arange(T)[:, None] + S - T) - np.arange(S)[None, :]
    s = s - np.asarray(slopes, np.float64)[None, :, None, None] * distance
    s = np.where(vis, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshd->bthd", p, vh)


@pytest.mark.parametrize("kind,G,T,softcap", [
    ("causal", 1, 45, None), ("none", 3, 30, None), ("local|document", 2, 45, 5.0),
    ("blockmask_runtime&causal", 2, 61, None), ("sinkwindow", 3, 1, None)])
def test_alibi_matches_reference_and_definition(kind, G, T, softcap):
    """ALiBi on xla (forward and custom-VJP backward) against the dense reference, which in
    turn matches the paper's definition in NumPy."""
    B, S, K, D = 2, 61, 2, 16
    H = K * G
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(jax.random.key(2), B, T, S, H, K, D, jnp.float32)
    mask = build_mask(kind, 12, *segment_ids(rng, B, T, S, 3), num_heads=H, seed=2)
    slopes = np.linspace(0.02, 0.5, H).astype(np.float32)  # bias swings of several logits
    cot = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)

    def fn(impl):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attend(q, k, v, mask, impl=impl, block_q=16, block_k=8,
                                           softcap=softcap, alibi_slopes=slopes) * cot),
            argnums=(0, 1, 2)))

    want, want_grads = fn("reference")(q, k, v)
    got, got_grads = fn("xla")(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    if softcap is None:
        vis = np.ones((1, 1, T, S), bool) if mask is None else np.asarray(
            mask.prepare(T, S).visible(jnp.arange(T), jnp.arange(S), S - T))
        out = attend(q, k, v, mask, impl="reference", alibi_slopes=slopes)
        np.testing.assert_allclose(out, numpy_alibi_attention(q, k, v, vis, slopes, D ** -0.5),
                                   atol=1e-5, rtol=1e-5)
        plain = attend(q, k, v, mask, impl="reference")
        assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-2  # the bias matters


def test_alibi_slopes_are_checked_before_tracing():
    q, k, v = random_qkv(jax.random.key(0), 1, 8, 8, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(3,\)"):
        attend(q, k, v, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda s: attend(q, k, v, alibi_slopes=s))(jnp.ones(4))


def test_fully_masked_rows_give_zeros_not_nan():
    B, T, H, D = 1, 24, 2, 8
    q, k, v = random_qkv(jax.random.key(0), B, T, T, H, H, D, jnp.float32)
    # Queries 0..7 belong to segment 9, which no key has: they see nothing.
    seg_q = jnp.asarray(np.r_[np.full(8, 9), np.zeros(16)][None].astype(np.int32))
    seg_kv = jnp.zeros((B, T), jnp.int32)
    mask = Causal() & Document(seg_q, seg_kv)
    for impl in ("reference", "xla"):
        fn = lambda q, k, v: attend(q, k, v, mask, impl=impl, block_q=8, block_k=8)  # noqa: E731
        out = fn(q, k, v)
        grads = jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2))(q, k, v)
        assert np.all(f32(out[:, :8]) == 0), impl
        assert np.abs(f32(out[:, 8:])).sum() > 0, impl
        for g in grads:
            assert np.isfinite(f32(g)).all(), impl
        assert np.all(f32(grads[0][:, :8]) == 0), impl


def test_decode_step_single_query():
    q, k, v = random_qkv(jax.random.key(1), 2, 1, 77, 4, 2, 16, jnp.float32)
    for mask in (None, Causal(), Local(10)):
        want = attend(q, k, v, mask, impl="reference")
        got = attend(q, k, v, mask, impl="xla", block_k=16)
        np.testing.assert_allclose(f32(got), f32(want), atol=2e-5, rtol=2e-5)


def test_local_window_matches_explicit_definition():
    """Local(w): a query at p sees exactly keys p-w+1..p."""
    T, w = 20, 4
    vis = np.asarray(Local(w).visible(jnp.arange(T), jnp.arange(T), 0))[0, 0]
    i, j = np.indices((T, T))
    np.testing.assert_array_equal(vis, (j <= i) & (j > i - w))


def test_mask_definitions_match_brute_force():
    T, S = 13, 20
    off = S - T
    i, j = np.indices((T, S))
    p = i + off  # query positions in key coordinates
    checks = [
        (SinkWindow(3, 4), (j <= p) & ((j < 3) | (j > p - 4))),
        (Chunked(5), (j <= p) & (j // 5 == p // 5)),
        (PrefixLM(9), (j <= p) | (j < 9)),
    ]
    grid = np.random.default_rng(0).random((2, -(-T // 4), -(-S // 4))) < 0.5
    checks.append((BlockMask(grid, 4), grid[:, i // 4, j // 4]))
    cols, diags = np.array([[2, 17], [5, 5]]), np.array([[0], [3]])
    vs_want = np.stack([(j <= p) & (np.isin(j, cols[h]) | np.isin(p - j, diags[h]))
                        for h in range(2)])
    checks.append((VerticalSlash(jnp.asarray(cols), jnp.asarray(diags)), vs_want))
    for mask, want in checks:
        got = np.asarray(mask.prepare(T, S).visible(jnp.arange(T), jnp.arange(S), off))
        np.testing.assert_array_equal(got[0], np.broadcast_to(want, got.shape[1:]),
                                      err_msg=type(mask).__name__)


@pytest.mark.parametrize("T,block", [(4096, 512), (1000, 128), (777, 64)])
def test_causal_layout_visits_about_half(T, block):
    layout = mask_layout(Causal(), T, T, block, block)
    n = -(-T // block)
    assert int(layout.num_visits) == n * (n + 1) // 2
    assert np.all(np.diag(layout.kinds[0])[:-1] != FULL)  # diagonal blocks need the mask


@pytest.mark.parametrize("T", [2048, 8192, 32768])
def test_local_layout_is_linear_in_length(T):
    layout = mask_layout(Local(1024), T, T, 512, 512)
    assert int(layout.counts.max()) <= 1024 // 512 + 1
    assert int(layout.num_visits) <= (T // 512) * 3


def test_static_layouts_store_visits_not_the_block_grid():
    """A 128k Local(1024) layout at block 128 holds O(nq * visits) ints (the dense kinds grid
    would be 4 MiB), and a jitted attend over it embeds no grid-sized constant."""
    T, block = 131072, 128
    layout = mask_layout(Local(1024), T, T, block, block)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(layout))
    nq = T // block
    assert layout.max_visits == 1024 // block + 1
    assert nbytes <= nq * (2 * layout.max_visits + 1) * 4 < 100_000
    q = jax.ShapeDtypeStruct((1, T, 1, 8), jnp.float32)
    text = jax.jit(lambda q: attend(q, q, q, Local(1024), impl="xla", block_q=block,
                                    block_k=block)).lower(q).as_text()
    assert len(text) < 200_000  # the program text, constants included


@pytest.mark.parametrize("kind", ["causal", "sinkwindow|document", "per_head_blockmask",
                                  "verticalslash"])
def test_dense_kinds_derive_from_the_visits(kind):
    """`kinds` (dense, derived) agrees with the visit lists, for NumPy and traced layouts, and
    a layout built from dense kinds (the old constructor) gives the same visit kinds."""
    from lcm.attention import BlockLayout
    T, S, bq, bk = 37, 50, 8, 8
    rng = np.random.default_rng(3)
    if kind == "per_head_blockmask":  # static, one layout per KV head: shared() is a union
        mask = BlockMask(rng.random((2, -(-T // 4), -(-S // 4))) < 0.3, 4)
    else:
        mask = build_mask(kind, 10, *segment_ids(rng, 2, T, S, 3), num_heads=2, seed=3)
    layout = mask_layout(mask, T, S, bq, bk, num_heads=2, num_kv_heads=2)
    kinds = np.asarray(layout.kinds)
    counts, blocks = np.asarray(layout.counts), np.asarray(layout.kv_blocks)
    visit_kinds = np.asarray(layout.visit_kinds)
    for h, i in np.ndindex(counts.shape):
        listed = blocks[h, i, :counts[h, i]]
        np.testing.assert_array_equal(np.flatnonzero(kinds[h, i]), listed)
        np.testing.assert_array_equal(kinds[h, i, listed], visit_kinds[h, i, :counts[h, i]])
    rebuilt = BlockLayout(kinds=kinds, kv_blocks=blocks, counts=counts, geom=layout.geom,
                          max_visits=layout.max_visits)
    np.testing.assert_array_equal(rebuilt.visit_kinds, np.take_along_axis(kinds, blocks, -1))
    shared = layout.shared()
    assert np.asarray(shared.counts).shape == (1, layout.geom.num_q_blocks)
    np.testing.assert_array_equal(np.asarray(shared.kinds)[0] != SKIP, (kinds != SKIP).any(0))
    # The union may visit more blocks per row than any head: none may be cut off.
    assert int(np.asarray(shared.counts).max()) <= shared.max_visits


@settings(max_examples=6)  # eager jnp on new shapes compiles every op: keep it short
@given(st.integers(1, 60), st.integers(0, 40), st.sampled_from([4, 8, 16]),
       st.sampled_from([4, 8, 16]), st.integers(1, 30), st.integers(0, 1000))
def test_layout_is_conservative(T, extra, bq, bk, window, seed):
    """SKIP blocks hold no visible pair; FULL blocks hold only visible pairs (no padding)."""
    S = T + extra
    rng = np.random.default_rng(seed)
    seg_q, seg_kv = segment_ids(rng, 2, T, S, 3)
    for kind in MASKS[1:]:
        mask = build_mask(kind, window, seg_q, seg_kv, num_heads=2, seed=seed)
        layout = mask_layout(mask, T, S, bq, bk, num_heads=2, num_kv_heads=2)
        kinds = np.asarray(layout.kinds)
        lh, nq, nk = kinds.shape
        vis = np.asarray(mask.prepare(T, S).visible(jnp.arange(T), jnp.arange(S), S - T))
        vis = np.broadcast_to(vis, (2, lh, T, S))

        def blocks(row_pad):  # padding keys are never visible; padding rows are `row_pad`
            out = np.full((2, lh, nq * bq, nk * bk), row_pad)
            out[..., S:] = False
            out[:, :, :T, :S] = vis
            return out.reshape(2, lh, nq, bq, nk, bk)

        assert not blocks(False).any(axis=(0, 3, 5))[kinds == SKIP].any(), kind
        assert blocks(True).all(axis=(0, 3, 5))[kinds == FULL].all(), kind
        static = mask.static_bound(layout.geom)
        assert np.all(static[(kinds != SKIP).any(0)]), kind  # the static bound is a superset
        assert np.all(np.asarray(layout.counts) <= layout.max_visits), kind


def test_document_layout_skips_blocks_inside_jit():
    T = 64
    seg = jnp.asarray(np.repeat(np.arange(4), 16)[None].astype(np.int32))

    @jax.jit
    def counts(seg):
        return mask_layout(Causal() & Document(seg), T, T, 16, 16).counts

    np.testing.assert_array_equal(np.asarray(counts(seg)), [[1, 1, 1, 1]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="flash"), "impl='flash'"),
    (dict(block_q=0), "block_q=0"),
    (dict(block_k=1.5), "block_k=1.5"),
    (dict(scale=-1.0), "scale=-1.0"),
    (dict(softcap=0.0), "softcap=0.0"),
    (dict(mask="causal"), "mask='causal'"),
])
def test_bad_options_raise(kwargs, match):
    q, k, v = random_qkv(jax.random.key(0), 1, 8, 8, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, **kwargs)


def test_bad_shapes_raise():
    q, k, v = random_qkv(jax.random.key(0), 1, 8, 8, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="not a multiple of the 2 KV heads"):
        attend(q, k, v)
    q, k, v = random_qkv(jax.random.key(0), 1, 9, 8, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="q_len=9 > kv_len=8"):
        attend(q, k, v)
    with pytest.raises(ValueError, match="expected 4 dims"):
        attend(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        attend(q[:, :8], k, v[:, :4])
    with pytest.raises(ValueError, match="int32"):
        attend(q.astype(jnp.int32), k, v)
    q, k, v = random_qkv(jax.random.key(0), 1, 4, 8, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="pass kv_segment_ids"):
        attend(q, k, v, Document(jnp.zeros((1, 4), jnp.int32)))
    with pytest.raises(ValueError, match="integer dtype"):
        attend(q, k, v, Document(jnp.zeros((1, 4)), jnp.zeros((1, 8))))
    with pytest.raises(ValueError, match="window"):
        Local(0)
    with pytest.raises(ValueError, match="expected a Mask"):
        Causal() & 3
