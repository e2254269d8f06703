"""Hugging Face checkpoint import/export, against the transformers-written fixtures/hf/."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcm.config import ModelConfig, RopeConfig
from lcm.io import load_hf_checkpoint, save_hf_checkpoint
from lcm.model import forward, param_shapes

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"
NAMES = ["llama", "qwen2", "mistral", "llama_sharded"]
# Made by make_hf_family_fixtures.py: one feature set each (see its docstring).
FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "ministral"]
# config.json keys whose values lcm cannot know (no tokenizer, no init, no transformers).
UNKNOWABLE = {"bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
              "max_window_layers", "transformers_version"}


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read with safetensors alone."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def small_cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=48, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=40, qkv_bias=arch == "qwen2",
                       sliding_window=5 if arch == "mistral" else None, architecture=arch,
                       rope=RopeConfig(theta=5e5), **kw)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Params shaped like init_params' (numpy's RNG: jax.random compiles for seconds on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                        param_shapes(cfg))


@pytest.fixture
def copy_of(tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    return copy


def edit_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(file: Path, fn):
    tensors = dict(load_file(file))
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- loading fixtures

@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads(name):
    cfg, params = load_hf_checkpoint(FIXTURES / name)
    assert cfg.architecture == name.split("_")[0]
    assert cfg.tie_embeddings == (name == "qwen2") and cfg.qkv_bias == (name == "qwen2")
    assert cfg.sliding_window == (8 if name == "mistral" else None)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    want = jax.tree.map(lambda s: (s.shape, jnp.float32), param_shapes(cfg))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == want


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_layout_follows_hf(name):
    """Heads split out of HF's [out, in] weights: wq[l, e, h, d] == q_proj[h * D + d, e]."""
    cfg, params = load_hf_checkpoint(FIXTURES / name)
    raw, layers, D = hf_tensors(FIXTURES / name), params["layers"], cfg.head_dim
    q = raw["model.layers.1.self_attn.q_proj.weight"]
    o = raw["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(layers["wq"][1, 5, 3, 7], q[3 * D + 7, 5])
    np.testing.assert_array_equal(layers["wo"][1, 2, 9, 11], o[11, 2 * D + 9])
    np.testing.assert_array_equal(layers["w_down"][1], raw["model.layers.1.mlp.down_proj.weight"].T)
    if name == "qwen2":
        bk = raw["model.layers.0.self_attn.k_proj.bias"]
        np.testing.assert_array_equal(layers["bk"][0, 1, 4], bk[D + 4])
    else:
        np.testing.assert_array_equal(params["lm_head"], raw["lm_head.weight"].T)


@pytest.mark.parametrize("name", NAMES + FAMILIES + ["gemma3_mm"])
def test_forward_matches_transformers(name):
    cfg, params = load_hf_checkpoint(FIXTURES / name)
    expected = np.load(FIXTURES / name / "expected.npz")
    logits = forward(params, jnp.asarray(expected["input_ids"]), cfg)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stored, dtype", [(ml_dtypes.bfloat16, jnp.float32),
                                           (ml_dtypes.bfloat16, jnp.bfloat16),
                                           (np.float16, jnp.float32), (np.float16, jnp.float16)])
def test_half_precision_files_load(copy_of, stored, dtype):
    path = copy_of("llama")
    edit_tensors(path / "model.safetensors",
                 lambda t: t.update({k: v.astype(stored) for k, v in t.items()}))
    cfg, params = load_hf_checkpoint(path, dtype=dtype)
    assert cfg.param_dtype == jnp.dtype(dtype).name
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    raw = load_file(FIXTURES / "llama" / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(params["embed"], raw.astype(stored).astype(dtype))


def test_legacy_config_keys(copy_of):
    """transformers 4.x wrote `rope_theta` at the top level, `rope_scaling: null`, `torch_dtype`."""
    path = copy_of("llama")
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"], config["head_dim"], config["dtype"]
    config.update(rope_theta=5e5, rope_scaling=None, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config))
    cfg, _ = load_hf_checkpoint(path)
    assert cfg.rope.theta == 5e5 and cfg.head_dim == 16  # head_dim: hidden_size // heads
    edit_config(path, num_key_value_heads=None)  # defaults to num_attention_heads=4; the file has 2
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' in model."
                                         r"safetensors has shape \[32, 64\]; expected \[64, 64\]"):
        load_hf_checkpoint(path)


