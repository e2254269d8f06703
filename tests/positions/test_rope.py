"""RoPE and its scaling family against transformers (fixtures/rope, fixtures/hf_rope), the config
forms, jit-safety, bad inputs, and the bf16 precision of angles at long positions."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lcm.config import ROPE_TYPES, RopeConfig
from lcm.io import load_hf_checkpoint, save_hf_checkpoint
from lcm.model import forward
from lcm.positions import apply_rope, rope_frequencies

FIXTURES = Path(__file__).parents[1] / "fixtures"
CASES = json.loads((FIXTURES / "rope" / "rope_cases.json").read_text())
TABLES = dict(np.load(FIXTURES / "rope" / "rope_tables.npz"))
CHECKPOINTS = sorted(p.name for p in (FIXTURES / "hf_rope").iterdir() if p.is_dir())


def table(name: str, key: str) -> np.ndarray:
    return TABLES[f"{name}/{key}"]


def lcm_table(name: str):
    case = CASES[name]
    rope = RopeConfig.from_hf(case["config"])
    return rope_frequencies(rope, case["head_dim"], case["seq_len"])


# ----------------------------------------------------------------------------- tables

def test_fixtures_cover_every_type():
    types = {RopeConfig.from_hf(c["config"]).rope_type for c in CASES.values()}
    assert types == set(ROPE_TYPES)
    assert set(CHECKPOINTS) >= {"llama_yarn", "llama_llama3", "llama_longrope_long",
                                "llama_longrope_short", "llama_dynamic", "llama_linear"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_frequencies_match_transformers(name):
    inv_freq, attention_factor = lcm_table(name)
    assert inv_freq.dtype == jnp.float32 and isinstance(attention_factor, float)
    # Relative: inv_freq spans 1 to 1e-7; proportional's unrotated pairs are exactly 0.
    np.testing.assert_allclose(np.asarray(inv_freq), table(name, "inv_freq"), rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(float(table(name, "attention_factor")), rel=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotation_matches_transformers(name):
    """cos/sin at a few positions (up to 131071), and apply_rope of a random vector, as HF's."""
    case = CASES[name]
    inv_freq, attention_factor = lcm_table(name)
    positions = np.asarray(case["positions"], np.int32)
    angles = positions.astype(np.float32)[:, None] * np.asarray(inv_freq)
    cos, sin = table(name, "cos"), table(name, "sin")  # HF: [P, R] = cat(freqs, freqs)
    half = inv_freq.shape[0]
    # Static tables equal transformers' bit for bit; dynamic's differ by <= 2 ulp (float32 pow of
    # a traced base), which a position p turns into an angle error of p * inv_freq * 2.4e-7.
    atol = 2e-6 + 3e-7 * np.abs(angles)
    for got, want in ((np.cos(angles), cos), (np.sin(angles), sin)):
        np.testing.assert_array_less(np.abs(got * attention_factor - want[:, :half]), atol)
        np.testing.assert_array_equal(want[:, :half], want[:, half:])
    x = table(name, "x")
    rotated = apply_rope(jnp.asarray(x)[None, :, None], jnp.asarray(positions)[None], inv_freq,
                         attention_factor)
    err = np.abs(np.asarray(rotated)[0, :, 0] - table(name, "rotated"))
    tol = 1e-5 + np.abs(x).max() * atol.max(1, keepdims=True)
    np.testing.assert_array_less(err, np.broadcast_to(tol, err.shape))


@pytest.mark.parametrize("prefix, lengths", [("dynamic_4", [1000, 2048, 2049, 4096, 8192]),
                                             ("longrope", [100, 2048, 2049, 8192])])
def test_length_dependent_tables_trace_once(prefix, lengths):
    """One compiled program for every seq_len; the switch is a jnp.where, not Python control."""
    rope = RopeConfig.from_hf(CASES[f"{prefix}@None"]["config"])
    traces = []

    @jax.jit
    def frequencies(seq_len):
        traces.append(seq_len)
        return rope_frequencies(rope, 64, seq_len)

    for seq_len in lengths:
        inv_freq, attention_factor = frequencies(jnp.int32(seq_len))
        name = f"{prefix}@{seq_len}"
        np.testing.assert_allclose(np.asarray(inv_freq), table(name, "inv_freq"), rtol=1e-6)
        assert float(attention_factor) == pytest.approx(float(table(name, "attention_factor")))
    assert len(traces) == 1
    # None is transformers' initial table: the original one.
    np.testing.assert_array_equal(np.asarray(rope_frequencies(rope, 64)[0]),
                                  np.asarray(rope_frequencies(rope, 64, lengths[0])[0]))


