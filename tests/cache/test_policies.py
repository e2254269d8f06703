"""Eviction policies: budgets, padding, per-head budgets, argument errors, edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cache_entries

from lcm.cache import (H2O, TOVA, AdaKV, Decoding, ExpectedAttention, Knorm, Merging,
                       ObservedAttention, PyramidKV, SnapKV, StreamingLLM, compress, decode_step,
                       policy_from_name, prefill, prefill_observed)
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jax.random.randint(jax.random.key(1), (2, 32), 0, 61, dtype=jnp.int32)
LENGTHS = jnp.asarray([32, 19])


def kept_sets(cache, layer, row):
    kept = np.asarray(cache.kept_positions(layer)[row])
    return [set(h[h >= 0].tolist()) for h in kept]


@pytest.mark.slow
@pytest.mark.parametrize("policy", [
    SnapKV(0.5, window_size=4), ObservedAttention(0.5), ExpectedAttention(0.5),
    PyramidKV(0.4, window_size=4, beta=2), AdaKV(TOVA(0.5)), Merging(Knorm(0.5)),
    H2O(hh_size=3, recent_size=5)],
    ids=lambda p: type(p).__name__)
def test_padded_rows_keep_only_real_tokens_and_equal_single_rows(policy):
    logits, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS,
                            max_new_tokens=1)
    one_logits, one = prefill(PARAMS, TOKENS[1:, :19], CFG, policy=policy, max_new_tokens=1)
    for layer in range(CFG.num_layers):
        assert all(max(s) < 19 for s in kept_sets(cache, layer, 1))
        assert kept_sets(cache, layer, 1) == kept_sets(one, layer, 0)
    np.testing.assert_allclose(logits[1], one_logits[0], atol=2e-5, rtol=2e-5)
    for layer in range(CFG.num_layers):
        for got, want in zip(cache_entries(cache, layer, 1), cache_entries(one, layer, 0)):
            assert got.keys() == want.keys()
            for p in got:
                np.testing.assert_allclose(got[p][1], want[p][1], atol=2e-5)


def test_budgets_ratio_and_token_count():
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=Knorm(0.25), lengths=LENGTHS)
    # kvpress rounding per row: max(1, int(n * 0.75)).
    np.testing.assert_array_equal(cache.length[0], [[24, 24], [14, 14]])
    assert cache.capacity == 24
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=SnapKV(budget=10, window_size=4),
                       lengths=LENGTHS)
    np.testing.assert_array_equal(cache.length[1], [[10, 10], [10, 10]])
    # A budget above the prompt keeps everything.
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=SnapKV(budget=100), lengths=LENGTHS)
    assert kept_sets(cache, 1, 1) == [set(range(19))] * 2
    assert kept_sets(cache, 0, 0) == [set(range(32))] * 2


def test_streaming_keeps_sinks_and_recent():
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=StreamingLLM(budget=10), lengths=LENGTHS)
    assert kept_sets(cache, 0, 0) == [set(range(4)) | set(range(26, 32))] * 2
    assert kept_sets(cache, 1, 1) == [set(range(4)) | set(range(13, 19))] * 2


def test_h2o_prefill_keeps_recent_window_and_accumulates_scores():
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=H2O(hh_size=3, recent_size=5))
    assert cache.capacity == 8 and cache.score is not None
    for layer in range(CFG.num_layers):
        for kept in kept_sets(cache, layer, 0):
            assert set(range(27, 32)) <= kept and len(kept) == 8
    assert (np.asarray(cache.score) > 0).all()


def test_adakv_heads_hold_different_lengths_in_a_pool_of_the_budget():
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=AdaKV(Knorm(0.5)), lengths=LENGTHS)
    assert cache.layout == "pooled" and cache.k.shape == (2, 2, 32, 8)  # 2 heads * 16 kept
    assert cache.capacity == 16
    lengths = np.asarray(cache.length)
    np.testing.assert_array_equal(lengths.sum(-1), [[32, 18], [32, 18]])  # 2 heads * n_kept
    assert (lengths[..., 0] != lengths[..., 1]).any()
    # layout="uniform": every head gets the most one head can win, 2 * 16 - 1 * int(0.2 * 16)
    _, uniform = prefill(PARAMS, TOKENS, CFG, policy=AdaKV(Knorm(0.5)), lengths=LENGTHS,
                         layout="uniform")
    assert uniform.capacity == 29 and uniform.nbytes() > 1.5 * cache.nbytes()
    for layer in range(CFG.num_layers):
        for row in range(2):
            assert kept_sets(uniform, layer, row) == kept_sets(cache, layer, row)
    # capacity_factor bounds what one head may win, in both layouts
    policy = AdaKV(Knorm(0.5), capacity_factor=1.25)
    _, capped = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, layout="uniform")
    assert capped.capacity == 20  # ceil(1.25 * 16) slots per head, not the prompt's 32
    _, pooled = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS)
    for c in (capped, pooled):
        np.testing.assert_array_equal(np.asarray(c.length).sum(-1), [[32, 18], [32, 18]])
        assert (np.asarray(c.length) <= 20).all()


def test_fully_evicted_heads_give_finite_outputs():
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=Knorm(0.5), max_new_tokens=2)
    empty = cache.replace(length=cache.length.at[:, :, 0].set(0))
    logits, after = decode_step(PARAMS, empty, jnp.asarray([1, 2]), CFG)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(after.length[:, :, 0], 1)  # only the new token


def test_observations_cover_several_policies_and_are_checked():
    policies = [SnapKV(0.5, window_size=4), TOVA(0.5), Knorm(0.5)]
    _, full, obs = prefill_observed(PARAMS, TOKENS, CFG, policies, lengths=LENGTHS)
    assert obs.q_win.shape == (2, 2, 4, 4, 8) and obs.colsum is None
    for policy in policies:
        _, direct = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS)
        later = compress(full, policy, obs, CFG)
        np.testing.assert_array_equal(direct.pos, later.pos)
    with pytest.raises(ValueError, match="window 8"):
        compress(full, SnapKV(0.5, window_size=8), obs, CFG)
    with pytest.raises(ValueError, match="ObservedAttention"):
        compress(full, ObservedAttention(0.5), obs, CFG)


@pytest.mark.parametrize("make,match", [
    (lambda: Knorm(1.0), "compression_ratio"),
    (lambda: SnapKV(-0.1), "compression_ratio"),
    (lambda: Knorm(budget=0), "budget"),
    (lambda: Knorm(0.5, budget=4), "both set"),
    (lambda: SnapKV(0.5, kernel_size=4), "kernel_size"),
    (lambda: SnapKV(0.5, pooling="median"), "pooling"),
    (lambda: Knorm(0.5, gqa="sum"), "gqa"),
    (lambda: Knorm(0.5, positions="relative"), "positions"),
    (lambda: AdaKV(H2O()), "AdaKV.press"),
    (lambda: AdaKV(Knorm(0.5), alpha_safeguard=1.5), "alpha_safeguard"),
    (lambda: Decoding(H2O()), "base_press"),
    (lambda: Decoding(Knorm(), hidden_states_buffer_size=-1), "hidden_states_buffer_size"),
    (lambda: policy_from_name("SnapKVPress"), "SnapKVPress"),
    (lambda: prefill(PARAMS, TOKENS, CFG, policy="snapkv"), "policy"),
])
def test_bad_policies_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_policy_from_name():
    assert policy_from_name("SnapKV", compression_ratio=0.5) == SnapKV(0.5)


def test_per_query_head_selection_holds_one_entry_set_per_query_head():
    policy = SnapKV(0.5, window_size=4, gqa="query_head")
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS, max_new_tokens=1)
    assert cache.k.shape[2] == CFG.num_heads
    np.testing.assert_array_equal(cache.length[0], [[16] * 4, [9] * 4])
    heads = kept_sets(cache, 1, 0)
    assert heads[0] != heads[1] or heads[2] != heads[3]  # query heads of a group choose alone
    # Keeping everything, the repeated per-query-head cache decodes exactly as the plain one.
    everything = SnapKV(budget=64, window_size=4, gqa="query_head")
    _, wide = prefill(PARAMS, TOKENS, CFG, policy=everything, lengths=LENGTHS, max_new_tokens=1)
    _, plain = prefill(PARAMS, TOKENS, CFG, lengths=LENGTHS, max_new_tokens=1)
    a, _ = decode_step(PARAMS, wide, jnp.asarray([3, 4]), CFG)
    b, _ = decode_step(PARAMS, plain, jnp.asarray([3, 4]), CFG)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
