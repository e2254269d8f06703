"""EM-LLM event boundaries and InfLLM representative tokens for RetrievedBlocks, against NumPy
statements of the two methods' rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.memory import RetrievedBlocks
from lcm.memory.base import SegmentContext
from lcm.memory.events import block_representatives
from lcm.model import forward
from lcm.positions import apply_rope, rope_frequencies

from memory_common import CFG, run, tiny_params, tokens_of


def np_event_starts(surprise, known, segment_len, *, gamma, window, min_size, max_size):
    """EM-LLM's rule, one token at a time: a segment's threshold is mean + gamma * std (ddof 1)
    of the last `window` known surprises before it (its own on the first segment)."""
    n = len(surprise)
    starts, run, history = np.zeros(n, bool), max_size, []
    for a in range(0, n, segment_len):
        own = [s for s, k in zip(surprise[a:a + segment_len], known[a:a + segment_len]) if k]
        ref = history[-window:] if history else own
        threshold = np.mean(ref) + gamma * np.std(ref, ddof=1) if len(ref) >= 2 else np.inf
        for t in range(a, min(a + segment_len, n)):
            if run >= max_size or (known[t] and surprise[t] > threshold and run >= min_size):
                starts[t], run = True, 1
            else:
                run += 1
        history += own
    return starts


def em_llm_block_sizes(divide, min_size, max_size):
    """The closed blocks EM-LLM's update_memory forms from a divide array (context_manager.py,
    the `acc_b` loop), restated: cut at max_size, merge pieces shorter than min_size forward,
    keep the last piece open."""
    idx = np.concatenate([[0], np.flatnonzero(divide), [len(divide)]])
    sizes = [b for b in np.diff(idx) if b != 0]
    blocks, acc = [], 0
    for i, b in enumerate(sizes):
        acc += b
        while acc >= max_size:
            blocks.append(max_size)
            acc -= max_size
        if acc < min(min_size, len(divide)):
            continue
        if acc > 0 and i != len(sizes) - 1:
            blocks.append(acc)
        acc = 0
    return blocks


def _events_over(memory, surprise, known, segment_len):
    """Runs update_events segment by segment over [B, N] surprises; returns the starts."""
    B, N = surprise.shape
    events = memory.init(CFG, B, {})["carried"]
    for a in range(0, N, segment_len):
        positions = a + jnp.broadcast_to(jnp.arange(segment_len), (B, segment_len))
        events = memory.update_events(events, jnp.asarray(surprise[:, a:a + segment_len]),
                                      jnp.asarray(known[:, a:a + segment_len]),
                                      jnp.ones((B, segment_len), bool), positions)
    return np.asarray(events["start"][:, :N])


def test_boundaries_follow_em_llm_rule_on_given_surprise():
    memory = RetrievedBlocks(capacity=96, block_size=8, boundaries="surprise", min_block_size=3,
                             surprise_gamma=0.5, surprise_window=12)
    rng = np.random.default_rng(0)
    spiky = rng.exponential(1.0, 96) + 6.0 * (rng.random(96) < 0.15)
    merging = np.tile([9.0, 0.1, 9.0, 0.1, 0.1, 0.1], 16)  # spikes closer than min_block_size
    constant = np.full(96, 2.5)
    surprise = np.stack([spiky, merging, constant]).astype(np.float32)
    known = np.ones_like(surprise, bool)
    known[0, 40:45] = False  # e.g. the end of a previous call: no surprise there
    got = _events_over(memory, surprise, known, 16)
    for b in range(3):
        want = np_event_starts(surprise[b], known[b], 16, gamma=0.5, window=12, min_size=3,
                               max_size=8)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")
    # A constant surprise never crosses mean + gamma * std: fixed blocks of block_size.
    np.testing.assert_array_equal(np.flatnonzero(got[2]), np.arange(0, 96, 8))
    assert len(np.flatnonzero(got[0])) > 12  # the spikes did cut events
    # The streaming rule forms the blocks EM-LLM's acc_b loop forms from the same divides.
    for divide in (surprise[1] > 5, rng.random(96) < 0.3, np.zeros(96, bool)):
        starts = _events_over(memory, np.where(divide, 1e3, 0.0)[None].astype(np.float32),
                              np.ones((1, 96), bool), 96)[0]
        streamed = np.diff(np.flatnonzero(starts)).tolist()  # closed events
        blocks = em_llm_block_sizes(divide, 3, 8)  # a full last block counts as closed there
        assert streamed == blocks[:len(streamed)] and len(streamed) >= len(blocks) - 1


@pytest.mark.slow
def test_event_blocks_end_to_end():
    params = tiny_params()
    tokens = tokens_of(jax.random.key(1), 2, 40)
    events = RetrievedBlocks(capacity=48, block_size=8, init_blocks=1, local_blocks=1, top_k=2,
                             boundaries="surprise", min_block_size=2, surprise_gamma=0.0,
                             surprise_window=8)
    logits, state = run(params, tokens, CFG, memory=events, segment_len=8)
    # The starts equal the NumPy rule over the surprise of the logits run_segments returned.
    logp = jax.nn.log_softmax(logits, -1)
    surprise = -np.take_along_axis(np.asarray(logp[:, :-1]), np.asarray(tokens[:, 1:, None]),
                                   -1)[..., 0]
    surprise = np.pad(surprise, ((0, 0), (0, 1)))
    known = np.arange(40) < 39
    starts = np.asarray(state["memory"]["carried"]["start"])
    for b in range(2):
        want = np_event_starts(surprise[b], known, 8, gamma=0.0, window=8, min_size=2,
                               max_size=8)
        np.testing.assert_array_equal(starts[b, :40], want)
    assert 5 < starts[:, :40].sum(1).min() and not starts[:, 40:].any()
    # Where no boundary fires the events are fixed blocks of block_size: the token-level path
    # gives the fixed-block path's logits.
    none = RetrievedBlocks(capacity=48, block_size=8, init_blocks=1, local_blocks=1, top_k=2,
                           boundaries="surprise", surprise_gamma=1e9, surprise_window=8)
    fixed = RetrievedBlocks(capacity=48, block_size=8, init_blocks=1, local_blocks=1, top_k=2)
    got, _ = run(params, tokens, CFG, memory=none, segment_len=8)
    want, _ = run(params, tokens, CFG, memory=fixed, segment_len=8)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert np.abs(np.asarray(logits - want)[:, 24:]).max() > 1e-4  # events change the picks


@pytest.mark.slow
def test_event_blocks_with_room_for_every_event_equal_full_attention():
    params = tiny_params()
    tokens = tokens_of(jax.random.key(2), 2, 40)
    memory = RetrievedBlocks(capacity=48, block_size=8, local_blocks=0, top_k=16,
                             clip_positions=False, boundaries="surprise", min_block_size=2,
                             surprise_gamma=0.0, surprise_window=8, repr_tokens=2)
    got, state = run(params, tokens, CFG, memory=memory, segment_len=8)
    np.testing.assert_allclose(got, forward(params, tokens, CFG), atol=2e-5, rtol=2e-5)
    assert state["memory"]["carried"]["start"].sum() > 10


def test_representatives_are_infllm_top_scored_keys():
    rng = np.random.default_rng(1)
    B, C, K, D, n, r = 2, 20, 2, 3, 6, 2
    keys = rng.normal(size=(B, C, K, D)).astype(np.float32)
    score = rng.random((B, C, K)).astype(np.float32)
    ids = np.sort(rng.integers(0, n, (B, C)), axis=1)
    valid = rng.random((B, C)) < 0.8
    reps = jax.jit(block_representatives, static_argnums=(3, 5))
    got = np.asarray(reps(keys, valid, ids, n, score, r))
    mean = np.asarray(reps(keys, valid, ids, n, None, None))
    for b in range(B):
        for j in range(n):
            members = np.flatnonzero((ids[b] == j) & valid[b])
            for h in range(K):
                best = members[np.argsort(-score[b, members, h], kind="stable")[:r]]
                want = keys[b, best, h].mean(0) if len(best) else np.zeros(D)
                np.testing.assert_allclose(got[b, j, h], want, atol=1e-6)
                want = keys[b, members, h].mean(0) if len(members) else np.zeros(D)
                np.testing.assert_allclose(mean[b, j, h], want, atol=1e-6)


def test_representative_scores_are_attention_received_in_the_local_window():
    memory = RetrievedBlocks(capacity=16, block_size=4, init_blocks=0, local_blocks=2, top_k=1,
                             repr_tokens=2)
    B, T, H, K, D, past = 1, 4, 4, 2, 8, 8  # 8 stored tokens: all in the local window
    rng = np.random.default_rng(2)
    q, k, v, store_k = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in
                        ((B, T, H, D), (B, T, K, D), (B, T, K, D), (B, 16, K, D)))
    state = {"k": store_k, "v": jnp.zeros_like(store_k),
             "valid": jnp.asarray(np.arange(16) < past)[None],
             "score": jnp.zeros((B, 16, K), jnp.float32)}
    inv_freq, factor = rope_frequencies(CFG.rope, D)
    positions = past + jnp.arange(T)[None]
    ctx = SegmentContext(cfg=CFG, positions=positions, valid=jnp.ones((B, T), bool),
                         inv_freq=inv_freq, attention_factor=factor, shard=lambda x, a: x)
    layer = jax.jit(lambda s, q, k, v: memory.carried_layer(s, None, {}, None, q, k, v, ctx))
    _, new, _ = layer(state, q, k, v)
    # NumPy: each query head's softmax over the 8 stored keys and the segment's causal keys.
    rot = lambda x, p: np.asarray(apply_rope(x, p, inv_freq, factor))  # noqa: E731
    keys = np.concatenate([rot(store_k[:, :past], jnp.arange(past)[None]), rot(k, positions)], 1)
    qr = rot(q, positions)
    want = np.zeros((past + T, K))
    for h in range(H):
        logits = qr[0, :, h] @ keys[0, :, h // (H // K)].T / np.sqrt(D)  # [T, past + T]
        logits[:, past:] = np.where(np.tri(T, dtype=bool), logits[:, past:], -np.inf)
        p = np.exp(logits - logits.max(1, keepdims=True))
        want[:, h // (H // K)] += (p / p.sum(1, keepdims=True)).sum(0)
    np.testing.assert_allclose(np.asarray(new["score"][0, :past + T]), want, atol=1e-5)
    assert not np.asarray(new["score"][0, past + T:]).any()


def test_event_options_are_checked():
    with pytest.raises(ValueError, match="boundaries='events'"):
        RetrievedBlocks(capacity=16, block_size=4, boundaries="events")
    with pytest.raises(ValueError, match="min_block_size=5"):
        RetrievedBlocks(capacity=16, block_size=4, min_block_size=5, boundaries="surprise")
    with pytest.raises(ValueError, match="repr_tokens=0"):
        RetrievedBlocks(capacity=16, block_size=4, repr_tokens=0)
    with pytest.raises(ValueError, match="surprise_window=None"):
        RetrievedBlocks(capacity=16, block_size=4, local_blocks=0, boundaries="surprise",
                        min_block_size=2)
    pallas = dataclasses.replace(CFG, attention=dataclasses.replace(CFG.attention, impl="pallas"))
    events = RetrievedBlocks(capacity=16, block_size=4, boundaries="surprise", min_block_size=2)
    with pytest.raises(ValueError, match="impl='pallas'"):
        run(tiny_params(), tokens_of(jax.random.key(0), 1, 8), pallas, memory=events,
            segment_len=4)
    with pytest.raises(ValueError, match="surprise_gamma"):
        RetrievedBlocks(capacity=16, block_size=4, surprise_gamma="high")
