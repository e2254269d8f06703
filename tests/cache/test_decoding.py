"""Compression while decoding: periodic (kvpress DecodingPress) and stepwise (H2O, TOVA,
StreamingLLM) policies inside decode_step and generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (H2O, TOVA, AdaKV, Decoding, Knorm, ObservedAttention, SnapKV,
                       StreamingLLM, decode_step, generate, prefill)
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, 61, dtype=jnp.int32)
LENGTHS = jnp.asarray([24, 17])
NEXT = jax.random.randint(jax.random.key(2), (2, 9), 0, 61, dtype=jnp.int32)


def run(policy, steps, *, prefill_policy=None, room=20):
    _, cache = prefill(PARAMS, TOKENS, CFG, lengths=LENGTHS, max_new_tokens=room,
                       policy=prefill_policy)
    out = []
    for t in range(steps):
        logits, cache = decode_step(PARAMS, cache, NEXT[:, t], CFG, policy=policy)
        out.append((logits, cache))
    return out


def kept(cache, layer, row):
    k = np.asarray(cache.kept_positions(layer)[row])
    return [set(h[h >= 0].tolist()) for h in k]


def test_periodic_knorm_compresses_every_interval_to_the_target():
    plain = run(None, 4)
    periodic = run(Decoding(Knorm(), compression_interval=4, target_size=12), 5)
    lengths = [np.asarray(c.length[0, :, 0]).tolist() for _, c in periodic]
    assert lengths == [[25, 18], [26, 19], [27, 20], [12, 12], [13, 13]]
    for t in range(4):  # nothing is evicted before the 4th step's attention
        np.testing.assert_allclose(periodic[t][0], plain[t][0], atol=1e-5)
    # At step 4 each head keeps 12 keys, none of larger norm than an evicted one (repeated
    # token ids give equal norms in layer 0, so compare norms, not sets); the cache before
    # eviction is the uncompressed one after 4 steps.
    full = plain[3][1]
    for layer in range(CFG.num_layers):
        norms = np.linalg.norm(np.asarray(full.k[layer]), axis=-1)
        for row in range(2):
            n = int(full.length[layer, row, 0])
            for head in range(CFG.num_kv_heads):
                by_pos = dict(zip(np.asarray(full.pos[layer, row, head, :n]).tolist(),
                                  norms[row, head, :n].tolist()))
                keep = kept(periodic[3][1], layer, row)[head]
                assert len(keep) == 12 and keep <= set(by_pos)
                evicted = set(by_pos) - keep
                assert max(by_pos[p] for p in keep) <= min(by_pos[p] for p in evicted) + 1e-6
    assert int(periodic[3][1].step) == 0 and int(periodic[4][1].step) == 1


def test_periodic_snapkv_observes_the_buffered_queries():
    steps = run(Decoding(SnapKV(window_size=2), compression_interval=3, target_size=10), 3)
    cache = steps[-1][1]
    assert cache.queries.shape == (2, 2, 2, 4, 8)
    assert (np.asarray(cache.query_pos) == -1).all()  # emptied by the compression
    for layer in range(CFG.num_layers):
        for row, n in enumerate((27, 20)):
            for head_kept in kept(cache, layer, row):
                assert len(head_kept) == 10 and {n - 2, n - 1} <= head_kept  # window kept


def test_stepwise_streaming_keeps_sinks_and_recent_tokens():
    steps = run(StreamingLLM(budget=10), 5)
    cache = steps[-1][1]
    assert kept(cache, 1, 0) == [set(range(4)) | set(range(23, 29))] * 2
    assert kept(cache, 0, 1) == [set(range(4)) | set(range(16, 22))] * 2


def test_stepwise_h2o_keeps_recent_window_and_accumulates():
    policy = H2O(hh_size=4, recent_size=6)
    steps = run(policy, 4, prefill_policy=policy)
    for t, (logits, cache) in enumerate(steps):
        assert np.isfinite(np.asarray(logits)).all()
        np.testing.assert_array_equal(cache.length, 10)
        newest = 24 + t
        for head_kept in kept(cache, 0, 0):
            assert set(range(newest - 5, newest + 1)) <= head_kept
    before, after = steps[-2][1], steps[-1][1]
    for head in range(CFG.num_kv_heads):  # scores of surviving entries only grow
        b = dict(zip(np.asarray(before.pos[0, 0, head]).tolist(),
                     np.asarray(before.score[0, 0, head]).tolist()))
        for p, s in zip(np.asarray(after.pos[0, 0, head]).tolist(),
                        np.asarray(after.score[0, 0, head]).tolist()):
            if p in b:
                assert s >= b[p] - 1e-6


def test_stepwise_tova_holds_its_budget_and_keeps_the_newest():
    steps = run(TOVA(budget=9), 3)
    for t, (_, cache) in enumerate(steps):
        np.testing.assert_array_equal(cache.length, 9)
        assert all(24 + t in h for h in kept(cache, 1, 0))


@pytest.mark.parametrize("base,buffer,size", [
    (ObservedAttention(), 256, 8), (ObservedAttention(), 3, 4), (ObservedAttention(), 0, 1),
    (SnapKV(window_size=2), 256, 2), (SnapKV(window_size=6), 3, 4), (Knorm(), 3, None)])
def test_query_buffer_holds_the_last_buffer_size_plus_one_steps(base, buffer, size):
    """kvpress's hidden_states_buffer_size: a compression sees the last buffer + 1 steps."""
    policy = Decoding(base, compression_interval=8, target_size=12,
                      hidden_states_buffer_size=buffer)
    logits, cache = run(policy, 5)[-1]
    if size is None:
        assert cache.queries is None
        return
    assert cache.queries.shape == (CFG.num_layers, 2, size, CFG.num_heads, CFG.head_dim)
    want = [[-1] * (size - min(size, 5)) + list(range(n + 5 - min(size, 5), n + 5))
            for n in (24, 17)]
    np.testing.assert_array_equal(cache.query_pos, want)


