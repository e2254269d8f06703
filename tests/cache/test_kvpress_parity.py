"""Parity with kvpress 0.5.5: kept positions per (layer, kv head) and next-token logits after
compression, on a tiny random Llama (fixtures from tests/fixtures/make_kvpress_fixtures.py).

The prompt's token ids are distinct, so no two scores tie at the cut and kept sets must be
equal, not just close."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (TOVA, AdaKV, Decoding, ExpectedAttention, Knorm, Merging, ObservedAttention,
                       PyramidKV, SnapKV, StreamingLLM, compress, decode_step, generate,
                       prefill, prefill_observed)
from lcm.cache.compress import capacity
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures" / "kvpress"
META = json.loads((FIXTURES / "meta.json").read_text())
NAMES = sorted(n for n in META["configurations"] if not n.startswith(("decoding_", "greedy_")))
DECODING = {"decoding_knorm": Decoding(Knorm(), compression_interval=8, target_size=100),
            "decoding_tova": Decoding(TOVA(), compression_interval=8, target_size=100)}
GREEDY = {"greedy_snapkv_50": SnapKV(0.5), "greedy_streamingllm_50": StreamingLLM(0.5),
          "greedy_knorm_50": Knorm(0.5), "greedy_pyramidkv_50": PyramidKV(0.5)}


def policy_for(name):
    r = META["configurations"][name]["compression_ratio"]
    kind = name.rsplit("_", 1)[0]
    return {
        "snapkv": SnapKV(r), "snapkv_w16k7": SnapKV(r, window_size=16, kernel_size=7),
        "streamingllm": StreamingLLM(r), "knorm": Knorm(r), "tova": TOVA(r),
        "observed": ObservedAttention(r), "pyramidkv": PyramidKV(r),
        "expected": ExpectedAttention(r), "adakv_snapkv": AdaKV(SnapKV(r)),
        "merging_knorm": Merging(Knorm(r)),
        "rerotation_streamingllm": StreamingLLM(r, positions="cache"),
    }[kind]


@pytest.fixture(scope="module")
def reference():
    cfg, params = load_hf_checkpoint(FIXTURES / "model")
    data = np.load(FIXTURES / "expected.npz")
    tokens = jnp.asarray(data["input_ids"])
    policies = [policy_for(name) for name in NAMES]
    logits, full, obs = prefill_observed(params, tokens, cfg, policies)
    return cfg, params, data, full, obs


def test_every_fixture_has_a_policy():
    assert len(NAMES) == 22 and all(policy_for(n) is not None for n in NAMES)
    assert set(META["configurations"]) == set(NAMES) | set(DECODING) | set(GREEDY)
    assert {META["configurations"][n]["compression_ratio"] for n in NAMES} == {0.3, 0.45}


def test_uncompressed_logits(reference):
    cfg, params, data, _, _ = reference
    _, cache = prefill(params, jnp.asarray(data["input_ids"]), cfg, max_new_tokens=1)
    logits, _ = decode_step(params, cache, jnp.asarray(data["next_id"]), cfg)
    np.testing.assert_allclose(logits[0], data["full/logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_kept_positions_and_logits_match_kvpress(reference, name):
    cfg, params, data, full, obs = reference
    T = data["input_ids"].shape[1]
    policy = policy_for(name)
    # One decode shape for every policy: pad each compressed cache to T + 1 slots.
    slots = capacity(policy, T, cfg.num_layers, cfg.num_kv_heads)
    cache = compress(full, policy, obs, cfg, max_new_tokens=T + 1 - slots)
    assert cache.capacity == T + 1
    want = data[f"{name}/kept"]
    for layer in range(cfg.num_layers):
        kept = np.asarray(cache.kept_positions(layer)[0])
        for head in range(cfg.num_kv_heads):
            got = set(kept[head][kept[head] >= 0].tolist())
            assert got == set(np.flatnonzero(want[layer, head]).tolist()), (layer, head)
    logits, _ = decode_step(params, cache, jnp.asarray(data["next_id"]), cfg)
    np.testing.assert_allclose(logits[0], data[f"{name}/logits"], atol=1e-4, rtol=1e-4)


def test_prefill_with_policy_equals_compress_of_observed_prefill(reference):
    cfg, params, data, full, obs = reference
    for policy in (SnapKV(0.45), PyramidKV(0.3)):
        _, direct = prefill(params, jnp.asarray(data["input_ids"]), cfg, policy=policy)
        later = compress(full, policy, obs, cfg)
        np.testing.assert_array_equal(direct.pos, later.pos)
        np.testing.assert_array_equal(direct.length, later.length)
        np.testing.assert_allclose(direct.k, later.k, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODING))
def test_decoding_press_matches_kvpress_step_by_step(reference, name):
    """DecodingPress(base, compression_interval=8, target_size=100): 24 fed tokens, three
    compressions; logits of every step and the kept positions at the end."""
    cfg, params, data, _, _ = reference
    policy = DECODING[name]
    _, cache = prefill(params, jnp.asarray(data["decoding/input_ids"]), cfg, max_new_tokens=8)
    want = data[f"{name}/logits"]
    for step, token in enumerate(data["decoding/tokens"]):
        logits, cache = decode_step(params, cache, jnp.asarray([token]), cfg, policy=policy)
        np.testing.assert_allclose(logits[0], want[step], atol=1e-4, rtol=1e-4)
    kept = data[f"{name}/kept"]
    for layer in range(cfg.num_layers):
        got = np.asarray(cache.kept_positions(layer)[0])
        for head in range(cfg.num_kv_heads):
            assert set(got[head][got[head] >= 0].tolist()) == set(
                np.flatnonzero(kept[layer, head]).tolist()), (layer, head)


@pytest.mark.parametrize("name", sorted(GREEDY))
def test_greedy_decoding_after_prefill_compression_matches_kvpress(reference, name):
    """The press compresses the prompt at prefill, then 8 greedy steps as kvpress's pipeline
    decodes (original positions 250, 251, ...): a scattered kept set, then appended entries.
    Logits of every step (teacher-forced with kvpress's tokens) and `generate`'s tokens."""
    cfg, params, data, _, _ = reference
    policy = GREEDY[name]
    tokens = jnp.asarray(data["input_ids"])
    want_tokens, want = data[f"{name}/tokens"], data[f"{name}/logits"]
    steps = len(want_tokens)
    logits, cache = prefill(params, tokens, cfg, policy=policy, max_new_tokens=steps)
    assert int(cache.length.max()) < tokens.shape[1]
    np.testing.assert_allclose(logits[0], want[0], atol=1e-4, rtol=1e-4)
    for step in range(1, steps):
        logits, cache = decode_step(params, cache, jnp.asarray(want_tokens[step - 1:step]), cfg)
        np.testing.assert_allclose(logits[0], want[step], atol=1e-4, rtol=1e-4, err_msg=str(step))
    assert int(cache.next_pos[0]) == tokens.shape[1] + steps - 1
    # no greedy choice is a near tie (smallest margin 9.5e-4), so generate picks kvpress's tokens
    top2 = np.sort(want, axis=-1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 5e-4)
    out, count = generate(params, cfg, tokens, max_new_tokens=steps, policy=policy)
    np.testing.assert_array_equal(np.asarray(out[0]), want_tokens)
    assert int(count[0]) == steps
    # batched beside a shorter right-padded prompt: each row as alone
    short = 180
    batch = jnp.concatenate([tokens, jnp.pad(tokens[:, 40:40 + short], ((0, 0), (0, 70)))])
    out2, _ = generate(params, cfg, batch, lengths=jnp.asarray([250, short]),
                       max_new_tokens=steps, policy=policy)
    alone, _ = generate(params, cfg, tokens[:, 40:40 + short], max_new_tokens=steps,
                        policy=policy)
    np.testing.assert_array_equal(np.asarray(out2), np.stack([want_tokens, alone[0]]))
