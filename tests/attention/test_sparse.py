"""Sparse-mask estimators: planted patterns are recovered, outputs are jit-safe masks that run
through `attend`, and bad arguments raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.attention import BlockMask, Causal, VerticalSlash, attend, mask_layout
from lcm.attention.sparse import estimate_block_topk, estimate_vertical_slash, top_k_blocks

# Planted vertical-slash pattern per head (2 query heads sharing one KV head).
COLUMNS = {0: (77, 300), 1: (123, 401)}
DIAGONALS = {0: (37, 150), 1: (5, 260)}
# Planted (query block, key block) pairs per head, block size 64.
BLOCK_PAIRS = {0: ((5, 2), (7, 3)), 1: ((4, 1), (6, 4))}


def planted_vertical_slash_qk(seed, B=2, T=512, F=32):
    """q [B, T, 2, D], k [B, T, 1, D] whose attention (scale 1) concentrates on COLUMNS and
    DIAGONALS. Columns: those keys and all queries of the head share a direction. Diagonals
    (RoPE-like): q_i and k_j carry rotations by i and j + d at F random frequencies, so
    q_i . k_j = mean_f cos(w_f (i - j - d)), peaked at i - j = d."""
    rng = np.random.default_rng(seed)
    D = 2 + 2 * 2 * F
    q = 0.1 * rng.standard_normal((B, T, 2, D))
    k = 0.1 * rng.standard_normal((B, T, 1, D))
    amp = np.sqrt(8.0)  # planted logits ~8, against ~N(0, 1.4) elsewhere
    pos = np.arange(T)[:, None]
    for h in (0, 1):
        q[:, :, h, h] += amp
        k[:, list(COLUMNS[h]), 0, h] += amp
        freqs = rng.uniform(0.3, np.pi, F)[None, :]
        dims = slice(2 + 2 * F * h, 2 + 2 * F * (h + 1))
        rot = lambda x: np.concatenate([np.cos(x), np.sin(x)], -1) / np.sqrt(F)
        q[:, :, h, dims] += amp * rot(pos * freqs)
        for d in DIAGONALS[h]:
            k[:, :, 0, dims] += amp * rot((pos + d) * freqs)
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def planted_block_qk(seed, B=2, T=512, D=16, amp=6.0**0.5, noise=1.0):
    """q [B, T, 2, D], k [B, T, 1, D] whose pooled block scores peak at BLOCK_PAIRS."""
    rng = np.random.default_rng(seed)
    q = noise * rng.standard_normal((B, T, 2, D))
    k = noise * rng.standard_normal((B, T, 1, D))
    direction = 0
    for h, pairs in BLOCK_PAIRS.items():
        for qb, kb in pairs:
            q[:, qb * 64:(qb + 1) * 64, h, direction] += amp
            k[:, kb * 64:(kb + 1) * 64, 0, direction] += amp
            direction += 1
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def numpy_vertical_slash_sums(q, k, last_q, scale):
    """Brute force: [H, S] column sums and diagonal sums of the last queries' causal softmax."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    vertical, slash = np.zeros((H, S)), np.zeros((H, S))
    for b in range(B):
        for h in range(H):
            for i in range(T - last_q, T):
                p = S - T + i
                logits = k[b, :p + 1, h // (H // K)] @ q[b, i, h] * scale
                w = np.exp(logits - logits.max())
                w /= w.sum()
                vertical[h, :p + 1] += w
                slash[h, p - np.arange(p + 1)] += w
    return vertical, slash


def test_vertical_slash_matches_brute_force():
    B, T, S, H, K, D = 2, 40, 56, 4, 2, 8
    kq, kk = jax.random.split(jax.random.key(3))
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, S, K, D))
    vs = estimate_vertical_slash(q, k, last_q=16, num_vertical=6, num_slash=7, always_vertical=2,
                                 always_slash=3)
    vertical, slash = numpy_vertical_slash_sums(q, k, 16, 1 / np.sqrt(D))
    assert vs.vertical_idx.shape == (H, 6) and vs.slash_offsets.shape == (H, 7)
    assert vs.vertical_idx.dtype == jnp.int32 and vs.slash_offsets.dtype == jnp.int32
    for h in range(H):
        want_v = {0, 1} | set(np.argsort(-vertical[h, 2:])[:4] + 2)
        want_s = {0, 1, 2} | set(np.argsort(-slash[h, 3:])[:4] + 3)
        assert set(np.asarray(vs.vertical_idx[h])) == want_v, h
        assert set(np.asarray(vs.slash_offsets[h])) == want_s, h
        assert np.all(np.diff(np.asarray(vs.vertical_idx[h])) > 0)  # ascending, distinct


