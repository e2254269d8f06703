"""Parity of the presses added as one file each (KeyDiff, LagKV) with kvpress 0.5.5's
KeyDiffPress and LagKVPress: kept positions per (layer, kv head) and the next token's logits on
the tiny random Llama (fixtures from tests/fixtures/make_kvpress_new_presses_fixtures.py,
which checks that no kept set depends on a tie)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import KeyDiff, LagKV, decode_step, prefill
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures"
META = json.loads((FIXTURES / "kvpress_new" / "meta.json").read_text())


def press_for(name):
    config = META["configurations"][name]
    options = {k: config[k] for k in ("lag_size", "cross_scoring") if k in config}
    cls = {"KeyDiffPress": KeyDiff, "LagKVPress": LagKV}[config["press"]]
    return cls(config["compression_ratio"], **options)


@pytest.fixture(scope="module")
def model():
    cfg, params = load_hf_checkpoint(FIXTURES / "kvpress" / "model")
    inputs = np.load(FIXTURES / "kvpress" / "expected.npz")
    data = np.load(FIXTURES / "kvpress_new" / "expected.npz")
    return cfg, params, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["next_id"]), data


def test_every_configuration_is_covered():
    assert {META["configurations"][n]["press"] for n in META["configurations"]} == {
        "KeyDiffPress", "LagKVPress"}
    assert len(META["configurations"]) == 8


@pytest.mark.parametrize("name", sorted(META["configurations"]))
def test_kept_positions_and_logits_match_kvpress(model, name):
    cfg, params, tokens, next_id, data = model
    press = press_for(name)
    _, cache = prefill(params, tokens, cfg, policy=press, max_new_tokens=1)
    want = data[f"{name}/kept"]
    assert int(cache.length.max()) == META["configurations"][name]["n_kept"]
    for layer in range(cfg.num_layers):
        kept = np.asarray(cache.kept_positions(layer)[0])
        for head in range(cfg.num_kv_heads):
            got = set(kept[head][kept[head] >= 0].tolist())
            assert got == set(np.flatnonzero(want[layer, head]).tolist()), (layer, head)
    logits, _ = decode_step(params, cache, next_id, cfg)
    np.testing.assert_allclose(logits[0], data[f"{name}/logits"], atol=1e-4, rtol=1e-4)


def test_lagkv_rejects_bad_options():
    for bad in (dict(lag_size=1), dict(n_sink=-1), dict(cross_scoring=1)):
        with pytest.raises(ValueError, match="LagKV"):
            LagKV(0.5, **bad)