def test_rotary_inv_freq_buffers_are_ignored(copy_of):
    """Old Llama checkpoints carry `rotary_emb.inv_freq`; it is derived from the config."""
    path = copy_of("llama")
    edit_tensors(path / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    assert_trees_equal(load_hf_checkpoint(path)[1], load_hf_checkpoint(FIXTURES / "llama")[1])


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("name", NAMES + FAMILIES)
def test_export_matches_transformers_files(tmp_path, name):
    """Re-exporting a fixture gives transformers' own tensors, bit for bit, and its config keys."""
    cfg, params = load_hf_checkpoint(FIXTURES / name)
    out = tmp_path / "export"
    save_hf_checkpoint(out, cfg, params)
    want, got = hf_tensors(FIXTURES / name), hf_tensors(out)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    want_cfg = json.loads((FIXTURES / name / "config.json").read_text())
    got_cfg = json.loads((out / "config.json").read_text())
    assert set(got_cfg) == set(want_cfg) - {"transformers_version"}
    # Types too: transformers' configs refuse 256.0 where they declare an int.
    assert {k: (v, type(v)) for k, v in got_cfg.items() if k not in UNKNOWABLE} == \
        {k: (v, type(v)) for k, v in want_cfg.items() if k not in UNKNOWABLE}
    cfg2, params2 = load_hf_checkpoint(out)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_params_round_trip(tmp_path, arch, dtype):
    cfg = small_cfg(arch, tie_embeddings=arch != "llama", dtype=dtype, param_dtype=dtype)
    params = random_params(cfg)
    save_hf_checkpoint(tmp_path / "ckpt", cfg, params)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == dtype
    cfg2, params2 = load_hf_checkpoint(tmp_path / "ckpt", dtype=dtype)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_sharded_export(tmp_path):
    cfg, params = load_hf_checkpoint(FIXTURES / "llama_sharded")
    out = tmp_path / "sharded"
    save_hf_checkpoint(out, cfg, params, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # transformers' max_shard_size="100KB" is 100_000 bytes: it split the same tensors the same way.
    want = json.loads((FIXTURES / "llama_sharded" / "model.safetensors.index.json").read_text())
    assert index == want
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    assert all((out / s).stat().st_size <= 100_000 + 4096 for s in shards)  # + header
    _, params2 = load_hf_checkpoint(out)
    assert_trees_equal(params2, params)
    # Everything within one shard: a plain model.safetensors, as transformers writes it.
    save_hf_checkpoint(tmp_path / "one", cfg, params, max_shard_bytes=10**9)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["config.json", "model.safetensors"]


def test_export_refuses_existing_path_unless_overwrite(tmp_path):
    cfg, params = load_hf_checkpoint(FIXTURES / "qwen2")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        save_hf_checkpoint(out, cfg, params)
    assert (out / "stale.txt").exists()
    save_hf_checkpoint(out, cfg, params, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    assert_trees_equal(load_hf_checkpoint(out)[1], params)


def test_failed_export_leaves_nothing(tmp_path):
    cfg, params = load_hf_checkpoint(FIXTURES / "llama")
    params["layers"]["wq"] = params["layers"]["wq"][:, :, :2]
    with pytest.raises(ValueError, match=r"\('layers', 'wq'\) has shape \[2, 64, 2, 16\]"):
        save_hf_checkpoint(tmp_path / "ckpt", cfg, params)
    del params["lm_head"]
    with pytest.raises(ValueError, match=r"missing \[\('lm_head',\)\]"):
        save_hf_checkpoint(tmp_path / "ckpt", cfg, params)
    _, params = load_hf_checkpoint(FIXTURES / "llama")
    with pytest.raises(ValueError, match="qkv_bias=False cannot be exported as "
                                         "architecture='qwen2'"):
        save_hf_checkpoint(tmp_path / "ckpt", dataclasses.replace(cfg, architecture="qwen2"),
                           params)
    with pytest.raises(ValueError, match="sliding_window=4 cannot be exported"):
        save_hf_checkpoint(tmp_path / "ckpt", dataclasses.replace(cfg, sliding_window=4), params)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad checkpoints

def test_missing_tensor(copy_of):
    path = copy_of("llama")
    edit_tensors(path / "model.safetensors", lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"),
                                                        t.pop("model.norm.weight")))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight', "
                                         r"'model.norm.weight'\]"):
        load_hf_checkpoint(path)


def test_unexpected_tensor(copy_of):
    path = copy_of("mistral")
    bias = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(path / "model.safetensors", lambda t: t.update({bias: np.zeros(64, np.float32)}))
    with pytest.raises(ValueError, match=rf"unexpected tensors \['{bias}'\]"):
        load_hf_checkpoint(path)


def test_shape_mismatch(copy_of):
    path = copy_of("qwen2")
    bias = "model.layers.1.self_attn.v_proj.bias"
    edit_tensors(path / "model.safetensors", lambda t: t.update({bias: np.zeros(48, np.float32)}))
    with pytest.raises(ValueError, match=rf"'{bias}' in model.safetensors has shape \[48\]; "
                                         r"expected \[32\]"):
        load_hf_checkpoint(path)


def test_tied_lm_head_must_equal_embedding(copy_of):
    path = copy_of("qwen2")
    embed = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    edit_tensors(path / "model.safetensors", lambda t: t.update({"lm_head.weight": embed.copy()}))
    load_hf_checkpoint(path)  # a redundant copy of the embedding is fine
    edit_tensors(path / "model.safetensors", lambda t: t.update({"lm_head.weight": embed + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-100], "the file is truncated"),
    (lambda b: b[:5], "too short for a safetensors file"),
    (lambda b: struct.pack("<Q", 10**7) + b[8:], "header length 10000000 does not fit"),
    (lambda b: b[:8] + b"X" + b[9:], "corrupt safetensors header"),
    (lambda b: b.replace(b'"shape":[64,64]', b'"shape":[64,65]', 1), "do not match its shape"),
    (lambda b: b + b"\0" * 16, "safetensors could not read it"),  # caught by safetensors itself
])
def test_damaged_file(copy_of, damage, message):
    path = copy_of("llama")
    file = path / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_hf_checkpoint(path)
    assert "model.safetensors" in str(info.value)