def test_vertical_slash_recovers_planted_pattern():
    q, k = planted_vertical_slash_qk(0)
    vs = estimate_vertical_slash(q, k, num_vertical=4, num_slash=4, scale=1.0)
    for h in (0, 1):
        cols, diags = set(np.asarray(vs.vertical_idx[h])), set(np.asarray(vs.slash_offsets[h]))
        assert set(COLUMNS[h]) <= cols and 0 in cols, (h, cols)
        assert set(DIAGONALS[h]) <= diags and 0 in diags, (h, diags)
    # Defaults: MInference's budgets clipped to S, its sinks and local diagonals forced.
    vs = estimate_vertical_slash(q, k, scale=1.0)
    assert vs.vertical_idx.shape == (2, 512) and vs.slash_offsets.shape == (2, 512)


def test_block_topk_recovers_planted_pairs():
    q, k = planted_block_qk(0)
    bm = estimate_block_topk(q, k, block_size=64, k_blocks=3, scale=1.0)
    assert isinstance(bm, BlockMask) and bm.block_size == 64
    grid = np.asarray(bm.blocks)
    assert grid.shape == (2, 8, 8) and grid.dtype == bool
    for h, pairs in BLOCK_PAIRS.items():
        for qb, kb in pairs:
            assert grid[h, qb, kb], (h, qb, kb)
    i = np.arange(8)
    assert grid[:, i, i].all() and grid[:, :, 0].all()  # diagonal and first block always kept
    assert not np.triu(grid, 1).any()  # causal at block level
    assert (grid.sum(-1) == np.minimum(i + 1, 3)).all()  # the budget, forced blocks included


def test_block_coverage_adapts_to_peakedness():
    q, k = planted_block_qk(1)
    peaked = np.asarray(estimate_block_topk(q, k, block_size=64, coverage=0.9, scale=1.0).blocks)
    for h, pairs in BLOCK_PAIRS.items():
        for qb, kb in pairs:
            assert peaked[h, qb, kb], (h, qb, kb)
    flat_q, flat_k = jnp.zeros_like(q), jnp.zeros_like(k)
    flat = np.asarray(estimate_block_topk(flat_q, flat_k, block_size=64, coverage=0.9).blocks)
    # Uniform over the i + 1 reachable blocks: 90% of the mass needs ceil(0.9 (i + 1)) of them.
    np.testing.assert_array_equal(flat.sum(-1), np.broadcast_to(
        np.maximum(np.ceil(0.9 * np.arange(1, 9) - 1e-6), np.minimum(np.arange(1, 9), 2)),
        (2, 8)))
    # Planted rows put ~all their mass on one block: diagonal + first + planted suffice.
    for h, pairs in BLOCK_PAIRS.items():
        for qb, _ in pairs:
            assert peaked[h, qb].sum() == 3 < flat[h, qb].sum(), (h, qb, peaked[h, qb])
    assert peaked.sum() < flat.sum()
    capped = np.asarray(estimate_block_topk(flat_q, flat_k, block_size=64, coverage=0.9,
                                            k_blocks=3).blocks)
    assert capped.sum(-1).max() == 3


