"""Hugging Face checkpoints (config.json + safetensors) <-> lcm params: Llama, Qwen2, Qwen3,
Mistral, Ministral, Gemma 2, Gemma 3 (text, and the text tower of a multimodal checkpoint) and
Phi-3 (see `lcm.io.hf_config` for what each family reads).

A directory holds `config.json` and either `model.safetensors` or `model.safetensors.index.json`
naming its shards. HF linear weights are stored `[out, in]` (the layer computes `x @ W.T`); lcm
keeps inputs first and splits heads out (`wq [E, H, D]`, `wo [H, D, E]`), and stacks the
per-layer weights on a leading `layers` axis (see `lcm.model.params`). No torch is needed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors.numpy import save_file

from lcm.checks import check_int
from lcm.config import ModelConfig
from lcm.config import dtype_name as config_dtype_name
from lcm.io.hf_config import config_from_hf, config_to_hf
from lcm.model.params import flatten_params, param_specs, unflatten_params

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # the float dtypes weights may have
_FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")
# Old Llama checkpoints saved RoPE's inverse frequencies as buffers: derived values, not weights.
_IGNORED_SUFFIX = ".rotary_emb.inv_freq"

# An HF tensor is one or more lcm tensors ("parts"; Phi-3 fuses q/k/v and gate/up), each
# (lcm key, kind). kind: "same" keeps the shape; "flat" flattens the heads (biases); an int n
# marks a linear weight whose first n lcm dims are its inputs, stored by HF as
# [prod(out dims), prod(in dims)]. Fused parts are concatenated along HF's first axis.
_GEMMA_NORMS = (("attn_norm", "input_layernorm.weight"),
                ("post_attn_norm", "post_attention_layernorm.weight"),
                ("mlp_norm", "pre_feedforward_layernorm.weight"),
                ("post_mlp_norm", "post_feedforward_layernorm.weight"))
_NORMS = (("attn_norm", "input_layernorm.weight"), ("mlp_norm", "post_attention_layernorm.weight"))
# Prefixes of a Gemma 3 multimodal checkpoint's text tower (transformers 5, then 4.x names), and
# of the tensors of its other towers, which loading its text model skips.
_TEXT_TOWERS = ("model.language_model.", "language_model.model.")
_OTHER_TOWERS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector.")


def _layer_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[tuple[str, object], ...]]]:
    """(HF name inside a layer, parts) in the order of HF's modules (save_pretrained shards in
    that order); the parts whose lcm key `cfg` lacks are left out."""
    fused = cfg.architecture == "phi3"
    attn = ([("self_attn.qkv_proj.weight", (("wq", 1), ("wk", 1), ("wv", 1)))] if fused else
            [("self_attn.q_proj.weight", (("wq", 1),)), ("self_attn.k_proj.weight", (("wk", 1),)),
             ("self_attn.v_proj.weight", (("wv", 1),))])
    attn += [("self_attn.q_proj.bias", (("bq", "flat"),)),
             ("self_attn.k_proj.bias", (("bk", "flat"),)),
             ("self_attn.v_proj.bias", (("bv", "flat"),)),
             ("self_attn.o_proj.weight", (("wo", 2),)),
             ("self_attn.o_proj.bias", (("bo", "same"),)),
             ("self_attn.q_norm.weight", (("q_norm", "same"),)),
             ("self_attn.k_norm.weight", (("k_norm", "same"),))]
    ffn = ([("mlp.gate_up_proj.weight", (("w_gate", 1), ("w_up", 1)))] if fused else
           [("mlp.gate_proj.weight", (("w_gate", 1),)), ("mlp.up_proj.weight", (("w_up", 1),))])
    ffn += [("mlp.down_proj.weight", (("w_down", 1),))]
    norms = [(name, ((key, "same"),)) for key, name in (_GEMMA_NORMS if cfg.post_norms else _NORMS)]
    return attn + ffn + norms


# ----------------------------------------------------------------------------- tensor layout

def stored_shape(shape: tuple[int, ...], kind) -> tuple[int, ...]:
    """The shape a checkpoint stores an lcm tensor of `shape` in ("same", "flat" or the int of
    a linear weight's input dims: [prod(out dims), prod(in dims)]); HF and GGUF alike."""
    if kind == "same":
        return shape
    if kind == "flat":
        return (math.prod(shape),)
    return (math.prod(shape[kind:]), math.prod(shape[:kind]))


def fused_shape(parts) -> tuple[int, ...]:
    """The stored shape of a checkpoint tensor made of `parts` [(key, layer, lcm shape, kind)],
    stacked along its first axis (fused projections)."""
    shapes = [stored_shape(shape, kind) for _, _, shape, kind in parts]
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def _to_lcm(x: np.ndarray, shape: tuple[int, ...], kind) -> np.ndarray:
    return x.T.reshape(shape) if isinstance(kind, int) else x.reshape(shape)


def _to_hf(x: np.ndarray, kind) -> np.ndarray:
    if isinstance(kind, int):
        x = x.reshape(math.prod(x.shape[:kind]), -1).T
    return np.ascontiguousarray(x.reshape(-1) if kind == "flat" else x)


def _layout(cfg: ModelConfig, prefix: str = "model.", head: str = "lm_head.weight") -> dict:
    """HF name -> its parts [(lcm key path, layer index or None, lcm shape of the slice, kind)],
    in HF order. prefix: where the decoder's tensors sit; head: the LM head's name."""
    specs = param_specs(cfg)
    out = {f"{prefix}embed_tokens.weight": [(("embed",), None, specs["embed"].shape, "same")]}
    for i in range(cfg.num_layers):
        for name, parts in _layer_tensors(cfg):
            have = [(key, kind) for key, kind in parts if key in specs["layers"]]
            if have:
                out[f"{prefix}layers.{i}.{name}"] = [
                    (("layers", key), i, specs["layers"][key].shape[1:], kind)
                    for key, kind in have]
    out[f"{prefix}norm.weight"] = [(("final_norm",), None, specs["final_norm"].shape, "same")]
    if "lm_head" in specs:
        out[head] = [(("lm_head",), None, specs["lm_head"].shape, 1)]
    return out


# ----------------------------------------------------------------------------- safetensors files

def _read_header(file: Path) -> dict:
    """Checks a safetensors file's framing before any data is read: name -> shape."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file}: {size} bytes is too short for a safetensors file; the file "
                             f"is truncated")
        (header_len,) = struct.unpack("<Q", prefix)  # little-endian u64, then that much JSON
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file}: header length {header_len} does not fit in the file "
                             f"({size} bytes); the file is truncated or corrupt")
        raw = f.read(header_len)
    try:
        entries = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"]))
                   for k, v in json.loads(raw).items() if k != "__metadata__"}
        if not all(all(isinstance(n, int) and n >= 0 for n in shape + offsets) and len(offsets) == 2
                   for _, shape, offsets in entries.values()):
            raise ValueError("shapes and data_offsets must be lists of non-negative ints")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: corrupt safetensors header ({e})") from e
    end = 0
    for name, (dtype, shape, (begin, stop)) in entries.items():
        if dtype not in _ITEMSIZE:
            raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; expected one of "
                             f"{sorted(_ITEMSIZE)}")
        if begin > stop or stop - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"{file}: tensor {name!r} has data_offsets {[begin, stop]} that do "
                             f"not match its shape {list(shape)} and dtype {dtype}; corrupt header")
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise ValueError(f"{file}: data ends at byte {8 + header_len + end} but the file has "
                         f"{size} bytes; the file is truncated")
    return {name: shape for name, (_, shape, _) in entries.items()}


def _read_headers(path: Path) -> dict:
    """Finds and checks the safetensors files of a checkpoint: HF name -> (file, shape).

    transformers prefers `model.safetensors` to an index when both exist; so does this.
    """
    index, weight_map = path / _INDEX, None
    if (path / _SINGLE).is_file():
        files = [_SINGLE]
    elif not index.is_file():
        raise ValueError(f"{path}: neither {_SINGLE} nor {_INDEX} found")
    else:
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        if bad := [f for f in files if not isinstance(f, str) or Path(f).name != f]:
            raise ValueError(f"{index}: shard names must be plain file names; got {bad}")
        if missing := [f for f in files if not (path / f).is_file()]:
            raise ValueError(f"{index}: names shard files that do not exist: {missing}")
    found = {}
    for file in files:
        for name, shape in _read_header(path / file).items():
            if name in found:
                raise ValueError(f"{path}: tensor {name!r} is in both {found[name][0].name} and "
                                 f"{file}")
            found[name] = (path / file, shape)
    if weight_map is not None:
        where = {name: file.name for name, (file, _) in found.items()}
        names = set(where) | set(weight_map)
        if wrong := sorted(n for n in names if where.get(n) != weight_map.get(n)):
            raise ValueError(f"{index}: weight_map disagrees with the shards' contents for {wrong}")
    return found


def _check_tensors(found: dict, expected: dict, optional: dict) -> None:
    """Raises one ValueError listing every missing, unexpected and misshapen tensor."""
    allowed = expected | optional
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing tensors {missing}")
    if extra := sorted(n for n in set(found) - set(allowed) if not n.endswith(_IGNORED_SUFFIX)):
        problems.append(f"unexpected tensors {extra}")
    for name, (file, shape) in sorted(found.items()):
        if name in allowed and shape != allowed[name]:
            problems.append(f"tensor {name!r} in {file.name} has shape {list(shape)}; expected "
                            f"{list(allowed[name])}")
    if problems:
        raise ValueError("checkpoint does not match its config.json: " + "; ".join(problems))


# ----------------------------------------------------------------------------- public API

def load_hf_checkpoint(path, *, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Reads a checkpoint directory of a supported family (module docstring) into `(cfg, params)`.

    Params follow `lcm.model.params.param_specs(cfg)`, cast to `dtype` (cfg.dtype and
    cfg.param_dtype are set to it). Headers, names and shapes are all checked before any data is
    read, and nothing is returned until every tensor is in place.
    """
    dtype_name = config_dtype_name(dtype)
    path = Path(path)
    if not (path / _CONFIG).is_file():
        raise ValueError(f"{path}: no {_CONFIG}; expected a transformers checkpoint directory")
    try:
        hf = json.loads((path / _CONFIG).read_text())
    except ValueError as e:
        raise ValueError(f"{path / _CONFIG}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path / _CONFIG}: expected a JSON object, got {type(hf).__name__}")
    cfg = config_from_hf(hf, path / _CONFIG, dtype_name)

    found = _read_headers(path)
    prefix, head = "model.", "lm_head.weight"
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # a multimodal checkpoint
        prefix = next((p for p in _TEXT_TOWERS if f"{p}embed_tokens.weight" in found), prefix)
        head = "language_model.lm_head.weight" if prefix == _TEXT_TOWERS[1] else head
        found = {n: v for n, v in found.items() if not n.startswith(_OTHER_TOWERS)}
    layout = _layout(cfg, prefix, head)
    # A tied checkpoint may still carry lm_head.weight; it must then equal the embedding.
    tied = {head: (cfg.vocab_size, cfg.hidden_size)} if cfg.tie_embeddings else {}
    _check_tensors(found, {n: fused_shape(parts) for n, parts in layout.items()}, tied)

    np_dtype = jnp.dtype(dtype_name)
    specs = flatten_params(param_specs(cfg))
    host = {k: np.empty(spec.shape, np_dtype) for k, spec in specs.items()}
    tied_head = None
    for file in sorted({file for file, _ in found.values()}):
        try:
            # Recent safetensors (0.8 here) give BF16 to numpy as ml_dtypes.bfloat16.
            with safetensors.safe_open(file, framework="np") as f:
                for name in f.keys():
                    if name in tied:
                        tied_head = f.get_tensor(name)
                    elif name in layout:
                        value, row = f.get_tensor(name), 0
                        for key, layer, shape, kind in layout[name]:
                            rows = stored_shape(shape, kind)[0]
                            part = _to_lcm(value[row:row + rows], shape, kind)
                            host[key][... if layer is None else layer] = part  # casts
                            row += rows
        except (safetensors.SafetensorError, TypeError) as e:  # TypeError: an old safetensors
            raise ValueError(f"{file}: safetensors could not read it ({e})") from e
    if tied_head is not None and not np.array_equal(tied_head.astype(np_dtype), host["embed",]):
        raise ValueError(f"{path}: tie_word_embeddings=true but lm_head.weight differs from "
                         f"model.embed_tokens.weight; drop lm_head.weight or untie the config")
    return cfg, unflatten_params({k: jnp.asarray(v) for k, v in host.items()})


def save_hf_checkpoint(path, cfg: ModelConfig, params: dict, *, max_shard_bytes: int | None = None,
                       overwrite: bool = False) -> None:
    """Writes `params` as a transformers checkpoint directory at `path` (config.json + safetensors).

    Tensors keep the params' dtype. With `max_shard_bytes`, tensors go to
    `model-0000i-of-0000n.safetensors` shards of at most that many bytes (a larger tensor gets a
    shard of its own) plus `model.safetensors.index.json`; a checkpoint that fits in one shard is a
    plain `model.safetensors`, as transformers does. The directory is written beside `path` and
    renamed into place, so a crash never leaves a half-written checkpoint at `path`.
    """
    path = Path(path)
    if max_shard_bytes is not None:
        check_int(None, "max_shard_bytes", max_shard_bytes, 1)
        max_shard_bytes = int(max_shard_bytes)
    if path.exists() and not overwrite:
        raise ValueError(f"path={str(path)!r} exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"path={str(path)!r} is a file, not a checkpoint directory; remove it")
    host = _host_params(cfg, params)
    config = config_to_hf(cfg, host["embed",].dtype.name)

    layout = _layout(cfg)
    sizes = {name: sum(math.prod(shape) * host[key].dtype.itemsize for key, _, shape, _ in parts)
             for name, parts in layout.items()}
    shards, filled = [[]], 0
    for name in layout:
        if max_shard_bytes is not None and shards[-1] and filled + sizes[name] > max_shard_bytes:
            shards, filled = shards + [[]], 0
        shards[-1].append(name)
        filled += sizes[name]
    files = ([_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(path, "tmp")
    try:
        (tmp / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                tensors[name] = np.concatenate([
                    _to_hf(host[key] if layer is None else host[key][layer], kind)
                    for key, layer, _, kind in layout[name]])
            # transformers refuses safetensors files whose metadata lacks a known "format".
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            # safetensors creates 0o600 files; give them the umask's mode, as mkdir gave `tmp`.
            os.chmod(tmp / file, tmp.stat().st_mode & 0o666)
        if len(files) > 1:
            count = sum(math.prod(shape) for parts in layout.values() for _, _, shape, _ in parts)
            index = {"metadata": {"total_parameters": count, "total_size": sum(sizes.values())},
                     "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for entry in [*tmp.iterdir(), tmp]:  # on disk before the rename makes them visible
            fd = os.open(entry, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- helpers

def _host_params(cfg: ModelConfig, params) -> dict:
    """Checks `params` against `cfg`; returns them flat, as host numpy arrays."""
    if not isinstance(params, dict):
        raise ValueError(f"params is a {type(params).__name__}; expected the dict of init_params")
    want = {k: spec.shape for k, spec in flatten_params(param_specs(cfg)).items()}
    got = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    problems = []
    if missing := sorted(set(want) - set(got)):
        problems.append(f"missing {missing}")
    if extra := sorted(set(got) - set(want)):
        problems.append(f"unexpected {extra}")
    for key in sorted(set(want) & set(got)):
        if got[key].shape != want[key]:
            problems.append(f"{key} has shape {list(got[key].shape)}; expected {list(want[key])}")
        if got[key].dtype.name not in _FLOAT_NAMES:
            problems.append(f"{key} has dtype {got[key].dtype}; expected one of "
                            f"{list(_FLOAT_NAMES)}")
    if problems:
        raise ValueError("params do not match cfg: " + "; ".join(problems))
    return got


def _fresh_dir(path: Path, tag: str) -> Path:
    """A new hidden directory beside `path`; mkdir (unlike mkdtemp's 0o700) honours the umask."""
    fresh = path.parent / f".{path.name}.{tag}-{secrets.token_hex(6)}"
    fresh.mkdir()
    return fresh


def _replace_dir(tmp: Path, path: Path) -> None:
    """Renames the finished `tmp` to `path`; an old `path` is moved aside first, then deleted."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = _fresh_dir(path, "old")
    os.rename(path, old / "checkpoint")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old / "checkpoint", path)  # put the old checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