def test_partial_rotary_passes_features_through():
    rope = RopeConfig(theta=1e4, partial_rotary_factor=0.25)
    inv_freq, _ = rope_frequencies(rope, 64)
    assert inv_freq.shape == (8,)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 64), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(5) * 1000, (2, 5))
    for layout in ("half", "interleaved"):
        out = apply_rope(x, positions, inv_freq, 1.3, layout=layout)
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(out[..., 16:]), np.asarray(x[..., 16:]))
        full = apply_rope(x[..., :16], positions, inv_freq, 1.3, layout=layout)
        np.testing.assert_array_equal(np.asarray(out[..., :16]), np.asarray(full))


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_forward_matches_transformers(name):
    cfg, params = load_hf_checkpoint(FIXTURES / "hf_rope" / name)
    assert cfg.rope.rope_type == name.split("_")[1].replace("deepseek", "yarn")
    expected = np.load(FIXTURES / "hf_rope" / name / "expected.npz")
    logits = forward(params, jnp.asarray(expected["input_ids"]), cfg)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_export_keeps_rope_config(tmp_path, name):
    path = FIXTURES / "hf_rope" / name
    cfg, params = load_hf_checkpoint(path)
    save_hf_checkpoint(tmp_path / "out", cfg, params)
    want = json.loads((path / "config.json").read_text())
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got["rope_parameters"] == want["rope_parameters"]  # what transformers wrote
    assert got["max_position_embeddings"] == want["max_position_embeddings"]
    assert load_hf_checkpoint(tmp_path / "out")[0] == cfg


def test_legacy_form_checkpoint_gives_the_same_logits(tmp_path):
    """The same model with transformers-4 keys: rope_theta + rope_scaling with `type`."""
    path = Path(shutil.copytree(FIXTURES / "hf_rope" / "llama_longrope_long", tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    block = config.pop("rope_parameters")
    config["rope_theta"] = block.pop("rope_theta")
    config["rope_scaling"] = {"type": block.pop("rope_type"), **block}
    (path / "config.json").write_text(json.dumps(config))
    cfg, params = load_hf_checkpoint(path)
    assert cfg == load_hf_checkpoint(FIXTURES / "hf_rope" / "llama_longrope_long")[0]
    expected = np.load(path / "expected.npz")
    logits = forward(params, jnp.asarray(expected["input_ids"]), cfg)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- config forms

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
        "original_max_position_embeddings": 2048}


@pytest.mark.parametrize("config, want", [
    ({"rope_parameters": YARN}, {}),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 2048}}, {}),
    # rope_scaling wins over rope_parameters; the block's rope_theta over the top-level one.
    ({"rope_scaling": YARN, "rope_parameters": {"rope_type": "linear", "factor": 2.0},
      "rope_theta": 5e5}, {}),
    # `rope_type` wins over the legacy `type`.
    ({"rope_parameters": {**YARN, "type": "linear"}}, {}),
    # original_max_position_embeddings defaults to max_position_embeddings...
    ({"rope_parameters": {k: v for k, v in YARN.items() if k[0] != "o"},
      "max_position_embeddings": 2048}, {}),
    # ... and a top-level one overrides the block's (transformers' Phi-3 priority).
    ({"rope_parameters": {**YARN, "original_max_position_embeddings": 99},
      "original_max_position_embeddings": 2048}, {}),
    # factor null: max_position_embeddings / original, kept as such.
    ({"rope_parameters": {**YARN, "factor": None}, "max_position_embeddings": 8192},
     {"factor": None, "max_position_embeddings": 8192}),
    # transformers reads `beta_fast or 32` and `if truncate:`.
    ({"rope_parameters": {**YARN, "beta_fast": 0, "beta_slow": None, "truncate": None}},
     {"truncate": False}),
    ({"rope_parameters": YARN, "partial_rotary_factor": 0.5}, {"partial_rotary_factor": 0.5}),
    # keys the type does not read are ignored, as transformers (which warns).
    ({"rope_parameters": {**YARN, "low_freq_factor": 3.0, "finetuned": True}}, {}),
])
def test_from_hf_forms(config, want):
    expected = RopeConfig(rope_type="yarn", theta=1e4, factor=4.0,
                          original_max_position_embeddings=2048)
    assert RopeConfig.from_hf(config) == dataclasses.replace(expected, **want)