def numpy_block_probs(q, k, bs, scale, causal):
    """Brute force [H, nq, nk] batch-mean block probabilities (queries at the end of the keys)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    nq, nk = -(-T // bs), -(-S // bs)
    pq = np.stack([q[:, i * bs:(i + 1) * bs].mean(1) for i in range(nq)], 1)
    pk = np.stack([k[:, j * bs:(j + 1) * bs].mean(1) for j in range(nk)], 1)
    counts = np.minimum(bs, S - np.arange(nk) * bs)
    probs = np.zeros((H, nq, nk))
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                logits = pk[b, :, h // (H // K)] @ pq[b, i, h] * scale + np.log(counts)
                if causal:
                    qhi = min((i + 1) * bs, T) - 1 + S - T
                    logits[np.arange(nk) * bs > qhi] = -np.inf
                w = np.exp(logits - logits.max())
                probs[h, i] += w / w.sum() / B
    return probs


@pytest.mark.parametrize("T,S,bs,causal", [(50, 50, 8, True), (37, 61, 8, True),
                                           (40, 40, 16, False)])
def test_coverage_is_the_smallest_set(T, S, bs, causal):
    B, H, K, D = 2, 4, 2, 8
    kq, kk = jax.random.split(jax.random.key(T))
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, S, K, D))
    grid = np.asarray(estimate_block_topk(q, k, block_size=bs, coverage=0.7, causal=causal)
                      .blocks)
    probs = numpy_block_probs(q, k, bs, 1 / np.sqrt(D), causal)
    nq, nk = grid.shape[1:]
    for h in range(H):
        for i in range(nq):
            qlo, qhi = i * bs + S - T, min((i + 1) * bs, T) - 1 + S - T
            klo, khi = np.arange(nk) * bs, np.minimum(np.arange(nk) * bs + bs, S) - 1
            forced = ((klo <= qhi) & (khi >= qlo)) | (klo == 0)
            kept, row = grid[h, i], probs[h, i]
            assert kept[forced].all()
            if causal:
                assert not kept[klo > qhi].any()
            optional = kept & ~forced
            assert row[kept].sum() >= 0.7 - 1e-5 or kept.sum() == (row > 0).sum()
            if optional.any():  # minimal: the optional blocks are the best, none is spare
                assert row[optional].min() >= row[~kept & (row > 0)].max(initial=0) - 1e-6
                assert row[kept].sum() - row[optional].min() < 0.7 + 1e-5


@settings(max_examples=8)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 12), st.integers(0, 1000))
def test_top_k_blocks_matches_numpy(nq, nk, k, seed):
    k = min(k, nk)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (2, nq, nk)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    got = np.asarray(top_k_blocks(jnp.asarray(scores), k))
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    want = np.zeros_like(got)
    np.put_along_axis(want, order, True, axis=-1)
    np.testing.assert_array_equal(got, want & (scores > -np.inf))


def test_estimators_compile_once():
    traces = []

    def both(q, k):
        traces.append(None)
        vs = estimate_vertical_slash(q, k, last_q=32, num_vertical=8, num_slash=8)
        bm = estimate_block_topk(q, k, block_size=32, k_blocks=3)
        return vs, bm

    fn = jax.jit(both)
    outs = []
    for seed in (0, 1):
        kq, kk = jax.random.split(jax.random.key(seed))
        q, k = jax.random.normal(kq, (1, 256, 4, 16)), jax.random.normal(kk, (1, 256, 2, 16))
        outs.append(fn(q, k))
        eager = both(q, k)
        for got, want in zip(jax.tree.leaves(outs[-1]), jax.tree.leaves(eager)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(traces) == 1 + 2  # one jit trace, then the two eager calls
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(outs[0]),
                                                          jax.tree.leaves(outs[1])))


@pytest.mark.parametrize("T,S", [(256, 256), (200, 256)])
def test_estimated_masks_run_through_attend(T, S):
    B, H, K, D = 2, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(T), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, S, K, D))
    v = jax.random.normal(kv, (B, S, K, D))

    def run(impl):
        @jax.jit
        def fn(q, k, v):
            vs = estimate_vertical_slash(q, k, num_vertical=16, num_slash=16)
            bm = estimate_block_topk(q, k, block_size=32, k_blocks=3) & Causal()
            return tuple(attend(q, k, v, m, impl=impl, block_q=64, block_k=64) for m in (vs, bm))
        return fn(q, k, v)

    for got, want in zip(run("xla"), run("reference")):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_estimated_layouts_are_sparse():
    """Per-head layouts (16-token kernel blocks) of small budgets at T=512 visit a fraction of
    the blocks that Causal() does."""
    T, bs = 512, 16
    causal = float(mask_layout(Causal(), T, T, bs, bs).density)
    q, k = planted_vertical_slash_qk(2)
    vs = estimate_vertical_slash(q, k, num_vertical=4, num_slash=4, scale=1.0)
    vs_density = float(mask_layout(vs, T, T, bs, bs, num_heads=2, num_kv_heads=2).density)
    q, k = planted_block_qk(2)
    bm = estimate_block_topk(q, k, block_size=64, k_blocks=3, scale=1.0) & Causal()
    bm_density = float(mask_layout(bm, T, T, bs, bs, num_heads=2, num_kv_heads=2).density)
    assert causal > 0.5
    assert vs_density < 0.25, vs_density
    assert bm_density < 0.3, bm_density


def _qk(B=1, T=64, S=64, H=2, K=1, D=8):
    return jnp.zeros((B, T, H, D)), jnp.zeros((B, S, K, D))


@pytest.mark.parametrize("fn,args,kwargs,match", [
    (estimate_vertical_slash, _qk(), dict(last_q=65), "last_q=65"),
    (estimate_vertical_slash, _qk(), dict(last_q=0), "last_q=0"),
    (estimate_vertical_slash, _qk(), dict(num_vertical=65), "num_vertical=65"),
    (estimate_vertical_slash, _qk(), dict(num_slash=-1), "num_slash=-1"),
    (estimate_vertical_slash, _qk(), dict(num_vertical=4, always_vertical=5),
     "always_vertical=5"),
    (estimate_vertical_slash, _qk(), dict(num_slash=4, always_slash=5), "always_slash=5"),
    (estimate_vertical_slash, _qk(), dict(scale=0.0), "scale=0.0"),
    (estimate_vertical_slash, _qk(H=3, K=2), {}, "not a multiple"),
    (estimate_vertical_slash, _qk(T=65), {}, "q_len=65 > kv_len=64"),
    (estimate_vertical_slash, (jnp.zeros((64, 2, 8)), _qk()[1]), {}, "expected 4 dims"),
    (estimate_vertical_slash, (_qk()[0], jnp.zeros((1, 64, 1, 4))), {}, "head_dim"),
    (estimate_block_topk, _qk(), dict(block_size=0, k_blocks=1), "block_size=0"),
    (estimate_block_topk, _qk(), dict(block_size=16, k_blocks=5), "k_blocks=5"),
    (estimate_block_topk, _qk(), dict(block_size=16, k_blocks=0), "k_blocks=0"),
    (estimate_block_topk, _qk(), dict(block_size=16, coverage=0.0), "coverage=0.0"),
    (estimate_block_topk, _qk(), dict(block_size=16, coverage=1.5), "coverage=1.5"),
    (estimate_block_topk, _qk(), dict(block_size=16), "k_blocks .* or coverage"),
    (estimate_block_topk, _qk(), dict(block_size=16, k_blocks=1, causal=None), "causal=None"),
    (top_k_blocks, (jnp.zeros((4, 5)), 6), {}, "k=6"),
    (top_k_blocks, (jnp.zeros((5,)), 1), {}, "expected a float array"),
    (top_k_blocks, (jnp.zeros((4, 5), jnp.int32), 1), {}, "expected a float array"),
])
def test_bad_arguments_raise(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_masks_validate_against_attend_shapes():
    q, k = planted_block_qk(0, B=1, T=200)
    vs = estimate_vertical_slash(q, k, num_vertical=8, num_slash=8)
    bm = estimate_block_topk(q, k, block_size=48, k_blocks=2)
    for mask in (vs, bm):
        mask.validate(1, 2, 200, 200)
    assert isinstance(vs, VerticalSlash) and bm.blocks.shape == (2, 5, 5)
    with pytest.raises(ValueError, match="BlockMask blocks shape"):
        bm.validate(1, 2, 200, 300)

