"""kNN memory in chosen layers only (the Memorizing Transformer's single memory layer)."""

import jax
import numpy as np
import pytest

from lcm.memory import KNNMemory, NoMemory, init_memory_state, run_segments

from memory_common import CFG, run, tiny_params, tokens_of


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def test_every_layer_listed_equals_the_all_layer_memory(params):
    tokens = tokens_of(jax.random.key(5), 2, 24)
    want, want_state = run(params, tokens, CFG, memory=KNNMemory(capacity=16, k=4),
                           segment_len=8)
    got, state = run(params, tokens, CFG, memory=KNNMemory(capacity=16, k=4, layers=(0, 1)),
                     segment_len=8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    stores = state["memory"]["carried"]
    assert set(state["memory"]) == {"carried"}
    assert stores["k"].shape == (2, 2, 16, CFG.num_kv_heads, CFG.head_dim)
    want_stores = want_state["memory"]["layers"]
    np.testing.assert_array_equal(stores["valid"], want_stores["valid"])
    for name in ("k", "v"):
        np.testing.assert_allclose(stores[name], want_stores[name], atol=1e-5, rtol=1e-5)


def test_single_memory_layer_leaves_the_other_layers_local(params):
    tokens = tokens_of(jax.random.key(6), 2, 24)
    one = KNNMemory(capacity=16, k=4, layers=(1,))
    state = init_memory_state(one, CFG, 2)
    assert state["memory"]["carried"]["k"].shape == (2, 1, 16, CFG.num_kv_heads, CFG.head_dim)
    local, _ = run(params, tokens, CFG, memory=NoMemory(), segment_len=8)
    got, final = run(params, tokens, CFG, memory=one, segment_len=8)
    # The first segment has an empty store; later ones read it.
    np.testing.assert_allclose(got[:, :8], local[:, :8], atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got[:, 8:] - local[:, 8:])).max() > 1e-3
    assert final["memory"]["carried"]["valid"].sum() == 2 * 16  # 24 tokens, a ring of 16
    # With layer 1's attention output cut, the memory (in layer 1 only) cannot act: the logits
    # are the local ones. With the memory in layer 0 instead, they are not.
    cut = jax.tree.map(lambda x: x, params)
    cut["layers"]["wo"] = cut["layers"]["wo"].at[1].set(0.0)
    local_cut, _ = run(cut, tokens, CFG, memory=NoMemory(), segment_len=8)
    top, _ = run(cut, tokens, CFG, memory=one, segment_len=8)
    np.testing.assert_allclose(top, local_cut, atol=1e-5, rtol=1e-5)
    bottom, _ = run(cut, tokens, CFG, memory=KNNMemory(capacity=16, k=4, layers=(0,)),
                    segment_len=8)
    assert np.abs(np.asarray(bottom[:, 8:] - local_cut[:, 8:])).max() > 1e-3


def test_layers_are_checked():
    tokens = tokens_of(jax.random.key(0), 1, 8)
    with pytest.raises(ValueError, match=r"layers=\(2,\).*num_layers=2"):
        run_segments(tiny_params(), tokens, CFG, memory=KNNMemory(capacity=8, k=2, layers=(2,)),
                     segment_len=8)
    for bad in ((), [0], (0, 0), (-1,)):
        with pytest.raises(ValueError, match="KNNMemory.layers="):
            KNNMemory(capacity=8, k=2, layers=bad)
