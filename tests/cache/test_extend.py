"""`extend`: several tokens appended to a cache in one call equal forward on the concatenation
(with free slots) and decode_step token by token (any layout and press, with or without room),
for padded rows too; multi-turn reuse; argument errors. Chunked prefill (`prefill_chunk`)
equals the one-shot prefill, with and without a press."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (H2O, AdaKV, ExpectedAttention, Knorm, ObservedAttention, PyramidKV,
                       SnapKV, StreamingLLM, decode_step, extend, prefill)
from lcm.cache import kv
from lcm.cache.extend import extend_jit
from lcm.cache.prefill import decode_step_jit
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
fwd = jax.jit(forward, static_argnames=("cfg",))


def setup(seed=0, cfg=CFG, batch=2, seq=24):
    params = init_params(cfg, jax.random.key(seed))[0]
    return params, jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, cfg.vocab_size,
                                      dtype=jnp.int32)


def decode_each(params, cache, tokens, cfg, counts):
    """decode_step token by token (jitted: a full head replaces its oldest entry), each row
    alone, for its count of tokens."""
    rows = []
    for b in range(tokens.shape[0]):
        one = _row(cache, b)
        logits = []
        for t in range(int(counts[b])):
            lg, one = decode_step_jit(params, one, tokens[b:b + 1, t], cfg=cfg, policy=None)
            logits.append(lg[0])
        rows.append((jnp.stack(logits) if logits else None, one))
    return rows


def _row(cache, b):
    """Row b of a cache as a batch of one (the batch axis: 0 for next_pos and a layered
    cache's entries, 1 otherwise)."""
    def take(name):
        x = getattr(cache, name)
        if x is None:
            return None
        axis = 0 if name == "next_pos" or (cache.layer_slots is not None and name != "length") \
            else 1
        return jax.lax.slice_in_dim(x, b, b + 1, axis=axis)
    return cache.replace(**{f: take(f) for f in
                            ("k", "v", "pos", "length", "next_pos", "score", "head")})


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 6},
                                     {"attn_softcap": 5.0, "attn_sinks": True}])