def test_from_hf_defaults_and_round_trip():
    assert RopeConfig.from_hf({}) == RopeConfig()
    assert RopeConfig.from_hf({"rope_theta": 5e5, "rope_scaling": None}) == RopeConfig(theta=5e5)
    assert RopeConfig.from_hf({"rope_parameters": {"rope_type": "dynamic", "factor": 2},
                               "max_position_embeddings": 4096}) == RopeConfig(
        rope_type="dynamic", factor=2.0, max_position_embeddings=4096)
    for case in CASES.values():
        rope = RopeConfig.from_hf(case["config"])
        config = {"rope_parameters": rope.to_hf(),
                  "max_position_embeddings": case["config"]["max_position_embeddings"]}
        assert RopeConfig.from_hf(config) == rope
    assert RopeConfig(rope_type="yarn", original_max_position_embeddings=16,
                      max_position_embeddings=64).to_hf() == {
        "factor": None, "original_max_position_embeddings": 16, "rope_theta": 1e4,
        "rope_type": "yarn"}


def test_rope_config_is_hashable():
    rope = RopeConfig.from_hf(CASES["longrope@None"]["config"])
    assert isinstance(rope.short_factor, tuple) and hash(rope) == hash(dataclasses.replace(rope))


# ----------------------------------------------------------------------------- bad inputs

def lr(**kw):
    return {"rope_type": "longrope", "original_max_position_embeddings": 16, "factor": 2.0,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, **kw}


def l3(**kw):
    return {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, **kw}


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_type="xpos"), r"rope_type='xpos'; expected one of \['default', 'linear'"),
    (dict(theta=float("nan")), "theta=nan; expected a number > 1.0"),
    (dict(factor=2.0), r"factor=2.0 is not read by rope_type='default'; it is read by rope_type "
                       r"in \['linear', 'dynamic', 'yarn', 'longrope', 'llama3', 'proportional'\]"),
    (dict(rope_type="linear", factor=2.0, beta_fast=8.0), "beta_fast=8.0 is not read by"),
    (dict(rope_type="linear"), r"rope_type='linear' requires \['factor'\]"),
    (dict(rope_type="linear", factor=0.5), r"factor=0.5; expected a number >= 1.0 or None"),
    (dict(rope_type="linear", factor=True), "factor=True; expected a number"),
    (dict(rope_type="dynamic", factor=2.0), r"requires \['max_position_embeddings'\]"),
    (dict(rope_type="yarn", factor=2.0), r"requires \['original_max_position_embeddings'\]"),
    (dict(rope_type="yarn", original_max_position_embeddings=16),
     "factor=None; rope_type='yarn' requires factor, or max_position_embeddings"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16.0),
     "original_max_position_embeddings=16.0; expected a positive int"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16, beta_fast=1,
          beta_slow=2), "beta_fast=1.0 < beta_slow=2.0"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16, beta_slow=-1),
     "beta_slow=-1; expected a number > 0.0"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16,
          attention_factor=0.0), "attention_factor=0.0; expected a number > 0.0 or None"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16, mscale="1"),
     "mscale='1'; expected a number"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16, truncate=1),
     "truncate=1; expected a bool"),
    (lr(short_factor=None), r"requires \['short_factor'\]"),
    (lr(short_factor=[1.0, -1.0]), r"short_factor=\[1.0, -1.0\]; expected a non-empty sequence"),
    (lr(long_factor="abc"), "long_factor='abc'; expected a non-empty sequence"),
    (lr(long_factor=[2.0] * 3), "short_factor has 4 entries but long_factor has 3"),
    (l3(low_freq_factor=None), r"requires \['low_freq_factor'\]"),
    (l3(high_freq_factor=1.0), "high_freq_factor=1.0 <= low_freq_factor=1.0"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor=0.0; expected a number > 0.0"),
    (dict(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5; expected a number in \(0, 1\]"),
])
def test_rope_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)


