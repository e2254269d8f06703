"""Compact cache layouts: PyramidKV per-layer capacities, AdaKV per-layer pools of heads.

Each is checked against the uniform layout (one capacity for all), which the kvpress parity
tests pin: same kept entries, same logits while decoding within the room, and bytes that are
the sum of the budgets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cache_entries

from lcm.cache import (H2O, AdaKV, Decoding, Knorm, PyramidKV, SnapKV, StreamingLLM, compress,
                       decode_step, generate, prefill, prefill_observed)
from lcm.cache.compress import budget_table
from lcm.cache.layouts import layer_runs
from lcm.cache.prefill import decode_step_jit, mapped_decode_step
from lcm.cache.step import plain_decode_step
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jax.random.randint(jax.random.key(1), (2, 40), 0, 61, dtype=jnp.int32)
LENGTHS = jnp.asarray([40, 27])
ROOM = 3
POLICIES = {"pyramidkv": PyramidKV(0.5, window_size=4, beta=2),
            "adakv": AdaKV(SnapKV(0.5, window_size=4)),
            "adakv_query_head": AdaKV(Knorm(0.5, gqa="query_head"))}


def assert_same_entries(a, b, rows=(0, 1)):
    for layer in range(CFG.num_layers):
        for row in rows:
            for got, want in zip(cache_entries(a, layer, row), cache_entries(b, layer, row)):
                assert got.keys() == want.keys(), (layer, row)
                for p in got:
                    np.testing.assert_allclose(got[p][0], want[p][0], atol=1e-6)
                    np.testing.assert_allclose(got[p][1], want[p][1], atol=1e-6)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compact_layout_keeps_the_uniform_entries_and_decodes_the_same(name):
    policy = POLICIES[name]
    _, uniform = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS,
                         max_new_tokens=ROOM, layout="uniform")
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=ROOM)
    assert cache.layout == ("layered" if name == "pyramidkv" else "pooled")
    assert cache.nbytes() < uniform.nbytes()
    assert_same_entries(cache, uniform)
    token = jnp.asarray([5, 7])
    for _ in range(ROOM):  # within the room both layouts append, so logits agree
        want, uniform = decode_step(PARAMS, uniform, token, CFG)
        got, cache = decode_step(PARAMS, cache, token, CFG)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        token = jnp.argmax(want, -1).astype(jnp.int32)
    assert_same_entries(cache, uniform)
    # compress() of a kept prefill gives the same cache as prefill(..., policy=)
    _, full, obs = prefill_observed(PARAMS, TOKENS, CFG, [policy], lengths=LENGTHS)
    later = compress(full, policy, obs, CFG, max_new_tokens=ROOM)
    _, again = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=ROOM)
    assert later.layout == again.layout and later.layer_slots == again.layer_slots
    np.testing.assert_array_equal(later.length, again.length)
    assert_same_entries(later, again)


def test_pyramidkv_bytes_are_the_sum_of_its_layer_budgets():
    policy = POLICIES["pyramidkv"]
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=ROOM)
    budgets = budget_table(policy, 40, CFG.num_layers)[:, 40]
    assert budgets[0] > budgets[-1]  # budgets fall with depth
    assert cache.layer_slots == tuple(int(b) + ROOM for b in budgets)
    K, D = CFG.num_kv_heads, CFG.head_dim
    slots = 2 * K * sum(cache.layer_slots)  # batch 2
    assert cache.k.shape == (2, K, sum(cache.layer_slots), D)
    assert cache.nbytes() == slots * (2 * D * 4 + 4) + cache.length.nbytes + 2 * 4 + 4
    np.testing.assert_array_equal(cache.length[:, 0], budgets[:, None].repeat(K, 1))


def test_adakv_pool_holds_the_budget_and_a_full_pool_overwrites_each_heads_oldest():
    policy = AdaKV(Knorm(0.5))
    _, cache = prefill(PARAMS, TOKENS[:1], CFG, policy=policy, max_new_tokens=1)
    K = CFG.num_kv_heads
    assert cache.k.shape[2] == K * (20 + 1)  # heads * (n_kept + room): the budget
    token = jnp.asarray([5])
    _, cache = decode_step(PARAMS, cache, token, CFG)  # fills the room: one entry per head
    before = np.asarray(cache.length)
    np.testing.assert_array_equal(before.sum(-1), K * 21)
    _, after = decode_step(PARAMS, cache, token, CFG)  # full: each head replaces its oldest
    np.testing.assert_array_equal(after.length, before)
    for layer in range(CFG.num_layers):
        old = [set(h) for h in cache_entries(cache, layer, 0)]
        new = [set(h) for h in cache_entries(after, layer, 0)]
        for o, n in zip(old, new):
            assert n == (o - {min(o)}) | {41}


def test_generate_on_compact_caches_equals_uniform_and_decode_policies_need_uniform():
    policy = POLICIES["adakv"]
    out, count = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=4, policy=policy)
    logits, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS,
                            max_new_tokens=3, layout="uniform")
    tokens = []
    for step in range(4):
        tokens.append(jnp.argmax(logits, -1).astype(jnp.int32))
        if step < 3:
            logits, cache = decode_step(PARAMS, cache, tokens[-1], CFG)
    np.testing.assert_array_equal(out, np.stack(tokens, 1))
    np.testing.assert_array_equal(count, [4, 4])
    _, pooled = prefill(PARAMS, TOKENS, CFG, policy=policy, max_new_tokens=8)
    with pytest.raises(ValueError, match="layout='uniform'"):
        decode_step(PARAMS, pooled, jnp.asarray([1, 2]), CFG,
                    policy=Decoding(Knorm(), compression_interval=2, target_size=4))
    with pytest.raises(ValueError, match="layout='pooled'"):
        prefill(PARAMS, TOKENS, CFG, policy=policy, layout="pooled")
    with pytest.raises(ValueError, match="valid"):
        pooled.valid()


@pytest.mark.parametrize("policy", [None, SnapKV(0.5, window_size=4, gqa="query_head"),
                                    StreamingLLM(0.5, positions="cache"), H2O(3, 8)],
                         ids=lambda p: type(p).__name__)
def test_in_place_decode_step_equals_the_layer_mapping_step(policy):
    """The step without a decode policy writes only the new entries into the carried cache;
    the mapped step (the one decode policies use) rebuilds every layer. Both, past the room
    too (a full head then replaces its oldest entry)."""
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=2)
    mapped = cache
    step = jax.jit(functools.partial(mapped_decode_step, cfg=CFG, policy=None))
    token = jnp.asarray([5, 7])
    for _ in range(4):
        got, cache = decode_step_jit(PARAMS, cache, token, cfg=CFG, policy=None)  # jit: slides
        want, mapped = step(PARAMS, mapped, token)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        for name in ("pos", "length", "k", "v", "score"):
            if getattr(cache, name) is not None:
                np.testing.assert_allclose(getattr(cache, name), getattr(mapped, name),
                                           atol=1e-6)
        token = jnp.argmax(want, -1).astype(jnp.int32)


def test_layer_runs_read_the_fewest_extra_slots():
    assert layer_runs((10, 8, 8, 3, 3), 2) == ((0, 3, 10), (3, 2, 3))
    assert layer_runs((5, 5, 4), 8) == ((0, 2, 5), (2, 1, 4))  # fewest runs without waste
    assert layer_runs((7, 6, 5), 1) == ((0, 3, 7),)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["original", "cache"])
def test_layered_decode_in_runs_of_layers_equals_one_scan_per_layer(positions):
    """A layered cache decodes in scans over runs of layers, each read through a window of its
    largest capacity (the last run's shifted back from the array's end): the same logits and
    cache as one exact run per layer, and as the uniform layout within the room. Past the room
    (a full head replaces its oldest entry) the runs agree with each other."""
    policy = PyramidKV(0.5, window_size=4, beta=2, positions=positions)
    _, uniform = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=2,
                         layout="uniform")
    _, layered = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=2)
    assert len(set(layered.layer_slots)) == CFG.num_layers
    steps = {runs: jax.jit(functools.partial(plain_decode_step, cfg=CFG, max_runs=runs))
             for runs in (1, 2, CFG.num_layers)}
    caches = dict.fromkeys(steps, layered)
    token = jnp.asarray([5, 7])
    for t in range(4):
        want, uniform = decode_step(PARAMS, uniform, token, CFG)
        exact, caches[CFG.num_layers] = steps[CFG.num_layers](PARAMS, caches[CFG.num_layers],
                                                              token)
        if t < 2:
            np.testing.assert_allclose(exact, want, atol=1e-5, rtol=1e-5)
        for runs in (1, 2):
            got, caches[runs] = steps[runs](PARAMS, caches[runs], token)
            np.testing.assert_allclose(got, exact, atol=1e-5, rtol=1e-5)
            for name in ("pos", "length"):
                np.testing.assert_array_equal(getattr(caches[runs], name),
                                              getattr(caches[CFG.num_layers], name))
            # The new entries' k, v come out of differently fused scans: equal up to float
            # rounding (jax 0.12.1 differs in the last bits), written to the same slots.
            for name in ("k", "v"):
                np.testing.assert_allclose(getattr(caches[runs], name),
                                           getattr(caches[CFG.num_layers], name),
                                           atol=1e-5, rtol=1e-5)
        token = jnp.argmax(exact, -1).astype(jnp.int32)