def test_periodic_adakv_heads_share_the_row_budget_as_at_prefill():
    """Decoding(AdaKV(Knorm())) after its first compression keeps what prefill's AdaKV keeps
    from the same tokens (Knorm scores keys alone): heads win unequal shares of 2 x 10."""
    steps = run(Decoding(AdaKV(Knorm()), compression_interval=3, target_size=10), 3, room=30)
    cache = steps[-1][1]
    np.testing.assert_array_equal(cache.length.sum(-1), 20)
    assert np.any(cache.length[..., 0] != cache.length[..., 1])
    rows = [np.concatenate([np.asarray(TOKENS[r, :n]), np.asarray(NEXT[r, :3])])
            for r, n in enumerate([24, 17])]
    tokens = np.zeros((2, 27), np.int32)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row
    _, want = prefill(PARAMS, jnp.asarray(tokens), CFG, lengths=jnp.asarray([27, 20]),
                      policy=AdaKV(Knorm(budget=10)), layout="uniform")
    for layer in range(CFG.num_layers):
        for row in range(2):
            assert kept(cache, layer, row) == kept(want, layer, row), (layer, row)


@pytest.mark.parametrize("decode_policy", [
    Decoding(Knorm(), compression_interval=3, target_size=10), H2O(hh_size=4, recent_size=6),
    Decoding(SnapKV(window_size=2, gqa="query_head"), compression_interval=3, target_size=10),
    Decoding(AdaKV(Knorm()), compression_interval=3, target_size=10)],
    ids=["Decoding", "H2O", "Decoding-query_head", "Decoding-AdaKV"])
def test_generate_with_decode_policy_equals_decode_steps(decode_policy):
    policy = decode_policy if isinstance(decode_policy, H2O) else None
    tokens, count = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=6,
                             policy=policy, decode_policy=decode_policy)
    logits, cache = prefill(PARAMS, TOKENS, CFG, lengths=LENGTHS, policy=policy,
                            max_new_tokens=13)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    want = [token]
    for _ in range(5):
        logits, cache = decode_step(PARAMS, cache, token, CFG, policy=decode_policy)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        want.append(token)
    np.testing.assert_array_equal(tokens, np.stack(want, 1))
    np.testing.assert_array_equal(count, [6, 6])


def test_decode_policy_errors():
    _, cache = prefill(PARAMS, TOKENS, CFG, max_new_tokens=2)
    with pytest.raises(ValueError, match="budget"):
        decode_step(PARAMS, cache, NEXT[:, 0], CFG, policy=TOVA(0.5))
    with pytest.raises(ValueError, match="capacity"):
        decode_step(PARAMS, cache, NEXT[:, 0], CFG, policy=StreamingLLM(budget=40))
    with pytest.raises(ValueError, match="capacity"):
        decode_step(PARAMS, cache, NEXT[:, 0], CFG, policy=Decoding(Knorm(), 8, 24))
    with pytest.raises(ValueError, match="score accumulators"):
        decode_step(PARAMS, cache, NEXT[:, 0], CFG, policy=H2O(hh_size=2, recent_size=4))
    with pytest.raises(ValueError, match="decode policy"):
        decode_step(PARAMS, cache, NEXT[:, 0], CFG, policy=Knorm(0.5))
