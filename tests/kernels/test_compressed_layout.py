"""Compressed layouts (per-visit kinds) as the kernels take them: the transpose built from the
visit lists alone, and the kernels' checks of the two layout forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
from lcm.kernels.block_sparse.layout import (layout_from_kinds, max_q_visits_of, transpose_layout,
                                             transpose_visits)
from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu


@pytest.mark.parametrize("seed", range(4))
def test_transpose_visits_matches_the_dense_transpose(seed):
    rng = np.random.default_rng(seed)
    Lh, nq, nk = 2, int(rng.integers(1, 7)), int(rng.integers(1, 9))
    kinds = rng.integers(0, 3, (Lh, nq, nk)).astype(np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    visit_kinds = np.take_along_axis(kinds, np.asarray(kv_blocks), -1)
    want_kinds_t, want_blocks, want_counts = map(np.asarray, transpose_layout(kinds))
    bound = max_q_visits_of(kv_blocks, counts, nk)
    assert bound == max(int((kinds != 0).sum(-2).max()), 1)
    q_blocks, kinds_t, counts_t = map(np.asarray, jax.jit(
        transpose_visits, static_argnums=(3, 4))(kv_blocks, visit_kinds, counts, nk, bound))
    assert q_blocks.shape == (Lh, nk, bound)
    np.testing.assert_array_equal(counts_t, want_counts)
    for h in range(Lh):
        for j in range(nk):
            n = counts_t[h, j]
            np.testing.assert_array_equal(q_blocks[h, j, :n], want_blocks[h, j, :n])
            np.testing.assert_array_equal(kinds_t[h, j, :n],
                                          want_kinds_t[h, j][want_blocks[h, j, :n]])


def test_transpose_visits_ignores_filler_and_truncates_to_the_bound():
    kv_blocks = np.array([[[0, 1, 1], [1, 0, 0]]], np.int32)  # filler past counts repeats
    visit_kinds = np.array([[[2, 1, 0], [1, 0, 0]]], np.int32)
    counts = np.array([[2, 1]], np.int32)
    q_blocks, kinds_t, counts_t = transpose_visits(kv_blocks, visit_kinds, counts, 3)
    np.testing.assert_array_equal(counts_t, [[1, 2, 0]])
    np.testing.assert_array_equal(q_blocks[0, 1], [0, 1])
    np.testing.assert_array_equal(kinds_t[0, :2, :2], [[2, 0], [1, 1]])
    _, _, counts_t = transpose_visits(kv_blocks, visit_kinds, counts, 3, 1)
    np.testing.assert_array_equal(counts_t, [[1, 1, 0]])


@pytest.mark.parametrize("kernel", [block_sparse_attention_tpu, block_sparse_attention_gpu])
def test_layout_forms_are_checked(kernel):
    q = jnp.zeros((1, 20, 2, 16))
    k = jnp.zeros((1, 40, 2, 16))
    kinds = np.ones((1, 2, 3), np.int32)
    kv_blocks, counts = layout_from_kinds(kinds)
    common = dict(kv_blocks=kv_blocks, counts=counts, scale=0.1, block_q=16, block_k=16,
                  interpret=True)
    with pytest.raises(ValueError, match="exactly one of them"):
        kernel(q, k, k, kinds=kinds, visit_kinds=np.ones((1, 2, 3), np.int32), **common)
    with pytest.raises(ValueError, match="exactly one of them"):
        kernel(q, k, k, **common)
    with pytest.raises(ValueError, match="visit_kinds"):
        kernel(q, k, k, visit_kinds=np.ones((1, 2, 2), np.int32), **common)