@pytest.mark.parametrize("config, match", [
    ("yarn", "config=str; expected a config.json dict"),
    ({"rope_parameters": [1]}, r"rope_parameters=\[1\]; expected a JSON object or null"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0]}},
     "rope_type='su' is not supported .'su' is Phi-3's old name for 'longrope'"),
    ({"rope_parameters": {"rope_type": "xpos"}}, r"rope_type='xpos' is not supported; expected"),
    ({"rope_parameters": {"rope_type": None}}, "rope_type=None is not supported"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling lacks 'factor', which rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 16}},
     "rope_parameters lacks 'factor'"),
    ({"rope_parameters": {k: v for k, v in YARN.items() if k[0] != "o"}},
     "lacks 'original_max_position_embeddings'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     "lacks 'max_position_embeddings', which rope_type='dynamic' reads"),
    ({"rope_parameters": {**YARN, "factor": None}}, "reads when factor is null"),
    ({"rope_parameters": lr(short_factor=None)},
     r"requires \['short_factor'\]"),
    ({"rope_parameters": {k: v for k, v in lr().items() if k != "long_factor"}},
     "lacks 'long_factor'"),
    ({"rope_parameters": {k: v for k, v in l3().items() if k != "high_freq_factor"}},
     "lacks 'high_freq_factor'"),
    ({"rope_parameters": {"full_attention": YARN, "sliding_attention": {"rope_type": "default"}}},
     "nested per layer type"),
    ({"rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4]}}, "mrope_section"),
])
def test_from_hf_rejects(config, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig.from_hf(config)


def test_frequencies_and_apply_reject():
    rope = RopeConfig(**lr())
    with pytest.raises(ValueError, match="rope=.*expected a RopeConfig"):
        rope_frequencies({"rope_type": "default"}, 64)
    with pytest.raises(ValueError, match="head_dim=63; expected a positive even int"):
        rope_frequencies(RopeConfig(), 63)
    with pytest.raises(ValueError, match="gives rotary_dim=3; expected an even rotary_dim"):
        rope_frequencies(RopeConfig(partial_rotary_factor=0.5), 6)
    with pytest.raises(ValueError, match=r"short_factor has 4 entries; expected rotary_dim // 2 "
                                         r"= 8"):
        rope_frequencies(rope, 16)
    with pytest.raises(ValueError, match=r"seq_len has shape \(2,\); expected a scalar"):
        rope_frequencies(rope, 8, jnp.array([3, 4]))
    x, positions = jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"inv_freq has shape \(5,\) but x has head_dim 8"):
        apply_rope(x, positions, jnp.ones(5))
    with pytest.raises(ValueError, match="layout='gptj'; expected one of"):
        apply_rope(x, positions, jnp.ones(4), layout="gptj")


def test_checkpoint_rope_errors(tmp_path):
    path = Path(shutil.copytree(FIXTURES / "hf_rope" / "llama_yarn", tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    for change, match in [({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not "
                                                           "supported for llama"),
                          ({"rope_parameters": {"rope_type": "longrope"}},
                           "RoPE config: rope_parameters lacks 'short_factor'")]:
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match) as info:
            load_hf_checkpoint(path)
        assert "config.json" in str(info.value)
    cfg, params = load_hf_checkpoint(FIXTURES / "hf_rope" / "llama_dynamic")
    # config.json has one max_position_embeddings, read by the rope too: a config that disagrees
    # cannot even be built, so it can never be exported.
    with pytest.raises(ValueError, match="rope.max_position_embeddings=16 differs from "
                                         "max_position_embeddings=32"):
        dataclasses.replace(cfg, max_position_embeddings=32)


# ----------------------------------------------------------------------------- precision

def test_bf16_angles_lose_long_positions_float32_keeps_them():
    """Issue 6 item 6. At 100k, bf16 steps by 512: 64 consecutive positions collapse to one or
    two values, and RoPE computed in bf16 rotates them all alike; lcm's float32 angles do not."""
    positions = 100_000 + np.arange(64)
    assert len(np.unique(positions.astype(ml_dtypes.bfloat16))) <= 2
    inv_freq, _ = rope_frequencies(RopeConfig(theta=5e5), 128)
    x = jax.random.normal(jax.random.key(0), (1, 64, 2, 128), jnp.float32).astype(jnp.bfloat16)

    def rotate64(angles):  # exact rotate-half in float64
        xf = np.asarray(x, np.float64)
        c, s = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
        x1, x2 = xf[..., :64], xf[..., 64:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    want = rotate64(positions[:, None] * np.asarray(inv_freq, np.float64))
    got = np.asarray(apply_rope(x, jnp.asarray(positions)[None], inv_freq), np.float64)
    # Everything computed in bf16: positions, frequencies, angles.
    bf16 = jnp.asarray(positions, jnp.bfloat16)[:, None] * inv_freq.astype(jnp.bfloat16)[None]
    naive = rotate64(np.asarray(bf16, np.float64))
    err_lcm, err_naive = np.abs(got - want).max(), np.abs(naive - want).max()
    assert err_lcm < 0.05, err_lcm  # bf16 rounding of the output (|x| <= 5, 2^-8 relative)
    assert err_naive > 1.0, err_naive  # angles off by hundreds of radians
    # Neighbouring tokens: bf16 gives them the very same angles; float32 does not.
    assert np.array_equal(np.asarray(bf16[0]), np.asarray(bf16[1]))
    f32 = positions.astype(np.float32)[:, None] * np.asarray(inv_freq)
    assert np.all(f32[1] != f32[0])
