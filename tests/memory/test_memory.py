"""Segment recurrence: segment_scan (resets, truncated BPTT, gradients) and run_segments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.memory import (NoMemory, TransformerXL, init_memory_state, run_segments,
                        segment_scan)
from lcm.model import forward

from memory_common import CFG, run, tiny_params, tokens_of


@pytest.fixture(scope="module")
def params():
    return tiny_params()


# ------------------------------------------------------------------------------ segment_scan


def _toy_step(w):
    def step(m, x):
        m = jnp.tanh(m @ w + x)
        return m, m.sum(-1)
    return step


def test_segment_scan_gradients_equal_unrolled():
    w = jax.random.normal(jax.random.key(1), (3, 3)) * 0.5
    xs = jax.random.normal(jax.random.key(2), (5, 2, 3))
    m0 = jnp.ones((2, 3))

    def scanned(w, bptt):
        m, outs = segment_scan(_toy_step(w), m0, xs, bptt_segments=bptt)
        return (outs ** 2).sum() + m.sum()

    def unrolled(w, bptt):
        m, total = m0, 0.0
        for n in range(xs.shape[0]):
            if bptt is not None and n > 0 and n % bptt == 0:
                m = jax.lax.stop_gradient(m)
            m, out = _toy_step(w)(m, xs[n])
            total += (out ** 2).sum()
        return total + m.sum()

    for bptt in (None, 2):
        np.testing.assert_allclose(scanned(w, bptt), unrolled(w, bptt), rtol=1e-6)
        np.testing.assert_allclose(jax.grad(scanned)(w, bptt), jax.grad(unrolled)(w, bptt),
                                   rtol=1e-5, atol=1e-6)
    # Truncation changes the gradient (so the test above could fail).
    assert np.abs(jax.grad(scanned)(w, None) - jax.grad(scanned)(w, 2)).max() > 1e-4


def test_segment_scan_resets_per_example():
    w = jnp.eye(3)
    xs = jnp.ones((4, 2, 3))
    sos = jnp.array([[False, False], [False, True], [False, False], [True, False]])
    _, outs = segment_scan(lambda m, x: (m + x, m.sum(-1)), jnp.zeros((2, 3)), xs,
                           start_of_sequence=sos)
    # Example 0 resets before segment 3, example 1 before segment 1.
    np.testing.assert_array_equal(outs, [[0, 0], [3, 0], [6, 3], [0, 6]])
    del w


def test_segment_scan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bptt_segments"):
        segment_scan(lambda m, x: (m, x), jnp.zeros((2,)), jnp.ones((3, 2)), bptt_segments=0)
    with pytest.raises(ValueError, match="start_of_sequence"):
        segment_scan(lambda m, x: (m, x), jnp.zeros((2,)), jnp.ones((3, 2)),
                     start_of_sequence=jnp.ones((2, 3), bool))


# ------------------------------------------------------------------------------ run_segments


@pytest.mark.parametrize("seq,segment_len", [(24, 8), (21, 8)])
def test_xl_with_long_memory_equals_full_causal_attention(params, seq, segment_len):
    tokens = tokens_of(jax.random.key(3), 2, seq)
    want = forward(params, tokens, CFG)
    got, state = run(params, tokens, CFG, memory=TransformerXL(mem_len=32),
                     segment_len=segment_len)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(state["position"], [seq, seq])
    targets = jnp.roll(tokens, -1, axis=1)
    logp, _ = run(params, tokens, CFG, memory=TransformerXL(mem_len=32), segment_len=segment_len,
                  targets=targets)
    want_logp = jnp.take_along_axis(jax.nn.log_softmax(want), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp, want_logp, atol=2e-5, rtol=2e-5)


def test_xl_sliding_window_model_equals_forward(params):
    cfg = dataclasses.replace(CFG, sliding_window=6)
    tokens = tokens_of(jax.random.key(4), 1, 24)
    got, _ = run(params, tokens, cfg, memory=TransformerXL(mem_len=8), segment_len=8)
    np.testing.assert_allclose(got, forward(params, tokens, cfg), atol=2e-5, rtol=2e-5)


def test_short_xl_memory_forgets_and_no_memory_sees_one_segment(params):
    tokens = tokens_of(jax.random.key(5), 1, 32)
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % CFG.vocab_size)
    for memory, sees in ((TransformerXL(mem_len=8), 24), (NoMemory(), 8)):
        a, _ = run(params, tokens, CFG, memory=memory, segment_len=8)
        b, _ = run(params, changed, CFG, memory=memory, segment_len=8)
        # Each of the 2 layers reaches one cached segment further back: segments 0-2 see token
        # 0, segment 3 does not.
        assert np.abs(np.asarray(a[:, :sees] - b[:, :sees])).max() > 1e-4
        np.testing.assert_allclose(a[:, sees:], b[:, sees:], atol=1e-6)


def test_resuming_after_a_padded_segment_equals_one_call(params):
    tokens = tokens_of(jax.random.key(6), 2, 24)
    memory = TransformerXL(mem_len=32)
    whole, final = run(params, tokens, CFG, memory=memory, segment_len=8)
    first, state = run(params, tokens[:, :13], CFG, memory=memory, segment_len=8)
    np.testing.assert_array_equal(state["position"], [13, 13])
    # 13 = one full segment + 5 padded: the padding is masked, so the second call continues
    # exactly (with a memory that holds the whole sequence, segmentation does not matter).
    second, state = run(params, tokens[:, 13:], CFG, memory=memory, segment_len=8, state=state)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(state["position"], final["position"])


@pytest.mark.slow
@pytest.mark.parametrize("memory", [TransformerXL(mem_len=16), NoMemory()])
def test_start_of_sequence_makes_concatenation_equal_separate_runs(params, memory):
    a, b = tokens_of(jax.random.key(7), 1, 16), tokens_of(jax.random.key(8), 1, 8)
    # Example 0: document a then document b; example 1: b then a.
    tokens = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)], 0)
    sos = jnp.array([[True, False, True], [True, True, False]])
    got, _ = run(params, tokens, CFG, memory=memory, segment_len=8, start_of_sequence=sos)
    la, _ = run(params, a, CFG, memory=memory, segment_len=8)
    lb, _ = run(params, b, CFG, memory=memory, segment_len=8)
    np.testing.assert_allclose(got[0], jnp.concatenate([la, lb], 1)[0], atol=2e-5)
    np.testing.assert_allclose(got[1], jnp.concatenate([lb, la], 1)[0], atol=2e-5)


@pytest.mark.slow
def test_gradients_through_run_segments_equal_unrolled_calls(params):
    tokens = tokens_of(jax.random.key(9), 1, 24)
    memory = TransformerXL(mem_len=8)

    def loss_scan(p):
        return run(p, tokens, CFG, memory=memory, segment_len=8)[0].std()

    def loss_unrolled(p):
        state, outs = None, []
        for i in range(3):
            out, state = run(p, tokens[:, 8 * i:8 * i + 8], CFG, memory=memory, segment_len=8,
                             state=state, remat=False)
            outs.append(out)
        return jnp.concatenate(outs, 1).std()

    g1, g2 = jax.grad(loss_scan)(params), jax.grad(loss_unrolled)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_run_segments_rejects_bad_arguments(params):
    tokens = tokens_of(jax.random.key(0), 2, 16)
    with pytest.raises(ValueError, match="segment_len"):
        run_segments(params, tokens, CFG, memory=None, segment_len=0)
    with pytest.raises(ValueError, match="memory="):
        run_segments(params, tokens, CFG, memory="xl", segment_len=8)
    with pytest.raises(ValueError, match="start_of_sequence"):
        run_segments(params, tokens, CFG, memory=None, segment_len=8,
                     start_of_sequence=jnp.ones((2, 3), bool))
    state = init_memory_state(TransformerXL(mem_len=8), CFG, batch=2)
    with pytest.raises(ValueError, match="state does not fit"):
        run_segments(params, tokens, CFG, memory=TransformerXL(mem_len=4), segment_len=8,
                     state=state)
    with pytest.raises(ValueError, match="mem_len"):
        TransformerXL(mem_len=0)
