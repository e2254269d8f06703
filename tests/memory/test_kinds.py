"""Memory kinds: RMT, Infini-attention, kNN and linear recurrence, against their exact peers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.attention import Document, attend
from lcm.config import PositionConfig
from lcm.memory import (CompressiveMemory, KNNMemory, LinearRecurrence, RecurrentMemory,
                        chunked_linear_attention, init_memory_params, knn_attention,
                        linear_attention_step, quadratic_linear_attention, run_segments)
from lcm.model import forward

from memory_common import CFG, run, tiny_params, tokens_of


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def _reach(params, memory, memory_params, seq=24, segment_len=8):
    """Max logit change per segment when token 0 changes."""
    tokens = tokens_of(jax.random.key(11), 1, seq)
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % CFG.vocab_size)
    a, _ = run(params, tokens, CFG, memory=memory, segment_len=segment_len,
               memory_params=memory_params)
    b, _ = run(params, changed, CFG, memory=memory, segment_len=segment_len,
               memory_params=memory_params)
    diff = np.abs(np.asarray(a - b)).reshape(seq // segment_len, -1)
    return diff.max(-1)


# ------------------------------------------------------------------------------------ RMT


def test_one_segment_rmt_without_memory_tokens_equals_forward(params):
    memory = RecurrentMemory(num_mem_tokens=0)
    mparams, _ = init_memory_params(memory, CFG, jax.random.key(1))
    tokens = tokens_of(jax.random.key(2), 2, 13)
    got, _ = run(params, tokens, CFG, memory=memory, segment_len=16, memory_params=mparams)
    np.testing.assert_allclose(got, forward(params, tokens, CFG), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_rmt_carries_information_and_gradients_across_segments(params):
    memory = RecurrentMemory(num_mem_tokens=2)
    mparams, axes = init_memory_params(memory, CFG, jax.random.key(3))
    assert mparams["memory"].shape == (2, CFG.hidden_size) and axes["memory"] == (None, "embed")
    assert np.all(_reach(params, memory, mparams)[1:] > 1e-4)  # later segments see token 0
    tokens = tokens_of(jax.random.key(4), 1, 24)

    def loss(mp, bptt):
        logits, _ = run(params, tokens, CFG, memory=memory, segment_len=8, memory_params=mp,
                        bptt_segments=bptt)
        return logits[:, 16:].std()  # the last segment only

    full, cut = jax.grad(loss)(mparams, None), jax.grad(loss)(mparams, 1)
    assert np.abs(np.asarray(full["memory"])).max() > 1e-5
    # bptt_segments=1: the last segment's loss reaches only its own incoming memory, which
    # after two segments no longer depends on the initial memory.
    np.testing.assert_array_equal(cut["memory"], 0.0)


# ------------------------------------------------------------------------ Infini-attention


@pytest.mark.slow
def test_compressive_memory_reads_past_segments_and_gate_shuts_it(params):
    for delta_rule in (False, True):
        memory = CompressiveMemory(delta_rule=delta_rule)
        mparams, _ = init_memory_params(memory, CFG, jax.random.key(5))
        assert np.all(_reach(params, memory, mparams)[1:] > 1e-4)
    # A shut gate (sigmoid(-inf) = 0) leaves causal attention within each segment.
    shut = {"layers": {"gate": jnp.full_like(mparams["layers"]["gate"], -1e9)}}
    np.testing.assert_array_less(_reach(params, memory, shut)[1:], 1e-6)
    tokens = tokens_of(jax.random.key(6), 1, 8)
    got, _ = run(params, tokens, CFG, memory=memory, segment_len=8, memory_params=shut)
    np.testing.assert_allclose(got, forward(params, tokens, CFG), atol=2e-5, rtol=2e-5)


def test_compressive_memory_write_and_read_formulas():
    memory = CompressiveMemory()
    B, T, K, D = 1, 3, 1, 2
    k = jnp.array([[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 0.1]]]])  # [B, T, K, D]
    v = jnp.arange(6.0).reshape(B, T, K, D)
    state = {"M": jnp.zeros((B, K, D, D)), "z": jnp.zeros((B, K, D))}

    class Ctx:
        valid = jnp.array([[True, True, False]])

    new = memory.write(state, None, None, None, k, v, Ctx)
    sk = np.where(np.asarray(k) > 0, np.asarray(k) + 1, np.exp(np.asarray(k)))[0, :2, 0]
    np.testing.assert_allclose(new["M"][0, 0], sk.T @ np.asarray(v)[0, :2, 0], rtol=1e-6)
    np.testing.assert_allclose(new["z"][0, 0], sk.sum(0), rtol=1e-6)


# ------------------------------------------------------------------------------------ kNN


def test_knn_attention_with_k_at_least_store_equals_dense_attention_over_store():
    key = jax.random.key(7)
    q = jax.random.normal(key, (2, 5, 4, 8))
    keys, values = jax.random.normal(jax.random.key(8), (2, 2, 12, 2, 8))
    valid = jnp.arange(12)[None] < jnp.array([[12], [7]])
    want = attend(q, keys, values, Document(jnp.ones((2, 5), jnp.int32),
                                            valid.astype(jnp.int32)), impl="reference")
    knn = jax.jit(knn_attention, static_argnames=("k", "approx", "shards"))
    for kwargs in ({}, {"shards": 3}, {"approx": True}):
        np.testing.assert_allclose(knn(q, keys, values, valid, k=12, **kwargs), want,
                                   atol=1e-5, err_msg=str(kwargs))
    # Fewer neighbours than the store: a different answer, the same from every search.
    few = knn(q, keys, values, valid, k=3)
    assert np.abs(np.asarray(few - want)).max() > 1e-3
    np.testing.assert_allclose(knn(q, keys, values, valid, k=3, shards=4), few, atol=1e-6)


def test_knn_memory_with_whole_store_equals_full_causal_attention(params):
    tokens = tokens_of(jax.random.key(9), 2, 21)
    got, state = run(params, tokens, CFG, memory=KNNMemory(capacity=24, k=24), segment_len=8)
    np.testing.assert_allclose(got, forward(params, tokens, CFG), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(state["memory"]["layers"]["valid"].sum(-1), 21)


def test_knn_store_sharded_over_a_mesh_axis(params, devices):
    from lcm.sharding import LogicalSharding, make_mesh

    mesh = make_mesh((2, 1, 1, 4), devices=devices)  # data 2, context 4
    memory = KNNMemory(capacity=16, k=4, shards=4)
    tokens = tokens_of(jax.random.key(10), 2, 24)
    want, _ = run(params, tokens, CFG, memory=memory, segment_len=8)
    shard = LogicalSharding(mesh)
    got, state = run(params, tokens, CFG, memory=memory, segment_len=8, shard=shard)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    store = state["memory"]["layers"]["k"]  # [B, layers, capacity, kv_heads, head_dim]
    assert store.sharding.shard_shape(store.shape)[2] == 4  # capacity 16 over context 4


# ------------------------------------------------------------------------ linear recurrence


@pytest.mark.parametrize("T,chunk", [(12, 4), (11, 4), (7, 16)])
def test_chunked_linear_scan_equals_step_recurrence_and_quadratic_form(T, chunk):
    ks = jax.random.split(jax.random.key(T), 5)
    B, H, K, D = 2, 4, 2, 3
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, D))
    log_decay = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, K)))
    s0 = jax.random.normal(ks[4], (B, K, D, D))
    chunked = jax.jit(chunked_linear_attention, static_argnames="chunk_size")
    o, s = chunked(q, k, v, log_decay, s0, chunk_size=chunk)

    def step(state, xs):
        out, state = linear_attention_step(*xs, state)
        return state, out

    state, steps = jax.lax.scan(step, s0, (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                           log_decay.swapaxes(0, 1)))
    np.testing.assert_allclose(o, steps.swapaxes(0, 1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s, state, atol=1e-5, rtol=1e-5)
    quadratic = jax.jit(quadratic_linear_attention)
    np.testing.assert_allclose(o, quadratic(q, k, v, log_decay, s0), atol=1e-5, rtol=1e-5)

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2, 3, 4)))

    g1 = loss(lambda *b: chunked_linear_attention(*b, chunk_size=chunk)[0])(q, k, v, log_decay,
                                                                              s0)
    g2 = loss(quadratic_linear_attention)(q, k, v, log_decay, s0)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_linear_recurrence_model_same_for_any_segmentation(params):
    memory = LinearRecurrence(chunk_size=4)
    mparams, axes = init_memory_params(memory, CFG, jax.random.key(12))
    assert axes["layers"]["decay"] == ("layers", "embed", "kv_heads")
    tokens = tokens_of(jax.random.key(13), 2, 10)
    whole, s1 = run(params, tokens, CFG, memory=memory, segment_len=10, memory_params=mparams)
    for segment_len in (1, 3):  # 1: the step form, as in decoding; 3: padded last segment
        got, s2 = run(params, tokens, CFG, memory=memory, segment_len=segment_len,
                      memory_params=mparams)
        np.testing.assert_allclose(got, whole, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(s2["memory"]["layers"]["S"], s1["memory"]["layers"]["S"],
                                   atol=1e-5)


# --------------------------------------------------------------------------------- errors


def test_memory_that_does_not_fit_the_model_raises(params):
    memory = RecurrentMemory(num_mem_tokens=2)
    other = dataclasses.replace(CFG, hidden_size=16)
    mparams, _ = init_memory_params(memory, other, jax.random.key(0))
    tokens = tokens_of(jax.random.key(0), 1, 8)
    with pytest.raises(ValueError, match=r"RecurrentMemory.*hidden_size=32"):
        run_segments(params, tokens, CFG, memory=memory, segment_len=8, memory_params=mparams)
    with pytest.raises(ValueError, match="init_memory_params"):
        run_segments(params, tokens, CFG, memory=CompressiveMemory(), segment_len=8)
    alibi = dataclasses.replace(CFG, positions=PositionConfig(type="alibi"))
    with pytest.raises(ValueError, match=r"KNNMemory.*alibi"):
        run_segments(params, tokens, alibi, memory=KNNMemory(capacity=8, k=2), segment_len=8)
    with pytest.raises(ValueError, match="capacity"):
        run_segments(params, tokens, CFG, memory=KNNMemory(capacity=4, k=2), segment_len=8)
    with pytest.raises(ValueError, match="k=5"):
        KNNMemory(capacity=4, k=5)