def test_extend_equals_forward_with_free_slots(variant):
    cfg = dataclasses.replace(CFG, **variant)
    params, seq = setup(cfg=cfg)
    if variant.get("attn_sinks"):  # non-zero sink logits so that they matter
        params["layers"]["sinks"] = jnp.linspace(-1.0, 2.0, 12).reshape(3, 4)
    want = fwd(params, seq, cfg)
    _, cache = prefill(params, seq[:, :9], cfg, max_new_tokens=15)
    logits, cache = extend(params, cache, seq[:, 9:16], cfg)
    np.testing.assert_allclose(logits, want[:, 9:16], atol=3e-5, rtol=3e-5)
    # rows with different real counts: row 1's padding is neither written nor counted
    logits, cache = extend(params, cache, seq[:, 16:24], cfg, lengths=jnp.array([8, 5]))
    np.testing.assert_allclose(logits[0], want[0, 16:24], atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(logits[1, :5], want[1, 16:21], atol=3e-5, rtol=3e-5)
    np.testing.assert_array_equal(cache.next_pos, [24, 21])
    last, _ = extend(params, cache, seq[:, :1], cfg, all_logits=False)
    assert last.shape == (2, cfg.vocab_size)


POLICIES = {"none": None, "query_head": SnapKV(0.5, window_size=4, gqa="query_head"),
            "pyramidkv": PyramidKV(0.5, window_size=4, beta=2),
            "adakv": AdaKV(Knorm(0.5)),
            "streaming_cache": StreamingLLM(0.5, n_sink=2, positions="cache"),
            "h2o": H2O(3, 6)}


@pytest.mark.parametrize("name", list(POLICIES))
def test_extend_equals_decode_steps(name, room=2):
    """Any press's cache, overflowing under jit (each new token past the room replaces the
    oldest entry; free slots are covered by the forward test above)."""
    params, seq = setup(seed=3)
    cfg = dataclasses.replace(CFG, sliding_window=7) if name == "none" else CFG
    _, cache = prefill(params, seq[:, :12], cfg, policy=POLICIES[name], max_new_tokens=room)
    counts = np.array([6, 4])
    logits, got = extend_jit(params, cache, seq[:, 12:18], jnp.asarray(counts, jnp.int32),
                             cfg=cfg)
    for b, (want, one) in enumerate(decode_each(params, cache, seq[:, 12:18], cfg, counts)):
        np.testing.assert_allclose(logits[b, :counts[b]], want, atol=3e-5, rtol=3e-5)
        mine = _row(got, b)
        for layer in range(cfg.num_layers):
            np.testing.assert_array_equal(mine.kept_positions(layer), one.kept_positions(layer))
        assert int(mine.next_pos[0]) == int(one.next_pos[0])


def test_second_turn_equals_both_turns_prefilled():
    """Multi-turn reuse: a question appended to the first turn's cache gives the logits of
    prefilling both turns at once."""
    params, seq = setup(seed=5, batch=1, seq=30)
    both, _ = prefill(params, seq, CFG, all_logits=True)
    _, cache = prefill(params, seq[:, :20], CFG, max_new_tokens=10)
    logits, _ = extend(params, cache, seq[:, 20:], CFG)
    np.testing.assert_allclose(logits, both[:, 20:], atol=3e-5, rtol=3e-5)


def test_a_full_cache_grows_with_one_warning(monkeypatch):
    """prefill's default leaves no free slot: the eager decode_step / extend grow a full
    uniform cache (warning once) instead of evicting, so decoding equals forward."""
    monkeypatch.setattr(kv, "_warned", set())
    params, seq = setup(seed=9, seq=14)
    want = fwd(params, seq, CFG)
    _, cache = prefill(params, seq[:, :10], CFG)
    assert cache.capacity == 10
    with pytest.warns(UserWarning, match="the KV cache is full .10 slots per head.; it grows"):
        logits, cache = decode_step(params, cache, seq[:, 10], CFG)
    np.testing.assert_allclose(logits, want[:, 10], atol=3e-5, rtol=3e-5)
    assert cache.capacity == 74
    logits, cache = extend(params, cache, seq[:, 11:], CFG)
    np.testing.assert_allclose(logits, want[:, 11:], atol=3e-5, rtol=3e-5)
    _, small = prefill(params, seq[:, :10], CFG, policy=PyramidKV(0.5, window_size=2, beta=2))
    with pytest.warns(UserWarning, match="layered KV cache is full; each new token replaces"):
        decode_step(params, small, seq[:, 10], CFG)


def test_errors():
    params, seq = setup()
    _, cache = prefill(params, seq[:, :8], CFG, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"tokens: shape \(2,\)"):
        extend(params, cache, seq[:, 0], CFG)
    with pytest.raises(ValueError, match=r"tokens: shape \(1, 3\)"):
        extend(params, cache, seq[:1, :3], CFG)
    with pytest.raises(ValueError, match=r"lengths=\[4, 5\]; expected every length in \[0, 4\]"):
        extend(params, cache, seq[:, :4], CFG, lengths=jnp.array([4, 5]))
    with pytest.raises(ValueError, match="holds id 61"):
        extend(params, cache, jnp.full((2, 2), 61, jnp.int32), CFG)
    with pytest.raises(ValueError, match="extend needs a KVCache"):
        extend(params, {"k": 1}, seq[:, :2], CFG)


CHUNKED = {"none_sliding": None, "observed": ObservedAttention(0.5),
           "expected": ExpectedAttention(0.5, n_sink=2),
           "pyramidkv": PyramidKV(0.5, window_size=4, beta=2), "adakv": AdaKV(SnapKV(0.5, 4))}


@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunked_prefill_equals_one_shot(name):
    """prefill_chunk runs 5 tokens at a time (the last chunk partial, rows of different
    lengths); the statistics the presses gather chunk by chunk (attention sums, query moments,
    the last window) give the one-shot cache."""
    cfg = dataclasses.replace(CFG, sliding_window=6) if name == "none_sliding" else CFG
    params, seq = setup(seed=7, cfg=cfg, seq=27)
    lengths = jnp.array([27, 19])
    policy = CHUNKED[name]
    want, one = prefill(params, seq, cfg, policy=policy, lengths=lengths, max_new_tokens=3,
                        all_logits=policy is None)
    got, chunked = prefill(params, seq, cfg, policy=policy, lengths=lengths, max_new_tokens=3,
                           all_logits=policy is None, prefill_chunk=5)
    if policy is None:
        want, got = want[0], got[0]  # row 1's padding logits are not defined
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5)
    assert chunked.layout == one.layout and chunked.k.shape == one.k.shape
    for layer in range(cfg.num_layers):
        np.testing.assert_array_equal(chunked.kept_positions(layer), one.kept_positions(layer))
        for cache in (chunked, one):  # slots in position order (a ring buffer rotates them)
            entries = cache.layer(layer)
            order = jnp.argsort(entries["pos"], axis=-1)[..., None]
            cache_k = jnp.take_along_axis(entries["k"], order, axis=-2)
            if cache is chunked:
                got_k = cache_k
        np.testing.assert_allclose(got_k, cache_k, atol=3e-5)
    np.testing.assert_array_equal(chunked.next_pos, one.next_pos)
