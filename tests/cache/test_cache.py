"""KV cache core: prefill + decode equal the full forward, batches of different lengths equal
single prompts, greedy generate equals a forward-based greedy loop, argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import KVCache, decode_step, generate, prefill, sample_logits
from lcm.cache.prefill import decode_step_jit
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
fwd = jax.jit(forward, static_argnames=("cfg",))


def model(cfg=CFG, seed=0):
    return init_params(cfg, jax.random.key(seed))[0]


def tokens_of(seed, batch, seq, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 5}, {"qkv_bias": True}])
def test_prefill_then_decode_equals_forward(variant):
    cfg = dataclasses.replace(CFG, **variant)
    params = model(cfg)
    seq = tokens_of(1, 2, 20)
    want = fwd(params, seq, cfg)
    logits, cache = prefill(params, seq[:, :13], cfg, max_new_tokens=7, all_logits=True)
    np.testing.assert_allclose(logits, want[:, :13], atol=2e-5, rtol=2e-5)
    window = variant.get("sliding_window")
    if window:  # each layer keeps a ring buffer of its window, whatever the context
        assert cache.layer_slots == (window, window) and cache.k.shape == (2, 2, 2 * window, 8)
    else:
        assert cache.capacity == 20 and cache.k.shape == (2, 2, 2, 20, 8)
    for t in range(13, 20):
        logits, cache = decode_step(params, cache, seq[:, t], cfg)
        np.testing.assert_allclose(logits, want[:, t], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache.next_pos, [20, 20])
    np.testing.assert_array_equal(cache.kept_positions(1)[0, 0],
                                  np.arange(20 - window, 20) if window else np.arange(20))


def test_last_token_logits_and_chunked_prefill():
    params = model()
    seq = tokens_of(2, 2, 19)
    want = fwd(params, seq, CFG)
    logits, _ = prefill(params, seq, CFG, chunk_size=4)
    np.testing.assert_allclose(logits, want[:, -1], atol=2e-5, rtol=2e-5)


def test_padded_batch_equals_single_prompts():
    params = model()
    lengths = [11, 6]
    seqs = tokens_of(3, 2, 11)
    logits, cache = prefill(params, seqs, CFG, lengths=jnp.asarray(lengths), max_new_tokens=3)
    nxt = tokens_of(4, 2, 3)
    steps = [decode_step(params, cache, nxt[:, 0], CFG)]
    for t in (1, 2):
        steps.append(decode_step(params, steps[-1][1], nxt[:, t], CFG))
    for b, n in enumerate(lengths):
        one_logits, one = prefill(params, seqs[b:b + 1, :n], CFG, max_new_tokens=3)
        np.testing.assert_allclose(logits[b], one_logits[0], atol=2e-5, rtol=2e-5)
        for t in range(3):
            one_step, one = decode_step(params, one, nxt[b:b + 1, t], CFG)
            np.testing.assert_allclose(steps[t][0][b], one_step[0], atol=2e-5, rtol=2e-5)
        # Padding is never cached: the row keeps exactly its prompt and decoded positions.
        kept = np.asarray(steps[-1][1].kept_positions(0)[b])
        np.testing.assert_array_equal(kept[:, :n + 3], np.broadcast_to(np.arange(n + 3),
                                                                       (2, n + 3)))
        assert (kept[:, n + 3:] == -1).all()


def greedy_reference(params, prompt, steps, stop=()):
    """Greedy decoding by full forward passes (one padded shape: causal, so padding after the
    sequence does not change its logits)."""
    seq = list(np.asarray(prompt))
    out = []
    for _ in range(steps):
        padded = np.zeros((1, 24), np.int32)
        padded[0, :len(seq)] = seq
        logits = fwd(params, jnp.asarray(padded), CFG)
        token = int(jnp.argmax(logits[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token in stop:
            break
    return out


def test_greedy_generate_equals_forward_greedy():
    params = model(seed=5)
    lengths = [9, 5]
    prompts = tokens_of(6, 2, 9)
    tokens, count = generate(params, CFG, prompts, lengths=jnp.asarray(lengths),
                             max_new_tokens=6)
    assert tokens.shape == (2, 6) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(count, [6, 6])
    for b, n in enumerate(lengths):
        assert np.asarray(tokens[b]).tolist() == greedy_reference(params, prompts[b, :n], 6)


def test_generate_stops_per_row_and_pads():
    params = model(seed=5)
    prompts = tokens_of(6, 2, 9)
    free = [greedy_reference(params, prompts[b], 8) for b in range(2)]
    stop = free[0][2]  # row 0 stops at its third token; row 1 wherever it first emits it
    tokens, count = generate(params, CFG, prompts, max_new_tokens=8, stop_tokens=(stop,),
                             pad_token=60)
    for b in range(2):
        want = greedy_reference(params, prompts[b], 8, stop=(stop,))
        assert int(count[b]) == len(want)
        assert np.asarray(tokens[b, :len(want)]).tolist() == want
        assert (np.asarray(tokens[b, len(want):]) == 60).all()
    assert int(count[0]) <= 3


def test_sampling_restricts_to_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 2)
    top2 = sample_logits(logits, keys[0], temperature=1.0, top_k=2)
    assert set(np.asarray(top2).tolist()) == {0, 1}
    nucleus = sample_logits(logits, keys[1], temperature=1.0, top_p=0.85)
    assert set(np.asarray(nucleus).tolist()) == {0, 1, 2}
    greedy = sample_logits(logits, keys[1], temperature=0.0)
    assert (np.asarray(greedy) == 0).all()


def test_sampled_generate_is_reproducible_and_varies_with_key():
    params = model(seed=5)
    prompts = tokens_of(7, 2, 6)
    run = [generate(params, CFG, prompts, max_new_tokens=12, temperature=2.0,
                    key=jax.random.key(k))[0] for k in (1, 1, 2)]
    np.testing.assert_array_equal(run[0], run[1])
    assert (np.asarray(run[0]) != np.asarray(run[2])).any()


def test_full_cache_slides_under_jit():
    """Under jit a full head replaces its oldest entry (the eager decode_step grows a full
    uniform cache instead: tests/cache/test_extend.py)."""
    params = model()
    seq = tokens_of(8, 1, 12)
    _, cache = prefill(params, seq[:, :8], CFG)
    for t in range(8, 12):
        _, cache = decode_step_jit(params, cache, seq[:, t], cfg=CFG, policy=None)
    assert cache.capacity == 8
    np.testing.assert_array_equal(cache.kept_positions(0)[0, 0], np.arange(4, 12))
    assert np.isfinite(np.asarray(cache.k)).all()


def test_cache_pytree_roundtrip_and_empty():
    cache = KVCache.empty(num_layers=2, batch=3, num_kv_heads=2, capacity=5, head_dim=4,
                          scores=True)
    leaves, tree = jax.tree.flatten(cache)
    again = jax.tree.unflatten(tree, leaves)
    assert again.rotation == "original" and again.capacity == 5
    assert (np.asarray(cache.kept_positions(1)) == -1).all()
    assert cache.nbytes() == sum(x.nbytes for x in leaves)


@pytest.mark.parametrize("call,match", [
    (lambda p: prefill(p, jnp.zeros((2, 4), jnp.float32), CFG), "tokens"),
    (lambda p: prefill(p, jnp.zeros((2, 4), jnp.int32), CFG, lengths=jnp.asarray([4, 0])),
     "lengths"),
    (lambda p: prefill(p, jnp.zeros((2, 4), jnp.int32), CFG, lengths=jnp.asarray([5, 1])),
     "lengths"),
    (lambda p: prefill(p, jnp.zeros((2, 4), jnp.int32), CFG, chunk_size=0), "chunk_size"),
    (lambda p: generate(p, CFG, jnp.zeros((1, 4), jnp.int32), max_new_tokens=0),
     "max_new_tokens"),
    (lambda p: generate(p, CFG, jnp.zeros((1, 4), jnp.int32), max_new_tokens=2,
                        temperature=1.0), "key"),
    (lambda p: generate(p, CFG, jnp.zeros((1, 4), jnp.int32), max_new_tokens=2,
                        top_p=1.5), "top_p"),
    (lambda p: generate(p, CFG, jnp.zeros((1, 4), jnp.int32), max_new_tokens=2,
                        stop_tokens=(99,)), "stop_tokens"),
])
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(model())
