"""Decode-time SnapKV, ObservedAttention, ExpectedAttention and AdaKV against kvpress 0.5.5's
DecodingPress(base, compression_interval=8, target_size=100, hidden_states_buffer_size), step
by step: logits of each of 24 fed tokens and the kept positions per (layer, kv head) after
three compressions (fixtures from tests/fixtures/make_kvpress_decoding_fixtures.py, whose
docstring says why most configurations use `PositionalDecodingPress`: kvpress as shipped scores
decode-time caches in score order, rotates SnapKV's buffered queries at the newest position and
averages ExpectedAttention's RoPE from the buffer length). A buffer of n hidden states below the
interval shows the scorer the last n + 1 steps; kvpress's default 256 shows it all 8."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (AdaKV, Decoding, ExpectedAttention, Knorm, ObservedAttention, SnapKV,
                       decode_step, prefill)
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures"
META = json.loads((FIXTURES / "kvpress_decoding" / "meta.json").read_text())
BASE = {"stock_snapkv_w1_k1": SnapKV(window_size=1, kernel_size=1),
        "stock_snapkv_w1_k5": SnapKV(window_size=1),
        "positional_snapkv_w4_k5": SnapKV(window_size=4),
        "positional_expected": ExpectedAttention(),
        "positional_observed": ObservedAttention(),
        "positional_expected_b3": ExpectedAttention(),
        "positional_expected_b0": ExpectedAttention(),
        "positional_observed_b3": ObservedAttention(),
        "stock_adakv_knorm": AdaKV(Knorm()),
        "stock_adakv_snapkv_w1_k1": AdaKV(SnapKV(window_size=1, kernel_size=1)),
        "positional_adakv_expected": AdaKV(ExpectedAttention())}
# kvpress's own cache order first differs from position order at the second compression, which
# changes only SnapKV's pooling: up to then the stock press must agree. AdaKV masks evicted keys
# by writing "fake keys" into kvpress's cache in place (attention_patch.py), and at the second
# compression ExpectedAttention rates those fake keys highest (their norm is ~1e5 / |q|), so
# kvpress re-admits evicted entries with stale keys: it is compared up to then. (Knorm ranks
# them lowest; SnapKV's window-1 query gets zero attention to them: those match throughout.)
STEPS = {"stock_snapkv_w1_k5": 16, "positional_adakv_expected": 16}
PRESS = {SnapKV: "SnapKVPress", ObservedAttention: "ObservedAttentionPress",
         ExpectedAttention: "PositionalExpectedAttention", Knorm: "KnormPress"}


def policy_for(name):
    conf = META["configurations"][name]
    return Decoding(BASE[name], compression_interval=META["compression_interval"],
                    target_size=META["target_size"],
                    hidden_states_buffer_size=conf["hidden_states_buffer_size"])


@pytest.fixture(scope="module")
def model():
    cfg, params = load_hf_checkpoint(FIXTURES / "kvpress" / "model")
    source = np.load(FIXTURES / "kvpress" / "expected.npz")
    want = np.load(FIXTURES / "kvpress_decoding" / "expected.npz")
    return cfg, params, source, want


def test_every_fixture_has_a_policy():
    assert set(META["configurations"]) == set(BASE)
    assert (META["compression_interval"], META["target_size"]) == (8, 100)
    for name, conf in META["configurations"].items():
        policy = policy_for(name).base_press
        scorer = policy.press if isinstance(policy, AdaKV) else policy
        assert conf["base_press"] == ("AdaKVPress" if isinstance(policy, AdaKV)
                                      else PRESS[type(scorer)]), name
        if isinstance(policy, AdaKV):
            assert conf["scorer"] == PRESS[type(scorer)], name
            assert conf["alpha_safeguard"] == policy.alpha_safeguard, name
        for field in ("window_size", "kernel_size"):
            if field in conf:
                assert getattr(scorer, field) == conf[field], (name, field)
    # both sides of the buffer: below the interval (fewer queries seen) and kvpress's default
    buffers = {conf["hidden_states_buffer_size"] for conf in META["configurations"].values()}
    assert min(buffers) + 1 < 8 < max(buffers) == Decoding(Knorm()).hidden_states_buffer_size


def test_a_smaller_buffer_changes_what_is_kept(model):
    want = model[3]
    for scorer in ("expected", "observed"):
        assert np.any(want[f"positional_{scorer}/kept"] != want[f"positional_{scorer}_b3/kept"])


def kept_mask(cache, cfg, length):
    out = np.zeros((cfg.num_layers, cfg.num_kv_heads, length), bool)
    for layer in range(cfg.num_layers):
        kept = np.asarray(cache.kept_positions(layer)[0])
        for head in range(cfg.num_kv_heads):
            out[layer, head, kept[head][kept[head] >= 0]] = True
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASE))
def test_decoding_matches_kvpress_step_by_step(model, name):
    cfg, params, source, want = model
    policy = policy_for(name)
    prompt, tokens = source["decoding/input_ids"], source["decoding/tokens"]
    # AdaKV's heads hold different numbers of entries: room for the most one head can win
    room = 8 if not isinstance(policy.base_press, AdaKV) else 100
    _, cache = prefill(params, jnp.asarray(prompt), cfg, max_new_tokens=room)
    steps = STEPS.get(name, len(tokens))
    logits = want[f"{name}/logits"]
    for step in range(steps):
        got, cache = decode_step(params, cache, jnp.asarray(tokens[step:step + 1]), cfg,
                                 policy=policy)
        np.testing.assert_allclose(got[0], logits[step], atol=1e-4, rtol=1e-4,
                                   err_msg=f"step {step + 1}")
        if (step + 1) % 8 == 0:
            assert int(cache.length.sum(-1).max()) == 100 * cfg.num_kv_heads
    if steps == len(tokens):  # the kept sets after the third compression
        kept = kept_mask(cache, cfg, prompt.shape[1] + len(tokens))
        for layer in range(cfg.num_layers):
            for head in range(cfg.num_kv_heads):
                np.testing.assert_array_equal(
                    np.flatnonzero(kept[layer, head]),
                    np.flatnonzero(want[f"{name}/kept"][layer, head]), err_msg=str((layer, head)))