def test_missing_shard(copy_of):
    path = copy_of("llama_sharded")
    (path / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(ValueError, match=r"names shard files that do not exist: "
                                         r"\['model-00003-of-00005.safetensors'\]"):
        load_hf_checkpoint(path)


def test_index_disagrees_with_shards(copy_of):
    path = copy_of("llama_sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map disagrees .* \['model.norm.weight'\]"):
        load_hf_checkpoint(path)


def test_missing_files(copy_of, tmp_path):
    path = copy_of("llama")
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_checkpoint(path)
    path = copy_of("mistral")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor "
                                         "model.safetensors.index.json"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), r"model_type='gpt2' is not supported; expected one of \['gemma2', "
                              r"'gemma3_text', 'llama', 'ministral', 'mistral', 'phi3', 'qwen2', "
                              r"'qwen3'\]"),
    (dict(rope_parameters={"rope_type": "xpos", "rope_theta": 1e4}),
     "rope_type='xpos' is not supported"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling lacks 'factor'"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(num_local_experts=8), "mixture-of-experts layers are not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_attention_heads=3), "num_heads=3 must be a multiple of num_kv_heads=2"),
    (dict(vocab_size=None), r"lacks \['vocab_size'\]"),
    (dict(num_attention_heads=0), "num_attention_heads=0; expected a positive int"),
])
def test_unsupported_config(copy_of, changes, message):
    path = copy_of("llama")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message) as info:
        load_hf_checkpoint(path)
    assert "config.json" in str(info.value)


def test_unsupported_layer_type_is_refused(copy_of):
    path = copy_of("qwen2")
    edit_config(path, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match=r"layer_types holds \['chunked_attention'\]"):
        load_hf_checkpoint(path)


def test_qwen2_sliding_window_windows_the_top_layers(copy_of):
    path = copy_of("qwen2")
    edit_config(path, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                layer_types=None)
    cfg, _ = load_hf_checkpoint(path)
    assert cfg.layer_types == ("full_attention", "sliding_attention")
    assert [k.window for k in cfg.layer_kinds] == [None, 8]


def test_bad_dtype_argument():
    with pytest.raises(ValueError, match=r"dtype=.*int32.*expected one of"):
        load_hf_checkpoint(FIXTURES / "llama", dtype=jnp.int32)
