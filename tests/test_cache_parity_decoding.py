"""Decode-time SnapKV, ObservedAttention and ExpectedAttention against kvpress 0.5.5's
DecodingPress(base, compression_interval=8, target_size=100), step by step: logits of each of
24 fed tokens and the kept positions per (layer, kv head) after three compressions (fixtures
from tests/fixtures/make_kvpress_decoding_fixtures.py, whose docstring says why most
configurations use `PositionalDecodingPress`: kvpress as shipped scores decode-time caches in
score order, rotates SnapKV's buffered queries at the newest position and averages
ExpectedAttention's RoPE from the buffer length)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (Decoding, ExpectedAttention, ObservedAttention, SnapKV, decode_step,
                       prefill)
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "kvpress_decoding" / "meta.json").read_text())
BASE = {"stock_snapkv_w1_k1": SnapKV(window_size=1, kernel_size=1),
        "stock_snapkv_w1_k5": SnapKV(window_size=1),
        "positional_snapkv_w4_k5": SnapKV(window_size=4),
        "positional_expected": ExpectedAttention(),
        "positional_observed": ObservedAttention()}
# kvpress's own cache order first differs from position order at the second compression, which
# changes only SnapKV's pooling: up to then the stock press must agree.
STEPS = {"stock_snapkv_w1_k5": 16}
PRESS = {SnapKV: "SnapKVPress", ObservedAttention: "ObservedAttentionPress",
         ExpectedAttention: "PositionalExpectedAttention"}


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
        assert conf["base_press"] == PRESS[type(BASE[name])], name
        for field in ("window_size", "kernel_size"):
            if field in conf:
                assert getattr(BASE[name], field) == conf[field], (name, field)


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
    policy = Decoding(BASE[name], compression_interval=8, target_size=100)
    prompt, tokens = source["decoding/input_ids"], source["decoding/tokens"]
    _, cache = prefill(params, jnp.asarray(prompt), cfg, max_new_tokens=8)
    steps = STEPS.get(name, len(tokens))
    logits = want[f"{name}/logits"]
    for step in range(steps):
        got, cache = decode_step(params, cache, jnp.asarray(tokens[step:step + 1]), cfg,
                                 policy=policy)
        np.testing.assert_allclose(got[0], logits[step], atol=1e-4, rtol=1e-4,
                                   err_msg=f"step {step + 1}")
        if (step + 1) % 8 == 0:
            assert int(cache.length.max()) == 100
    if steps == len(tokens):  # the kept sets after the third compression
        kept = kept_mask(cache, cfg, prompt.shape[1] + len(tokens))
        for layer in range(cfg.num_layers):
            for head in range(cfg.num_kv_heads):
                np.testing.assert_array_equal(
                    np.flatnonzero(kept[layer, head]),
                    np.flatnonzero(want[f"{name}/kept"][layer, head]), err_msg=str((layer, head)))
