"""`gqa="query_head"` (each query head selects its own entries over repeated K/V, as the
original SnapKV) against kvpress 0.5.5 run on the multi-head copy of the GQA tiny Llama, where
kvpress's group vote is per query head (fixtures from
tests/fixtures/make_kvpress_query_head_fixtures.py): kept positions per (layer, query head)
and logits, at prefill and for decode-time SnapKV."""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (Decoding, ExpectedAttention, ObservedAttention, SnapKV, compress,
                       decode_step, prefill, prefill_observed)
from lcm.cache.compress import capacity
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures"
META = json.loads((FIXTURES / "kvpress_query_head" / "meta.json").read_text())
PREFILL = {"snapkv_45": SnapKV(0.45, gqa="query_head"),
           "snapkv_w16k7_30": SnapKV(0.3, window_size=16, kernel_size=7, gqa="query_head"),
           "observed_30": ObservedAttention(0.3, gqa="query_head"),
           "expected_45": ExpectedAttention(0.45, gqa="query_head")}
DECODING = Decoding(SnapKV(window_size=4, gqa="query_head"), compression_interval=8,
                    target_size=100)


@pytest.fixture(scope="module")
def model():
    cfg, params = load_hf_checkpoint(FIXTURES / "kvpress" / "model")
    source = np.load(FIXTURES / "kvpress" / "expected.npz")
    want = np.load(FIXTURES / "kvpress_query_head" / "expected.npz")
    return cfg, params, source, want


def kept_sets(cache, layer):
    kept = np.asarray(cache.kept_positions(layer)[0])
    return [kept[h][kept[h] >= 0].tolist() for h in range(kept.shape[0])]


def test_every_fixture_has_a_policy():
    assert set(META["configurations"]) == set(PREFILL) | {"decoding_snapkv_w4"}
    for name, policy in PREFILL.items():
        conf = META["configurations"][name]
        assert conf["compression_ratio"] == policy.compression_ratio
        for field in ("window_size", "kernel_size"):
            if field in conf:
                assert getattr(policy, field) == conf[field], (name, field)


@pytest.mark.slow
def test_prefill_query_head_selection_matches_kvpress_on_the_multi_head_copy(model):
    cfg, params, source, want = model
    tokens = jnp.asarray(source["input_ids"])
    T = tokens.shape[1]
    _, full, obs = prefill_observed(params, tokens, cfg, list(PREFILL.values()))
    for name, policy in PREFILL.items():
        slots = capacity(policy, T, cfg.num_layers, cfg.num_kv_heads)
        cache = compress(full, policy, obs, cfg, max_new_tokens=T + 1 - slots)
        assert cache.k.shape[2] == cfg.num_heads  # one entry set per query head
        expected = want[f"{name}/kept"]
        for layer in range(cfg.num_layers):
            for head, got in enumerate(kept_sets(cache, layer)):
                assert got == np.flatnonzero(expected[layer, head]).tolist(), (name, layer, head)
        # the heads of a group do disagree, so this is not kv-head selection
        assert (expected[:, 0::2] != expected[:, 1::2]).any(), name
        logits, _ = decode_step(params, cache, jnp.asarray(source["next_id"]), cfg)
        np.testing.assert_allclose(logits[0], want[f"{name}/logits"], atol=1e-4, rtol=1e-4,
                                   err_msg=name)


@pytest.mark.slow
def test_decoding_query_head_snapkv_matches_kvpress_on_the_multi_head_copy(model):
    cfg, params, source, want = model
    prompt, tokens = source["decoding/input_ids"], source["decoding/tokens"]
    _, cache = prefill(params, jnp.asarray(prompt), cfg, max_new_tokens=8)
    for step, token in enumerate(tokens):
        logits, cache = decode_step(params, cache, jnp.asarray([token]), cfg, policy=DECODING)
        np.testing.assert_allclose(logits[0], want["decoding_snapkv_w4/logits"][step],
                                   atol=1e-4, rtol=1e-4, err_msg=f"step {step + 1}")
    assert cache.k.shape[2] == cfg.num_heads
    expected = want["decoding_snapkv_w4/kept"]
    for layer in range(cfg.num_layers):
        for head, got in enumerate(kept_sets(cache, layer)):
            assert got == np.flatnonzero(expected[layer, head]).tolist(), (layer, head)


@pytest.mark.parametrize("policy", [SnapKV(window_size=3, kernel_size=1),
                                    ObservedAttention(), ExpectedAttention(n_sink=1)],
                         ids=["SnapKV", "ObservedAttention", "ExpectedAttention"])
def test_gqa_votes_are_the_per_query_head_scores_reduced_over_the_group(policy):
    """gqa="mean" / "max" score a kv head by the mean / max of its query heads' scores, which
    are the scores of the gqa="query_head" cache (K/V repeated per query head)."""
    B, K, G, S_, D = 1, 2, 2, 12, 8
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(B, K, S_, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S_, D)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(S_, dtype=jnp.int32), (B, K, S_))
    valid = jnp.ones((B, K, S_), bool)
    n = jnp.full((B, K), S_, jnp.int32)
    q = jnp.asarray(rng.normal(size=(B, 3, K * G, D)), jnp.float32)
    obs = {"q_win": q, "q_pos": jnp.asarray([[S_ - 3, S_ - 2, S_ - 1]], jnp.int32),
           "colsum": jnp.asarray(rng.uniform(size=(B, K * G, S_)), jnp.float32),
           "q_mean": q[:, 0], "q_cov": jnp.einsum("bhi,bhj->bhij", q[:, 1], q[:, 1])}
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    common = dict(obs=obs, inv_freq=inv_freq, factor=1.0, next_pos=jnp.asarray([S_]))

    def scores(policy, heads):
        rep = heads // K
        return np.asarray(policy.score(keys=jnp.repeat(keys, rep, 1), v=jnp.repeat(v, rep, 1),
                                       pos=jnp.repeat(pos, rep, 1), valid=jnp.repeat(valid, rep, 1),
                                       n=jnp.repeat(n, rep, 1), **common))

    per_head = scores(dataclasses.replace(policy, gqa="query_head"), K * G).reshape(B, K, G, S_)
    finite = np.isfinite(per_head).all(2)
    assert finite.sum() >= S_  # most entries are scored, not protected
    for vote, reduce in (("mean", np.mean), ("max", np.max)):
        got = scores(dataclasses.replace(policy, gqa=vote), K)
        np.testing.assert_allclose(got[finite], reduce(per_head, 2)[finite], rtol=1e-5,
                                   atol=1e-7, err_msg=vote)
        assert (np.isinf(got) == ~finite).all()
    assert not np.allclose(np.mean(per_head, 2)[finite], np.max(per_head, 2)[finite])
